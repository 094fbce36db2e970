"""Reading the user's YAML files with one-line errors and YAML 1.2 floats.

PyYAML follows YAML 1.1, where ``1e-5`` (no dot, no exponent sign) is a string, so a crossbar file
with ``g_max: 1e-5`` would fail as "not a number". The loader here also reads such scientific
notation as floats, as YAML 1.2 and jsonargparse (LightningCLI's configs) do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["read_yaml"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also resolves ``1e-5``-style scalars as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)
        |[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path: str | Path, what: str) -> Any:
    """Parse a YAML file, naming the file and the fix on any problem.

    Args:
        path: The file.
        what: How the user gave it, for the message (e.g. ``"--config"``).

    Returns:
        The parsed document (``None`` for an empty file).

    Raises:
        ValueError: If the file is missing, a folder, not text, or not valid YAML.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} {p} not found; check the path")
    if p.is_dir():
        raise ValueError(f"{what} {p} is a folder; give a YAML file")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{what} {p} is not a text file; give a YAML file") from None
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(
            f"{what} {p} is not valid YAML{where}: {problem}; fix the syntax"
        ) from None
