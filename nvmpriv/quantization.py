r"""DoReFa quantization (Zhou et al., 2016) of weights and activations, with straight-through grads.

Pure torch. The maths:

.. math::

    \operatorname{quantize}_k(r) = \frac{\operatorname{round}\bigl((2^k - 1)\, r\bigr)}{2^k - 1},
    \qquad \frac{\partial \operatorname{quantize}_k(r)}{\partial r} := 1
    \quad\text{(straight-through estimator)}

    w_q = 2\,\operatorname{quantize}_k\!\Bigl(\frac{\tanh w}{2 \max|\tanh w|} + \tfrac12\Bigr) - 1
    \in \Bigl\{\tfrac{2i}{2^k - 1} - 1 : i = 0, \dots, 2^k - 1\Bigr\}

    a_q = \operatorname{quantize}_k\bigl(\operatorname{clip}(a, 0, 1)\bigr)
    \in \Bigl\{\tfrac{i}{2^k - 1} : i = 0, \dots, 2^k - 1\Bigr\}

    a_q^{\pm} = 2\,\operatorname{quantize}_k\bigl(\tfrac12(\operatorname{clip}(a, -1, 1) + 1)\bigr) - 1
    \quad\text{(signed form, for Tanh nets: the weights' level set)}

``k = 32`` (or ``None``) means full precision: the functions return their input unchanged.
Biases are not quantized (as in DoReFa). Note that 0 is not a DoReFa weight level (the number
of intervals ``2^k - 1`` is odd), so an exactly-zero (pruned) weight becomes ``+-1/(2^k - 1)``.

The straight-through estimator is written with the detach trick
(``r + (q(r) - r).detach()``) rather than a custom ``autograd.Function``, so the quantized
layers export to ONNX as plain ``Round`` nodes.

:func:`quantize_model` returns a copy of a net with ``nn.Linear`` / ``nn.Conv2d`` layers replaced
by :class:`QuantLinear` / :class:`QuantConv2d`, which keep float "master" weights (the optimizer
updates these) and quantize them on the fly in ``forward``. Activations are quantized at the
*input* of each such layer (see :func:`quantize_model` for the exact rule), which keeps the
state-dict keys of the original net, so full-precision checkpoints load unchanged.

DoReFa quantizes the activation and then applies dropout (``dropout(quantize(a))``). A layer
whose input comes from an ``nn.Dropout`` sees ``a * m / (1 - p)`` in training, and clipping that
to [0, 1] would saturate every ``a > 1 - p``; so such a layer knows the dropout's ``p``
(``input_dropout``) and, in training mode, quantizes ``x (1 - p)`` and rescales by
``1 / (1 - p)``, which is exactly ``dropout(quantize(a))`` with the same mask.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACT_RANGES",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "check_bits",
    "dorefa_activation",
    "dorefa_weight",
    "quantize_k",
    "quantize_model",
]

FULL_PRECISION_BITS = 32
#: Choices of :func:`quantize_model`'s ``act_range``.
ACT_RANGES = ("auto", "unsigned", "signed")


def check_bits(bits: int | None, name: str = "bits") -> int | None:
    """Validate a bit width and normalise full precision to ``None``.

    Args:
        bits: Number of bits in [1, 32]; 32 or ``None`` means full precision.
        name: Field name used in the error message.

    Returns:
        ``bits`` if it is in [1, 31], ``None`` for full precision (32 or ``None``).

    Raises:
        ValueError: If ``bits`` is not an integer in [1, 32] nor ``None``.
    """
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
        raise ValueError(
            f"{name}={bits!r} is outside 1..32: use an integer number of bits in [1, 32] "
            f"(32 or None = full precision)"
        )
    return None if bits == FULL_PRECISION_BITS else bits


def _round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def quantize_k(r: Tensor, k: int | None) -> Tensor:
    """Quantize ``r`` (expected in [0, 1]) to ``2^k`` levels with a straight-through gradient.

    Args:
        r: Real tensor, normally in [0, 1].
        k: Number of bits in [1, 32]; 32 or ``None`` returns ``r`` unchanged.

    Returns:
        ``round((2^k - 1) r) / (2^k - 1)``; gradient w.r.t. ``r`` is the identity.

    Raises:
        ValueError: If ``k`` is not in [1, 32] nor ``None``.

    Example:
        >>> quantize_k(torch.tensor([0.0, 0.2, 0.5, 1.0]), 2)
        tensor([0.0000, 0.3333, 0.6667, 1.0000])
    """
    bits = check_bits(k, "k")
    if bits is None:
        return r
    n = float(2**bits - 1)
    return _round_ste(r * n) / n


def dorefa_weight(w: Tensor, k: int | None) -> Tensor:
    """DoReFa weight quantizer: ``2 quantize_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1``.

    Args:
        w: Float weights (any shape).
        k: Number of bits in [1, 32]; 32 or ``None`` returns ``w`` unchanged.

    Returns:
        Quantized weights in [-1, 1] taking at most ``2^k`` values ``2i/(2^k - 1) - 1``;
        gradient flows through ``tanh`` and the max normalisation, straight through the rounding.

    Raises:
        ValueError: If ``k`` is not in [1, 32] nor ``None``.
    """
    bits = check_bits(k, "k")
    if bits is None:
        return w
    t = torch.tanh(w)
    # An all-zero tensor would divide by zero; any positive floor gives the same levels there.
    scale = t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)
    return 2.0 * quantize_k(t / (2.0 * scale) + 0.5, bits) - 1.0


def dorefa_activation(
    a: Tensor, k: int | None, *, signed: bool = False, dropout: float = 0.0
) -> Tensor:
    """DoReFa activation quantizer: ``quantize_k(clip(a, 0, 1))``, or its signed form.

    The gradient is the identity inside the clip range and zero outside (the clip's gradient).

    Args:
        a: Activations (any shape). The unsigned form (DoReFa's) suits non-negative (ReLU)
            activations; it would clip the negative half of a Tanh output to 0.
        k: Number of bits in [1, 32]; 32 or ``None`` returns ``a`` unchanged (no clipping).
        signed: Quantize ``clip(a, -1, 1)`` to the ``2^k`` levels ``2i / (2^k - 1) - 1``
            instead (``2 quantize_k((clip(a, -1, 1) + 1) / 2) - 1``), for Tanh activations.
        dropout: Probability ``p`` of an inverted dropout already applied to ``a`` (pass 0 in
            evaluation mode). The quantizer then acts on the pre-dropout activation
            ``a (1 - p)`` and rescales by ``1 / (1 - p)``: ``dropout(quantize(.))`` as DoReFa
            orders them, with the same mask (dropped entries are 0 and stay 0; with
            ``signed``, whose levels exclude 0, an input of exactly 0 is taken as dropped).

    Returns:
        Activations in [0, 1] (signed: [-1, 1]) taking at most ``2^k`` values (divided by
        ``1 - p`` where ``dropout`` is set).

    Raises:
        ValueError: If ``k`` is not in [1, 32] nor ``None``, or ``dropout`` is not in [0, 1).
    """
    bits = check_bits(k, "k")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is outside [0, 1): pass the dropout's p")
    if bits is None:
        return a
    if dropout:
        kept = dorefa_activation(a * (1.0 - dropout), bits, signed=signed) / (1.0 - dropout)
        # 0 is not a signed level, so dropped entries (exact zeros) are put back explicitly
        return torch.where(a == 0, torch.zeros_like(kept), kept) if signed else kept
    if signed:
        return 2.0 * quantize_k((a.clamp(-1.0, 1.0) + 1.0) * 0.5, bits) - 1.0
    return quantize_k(a.clamp(0.0, 1.0), bits)


class QuantAct(nn.Module):
    """Module form of :func:`dorefa_activation`.

    Args:
        bits: Activation bits in [1, 32]; 32 or ``None`` makes the module an identity.
        signed: Use the signed form (levels in [-1, 1]) for Tanh activations.

    Raises:
        ValueError: If ``bits`` is not in [1, 32] nor ``None``.
    """

    def __init__(self, bits: int | None = 4, *, signed: bool = False) -> None:
        super().__init__()
        self.bits = check_bits(bits, "bits")
        self.signed = bool(signed)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``quantize_k(clip(x, 0, 1))`` or the signed form (``x`` at full precision)."""
        return dorefa_activation(x, self.bits, signed=self.signed)

    def extra_repr(self) -> str:
        """Show the bit width in ``print(model)``."""
        bits = self.bits if self.bits is not None else FULL_PRECISION_BITS
        return f"bits={bits}" + (", signed=True" if self.signed else "")


class _DoReFaWeights(nn.Module):
    """What QuantLinear and QuantConv2d share: quantized effective weights and bit widths."""

    weight: Tensor
    weight_bits: int | None
    act_bits: int | None
    #: Signed activation levels in [-1, 1] (Tanh inputs) instead of DoReFa's [0, 1].
    act_signed: bool = False
    #: ``p`` of the ``nn.Dropout`` feeding this layer (see the module docstring).
    input_dropout: float = 0.0

    def quantize_input(self, x: Tensor) -> Tensor:
        """The layer input as the layer computes with it (DoReFa activation quantizer).

        Args:
            x: Layer input.

        Returns:
            ``x`` quantized to ``act_bits`` (unchanged without ``act_bits``).
        """
        dropout = self.input_dropout if self.training else 0.0
        return dorefa_activation(x, self.act_bits, signed=self.act_signed, dropout=dropout)

    @property
    def effective_weight(self) -> Tensor:
        """The quantized weight used in ``forward`` (differentiable w.r.t. ``self.weight``)."""
        return dorefa_weight(self.weight, self.weight_bits)

    def _copy_state(self, module: nn.Module) -> None:
        """Take ``module``'s parameters and training mode (after construction)."""
        self.load_state_dict(module.state_dict())
        self.train(module.training)

    def extra_repr(self) -> str:
        """Show the bit widths in ``print(model)``."""
        text = f"{super().extra_repr()}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"
        if self.act_bits is not None and self.act_signed:
            text += ", act_signed=True"
        if self.act_bits is not None and self.input_dropout:
            text += f", input_dropout={self.input_dropout:g}"
        return text


class QuantLinear(_DoReFaWeights, nn.Linear):
    """``nn.Linear`` whose weights (and optionally inputs) are DoReFa-quantized in ``forward``.

    ``self.weight`` stays the float master weight that the optimizer updates;
    :attr:`effective_weight` is what the layer computes with. The bias is not quantized.

    Args:
        in_features: Input features.
        out_features: Output features.
        bias: Whether to add a (full-precision) bias.
        weight_bits: Weight bits in [1, 32]; 32/``None`` keeps full-precision weights.
        act_bits: If set (1..31), the layer input is passed through :func:`dorefa_activation`
            first; 32/``None`` leaves the input untouched.

    Raises:
        ValueError: If a bit width is not in [1, 32] nor ``None``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_bits: int | None = 4,
        act_bits: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_bits = check_bits(weight_bits, "weight_bits")
        self.act_bits = check_bits(act_bits, "act_bits")

    def forward(self, x: Tensor) -> Tensor:
        """Return ``linear(quant_act(x), quant_weight, bias)``."""
        return F.linear(self.quantize_input(x), self.effective_weight, self.bias)

    @classmethod
    def from_module(
        cls, module: nn.Linear, weight_bits: int | None, act_bits: int | None = None
    ) -> QuantLinear:
        """Build a :class:`QuantLinear` with a copy of ``module``'s parameters.

        Args:
            module: Source linear layer (not modified).
            weight_bits: Weight bits (see class doc).
            act_bits: Input activation bits (see class doc).

        Returns:
            The new layer, on ``module``'s device and dtype.
        """
        new = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            weight_bits=weight_bits,
            act_bits=act_bits,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        new._copy_state(module)
        return new


class QuantConv2d(_DoReFaWeights, nn.Conv2d):
    """``nn.Conv2d`` whose weights (and optionally inputs) are DoReFa-quantized in ``forward``.

    Same constructor as :class:`torch.nn.Conv2d` plus the keyword-only ``weight_bits`` and
    ``act_bits`` of :class:`QuantLinear`. Grouped/depthwise convolutions are supported.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding.
        dilation: Dilation.
        groups: Groups (``in_channels`` for depthwise).
        bias: Whether to add a (full-precision) bias.
        padding_mode: As in :class:`torch.nn.Conv2d`.
        weight_bits: Weight bits in [1, 32]; 32/``None`` keeps full-precision weights.
        act_bits: Input activation bits; 32/``None`` leaves the input untouched.
        device: Parameter device.
        dtype: Parameter dtype.

    Raises:
        ValueError: If a bit width is not in [1, 32] nor ``None``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        weight_bits: int | None = 4,
        act_bits: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,  # type: ignore[arg-type]
            device=device,
            dtype=dtype,
        )
        self.weight_bits = check_bits(weight_bits, "weight_bits")
        self.act_bits = check_bits(act_bits, "act_bits")

    def forward(self, x: Tensor) -> Tensor:
        """Return ``conv2d(quant_act(x), quant_weight, bias)``."""
        return self._conv_forward(self.quantize_input(x), self.effective_weight, self.bias)

    @classmethod
    def from_module(
        cls, module: nn.Conv2d, weight_bits: int | None, act_bits: int | None = None
    ) -> QuantConv2d:
        """Build a :class:`QuantConv2d` with a copy of ``module``'s parameters and geometry.

        Args:
            module: Source convolution (not modified).
            weight_bits: Weight bits (see class doc).
            act_bits: Input activation bits (see class doc).

        Returns:
            The new layer, on ``module``'s device and dtype.
        """
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,  # type: ignore[arg-type]
            module.stride,  # type: ignore[arg-type]
            module.padding,  # type: ignore[arg-type]
            module.dilation,  # type: ignore[arg-type]
            module.groups,
            module.bias is not None,
            module.padding_mode,
            weight_bits=weight_bits,
            act_bits=act_bits,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        new._copy_state(module)
        return new


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quantize_model(
    model: nn.Module,
    weight_bits: int | None,
    act_bits: int | None,
    *,
    skip_first_last: bool = True,
    act_range: str = "auto",
) -> nn.Module:
    """Return a DoReFa-quantized copy of ``model`` (the original is not modified).

    The ``nn.Linear`` / ``nn.Conv2d`` layers are taken in registration order
    (``model.named_modules()``), which is the forward order for the nets in :mod:`nvmpriv.nets`.
    Each is replaced by :class:`QuantLinear` / :class:`QuantConv2d` with the same parameters and
    state-dict keys, under this rule:

    * weights: quantized to ``weight_bits`` in every layer except, when ``skip_first_last``, the
      first and the last one, which keep full-precision weights (as in DoReFa);
    * activations: the *input* of every layer except the first is quantized to ``act_bits``
      (the first layer's input is the data itself). So every hidden activation that feeds a
      weight layer is k-bit, including the one that feeds the full-precision last layer. The
      first layer is therefore left exactly as it was (same class, same weights); the last one
      becomes a ``Quant*`` layer with full-precision weights when ``act_bits`` is set.

    DoReFa's activation quantizer clips to [0, 1], which suits ReLU nets (the inputs of weight
    layers are non-negative); on a Tanh net such as :class:`~nvmpriv.nets.NasrFC` it would zero
    the negative half of every activation. ``act_range`` picks the form per layer: with
    ``"auto"``, a layer whose input comes from an ``nn.Tanh`` module (possibly through an
    ``nn.Dropout``) gets the signed form (levels ``2i/(2^k - 1) - 1`` in [-1, 1]), every other
    layer DoReFa's [0, 1]. A layer fed by an ``nn.Dropout`` module quantizes the pre-dropout
    activation in training (``input_dropout``, see the module docstring). "Fed by" means the
    leaf module registered just before the layer, which is the forward order for the nets in
    :mod:`nvmpriv.nets`; activations applied as functions in ``forward`` are not seen.

    Args:
        model: Net to quantize.
        weight_bits: Weight bits in [1, 32]; 32/``None`` keeps all weights full precision.
        act_bits: Activation bits in [1, 32]; 32/``None`` leaves activations full precision.
        skip_first_last: Keep the first and last weight layers' weights full precision.
        act_range: ``"auto"`` (above), ``"unsigned"`` ([0, 1] everywhere, DoReFa's) or
            ``"signed"`` ([-1, 1] everywhere).

    Returns:
        A deep copy of ``model`` with the layers replaced (same mode, device and dtype).

    Raises:
        ValueError: If a bit width is not in [1, 32] nor ``None``, or ``act_range`` is unknown.
    """
    w_bits = check_bits(weight_bits, "weight_bits")
    a_bits = check_bits(act_bits, "act_bits")
    if act_range not in ACT_RANGES:
        raise ValueError(f"act_range={act_range!r} is unknown: allowed {', '.join(ACT_RANGES)}")
    new_model = copy.deepcopy(model)
    fed_by = _feeding_modules(new_model)
    names = [
        name
        for name, m in new_model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and name != ""
    ]
    if isinstance(new_model, nn.Linear | nn.Conv2d):
        names = [""]
    for i, name in enumerate(names):
        is_first, is_last = i == 0, i == len(names) - 1
        layer_w_bits = None if (skip_first_last and (is_first or is_last)) else w_bits
        layer_a_bits = None if is_first else a_bits
        layer = new_model.get_submodule(name)
        if layer_w_bits is None and layer_a_bits is None and type(layer) in (nn.Linear, nn.Conv2d):
            continue
        new_layer: QuantLinear | QuantConv2d
        if isinstance(layer, nn.Linear):
            new_layer = QuantLinear.from_module(layer, layer_w_bits, layer_a_bits)
        else:
            assert isinstance(layer, nn.Conv2d)
            new_layer = QuantConv2d.from_module(layer, layer_w_bits, layer_a_bits)
        dropout, activation = fed_by.get(name, (0.0, None))
        new_layer.input_dropout = dropout
        new_layer.act_signed = act_range == "signed" or (
            act_range == "auto" and isinstance(activation, nn.Tanh)
        )
        if name == "":
            return new_layer
        _set_submodule(new_model, name, new_layer)
    return new_model


def _feeding_modules(model: nn.Module) -> dict[str, tuple[float, nn.Module | None]]:
    """For each leaf module: the ``p`` of a dropout just before it, and the leaf before that.

    Returns:
        ``{name: (dropout p or 0, the preceding non-dropout leaf or None)}`` in registration
        order.
    """
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    out: dict[str, tuple[float, nn.Module | None]] = {}
    for i, (name, _) in enumerate(leaves):
        j, dropout = i - 1, 0.0
        if j >= 0 and isinstance(leaves[j][1], nn.Dropout):
            dropout = float(leaves[j][1].p)
            j -= 1
        out[name] = (dropout, leaves[j][1] if j >= 0 else None)
    return out
