"""``ExportOnnx``: write the trained model to ONNX at the end of ``fit`` (see nvmpriv.export)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from nvmpriv.export import DIGITAL, export_run, export_stem, load_crossbar

__all__ = ["ExportOnnx"]


class ExportOnnx(Callback):
    """Export the trained net, digital and/or on simulated chips, when ``fit`` ends.

    Files are ``<folder>/<run>_<crossbar>[_seed<s>].onnx`` with ``<run>`` the logger's
    ``<name>_version_<n>`` (or ``name`` when given). DAC/ADC are calibrated like
    :class:`nvmpriv.callbacks.CrossbarAudit`: the first ``calibration_samples`` rows of
    ``target_train``, so the file reproduces the audited chip for the same ``chip_seed``.

    Args:
        crossbars: ``"digital"`` and/or preset names / crossbar YAML files.
        chip_seed: Chip seed (same meaning as in ``CrossbarAudit``).
        calibration_samples: Rows of ``target_train`` calibrating DAC/ADC (count, >= 1).
        folder: Output folder.
        name: File stem of the run (default from the logger).
        overwrite: Replace existing files (otherwise an existing file is an error, except the
            run's own exports when ``fit`` resumes the run to extend it).
        enabled: Switch the export off without removing the callback.

    Raises:
        ValueError: On an unknown crossbar or ``calibration_samples < 1``.
    """

    def __init__(
        self,
        crossbars: Sequence[str] = (DIGITAL, "64x64_100k"),
        chip_seed: int = 0,
        calibration_samples: int = 256,
        folder: str = "exports",
        name: str | None = None,
        overwrite: bool = False,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        if calibration_samples < 1:
            raise ValueError(f"ExportOnnx: calibration_samples={calibration_samples} must be >= 1")
        self.configs = {c: load_crossbar(c) for c in crossbars}
        self.chip_seed = int(chip_seed)
        self.calibration_samples = int(calibration_samples)
        self.folder = Path(folder)
        self.name = name
        self.overwrite = overwrite
        self.enabled = enabled
        self.paths: list[Path] = []
        self._replace_own = False

    def _run_name(self, trainer: pl.Trainer) -> str:
        if self.name:
            return self.name
        logger = trainer.logger
        if logger is not None:
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            return f"{logger.name}_{version}"
        return "run"

    def _active(self, trainer: pl.Trainer) -> bool:
        # fast_dev_run only checks that a run works; like Lightning's checkpoints, no files.
        return (
            self.enabled and trainer.is_global_zero and not getattr(trainer, "fast_dev_run", False)
        )

    def _targets(self, trainer: pl.Trainer) -> dict[str, Path]:
        run = self._run_name(trainer)
        return {
            label: self.folder / f"{export_stem(run, cfg, self.chip_seed)}.onnx"
            for label, cfg in self.configs.items()
        }

    @staticmethod
    def _resumes_own_run(trainer: pl.Trainer) -> bool:
        """Whether ``fit`` continues from a checkpoint inside its own run folder."""
        # logger.log_dir, not trainer.log_dir: the latter is a collective broadcast, and only
        # rank 0 gets here (a DDP resume would hang).
        ckpt, log_dir = trainer.ckpt_path, getattr(trainer.logger, "log_dir", None)
        if not ckpt or not log_dir or "://" in str(ckpt):
            return False
        return Path(ckpt).resolve().is_relative_to(Path(log_dir).resolve())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, before training, an output file that exists (unless ``overwrite``).

        Runs after Lightning restored the weights and callbacks of a checkpoint (``ckpt_path``
        is known), so it knows whether ``fit`` resumes its own run (``--ckpt_path last``): that run's files are its own earlier exports, which the
        model this fit ends with replaces.
        """
        self._replace_own = False
        if self.overwrite or not self._active(trainer):
            return
        existing = [p for p in self._targets(trainer).values() if p.exists()]
        if existing and self._resumes_own_run(trainer):
            self._replace_own = True
            return
        for path in existing:
            raise FileExistsError(
                f"ExportOnnx: {path} already exists; move it away, or set the callback's "
                "overwrite: true (or another folder/name)"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Export every configured crossbar (rank 0 only)."""
        if not self._active(trainer):
            return
        dm: Any = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "arrays"):
            raise ValueError("ExportOnnx needs an nvmpriv MembershipDataModule (nvmpriv.data.*)")
        run = self._run_name(trainer)
        targets = self._targets(trainer)
        for label, cfg in self.configs.items():
            path = export_run(
                pl_module.net,  # type: ignore[arg-type]
                dm,
                cfg,
                targets[label],
                chip_seed=self.chip_seed,
                calibration_samples=self.calibration_samples,
                overwrite=self.overwrite or self._replace_own,
                metadata={"nvmpriv.run": run, "nvmpriv.crossbar_spec": label},
            )
            self.paths.append(path)
