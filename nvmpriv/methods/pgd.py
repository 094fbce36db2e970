r"""PGD adversarial training (Madry et al.): minimise the loss at the worst point of an eps-ball.

Each training batch is replaced by its L-infinity PGD example (random start, ``steps`` steps of
size ``alpha``, projected to the eps-ball and clamped to the valid input range), optionally mixed
with the clean loss:

.. math::

    \mathcal L = (1 - w)\,\mathrm{CE}(f(x_{adv}), y) + w\,\mathrm{CE}(f(x), y),
    \qquad x_{adv} = \mathrm{PGD}_{\epsilon, \alpha, T}(x, y)

with :math:`w` = ``clean_weight``. The maths is :func:`nvmpriv.adversarial.pgd_attack`.

Units: ``eps`` and ``alpha`` are in input units. Images in nvmpriv are scaled to [0, 1], so the
customary 8/255 is ``0.0313725`` (:func:`nvmpriv.adversarial.pgd_eps_from_pixels`). Binary
tabular inputs are perturbed as continuous values in [0, 1] and are not re-binarised (see
:mod:`nvmpriv.adversarial`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from nvmpriv.adversarial import pgd_attack
from nvmpriv.methods._common import check_nonnegative, check_positive_int
from nvmpriv.methods.base import MembershipModule, _adam

__all__ = ["PGDTraining", "adversarial_accuracy"]


def _clamp_range(clamp_min: float | None, clamp_max: float | None) -> tuple[float, float] | None:
    if clamp_min is None and clamp_max is None:
        return None
    if clamp_min is None or clamp_max is None or not clamp_min < clamp_max:
        raise ValueError(
            f"clamp_min={clamp_min!r}, clamp_max={clamp_max!r} is invalid: give both with "
            "clamp_min < clamp_max (e.g. 0 and 1 for inputs in [0, 1]) or both null"
        )
    return (float(clamp_min), float(clamp_max))


def adversarial_accuracy(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    eps: float,
    alpha: float,
    steps: int,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    random_start: bool = True,
    max_batches: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Accuracy of ``model`` on the PGD examples of ``(x, y)`` batches (usable in any hook).

    Works under Lightning's ``inference_mode`` (validation) because
    :func:`nvmpriv.adversarial.pgd_attack` leaves inference mode for the input gradient; so a
    callback can call it with a net wrapped in a crossbar simulation, for example.

    Args:
        model: Classifier returning logits (put in eval mode during the attack, modes restored).
        batches: Iterable of ``(x, y)`` (a DataLoader); moved to the model's device.
        eps: L-infinity radius, in input units (>= 0).
        alpha: Step size, in input units (>= 0).
        steps: PGD steps (>= 0).
        clamp: Valid input range or ``None``.
        random_start: Start from a uniform point of the eps-ball.
        max_batches: Use at most this many batches (``None``: all).
        generator: Random generator for the random starts.

    Returns:
        Fraction of PGD examples still classified correctly (in [0, 1]; NaN if no samples).

    Raises:
        ValueError: As :func:`nvmpriv.adversarial.pgd_attack`.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = total = 0
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        x_adv = pgd_attack(
            model,
            x,
            y,
            eps=eps,
            alpha=alpha,
            steps=steps,
            random_start=random_start,
            clamp=clamp,
            generator=generator,
        )
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        with torch.no_grad():
            correct += int((model(x_adv).argmax(dim=1) == y).sum().item())
        for m, flag in flags:
            m.training = flag
        total += len(y)
    return correct / total if total else float("nan")


class PGDTraining(MembershipModule):
    """Madry PGD adversarial training; also logs ``val/pgd_acc`` at the training budget.

    ``train/acc`` is the accuracy on the adversarial batch (the examples the net trains on).

    Args:
        net: The classifier.
        num_classes: Number of classes (linked from the data module by the CLI).
        eps: L-infinity budget, in input units, >= 0 (e.g. 8/255 = 0.0314 for [0, 1] images).
        alpha: PGD step size, in input units, >= 0 (e.g. 2/255 = 0.00784).
        steps: PGD steps per training batch, >= 1 (10 is common).
        clean_weight: Weight ``w`` in [0, 1] of the clean loss in ``(1-w) CE_adv + w CE_clean``.
        clamp_min: Lower end of the valid input range (null with ``clamp_max`` = unbounded).
        clamp_max: Upper end of the valid input range.
        random_start: Start PGD from a uniform point of the eps-ball.
        val_steps: PGD steps for ``val/pgd_acc`` (alpha is rescaled to ``alpha * steps /
            val_steps`` so the total path length matches); 0 disables the metric.
        val_batches: Compute ``val/pgd_acc`` on at most this many validation batches.
        optimizer: Optimizer factory.
        lr_scheduler: Optional LR scheduler factory.

    Raises:
        ValueError: On a negative ``eps``/``alpha``, ``steps`` < 1, ``clean_weight`` outside
            [0, 1] or a bad clamp range.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        clean_weight: float = 0.0,
        clamp_min: float | None = 0.0,
        clamp_max: float | None = 1.0,
        random_start: bool = True,
        val_steps: int = 10,
        val_batches: int = 2,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(net, num_classes, optimizer, lr_scheduler)
        self.eps = check_nonnegative(eps, "eps", " (input units, e.g. 8/255 = 0.0314 for images)")
        self.alpha = check_nonnegative(alpha, "alpha", " (input units, e.g. 2/255 = 0.00784)")
        self.steps = check_positive_int(steps, "steps")
        if isinstance(clean_weight, bool) or not 0.0 <= clean_weight <= 1.0:
            raise ValueError(
                f"clean_weight={clean_weight!r} is outside [0, 1]: 0 = adversarial loss only, "
                "0.5 = equal mix of clean and adversarial loss"
            )
        self.clean_weight = float(clean_weight)
        self.clamp = _clamp_range(clamp_min, clamp_max)
        self.random_start = bool(random_start)
        self.val_steps = check_positive_int(val_steps, "val_steps", minimum=0)
        self.val_batches = check_positive_int(val_batches, "val_batches", minimum=0)
        self.val_pgd_acc = MulticlassAccuracy(num_classes, average="micro")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])

    def adversarial_examples(
        self,
        x: Tensor,
        y: Tensor,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """PGD examples of ``(x, y)`` at the training budget (net in eval mode meanwhile).

        Args:
            x: Clean inputs inside ``[clamp_min, clamp_max]``.
            y: Labels.
            steps: PGD steps (default: the training ``steps``); alpha is rescaled to keep
                ``alpha * steps`` constant.
            generator: Generator of the random start (``None``: the global RNG, as training).

        Returns:
            Detached adversarial inputs within ``eps`` of ``x`` and inside the valid range.
        """
        n = self.steps if steps is None else steps
        return pgd_attack(
            self.net,
            x,
            y,
            eps=self.eps,
            alpha=self.alpha * self.steps / max(n, 1),
            steps=n,
            random_start=self.random_start,
            clamp=self.clamp,
            generator=generator,
        )

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 - w) CE(f(x_adv), y) + w CE(f(x), y)``; returns the adversarial logits."""
        x_adv = self.adversarial_examples(x, y)
        logits_adv = self._logits(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        if self.clean_weight > 0:
            clean = F.cross_entropy(self._logits(x), y)
            loss = (1.0 - self.clean_weight) * loss + self.clean_weight * clean
        return loss, logits_adv

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Clean validation metrics, plus ``val/pgd_acc`` on the first ``val_batches`` batches."""
        loss = super().validation_step(batch, batch_idx)
        if self.val_steps > 0 and batch_idx < self.val_batches:
            x, y = batch
            # Own generator per (epoch, batch): validation settings must not shift the training
            # RNG stream, and val/pgd_acc is reproducible on its own.
            gen = torch.Generator(device=x.device)
            gen.manual_seed(1_000_003 * self.current_epoch + batch_idx)
            x_adv = self.adversarial_examples(x, y, steps=self.val_steps, generator=gen)
            self.val_pgd_acc(self._logits(x_adv), y)
            self.log("val/pgd_acc", self.val_pgd_acc, prog_bar=True)
        return loss
