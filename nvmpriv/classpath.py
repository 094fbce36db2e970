"""Build objects from ``class_path`` strings and the LightningCLI ``{class_path, init_args}`` form.

Shared by the tools that rebuild parts of a run outside LightningCLI (export, black-box attack)
so that an unknown class path is one clear error everywhere. No torch import of its own.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_object", "instantiate"]


def import_object(class_path: str, *, what: str = "class_path") -> Any:
    """Import ``package.module.Name``.

    Args:
        class_path: Dotted path of a class or function.
        what: How the caller names the field, for the error message.

    Returns:
        The imported object.

    Raises:
        ValueError: The module or the name cannot be imported.
    """
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"{what} {class_path!r} cannot be imported ({exc}); give a dotted path such as "
            "nvmpriv.nets.ColumnFC"
        ) from None


def instantiate(spec: Any, **overrides: Any) -> Any:
    """Build ``{class_path, init_args}`` recursively (lists and plain mappings are walked).

    Args:
        spec: A LightningCLI-style specification, or any YAML value.
        **overrides: Extra keyword arguments for the outermost class.

    Returns:
        The built object (or the value itself when it is not a specification).

    Raises:
        ValueError: An unknown class path.
    """
    if isinstance(spec, dict) and "class_path" in spec:
        target = import_object(spec["class_path"])
        kwargs = {k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()}
        return target(**(kwargs | overrides))
    if isinstance(spec, dict):
        return {k: instantiate(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec
