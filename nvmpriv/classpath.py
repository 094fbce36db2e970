"""Build objects from ``class_path`` strings and the LightningCLI ``{class_path, init_args}`` form.

Shared by the tools that rebuild parts of a run outside LightningCLI (export, black-box attack)
so that an unknown class path is one clear error everywhere. No torch import of its own.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from typing import Any

__all__ = ["SHORT_NAME_PACKAGES", "check_spec", "import_object", "instantiate"]

_UnionType = type(int | None)


#: Where a bare class name (``class_path: StandardTraining``) is looked up, as LightningCLI
#: resolves the subclasses it knows.
SHORT_NAME_PACKAGES = (
    "nvmpriv.methods",
    "nvmpriv.data",
    "nvmpriv.nets",
    "nvmpriv.callbacks",
    "nvmpriv.export_callback",
    "lightning.pytorch",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "torch.optim",
    "torch.optim.lr_scheduler",
)


def _import_short_name(name: str, what: str) -> Any:
    found: dict[int, tuple[str, Any]] = {}
    for package in SHORT_NAME_PACKAGES:
        try:
            obj = getattr(importlib.import_module(package), name, None)
        except ImportError:
            continue
        if obj is not None:
            found.setdefault(id(obj), (package, obj))
    if len(found) == 1:
        return next(iter(found.values()))[1]
    if not found:
        raise ValueError(
            f"{what} {name!r} is not a class of {', '.join(SHORT_NAME_PACKAGES)}; give its "
            "dotted path, e.g. nvmpriv.nets.ColumnFC"
        )
    paths = sorted(f"{package}.{name}" for package, _ in found.values())
    raise ValueError(f"{what} {name!r} is ambiguous ({', '.join(paths)}); give the dotted path")


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
    if not module:
        return _import_short_name(name, what)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"{what} {class_path!r} cannot be imported ({exc}); give a dotted path such as "
            "nvmpriv.nets.ColumnFC"
        ) from None


_SIMPLE = (bool, int, float, str)


def _options(hint: Any) -> tuple[Any, ...]:
    """The members of a union annotation (``int | None``, ``Optional[int]``), else ``(hint,)``."""
    if typing.get_origin(hint) in (typing.Union, _UnionType):
        return typing.get_args(hint)
    return (hint,)


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits a simple annotation (unknown annotations accept anything)."""
    options = _options(hint)
    if len(options) > 1:
        return any(_accepts(o, value) for o in options)
    if hint is type(None):
        return value is None
    if hint not in _SIMPLE:
        return True
    if isinstance(value, str) and hint in (int, float, bool):
        return _parses_as(hint, value)  # LightningCLI reads quoted numbers too
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _parses_as(hint: Any, text: str) -> bool:
    if hint is bool:
        return text.lower() in ("true", "false")
    try:
        hint(text)
    except ValueError:
        return False
    return True


def _coerced(hint: Any, value: Any) -> Any:
    """A quoted number or boolean as the number/boolean a simple annotation asks for."""
    if not isinstance(value, str):
        return value
    options = _options(hint)
    if any(o is str or (o not in _SIMPLE and o is not type(None)) for o in options):
        return value  # a string is acceptable as it is
    for kind in (int, float, bool):
        if kind in options and _parses_as(kind, value):
            return value.lower() == "true" if kind is bool else kind(value)
    return value


def _hint_text(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _check_arguments(class_path: str, target: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Unknown argument names, and values that do not fit a simple annotation, name the class.

    Returns:
        ``kwargs`` with quoted numbers/booleans converted where the annotation asks for them.
    """
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return kwargs
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            names = [n for n in params if n != "self"]
            accepted = f"it accepts {', '.join(names)}" if names else "it takes no init_args"
            raise ValueError(f"{class_path}: unknown init_args {unknown}; {accepted}")
    try:
        init = target.__init__ if inspect.isclass(target) else target
        hints = typing.get_type_hints(init)
    except Exception:  # unresolvable annotations: leave the checks to the callee
        return kwargs
    for name, value in kwargs.items():
        if name in hints and not _accepts(hints[name], value):
            raise ValueError(
                f"{class_path}: init_args {name}={value!r} is a {type(value).__name__}, "
                f"expected {_hint_text(hints[name])}"
            )
    return {k: _coerced(hints[k], v) if k in hints else v for k, v in kwargs.items()}


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
        init_args = spec.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise ValueError(
                f"{spec['class_path']}: init_args must be a mapping of argument: value, got "
                f"{type(init_args).__name__}"
            )
        kwargs = {k: instantiate(v) for k, v in init_args.items()} | overrides
        kwargs = _check_arguments(spec["class_path"], target, kwargs)
        try:
            return target(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{spec['class_path']} with init_args {init_args}: {exc}") from None
    if isinstance(spec, dict):
        return {k: instantiate(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec


def check_spec(spec: Any, where: str) -> None:
    """Check a ``{class_path, init_args}`` tree without building anything.

    Every class path must import, every ``init_args`` name must be one its class accepts, and
    values of simple annotated types (``int``, ``float``, ``bool``, ``str``, optionals of them)
    must fit. Nested specifications (a method's ``net``, lists of callbacks) are walked.

    Args:
        spec: A LightningCLI-style specification, or any YAML value.
        where: The spec's dotted location in its config (starts every message).

    Raises:
        ValueError: The first problem found, naming ``where``.
    """
    if isinstance(spec, dict) and "class_path" in spec:
        target = import_object(spec["class_path"], what=f"{where}.class_path")
        init_args = spec.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise ValueError(f"{where}.init_args must be a mapping, got {type(init_args).__name__}")
        try:
            _check_arguments(spec["class_path"], target, init_args)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        for key, value in init_args.items():
            check_spec(value, f"{where}.init_args.{key}")
    elif isinstance(spec, dict):
        for key, value in spec.items():
            check_spec(value, f"{where}.{key}")
    elif isinstance(spec, list):
        for i, value in enumerate(spec):
            check_spec(value, f"{where}.{i}")
