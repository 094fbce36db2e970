r"""PPB fine-tuning (Yuan & Zhang, 2022): prune a trained net, then fine-tune with a posterior balancer.

At construction the net of ``source_checkpoint`` is loaded (the architecture must match), pruned
with one of :mod:`nvmpriv.pruning`'s criteria, and the masks are kept while fine-tuning (gradient
masks plus re-masking after every optimizer step). The fine-tuning loss on a batch is

.. math::

    \mathcal L = \mathrm{CE}(f(x), y) + \lambda\,
        \mathrm{KL}\bigl(\mathrm{softmax}(\bar z_{B/2:}) \,\|\, \mathrm{softmax}(\bar z_{:B/2})\bigr)

where :math:`\bar z` are each sample's logits sorted in descending order and the batch is split
into its first and second halves (an odd last sample is left out of the KL term); the KL is
averaged over the half-batch (``batchmean``). Sorting removes the class identity, so the term
pushes every sample's *shape* of posterior towards the same one, which is what separates members
from non-members. ``lam = 0`` is plain fine-tuning of the pruned net (the baseline).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from nvmpriv.methods._common import (
    MaskKeeper,
    check_nonnegative,
    load_net_weights,
)
from nvmpriv.methods.base import MembershipModule, _adam
from nvmpriv.pruning import (
    Masks,
    apply_masks,
    check_sparsity,
    l1_filter_masks,
    magnitude_masks,
    slimming_masks,
    sparsity_report,
)

__all__ = [
    "PRUNE_METHODS",
    "PPBFineTuning",
    "ppb_penalty",
    "prune_masks",
    "sorted_posterior_divergence",
]

#: Allowed values of ``prune_method``.
PRUNE_METHODS: tuple[str, ...] = ("magnitude", "l1_filter", "slimming")
_CKPT_KEY = "nvmpriv_ppb_masks"


def ppb_penalty(logits: Tensor) -> Tensor:
    """Posterior-balancing KL between the sorted posteriors of a batch's two halves.

    Args:
        logits: Logits ``[B, C]``.

    Returns:
        ``KL(softmax(sorted second half) || softmax(sorted first half))``, batchmean (nats);
        0 for a batch of fewer than 2 samples.
    """
    half = logits.shape[0] // 2
    if half == 0:
        return logits.sum() * 0.0
    ordered = logits.sort(dim=1, descending=True).values
    first, second = ordered[:half], ordered[half : 2 * half]
    return F.kl_div(
        F.log_softmax(first, dim=1),
        F.log_softmax(second, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def sorted_posterior_divergence(member_logits: Tensor, nonmember_logits: Tensor) -> float:
    """Member/non-member divergence of sorted posteriors, the quantity PPB balances.

    ``KL(p || q)`` between the mean descending-sorted softmax of the members (``p``) and of the
    non-members (``q``); sorting drops the class identity, as in the PPB penalty.

    Args:
        member_logits: Logits of members ``[N, C]``.
        nonmember_logits: Logits of non-members ``[M, C]``.

    Returns:
        The divergence (nats).
    """
    p = member_logits.softmax(1).sort(1, descending=True).values.mean(0)
    q = nonmember_logits.softmax(1).sort(1, descending=True).values.mean(0)
    return float((p * (p / q).log()).sum())


def prune_masks(net: nn.Module, method: str, sparsity: float) -> Masks:
    """Pruning masks of one criterion (no masks at sparsity 0).

    Args:
        net: The trained net.
        method: ``"magnitude"`` (per-layer L1 unstructured, every Linear/Conv2d weight),
            ``"l1_filter"`` (output channels by L1 norm, last layer kept) or ``"slimming"``
            (BatchNorm channels by ``|gamma|``, global; the net needs BatchNorm).
        sparsity: Fraction to prune, in [0, 1).

    Returns:
        Keep-masks keyed by parameter name.

    Raises:
        ValueError: On an unknown method, a sparsity outside [0, 1) or (slimming) a net without
            BatchNorm.
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"prune_method={method!r} is invalid: choose one of {PRUNE_METHODS}")
    s = check_sparsity(sparsity)
    if s == 0.0:
        return {}
    if method == "magnitude":
        return magnitude_masks(net, s)
    if method == "l1_filter":
        return l1_filter_masks(net, s)
    return slimming_masks(net, s)


class PPBFineTuning(MembershipModule):
    """Prune a trained checkpoint and fine-tune it with ``CE + lam * PPB``, keeping the masks.

    Args:
        net: Net of the same architecture as the source checkpoint's.
        num_classes: Number of classes (linked from the data module by the CLI).
        source_checkpoint: Trained checkpoint (Lightning ``.ckpt`` of any nvmpriv method, or a
            saved ``net.state_dict()``); required.
        prune_method: ``"magnitude"``, ``"l1_filter"`` or ``"slimming"``.
        sparsity: Fraction pruned, in [0, 1) (Yuan & Zhang: 0.7); 0 = PPB without pruning.
        lam: PPB weight >= 0 (Yuan & Zhang: 4); 0 = plain fine-tuning.
        optimizer: Optimizer factory.
        lr_scheduler: Optional LR scheduler factory.

    Raises:
        ValueError: If ``source_checkpoint`` is missing, unreadable or of another architecture,
            or on a bad ``prune_method``, ``sparsity`` or ``lam``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        source_checkpoint: str | None = None,
        prune_method: str = "magnitude",
        sparsity: float = 0.7,
        lam: float = 4.0,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(net, num_classes, optimizer, lr_scheduler)
        if prune_method not in PRUNE_METHODS:
            raise ValueError(
                f"prune_method={prune_method!r} is invalid: choose one of {PRUNE_METHODS}"
            )
        self.sparsity = check_sparsity(sparsity)
        self.lam = check_nonnegative(lam, "lam", " (PPB weight; Yuan & Zhang use 4)")
        if not source_checkpoint:
            raise ValueError(
                "source_checkpoint is not set: PPB fine-tunes a trained net; pass "
                "--model.init_args.source_checkpoint=logs/<run>/version_0/checkpoints/last.ckpt"
            )
        self.prune_method = prune_method
        self._source_split = load_net_weights(self.net, source_checkpoint)
        self.mask_keeper = MaskKeeper()
        self.mask_keeper.load_state_dict(prune_masks(self.net, prune_method, self.sparsity))
        if self.mask_keeper.masks:
            apply_masks(self.net, self.mask_keeper.masks)
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``CE + lam * ppb_penalty``."""
        logits = self._logits(x)
        loss = F.cross_entropy(logits, y)
        if self.lam > 0:
            penalty = ppb_penalty(logits)
            self.log("train/ppb_kl", penalty.detach())
            loss = loss + self.lam * penalty
        return loss, logits

    def on_train_start(self) -> None:
        """Register the mask hooks with the optimizer."""
        super().on_train_start()
        opt = self.optimizers()
        if isinstance(opt, list):
            opt = opt[0]
        self.mask_keeper.attach(self.net, opt.optimizer)

    def on_train_epoch_end(self) -> None:
        """Log the per-layer sparsity (``prune/sparsity/<weight>``)."""
        super().on_train_epoch_end()
        for name, s in sparsity_report(self.net).items():
            self.log(f"prune/sparsity/{name}", s)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the masks."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[_CKPT_KEY] = self.mask_keeper.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the masks (hooks re-attach at train start)."""
        super().on_load_checkpoint(checkpoint)
        if _CKPT_KEY in checkpoint:
            self.mask_keeper.load_state_dict(checkpoint[_CKPT_KEY])
