"""``python -m nvmpriv``: Trainer subcommands through LightningCLI, plus nvmpriv's own tools.

LightningCLI's subcommands are exactly the Trainer's methods, so nvmpriv's extra subcommands
(``crossbar``, ``export``, ``attack``, ``sweep``) are dispatched here before LightningCLI sees the
arguments. Errors caused by the user's input print one line (``error: ...``) and exit with code 2;
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

__all__ = ["EXTRA_COMMANDS", "main", "one_line"]

#: Subcommand -> "module:function" taking ``argv`` and returning an exit code.
EXTRA_COMMANDS: dict[str, str] = {
    "crossbar": "nvmpriv.crossbar_cli:cli_main",
    "export": "nvmpriv.export:cli_main",
    "attack": "nvmpriv.blackbox:cli_main",
    "sweep": "nvmpriv.sweep:cli_main",
}

_TRAINER_COMMANDS = ("fit", "validate", "test", "predict")

_USAGE = (
    "usage: python -m nvmpriv {fit,validate,test,predict} --config CONFIG.yaml [overrides]\n"
    "       python -m nvmpriv {" + ",".join(EXTRA_COMMANDS) + "} [options]\n"
    "       add --debug to any command to see the traceback of an error\n"
    "\n"
    "  fit, validate, test, predict  train / evaluate a method (LightningCLI; --help per command)\n"
    "  crossbar                      show a crossbar preset and its measured non-ideality\n"
    "  export                        write a trained model (digital or on a chip) to ONNX\n"
    "  attack                        membership inference against an exported ONNX file\n"
    "  sweep                         run a grid of fit runs and gather tables and plots\n"
)


def _load_command(spec: str) -> Callable[[list[str]], int]:
    module, func = spec.split(":")
    command: Callable[[list[str]], int] = getattr(importlib.import_module(module), func)
    return command


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input rather than a bug in nvmpriv."""
    # FloatingPointError: FiniteLossGuard's stop (a diverging run: lower the LR and resume).
    import pickle
    import zipfile

    import yaml

    # OSError covers paths that are folders/files where the other is needed, permissions, bad
    # gzip files; EOFError, BadZipFile and UnpicklingError truncated or corrupt archives.
    errors: list[type[BaseException]] = [
        ValueError,
        OSError,
        KeyError,
        TypeError,
        FloatingPointError,
        OverflowError,
        EOFError,
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        yaml.YAMLError,
    ]
    try:
        from jsonargparse import ArgumentError

        errors.append(ArgumentError)
    except ImportError:  # pragma: no cover - jsonargparse ships with lightning's CLI extra
        pass
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    errors.append(MisconfigurationException)
    return tuple(errors)


_NOISE = (
    "Expected a <class 'NoneType'>",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Does not validate",
    # jsonargparse's explanation of the subclass syntax, after the callee's own message
    "Not a valid subclass of",
    "Subclass types expect one of",
    "a class path (str)",
    "a dict with class_path entry",
    "a dict without class_path",
    "a dict with parameters accepted",
)


def one_line(exc: BaseException) -> str:
    """Condense an exception message (jsonargparse's are multi-line) into one readable line.

    Args:
        exc: The exception.

    Returns:
        Its informative lines joined by spaces.
    """
    # Strip list bullets ("  - ") only: a leading "-" may belong to a flag or a number.
    lines = [line.strip().removeprefix("- ").strip() for line in str(exc).strip().splitlines()]
    kept = [
        line
        for line in lines
        if line
        and not line.startswith(_NOISE)
        # a dump of already-built objects ("Given value: [<... object at 0x...>, ...]") or of
        # the whole parsed subclass ("Given value: Namespace(class_path=..., init_args=...)")
        and not (
            line.startswith("Given value:")
            and (" object at 0x" in line or line.startswith("Given value: Namespace("))
        )
    ]
    return " ".join(kept) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m nvmpriv``.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Process exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_USAGE)
        return 0 if argv else 2
    try:
        if argv[0] in EXTRA_COMMANDS:
            return _load_command(EXTRA_COMMANDS[argv[0]])(argv[1:])
        if not argv[0].startswith("-") and argv[0] not in _TRAINER_COMMANDS:
            known = ", ".join([*_TRAINER_COMMANDS, *EXTRA_COMMANDS])
            raise ValueError(f"unknown command {argv[0]!r}; choose one of {known}")
        from nvmpriv.cli import run_lightning_cli

        run_lightning_cli(argv)
        return 0
    except _user_errors() as exc:
        if debug:
            raise
        sys.stderr.write(f"error: {one_line(exc)} (rerun with --debug for the traceback)\n")
        return 2
    except Exception as exc:  # never a raw traceback for the user
        if debug:
            raise
        sys.stderr.write(
            f"error: {type(exc).__name__}: {one_line(exc)} (check the inputs named in the "
            "command; rerun with --debug for the traceback)\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
