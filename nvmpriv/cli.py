"""LightningCLI for ``fit``, ``validate``, ``test`` and ``predict``.

YAML picks the method with ``model.class_path`` and the data set with ``data.class_path``; the
number of classes is linked from the data module into the method, so a config cannot train a
100-class net against a 10-class data set without a clear error.

``--ckpt_path last`` means "the newest ``last.ckpt`` of this experiment": Lightning alone would
look only in the new run's (empty) version folder and silently start from scratch, so the CLI
resolves the keyword against ``<save_dir>/<name>/version_*/checkpoints/last.ckpt`` first. ``fit``
then continues in that version folder; ``validate``/``test``/``predict`` read the checkpoint but
log to a new folder (they must not overwrite the fit's ``results.json``).
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from nvmpriv.callbacks import WritePredictions
from nvmpriv.ckptfile import check_checkpoint_file, find_last_checkpoint, logger_folder
from nvmpriv.data import MembershipDataModule
from nvmpriv.methods.base import MembershipModule

__all__ = ["NvmprivCLI", "find_last_checkpoint", "run_lightning_cli"]


def _logger_folder(config: Any) -> tuple[Any, str, str] | None:
    """The logger's init_args namespace, ``save_dir`` and ``name`` (``None`` without a logger)."""
    return logger_folder(config.get("trainer.logger"), config.get("trainer.default_root_dir"))


_KEYWORDS = ("last", "best", "hpc", "registry")

#: What a run writes into its folder before the first step (config, split, logger set-up).
_SET_UP_FILES = ("config.yaml", "hparams.yaml", "splits.npz")


def _holds_set_up_files_only(log_dir: Path, trainer: Any) -> bool:
    """Whether a run folder holds only what set-up wrote (no step, result or checkpoint)."""
    if not log_dir.is_dir() or trainer.global_step != 0:
        return False
    return all(
        p.is_file() and (p.name in _SET_UP_FILES or p.name.startswith("events.out.tfevents."))
        for p in log_dir.iterdir()
    )


class NvmprivCLI(LightningCLI):
    """LightningCLI with nvmpriv's links between data and model and a resolved ``ckpt_path``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data set's class count into the method; add ``--audit_crossbars``."""
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )
        # jsonargparse cannot address one entry of trainer.callbacks from the command line
        # (``--trainer.callbacks.crossbars=...`` lands on the last callback), so the audit's
        # most changed setting gets its own option.
        parser.add_argument(
            "--audit_crossbars",
            type=list[str] | None,
            default=None,
            help="Replace the CrossbarAudit callback's crossbars (preset names), e.g. "
            "'[pytorx_64,64x64_100k]'.",
        )

    def before_predict(self) -> None:
        """Save the predictions (``predictions.npz`` in the run folder) unless a writer is set."""
        callbacks: list[Any] = self.trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(cb, BasePredictionWriter) for cb in callbacks):
            callbacks.append(WritePredictions())

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; a run that fails before its first step leaves no version folder.

        Otherwise every failed attempt (a missing data file, a bad checkpoint) would take a
        ``version_N`` number, and the next good run would not land where the docs and the PPB
        configs' ``source_checkpoint`` expect it. A folder that existed before (``--ckpt_path
        last`` resumes into it), holds anything but set-up files (a checkpoint, results.json,
        predictions), or saw a training step is kept; under DDP nothing is removed.
        """
        trainer = self.trainer
        # Single process only: trainer.log_dir is a collective under DDP.
        single = trainer.world_size == 1 and trainer.logger is not None
        log_dir = Path(trainer.log_dir) if single and trainer.log_dir else None
        fresh = log_dir is not None and not log_dir.exists()
        fresh_parent = log_dir is not None and not log_dir.parent.exists()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if fresh and log_dir is not None and _holds_set_up_files_only(log_dir, trainer):
                shutil.rmtree(log_dir, ignore_errors=True)
                # The experiment folder (logs/<name>) too, if this run created it and it is empty.
                if fresh_parent and not any(log_dir.parent.iterdir()):
                    log_dir.parent.rmdir()
            raise

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then resolve ``--ckpt_path last`` and check the checkpoint file.

        This runs before Lightning reads the checkpoint's hyperparameters, so a bad file stops
        here with one line instead of a loader traceback.

        Raises:
            FileNotFoundError: Missing checkpoint, or ``last`` with none for a non-``fit`` command.
            ValueError: The file is not a torch checkpoint.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        self._resolve_last(subcommand)
        self._apply_audit_crossbars(subcommand)
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in _KEYWORDS and "://" not in str(ckpt_path):
            check_checkpoint_file(ckpt_path)

    def _apply_audit_crossbars(self, subcommand: str) -> None:
        config = self.config[subcommand]
        names = config.get("audit_crossbars")
        if names is None:
            return
        from nvmpriv.crossbar import get_preset

        for name in names:
            get_preset(name)  # an unknown name fails here, listing the presets
        audits = [
            cb
            for cb in config.get("trainer.callbacks") or []
            if str(getattr(cb, "class_path", "")).endswith("CrossbarAudit")
        ]
        if not audits:
            raise ValueError(
                "--audit_crossbars: the config has no nvmpriv.callbacks.CrossbarAudit callback; "
                "add one under trainer.callbacks"
            )
        for cb in audits:
            cb.init_args.crossbars = list(names)

    def _resolve_last(self, subcommand: str) -> None:
        config = self.config[subcommand]
        if config.get("ckpt_path") != "last":
            return
        folder = _logger_folder(config)
        found = find_last_checkpoint(folder[1], folder[2]) if folder is not None else None
        if found is None:
            if subcommand != "fit":
                where = f"{folder[1]}/{folder[2]}" if folder is not None else "the logger folder"
                raise FileNotFoundError(
                    f"--ckpt_path last: no version folder under {where} holds "
                    "checkpoints/last.ckpt; pass the checkpoint file itself"
                )
            return  # fit: nothing to resume, start from scratch (Lightning warns)
        config["ckpt_path"] = str(found)
        init_args = folder[0] if folder is not None else None
        if subcommand == "fit" and init_args is not None and "version" in init_args:
            version = found.parent.parent.name
            match = re.fullmatch(r"version_(\d+)", version)
            init_args["version"] = int(match.group(1)) if match else version


def _ckpt_arg(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
        if arg == "--ckpt_path" and i + 1 < len(args):
            return args[i + 1]
    return "the checkpoint"


def run_lightning_cli(args: list[str]) -> Any:
    """Run a Trainer subcommand (``fit``, ``validate``, ``test``, ``predict``).

    Args:
        args: Command-line arguments after ``python -m nvmpriv``.

    Returns:
        The finished :class:`NvmprivCLI`.

    Raises:
        ValueError: The checkpoint's weights do not fit the configured network.
    """
    # Passing args explicitly (so tests can call main()) is intended; silence Lightning's warning.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    # Lightning's own pytree helper trips torch's LeafSpec deprecation on every batch transfer;
    # nothing a user can act on.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    try:
        return NvmprivCLI(
            MembershipModule,
            MembershipDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except RuntimeError as exc:
        # torch's load_state_dict lists every mismatching tensor over many lines.
        if not str(exc).startswith("Error(s) in loading state_dict"):
            raise
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        first = details[0] if details else ""
        more = f" (+{len(details) - 1} more)" if len(details) > 1 else ""
        raise ValueError(
            f"{_ckpt_arg(args)} does not fit the configured network: {first}{more}; use the "
            "config the checkpoint was trained with (config.yaml next to its checkpoints folder)"
        ) from exc
