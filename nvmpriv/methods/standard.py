"""Standard (undefended) training: plain cross-entropy."""

from __future__ import annotations

from nvmpriv.methods.base import MembershipModule

__all__ = ["StandardTraining"]


class StandardTraining(MembershipModule):
    """Cross-entropy training with no privacy or robustness defence (the baseline target).

    Args:
        net: The classifier.
        num_classes: Number of classes (linked from the data module by the CLI).
        optimizer: Optimizer factory.
        lr_scheduler: Optional LR scheduler factory.
    """
