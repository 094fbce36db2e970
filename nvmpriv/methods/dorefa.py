"""DoReFa quantization-aware training (Zhou et al.): k-bit weights and activations, STE gradients.

The injected net is replaced at construction by :func:`nvmpriv.quantization.quantize_model`'s
copy, so checkpoints hold the quantized-module structure (parameter names are unchanged, so a
full-precision checkpoint of the same net loads into it). The optimizer updates float master
weights; every forward pass quantizes them (see :mod:`nvmpriv.quantization` for the exact rule:
by default the first and last layers keep full-precision weights and the data entering the
first layer is not quantized). Kowalski et al.'s settings are (weight_bits, act_bits) =
(4, 4), (16, 4) and (16, 16).
"""

from __future__ import annotations

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from nvmpriv.methods.base import MembershipModule, _adam
from nvmpriv.quantization import QuantConv2d, QuantLinear, check_bits, quantize_model

__all__ = ["DoReFaTraining", "quantized_layers"]


def quantized_layers(net: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    """The DoReFa layers of a net, by module name.

    Args:
        net: Any net.

    Returns:
        ``{module name: layer}`` for every :class:`~nvmpriv.quantization.QuantLinear` /
        :class:`~nvmpriv.quantization.QuantConv2d`, in module order.
    """
    return {n: m for n, m in net.named_modules() if isinstance(m, QuantLinear | QuantConv2d)}


class DoReFaTraining(MembershipModule):
    """Cross-entropy training of a DoReFa-quantized copy of ``net``.

    Args:
        net: The full-precision classifier; replaced by its quantized copy.
        num_classes: Number of classes (linked from the data module by the CLI).
        weight_bits: Weight bits in [1, 32] (32 = full precision).
        act_bits: Activation bits in [1, 32] (32 = full precision).
        skip_first_last: Keep the first and last layers' weights full precision.
        act_range: Activation levels: ``"auto"`` (DoReFa's [0, 1] after ReLU, the signed
            [-1, 1] form after Tanh, e.g. :class:`~nvmpriv.nets.NasrFC`), ``"unsigned"`` or
            ``"signed"``; see :func:`~nvmpriv.quantization.quantize_model`.
        optimizer: Optimizer factory.
        lr_scheduler: Optional LR scheduler factory.

    Raises:
        ValueError: If a bit width is outside [1, 32] or ``act_range`` is unknown.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        weight_bits: int = 4,
        act_bits: int = 4,
        skip_first_last: bool = True,
        act_range: str = "auto",
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_bits(weight_bits, "weight_bits")
        check_bits(act_bits, "act_bits")
        quantized = quantize_model(
            net, weight_bits, act_bits, skip_first_last=skip_first_last, act_range=act_range
        )
        super().__init__(quantized, num_classes, optimizer, lr_scheduler)
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.skip_first_last = bool(skip_first_last)
        self.act_range = act_range
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
