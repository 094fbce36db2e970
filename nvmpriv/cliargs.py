"""Argument parsing of the extra subcommands (``crossbar``, ``export``, ``attack``, ``sweep``).

Plain argparse prints a usage block of 5-8 lines before its error and exits by itself; the
project's rule for bad input is one ``error:`` line that names the problem and the fix. A
:class:`CommandParser` raises :class:`UsageError` instead, which ``python -m nvmpriv`` prints as
that one line (exit 2). Standard library only, so every layer can use it.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

__all__ = ["CommandParser", "UsageError", "nonnegative_int", "positive_int"]


class UsageError(ValueError):
    """A command line the subcommand cannot parse."""


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a meaningful default.

    ``argparse.ArgumentDefaultsHelpFormatter`` also prints ``(default: None)``, ``(default:
    False)`` and ``(default: [])`` for unset options, flags and empty lists, which say nothing;
    help texts that already state their default keep their own wording.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and not action.required
            and default is not None
            and default is not False
            and default != argparse.SUPPRESS
            and default != []
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors raise :class:`UsageError` (one line).

    Its ``--help`` shows each option's default.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage block and exiting.

        Args:
            message: argparse's message (names the argument).

        Raises:
            UsageError: Always.
        """
        raise UsageError(f"{self.prog}: {message}; see {self.prog} --help")


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is invalid: give an integer >= {least}")
    return value


def nonnegative_int(text: str) -> int:
    """Argparse ``type`` for seeds and counts that may be 0.

    Args:
        text: The command-line word.

    Returns:
        The integer.

    Raises:
        argparse.ArgumentTypeError: Not an integer, or negative.
    """
    return _integer(text, 0)


def positive_int(text: str) -> int:
    """Argparse ``type`` for counts that must be at least 1.

    Args:
        text: The command-line word.

    Returns:
        The integer.

    Raises:
        argparse.ArgumentTypeError: Not an integer, or below 1.
    """
    return _integer(text, 1)
