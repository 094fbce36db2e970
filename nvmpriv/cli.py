"""LightningCLI for ``fit``, ``validate``, ``test`` and ``predict``.

YAML picks the method with ``model.class_path`` and the data set with ``data.class_path``; the
number of classes is linked from the data module into the method, so a config cannot train a
100-class net against a 10-class data set without a clear error.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from nvmpriv.data import MembershipDataModule
from nvmpriv.methods.base import MembershipModule

__all__ = ["NvmprivCLI", "run_lightning_cli"]


class NvmprivCLI(LightningCLI):
    """LightningCLI with nvmpriv's links between data and model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data set's class count into the method."""
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )


def run_lightning_cli(args: list[str]) -> Any:
    """Run a Trainer subcommand (``fit``, ``validate``, ``test``, ``predict``).

    Args:
        args: Command-line arguments after ``python -m nvmpriv``.

    Returns:
        The finished :class:`NvmprivCLI`.
    """
    # Passing args explicitly (so tests can call main()) is intended; silence Lightning's warning.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return NvmprivCLI(
        MembershipModule,
        MembershipDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
        args=args,
    )
