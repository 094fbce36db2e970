"""Reading the user's YAML files with one-line errors and YAML 1.2 floats.

PyYAML follows YAML 1.1, where ``1e-5`` (no dot, no exponent sign) is a string, so a crossbar file
with ``g_max: 1e-5`` would fail as "not a number". The loader here also reads such scientific
notation as floats, as YAML 1.2 and jsonargparse (LightningCLI's configs) do.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["parse_override", "read_yaml", "set_dotted"]


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


def parse_override(item: str, option: str, *, example: str) -> tuple[str, Any]:
    """Split a command-line ``KEY=VALUE`` override; the value is read as YAML (1.2 floats).

    Args:
        item: The word, e.g. ``data.init_args.root=/data``.
        option: The option that gave it, for the message (e.g. ``"--set"``).
        example: A valid override shown in the message.

    Returns:
        ``(dotted key, value)``.

    Raises:
        ValueError: No ``=``, an empty key, or a value that is not valid YAML.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{option} {item!r}: expected KEY=VALUE, e.g. {example}")
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError:
        raise ValueError(
            f"{option} {item!r}: the value is not valid YAML; quote it, e.g. {key}='...'"
        ) from None
    return key, value


def set_dotted(config: dict[str, Any], path: str, value: Any) -> None:
    """Set ``config[a][b][c] = value`` for ``path = "a.b.c"``, creating mappings as needed.

    A numeric part indexes a list (``trainer.callbacks.0.init_args.monitor``).

    Args:
        config: The nested config (modified in place).
        path: Dotted path.
        value: New value (deep-copied).

    Raises:
        ValueError: A part of the path crosses a scalar or a list index is out of range.
    """
    parts = path.split(".")
    node: Any = config
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(
                    f"override {path!r}: {'.'.join(parts[:i]) or 'config'} is a list of "
                    f"{len(node)}; use an index 0..{len(node) - 1}"
                )
            if last:
                node[int(part)] = copy.deepcopy(value)
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ValueError(
                f"override {path!r}: {'.'.join(parts[:i])} is a {type(node).__name__}, "
                "not a mapping; check the path against --print_config"
            )
        if last:
            node[part] = copy.deepcopy(value)
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
