"""Cost of the crossbar audit as a fraction of training-epoch time (target <= 30 % at defaults).

Two set-ups, each trained once with the audit on every epoch so that every epoch's training time
and every audit's time are measured in the same run:

* quickstart: digits, ColumnFC, the audit of lightning_configs/quickstart.yaml;
* Texas-sized: synthetic binary data of Texas100's width (6,169 features, 100 classes), Nasr FC,
  batch 128, the audit of lightning_configs/texas.yaml.

The audit settings (presets, attacks, sample cap, every_n_epochs) are read from those shipped
configs. The fraction is audit seconds / (every_n_epochs x epoch seconds).

    python benchmarks/bench_audit.py [--texas-samples 20000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import yaml

from nvmpriv.callbacks import CrossbarAudit
from nvmpriv.data import Digits, MembershipDataModule
from nvmpriv.datasets import RawDataset, content_hash
from nvmpriv.methods import StandardTraining
from nvmpriv.nets import ColumnFC, NasrFC

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


class SyntheticTexas(MembershipDataModule):
    """Texas100-shaped random binary data (labels depend on a few features, so nets can learn)."""

    num_classes = 100
    input_shape = (6169,)

    def __init__(self, n: int = 20000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n = n

    def load_raw(self) -> RawDataset:
        rng = np.random.default_rng(0)
        x = (rng.random((self.n, 6169)) < 0.05).astype(np.uint8)
        y = (x[:, :7] @ (1 << np.arange(7)) % 100).astype(np.int64)
        return RawDataset(x, y, 100, "synthetic_texas", content_hash(x, y))


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)


class TimedAudit(CrossbarAudit):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.times: list[float] = []

    def audit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        result = super().audit(trainer, pl_module)
        self.times.append(result["seconds"])
        return result


def run(
    name: str,
    module: pl.LightningModule,
    dm: MembershipDataModule,
    audit_kwargs: dict[str, Any],
    every: int,
    epochs: int,
) -> None:
    audit = TimedAudit(**audit_kwargs, every_n_epochs=1, figures=True, print_table=False)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=pl.loggers.TensorBoardLogger(tmp),
            callbacks=[audit, timer],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=dm)
    # Lightning validates (and so audits) inside the training epoch: take the audit out again.
    epoch = float(np.median(np.array(timer.times) - np.array(audit.times)))
    first, later = (
        audit.times[0],
        float(np.median(audit.times[1:])) if len(audit.times) > 1 else audit.times[0],
    )
    print(
        f"{name:12s} epoch {epoch:7.2f} s | first audit {first:6.2f} s (shadow/NF setup) | "
        f"later audits {later:6.2f} s | audit / epoch {later / epoch:5.2f} | "
        f"every {every} epochs: {later / (every * epoch):5.1%} of training time"
    )


def shipped_audit(config: str) -> tuple[dict[str, Any], int]:
    """The CrossbarAudit settings of a shipped config (keyword arguments, every_n_epochs)."""
    spec = yaml.safe_load((CONFIGS / config).read_text())
    for cb in spec["trainer"]["callbacks"]:
        if cb["class_path"].endswith("CrossbarAudit"):
            kwargs = dict(cb.get("init_args", {}))
            return kwargs, int(kwargs.pop("every_n_epochs", 1))
    raise SystemExit(f"{config} has no CrossbarAudit")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texas-samples", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0)
    quick, quick_every = shipped_audit("quickstart.yaml")
    run(
        "quickstart",
        StandardTraining(ColumnFC(64, 10), num_classes=10),
        Digits(batch_size=32),
        quick,
        every=quick_every,
        epochs=max(args.epochs, 3),
    )
    texas, texas_every = shipped_audit("texas.yaml")
    run(
        "texas-sized",
        StandardTraining(NasrFC(6169, 100), num_classes=100),
        SyntheticTexas(n=args.texas_samples, batch_size=128),
        texas,
        every=texas_every,
        epochs=args.epochs,
    )


if __name__ == "__main__":
    main()
