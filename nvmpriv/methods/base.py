"""Base LightningModule of every training method: a net, an optimizer, one loss hook.

The module only orchestrates: the maths of each method (PGD, DoReFa, ADMM, ...) lives in plain
modules and is called from the one hook a method overrides, :meth:`MembershipModule.training_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from nvmpriv.methods._common import check_source_split
from nvmpriv.nets import check_accepts_inputs

__all__ = ["MembershipModule"]

#: Checkpoint key holding the optimizers' class names.
_OPTIMIZERS_KEY = "nvmpriv_optimizers"


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class MembershipModule(pl.LightningModule):
    """A classifier trained by one method; logs ``train/``, ``val/`` and ``test/`` loss and accuracy.

    Args:
        net: The classifier (a plain ``nn.Module`` returning logits ``[B, C]``).
        num_classes: Number of classes C (linked from the data module by the CLI).
        optimizer: Callable building the optimizer from the parameters (Adam, lr 1e-3 by default).
        lr_scheduler: Optional callable building an LR scheduler from the optimizer.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def setup(self, stage: str) -> None:
        """Check, before any step runs, that the net accepts the data module's inputs."""
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        shape = tuple(getattr(datamodule, "input_shape", ()) or ())
        if shape:
            check_accepts_inputs(self.net, shape)

    def on_fit_start(self) -> None:
        """Refuse a ``source_checkpoint`` trained on another membership split (fresh runs).

        Subclasses that load a source net keep the split
        :func:`~nvmpriv.methods._common.load_net_weights` found in ``_source_split``; a resumed
        run restores its own split, which was checked when it started.
        """
        super().on_fit_start()
        if self._trainer is not None and self._trainer.ckpt_path is None:
            check_source_split(
                getattr(self, "_source_split", None), getattr(self._trainer, "datamodule", None)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the net."""
        return self.net(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the net returns logits of shape {tuple(logits.shape)} but the data has "
                f"{self.num_classes} classes; set the net's num_classes to {self.num_classes}"
            )
        return logits

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss to minimise on one training batch; methods override this one hook.

        Args:
            x: Input batch.
            y: Labels.

        Returns:
            ``(loss, logits)``; the logits feed the training accuracy.
        """
        logits = self._logits(x)
        return F.cross_entropy(logits, y), logits

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """One optimisation step (automatic optimisation)."""
        x, y = batch
        loss, logits = self.training_loss(x, y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self._logits(x)
        loss = F.cross_entropy(logits, y)
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val")
        return loss

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """Validation loss and accuracy."""
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Test loss and accuracy."""
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Softmax probabilities ``[B, C]``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x), dim=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the optimizers' classes, so a resume with other ones stops with a clear error."""
        super().on_save_checkpoint(checkpoint)
        optimizers = self._trainer.optimizers if self._trainer is not None else []
        checkpoint[_OPTIMIZERS_KEY] = [type(o).__name__ for o in optimizers]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Remember the recorded optimizer classes for :meth:`check_resumed_optimizers`."""
        super().on_load_checkpoint(checkpoint)
        self._resumed_optimizers: list[str] | None = checkpoint.get(_OPTIMIZERS_KEY)

    def check_resumed_optimizers(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Stop a resume whose configured optimizers differ from the checkpoint's.

        Lightning would load the old optimizer's state into the new one and fail at its first
        step with a bare ``KeyError`` (e.g. ``'momentum'`` for Adam's state in SGD).

        Args:
            optimizers: What :meth:`configure_optimizers` built.

        Raises:
            ValueError: The classes differ.
        """
        saved = getattr(self, "_resumed_optimizers", None)
        built = [type(o).__name__ for o in optimizers]
        # only a resume restores optimizer state; load_from_checkpoint + a new fit does not
        ckpt = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        if saved is not None and ckpt and saved != built:
            raise ValueError(
                f"{ckpt} was trained with optimizer {', '.join(saved)} but the config builds "
                f"{', '.join(built)}; resume with the run's model.init_args.optimizer, or start "
                "a new run (no --ckpt_path)"
            )

    def configure_optimizers(self) -> Any:
        """The injected optimizer (and scheduler, if any)."""
        optimizer = self.optimizer_factory(self.parameters())
        self.check_resumed_optimizers([optimizer])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"},
        }
