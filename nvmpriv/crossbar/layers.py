"""Crossbar layers: Linear and Conv2d programmed onto simulated N x N crossbar tiles.

Lowering. A layer's matrix-vector product is lowered to a matrix ``W`` of shape ``[K, O]`` per
group (Linear: ``K = in_features``, ``O = out_features``; Conv2d: ``K = Cin/groups * kh * kw``
in ``(c, kh, kw)`` order, ``O = Cout/groups``; grouped and depthwise convs get one matrix per
group). Each group's matrix is zero-padded to multiples of N and cut into ``n_r x n_c`` tiles:
crossbar rows carry inputs, columns carry outputs.

Programming (static, once per chip; see :meth:`CrossbarLayer.program`). Every tile is a pair of
N x N arrays (differential pair ``G+``, ``G-``, see :func:`functional.conductance_pair`) whose
conductances receive levels, variation, stuck-at faults and drift; with parasitics each array is
replaced by its exact effective matrix (:func:`circuit.effective_conductance`). The result,
de-scaled back to weight units, is the buffer ``w_tiles``; padded cells stay programmed at
g_min and still load the lines.

Signed inputs are applied as signed read voltages ``V = x / x_fs * v_read`` within
``[-v_read, +v_read]`` (one phase). The circuit is linear, so the voltage scale cancels in
weight units and only matters through the DAC grid.
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nvmpriv.crossbar import functional as XF
from nvmpriv.crossbar.circuit import effective_conductance
from nvmpriv.crossbar.config import CrossbarConfig
from nvmpriv.crossbar.native import MAX_QMAX, NativeAdcGemm, adc_gemm_kernel

__all__ = [
    "CrossbarConv2d",
    "CrossbarLayer",
    "CrossbarLinear",
    "InputQuantizer",
    "NotCalibratedError",
    "dorefa_activation",
    "is_dorefa_layer",
    "quant_source",
    "release_workspaces",
]

# Partial-sum elements per chunk on the eager no-grad ADC path (keeps the working set in cache).
_CHUNK_ELEMENTS = 1 << 21

_WORKSPACES = threading.local()


def _workspace(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reusable scratch tensor of ``shape`` (contents undefined), one per name and thread.

    Large temporaries freshly allocated at every forward are returned to the OS and page-fault
    in again (measured: a 75 MB im2col gather took 21 ms fresh vs 5.5 ms in a reused buffer),
    so the fast paths keep their scratch space. Never return a workspace view to a caller.
    """
    pool: dict[str, torch.Tensor] | None = getattr(_WORKSPACES, "pool", None)
    if pool is None:
        pool = {}
        _WORKSPACES.pool = pool
    numel = math.prod(shape)
    buf = pool.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        pool[name] = buf
    return buf[:numel].view(shape)


def _abs_max(t: torch.Tensor) -> float:
    """``max |t|`` without allocating ``|t|`` (0 for an empty tensor)."""
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


def _reaches(p: torch.Tensor, qmax: int) -> bool:
    """Whether any partial sum (in ADC steps, before rounding) is at or past the clip level.

    The unfused quantizer passes no gradient there; a relative margin of 1e-6 covers the float
    difference between folded and unfolded scales.
    """
    return _abs_max(p) >= qmax * (1 - 1e-6)


def _row_flags(
    l1: torch.Tensor, x_max: float, qmax: int, detect: bool
) -> tuple[list[Any], list[Any]]:
    """Per tile row (any leading shape of ``l1``): may the ADC clamp act, may gradients clip.

    Bound of a row's partial sums (ADC steps): its largest column L1 norm times the largest
    input magnitude. The clamp is an exact no-op below ``qmax + 1/4``; with ``detect`` the rows
    whose bound reaches the clip level are marked for the exact check of :func:`_quantize_rows`.
    """
    bound = l1 * x_max * (1 + 1e-5)
    check = bound >= qmax * (1 - 1e-6) if detect else torch.zeros_like(bound, dtype=torch.bool)
    return (bound > qmax + 0.25).tolist(), check.tolist()


def _quantize_rows(p: torch.Tensor, qmax: int, clip: list[bool], check: list[bool]) -> list[int]:
    """ADC codes of partial sums ``p`` (``[rows, ...]``, ADC steps), in place.

    Rounds, then clamps the rows whose flag in ``clip`` is set.

    Returns:
        The checked rows whose partial sums reached the clip level before rounding.
    """
    reach = [i for i, flag in enumerate(check) if flag and _reaches(p[i], qmax)]
    p.round_()
    if all(clip):
        p.clamp_(-qmax, qmax)
    elif any(clip):
        for i, flag in enumerate(clip):
            if flag:
                p[i].clamp_(-qmax, qmax)
    return reach


def _clip_checks(l1: torch.Tensor, u: torch.Tensor, qmax: int, detect: bool) -> Any:
    """Per tile row, whether to report clipping to the native kernel (``None``: no report).

    The kernel always clamps (an exact no-op where the clamp cannot act), so only gradients,
    which must know the clipped tiles, need the per-row bounds and their pass over ``u``.
    """
    return _row_flags(l1, _abs_max(u), qmax, True)[1] if detect else None


def _native_kernel(u: torch.Tensor, qmax: int) -> NativeAdcGemm | None:
    """The fused GEMM + ADC kernel where it applies to input ``u`` (float32 on the CPU)."""
    if u.device.type != "cpu" or u.dtype != torch.float32 or qmax > MAX_QMAX:
        return None
    return adc_gemm_kernel()


def release_workspaces() -> None:
    """Free the scratch buffers the fast forward paths keep in this thread."""
    _WORKSPACES.pool = {}


class NotCalibratedError(RuntimeError):
    """A layer with DAC/ADC was run before its converter ranges were calibrated."""


def dorefa_activation(
    x: torch.Tensor, bits: int | None, *, signed: bool = False, dropout: float = 0.0
) -> torch.Tensor:
    """DoReFa activation quantizer ``round(clamp(x, 0, 1) (2^k - 1)) / (2^k - 1)``.

    Zhou et al., "DoReFa-Net" (2016), eq. for activations; straight-through gradient inside
    the clip range. Written with the same operations as
    ``nvmpriv.quantization.dorefa_activation`` (so results are bit-identical) but kept local so
    that the crossbar package imports no other nvmpriv module.

    Args:
        x: Activations (input units of the layer).
        bits: ``k`` in 1..31, or ``None`` to return ``x`` unchanged.
        signed: Signed form ``2 q((clamp(x, -1, 1) + 1) / 2) - 1`` (Tanh inputs).
        dropout: ``p`` of an inverted dropout applied to ``x`` before (training mode only):
            quantize ``x (1 - p)`` and rescale by ``1 / (1 - p)``.

    Returns:
        Quantized activations in [0, 1] (signed: [-1, 1]; same unit), or ``x``.
    """
    if bits is None:
        return x
    if dropout:
        kept = dorefa_activation(x * (1.0 - dropout), bits, signed=signed) / (1.0 - dropout)
        # 0 is not a signed level, so dropped entries (exact zeros) are put back explicitly
        return torch.where(x == 0, torch.zeros_like(kept), kept) if signed else kept
    n = float(2**bits - 1)
    if signed:
        r = (x.clamp(-1.0, 1.0) + 1.0) * 0.5 * n
        return 2.0 * ((r + (torch.round(r) - r).detach()) / n) - 1.0
    r = x.clamp(0.0, 1.0) * n
    return (r + (torch.round(r) - r).detach()) / n


class InputQuantizer(NamedTuple):
    """The DoReFa input quantizer a crossbar layer takes over from a quantized digital layer.

    Attributes:
        bits: Activation bits ``k`` (``None``: no quantizer).
        signed: Signed levels in [-1, 1] instead of [0, 1].
        dropout: ``p`` of the dropout feeding the layer (used in training mode only).
    """

    bits: int | None = None
    signed: bool = False
    dropout: float = 0.0


def is_dorefa_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a DoReFa-quantized Linear/Conv2d (duck-typed).

    A quantized layer is a subclass of ``nn.Linear`` / ``nn.Conv2d`` with an ``effective_weight``
    (the weight its forward uses) and an ``act_bits`` attribute (``None`` or 1..31), like
    ``nvmpriv.quantization.QuantLinear`` / ``QuantConv2d``.

    Args:
        module: Any module.

    Returns:
        ``True`` for such layers.
    """
    return (
        isinstance(module, nn.Linear | nn.Conv2d)
        and type(module) not in (nn.Linear, nn.Conv2d)
        and hasattr(type(module), "effective_weight")
        and hasattr(module, "act_bits")
    )


def quant_source(module: nn.Module) -> tuple[torch.Tensor, InputQuantizer]:
    """The weight to program and the input quantizer of a digital layer.

    Args:
        module: ``nn.Linear`` / ``nn.Conv2d`` or a DoReFa layer (:func:`is_dorefa_layer`).

    Returns:
        ``(effective_weight, its input quantizer)`` for a DoReFa layer (``act_bits``,
        ``act_signed``, ``input_dropout``), ``(weight, InputQuantizer())`` otherwise.
    """
    if is_dorefa_layer(module):
        bits: Any = module.act_bits
        weight: torch.Tensor = module.effective_weight  # type: ignore[assignment]
        return weight, InputQuantizer(
            None if bits is None else int(bits),
            bool(getattr(module, "act_signed", False)),
            float(getattr(module, "input_dropout", 0.0)),
        )
    return module.weight, InputQuantizer()  # type: ignore[return-value]


class CrossbarLayer(nn.Module):
    """Common machinery of crossbar layers (see the module docstring for the lowering).

    Forward equation (non-bit-sliced), for one group, with ``Wt[r]`` the tile-row ``r`` of
    ``w_tiles`` (``[N, O]``, weight units) and ``x_r`` the matching N inputs::

        x    = round(clamp(x, 0, 1) * (2^k - 1)) / (2^k - 1)             # input quantizer (if act_bits)
        xq   = clamp(round(x / s_dac), -q_dac, q_dac) * s_dac          # DAC (if dac_bits)
        P[r] = xq_r @ Wt[r]  (+ sqrt(xq_r^2 @ Nt[r]) * randn)         # tile MVM (+ read noise)
        Pq[r]= clamp(round(P[r] / s_adc), -q_adc, q_adc) * s_adc       # per-tile ADC (if adc_bits)
        y    = sum_r Pq[r] + bias                                      # digital sum

    with ``s_dac = dac_range / q_dac``, ``q_dac = 2^(dac_bits-1) - 1`` and likewise for the ADC.
    (signed layers, ``act_signed``: ``2 q((clamp(x, -1, 1) + 1) / 2) - 1`` with ``q`` the
    rounding above, for Tanh inputs.)
    The input quantizer is the digital layer's own DoReFa activation quantizer (``k = act_bits``,
    only for layers converted from a DoReFa layer, see :func:`dorefa_activation`; it runs in
    the digital periphery before the DAC, also on the bit-sliced path).
    Without ADC the sum over tiles is linear, so ``y = xq @ W_eff + bias`` with the assembled
    effective matrix (one GEMM/conv; exactly the same function).

    Bit-sliced forward (``config.bit_slicing``): inputs become fixed-point codes split into ``S``
    signed digits ``d_s`` (stream width ``a`` bits, MSB first), weights into ``T`` unsigned slices
    per polarity (slice width ``b`` bits); ``w_tiles[..., t*O:(t+1)*O]`` holds slice ``t`` in count
    units. Then ``P[r, s, t] = d_s,r @ Wt[r, t]``, the ADC quantizes in counts with a power-of-two
    step ``s_adc = 2^max(0, ceil(log2(N (2^a-1)(2^b-1) / q_adc)))``, and
    ``y = 2^-(fi+fw) sum_{s,t} 2^(a(S-1-s) + b(T-1-t)) sum_r Pq[r, s, t] + bias``.

    Read noise (per query, global torch RNG): every device's conductance fluctuates by
    ``read_noise_sigma * G`` (Gaussian, independent per cell and query); the resulting column
    current noise is drawn exactly in distribution as ``sqrt(x^2 @ Nt) * randn`` with
    ``Nt = sigma^2 (A+^2 + A-^2)`` in weight units, ``A±`` the effective entries of each
    polarity (``G±`` without parasitics): with IR drop, each device's fluctuation is attenuated
    like its signal. This is first order: the part of one device's fluctuation that the wires
    spread onto neighbouring columns is neglected (against an exact Monte Carlo over the nodal
    circuit it gives 0.97x the output noise std on a 32x32_100k tile).

    Gradients: ``config.gradient == "ste"`` differentiates the simulated chip (effective weights;
    quantizers pass gradients inside their range) and sends the output gradient to ``weight``
    as if the effective weights were the weights; ``"digital"`` returns the chip output with the
    digital layer's gradient. Without read noise the ``"ste"`` input gradient is computed as
    the effective dense product's gradient minus, for the tiles whose partial sums reached the
    ADC clip level, what their clipped quantizer blocks; bit-sliced layers pass the gradient of
    their fixed-point input (digit extraction is piecewise constant, and their ADC step covers
    every nominal partial sum; a sum that device variation pushes past it clips in the forward
    value, which this gradient ignores).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    w_tiles: torch.Tensor
    noise_tiles: torch.Tensor
    dac_range: torch.Tensor
    adc_range: torch.Tensor
    calibrated: torch.Tensor
    w_dense: torch.Tensor
    noise_dense: torch.Tensor

    def __init__(
        self,
        config: CrossbarConfig,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        seed: int,
        groups: int = 1,
        act_bits: int | None = None,
        act_signed: bool = False,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.config = config
        self.seed = int(seed)
        self.groups = int(groups)
        if act_bits is not None and (
            isinstance(act_bits, bool) or not isinstance(act_bits, int) or not 1 <= act_bits <= 31
        ):
            raise ValueError(
                f"act_bits={act_bits!r} is invalid: allowed an integer in 1..31 or None "
                "(None = no input quantizer)"
            )
        if not 0.0 <= input_dropout < 1.0:
            raise ValueError(f"input_dropout={input_dropout!r} is outside [0, 1)")
        self.act_bits = act_bits
        self.act_signed = bool(act_signed)
        self.input_dropout = float(input_dropout)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.bias = (
            None
            if bias is None
            else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        )
        k, o = self._matrix_shape()
        n = config.tile_size
        self.rows_per_group = k
        self.cols_per_group = o
        self.n_row_tiles = math.ceil(k / n)
        self.n_col_tiles = math.ceil(o / n)
        self.n_slices = config.n_slices if config.bit_slicing else 1
        self.register_buffer("w_tiles", torch.empty(0))
        self.register_buffer("noise_tiles", torch.empty(0))
        self.register_buffer("dac_range", torch.zeros(()))
        self.register_buffer("adc_range", torch.zeros(()))
        self.register_buffer("calibrated", torch.tensor(not config.needs_calibration))
        self._calibrating = False
        self._adc_cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        self._packed_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.program()

    # ------------------------------------------------------------------ lowering hooks
    def _matrix_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _weight_matrix(self) -> torch.Tensor:
        """The digital weights lowered to ``[groups, K, O]``."""
        raise NotImplementedError

    def _dense_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_weight_matrix`: ``[groups, K, O]`` to the module's weight shape."""
        raise NotImplementedError

    def _dense_mvm(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _tile_partial_sums(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per-tile partial sums with the tile-row axis at ``self._tile_dim``."""
        raise NotImplementedError

    _tile_dim = 0

    # ------------------------------------------------------------------ programming
    @torch.no_grad()
    def program(self) -> None:
        """Write the current ``weight`` onto the simulated chip (static effects, IR drop).

        Draws variation and faults from ``torch.Generator().manual_seed(self.seed)``, so the
        same seed programs the same chip. Call again after changing ``weight`` (hardware in the
        loop); calibration ranges are kept.
        """
        cfg = self.config
        n = cfg.tile_size
        dg = cfg.g_max - cfg.g_min
        w = self._weight_matrix().detach().to(torch.float64)  # [G, K, O]
        n_g, k, o = w.shape
        if cfg.bit_slicing:
            codes = XF.fixed_point(w, cfg.weight_bits, cfg.weight_frac_bits)
            unit = 2**cfg.slice_width - 1
            pos = XF.unsigned_slices(torch.relu(codes), cfg.slice_width, self.n_slices) / unit
            neg = XF.unsigned_slices(torch.relu(-codes), cfg.slice_width, self.n_slices) / unit
            w_scale = unit / dg  # siemens -> counts
        else:
            w_max = float(w.abs().max()) or 1.0
            wq = XF.quantize_levels(w, w_max, cfg.levels)
            pos = (torch.relu(wq) / w_max).unsqueeze(0)  # [1, G, K, O] fraction of the swing
            neg = (torch.relu(-wq) / w_max).unsqueeze(0)
            w_scale = w_max / dg  # siemens -> weight units
        n_t = pos.shape[0]
        kp, op = self.n_row_tiles * n, self.n_col_tiles * n
        noise = torch.empty(0)
        if cfg.analog_exact:
            eff = (wq.unsqueeze(0) if not cfg.bit_slicing else (pos - neg) * unit).clone()
            eff = F.pad(eff, (0, 0, 0, kp - k))  # [T, G, Kp, O]
        else:
            frac = torch.stack([pos, neg])  # [2, T, G, K, O]
            frac = F.pad(frac, (0, op - o, 0, kp - k))
            frac = frac.view(2, n_t, n_g, self.n_row_tiles, n, self.n_col_tiles, n)
            frac = frac.permute(0, 1, 2, 3, 5, 4, 6)  # [2, T, G, n_r, n_c, N, N]
            g = cfg.g_min + frac * dg
            gen = torch.Generator().manual_seed(self.seed)
            g = XF.apply_variation(g, cfg.variation_sigma, cfg.variation_model, gen)
            g = XF.apply_stuck_at(g, cfg.p_stuck_min, cfg.p_stuck_max, cfg.g_min, cfg.g_max, gen)
            g = XF.apply_drift(g, cfg.drift_nu, cfg.drift_time, cfg.drift_t0)
            if cfg.has_parasitics:
                g = effective_conductance(
                    g, r_wire=cfg.r_wire, r_source=cfg.r_source, r_sink=cfg.r_sink
                )
            if cfg.has_read_noise:
                # A device's fluctuation reaches the sense line attenuated like its signal, so
                # the noise uses the effective entries (the programmed G without parasitics).
                noise = (g[0] ** 2 + g[1] ** 2) * (cfg.read_noise_sigma * w_scale) ** 2
                noise = self._untile(noise, n_t, n_g, kp, op)[..., :o]
                noise = noise.to(torch.float32)
            eff = self._untile((g[0] - g[1]) * w_scale, n_t, n_g, kp, op)[..., :o]
        # [T, G, Kp, O] -> [G, n_r, N, T * O]
        eff = eff.reshape(n_t, n_g, self.n_row_tiles, n, o).permute(1, 2, 3, 0, 4)
        self.w_tiles = eff.reshape(n_g, self.n_row_tiles, n, n_t * o).to(torch.float32)
        if noise.numel():
            noise = noise.reshape(n_t, n_g, self.n_row_tiles, n, o).permute(1, 2, 3, 0, 4)
            self.noise_tiles = noise.reshape(n_g, self.n_row_tiles, n, n_t * o).contiguous()
        else:
            self.noise_tiles = torch.empty(0)
        self._build_derived()

    def _untile(self, t: torch.Tensor, n_t: int, n_g: int, kp: int, op: int) -> torch.Tensor:
        """``[T, G, n_r, n_c, N, N]`` -> ``[T, G, Kp, Op]``."""
        return t.permute(0, 1, 2, 4, 3, 5).reshape(n_t, n_g, kp, op)

    @torch.no_grad()
    def _build_derived(self) -> None:
        """Rebuild the non-persistent views used by the fast paths from ``w_tiles``."""
        cfg = self.config
        n_g, k, o = self.groups, self.rows_per_group, self.cols_per_group
        full = self.w_tiles.reshape(n_g, -1, self.n_slices, o)[:, :k]  # [G, K, T, O]
        if cfg.bit_slicing:
            coeff = torch.tensor(
                [2.0 ** (cfg.slice_width * (self.n_slices - 1 - t)) for t in range(self.n_slices)],
                dtype=torch.float64,
            )
            comb = (full.double() * coeff.view(1, 1, -1, 1)).sum(2) * 2.0**-cfg.weight_frac_bits
            dense = comb.float()
        else:
            dense = full[:, :, 0]
        self.register_buffer("w_dense", self._dense_from_matrix(dense).contiguous(), False)
        if self.noise_tiles.numel() and not cfg.bit_slicing:
            nfull = self.noise_tiles.reshape(n_g, -1, o)[:, :k]
            self.register_buffer("noise_dense", self._dense_from_matrix(nfull).contiguous(), False)
        else:
            self.register_buffer("noise_dense", torch.empty(0), False)
        self._adc_cache = None
        self._packed_cache = None
        self._build_tiled()

    def _build_tiled(self) -> None:
        """Hook for layers that need extra derived tensors on the per-tile path."""

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._build_derived()

    # ------------------------------------------------------------------ converters
    @property
    def tiled_path(self) -> bool:
        """Whether the forward needs per-tile partial sums (ADC on, or sliced with noise)."""
        cfg = self.config
        return cfg.adc_bits is not None or (cfg.bit_slicing and cfg.has_read_noise)

    def _dac(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.dac_bits is None:
            return x
        qmax = 2 ** (cfg.dac_bits - 1) - 1
        if self._calibrating:
            self.dac_range.fill_(float(XF.percentile_abs(x, cfg.calibration_percentile)))
        if not (torch.is_grad_enabled() and x.requires_grad) and not torch.jit.is_tracing():
            # same codes as the straight-through form in four in-place passes instead of seven
            codes, unit = self._dac_codes(x)
            return codes.mul_(unit)
        step = torch.clamp(self.dac_range, min=1e-30) / qmax
        return XF.quantize_ste(x, step, qmax)

    def _adc_params(self) -> tuple[torch.Tensor | float, int]:
        cfg = self.config
        assert cfg.adc_bits is not None
        qmax = 2 ** (cfg.adc_bits - 1) - 1
        if cfg.bit_slicing:
            full = cfg.tile_size * (2**cfg.stream_width - 1) * (2**cfg.slice_width - 1)
            return 2.0 ** max(0, math.ceil(math.log2(full / qmax))), qmax
        return torch.clamp(self.adc_range, min=1e-30) / qmax, qmax

    def _adc_reduce(self, p: torch.Tensor, fast: bool) -> torch.Tensor:
        """Per-tile ADC on partial sums ``p`` and digital sum over the tile-row axis."""
        cfg = self.config
        dim = self._tile_dim
        if cfg.adc_bits is None:
            return p.sum(dim)
        if self._calibrating and not cfg.bit_slicing:
            self.adc_range.fill_(float(XF.percentile_abs(p, cfg.calibration_percentile)))
        step, qmax = self._adc_params()
        if not fast:
            return XF.quantize_ste(p, step, qmax).sum(dim)
        p.div_(step).round_().clamp_(-qmax, qmax)
        return p.sum(dim).mul_(step)

    # ------------------------------------------------------------------ forward
    def _check_calibrated(self) -> None:
        if not bool(self.calibrated) and not self._calibrating:
            raise NotCalibratedError(
                f"{type(self).__name__}: config {self.config.name!r} has a DAC/ADC but the layer "
                "was never calibrated; call nvmpriv.crossbar.calibrate(model, batch) or pass "
                "calibration=batch to convert()/simulate()"
            )

    def _noise(
        self, x: torch.Tensor, like: torch.Tensor, w: torch.Tensor, tiled: bool
    ) -> torch.Tensor:
        var = self._tile_partial_sums(x * x, w) if tiled else self._dense_mvm(x * x, w)
        return torch.sqrt(torch.clamp(var, min=0)) * torch.randn_like(like)

    def _chip(self, x: torch.Tensor) -> torch.Tensor:
        """The simulated chip's output, bias included (added digitally)."""
        cfg = self.config
        if not self.tiled_path and not cfg.bit_slicing and not cfg.has_read_noise:
            # bias fused exactly as the digital layer does, so the ideal chip is bit-exact
            return self._dense_mvm(self._dac(x), self.w_dense, self.bias)
        return self._add_bias(self._chip_nobias(x))

    def _chip_nobias(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        # the fused paths use scratch buffers and host-side decisions, which a tracer cannot record
        tracing = torch.jit.is_tracing()
        grad = torch.is_grad_enabled() and x.requires_grad
        if cfg.bit_slicing:
            if grad and not tracing:
                return self._sliced_ste(x)
            return self._chip_sliced(x, not grad and not tracing)
        if self.tiled_path and not cfg.has_read_noise and not self._calibrating and not tracing:
            with torch.no_grad():
                codes, unit = self._dac_codes(x.detach())
                y, reach = self._fast_tiled(codes, unit, detect=grad)
            if not grad:
                return y
            if reach is not None:
                # Straight-through gradient of the chip: the effective dense product's, minus,
                # for the few tiles whose partial sums reached the ADC clip level, what their
                # clipped quantizer does not pass (recomputed for those tiles only). The value
                # is the fused chip output.
                xq = self._dac(x)
                z = self._dense_mvm(xq, self.w_dense)
                if reach:
                    z = z + self._clip_correction(xq, reach)
                return z + (y - z).detach()
        return self._chip_reference(x)

    def _sliced_ste(self, x: torch.Tensor) -> torch.Tensor:
        """Bit-sliced chip output with the straight-through gradient of its fixed-point input.

        Digit extraction (floor / remainder) has no gradient, and the bit-sliced ADC step is
        chosen so that no partial sum of nominal devices can clip; the gradient is therefore
        that of the fixed-point input times the effective dense weight, 0 outside the input
        range (a rare sum that device variation pushes past full scale clips in the value only).
        """
        cfg = self.config
        with torch.no_grad():
            y = self._chip_sliced(x.detach(), True)
        qmax = 2 ** (cfg.input_bits - 1) - 1
        xs = XF.quantize_ste(x, 2.0**-cfg.input_frac_bits, qmax)
        y_lin = self._dense_mvm(xs, self.w_dense)
        return y_lin + (y - y_lin).detach()

    def _chip_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused, differentiable chip (non-bit-sliced): per-tile partial sums, noise, ADC.

        Used for read noise, calibration, tracing and gradients when a partial sum clips; the
        fused paths are checked against it.
        """
        cfg = self.config
        fast = not (torch.is_grad_enabled() and x.requires_grad)
        noisy = cfg.has_read_noise
        xq = self._dac(x)
        if not self.tiled_path:
            y = self._dense_mvm(xq, self.w_dense)
            if noisy:
                y = y + self._noise(xq, y, self.noise_dense, tiled=False)
            return y
        p = self._tile_partial_sums(xq, self.w_tiles)
        if noisy:
            p = p + self._noise(xq, p, self.noise_tiles, tiled=True)
        return self._adc_reduce(p, fast)

    def _dac_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """DAC output as integer codes and the code's value (no-grad fast path).

        ``codes * unit`` equals :meth:`_dac` bit for bit (same division and rounding); without
        a DAC the input itself is returned with unit 1.
        """
        cfg = self.config
        if cfg.dac_bits is None:
            return x, 1.0
        qmax = 2 ** (cfg.dac_bits - 1) - 1
        step = torch.clamp(self.dac_range, min=1e-30) / qmax
        return torch.div(x, step).round_().clamp_(-qmax, qmax), float(step)

    def _adc_tiles(self, unit: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``w_tiles`` rescaled to ADC steps per input unit, and per-tile-row column-L1 bounds.

        Folding the DAC and ADC scales into the weights removes two elementwise passes over
        the partial sums (the largest tensors of the forward); cached until the ranges or the
        programmed tiles change.

        Args:
            unit: Value of one input unit (DAC step, 1 for digits or raw inputs).

        Returns:
            ``(w, l1)``: ``w`` like ``w_tiles`` in ADC steps; ``l1`` ``[G, n_r]`` the largest
            column L1 norm of each tile (a bound on ``|partial sum| / max |input|``).
        """
        step, _ = self._adc_params()
        scale = unit / float(step)
        w = self.w_tiles
        key = (id(w), w._version, w.device, scale)
        cache = self._adc_cache
        if cache is None or cache[0] != key:
            scaled = w * scale if scale != 1.0 else w
            l1 = scaled.abs().sum(-2).amax(-1)
            cache = (key, scaled, l1)
            self._adc_cache = cache
        return cache[1], cache[2]

    def _fast_tiled(
        self, u: torch.Tensor, unit: float, detect: bool = False
    ) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        """No-grad, noise-free per-tile ADC forward of input ``u`` given in ``unit``s.

        Returns:
            The output without bias, and with ``detect`` the ``(group, tile row)`` pairs whose
            partial sums reached the ADC clip level (``None``: not tracked, use the reference
            path for gradients); ``[]`` without ``detect``.
        """
        p = self._tile_partial_sums(u * unit if unit != 1.0 else u, self.w_tiles)
        return self._adc_reduce(p, True), None if detect else []

    def _clip_correction(self, xq: torch.Tensor, reach: list[tuple[int, int]]) -> torch.Tensor:
        """``sum over reach of (ADC(P) - P)`` for the given tiles, differentiable in ``xq``.

        Its gradient removes, for those tiles, the part of the output gradient that the
        reference path's clipped quantizer does not pass.
        """
        raise NotImplementedError

    def _chip_sliced(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        cfg = self.config
        codes = XF.fixed_point(x, cfg.input_bits, cfg.input_frac_bits)
        if not self.tiled_path:
            return self._dense_mvm(codes * 2.0**-cfg.input_frac_bits, self.w_dense)
        n_s = cfg.n_streams
        d = XF.signed_digits(codes, cfg.stream_width, n_s)
        streams = list(range(n_s))
        if fast and not cfg.has_read_noise and cfg.adc_bits is not None:
            # An all-zero input stream gives zero partial sums and zero ADC codes: skip it
            # (binary or small inputs leave most high-order streams empty).
            streams = [s for s in streams if bool(d[s].any())] or [n_s - 1]
            if len(streams) < n_s:
                d = d[streams]
        d = d.reshape(len(streams) * x.shape[0], *x.shape[1:])
        if fast and not cfg.has_read_noise and cfg.adc_bits is not None:
            # chunked, ADC fused in place; the codes are integers, so their float sums are
            # exact and the chunking does not change the result
            y = self._fast_tiled(d, 1.0)[0]
        else:
            p = self._tile_partial_sums(d, self.w_tiles)
            if cfg.has_read_noise:
                p = p + self._noise(d, p, self.noise_tiles, tiled=True)
            y = self._adc_reduce(p, fast)  # [S*B, ..., T*O-ish]
        coeff = torch.tensor(
            [
                [
                    2.0
                    ** (
                        cfg.stream_width * (n_s - 1 - s) + cfg.slice_width * (self.n_slices - 1 - t)
                    )
                    for t in range(self.n_slices)
                ]
                for s in streams
            ],
            dtype=y.dtype,
        ) * 2.0 ** -(cfg.input_frac_bits + cfg.weight_frac_bits)
        return self._shift_add(y, coeff, x.shape[0])

    def _shift_add(self, y: torch.Tensor, coeff: torch.Tensor, batch: int) -> torch.Tensor:
        raise NotImplementedError

    def _digital(self, x: torch.Tensor) -> torch.Tensor:
        """The digital layer's output without bias."""
        raise NotImplementedError

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the input through the simulated chip (see the class docstring).

        Args:
            x: Layer input (same shape as for the digital layer).

        Returns:
            Layer output (same shape as the digital layer's).

        Raises:
            NotCalibratedError: If DAC/ADC ranges are needed but were never calibrated.
        """
        self._check_calibrated()
        x = dorefa_activation(
            x,
            self.act_bits,
            signed=self.act_signed,
            dropout=self.input_dropout if self.training else 0.0,
        )
        grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if grad and self.config.gradient == "digital":
            with torch.no_grad():
                y_chip = self._chip(x)
            y_dig = self._add_bias(self._digital(x))
            return y_dig + (y_chip - y_dig).detach()
        y = self._chip(x)
        if grad and self.weight.requires_grad:
            # hardware in the loop: the weight receives the gradient of the effective weights
            surrogate = self._digital(x.detach())
            y = y + (surrogate - surrogate.detach())
        return y

    # ------------------------------------------------------------------ export
    def programmed_state(self) -> dict[str, torch.Tensor | float | int | bool | str]:
        """Everything needed to reproduce the forward without re-running the physics.

        Keys (tensors are float32, weight units unless stated):

        * ``kind`` (``"linear"`` or ``"conv2d"``), ``groups``, ``tile_size`` (N),
          ``rows_per_group`` (K), ``cols_per_group`` (O), ``n_row_tiles``, ``n_slices`` (T);
        * ``w_tiles``: ``[groups, n_row_tiles, N, T*O]`` per-tile effective weights (rows past K
          are padding and multiply zero inputs); with bit slicing in counts, slice-major columns;
        * ``w_dense``: the assembled effective weight in the digital layer's weight shape (valid
          for the no-ADC path; bit-sliced: sum of slices with their shifts, in weight units);
        * ``bias`` (tensor or absent);
        * ``dac_bits`` (0 = none), ``dac_step`` (input units), ``dac_qmax``;
        * ``adc_bits`` (0 = none), ``adc_step`` (weight x input units, or counts), ``adc_qmax``;
        * ``act_bits`` (0 = none): DoReFa input quantizer applied first (see the forward equation);
        * ``read_noise`` (bool), ``noise_tiles`` (``[groups, n_row_tiles, N, T*O]`` variance per
          unit squared input, weight units squared; empty when off);
        * ``bit_slicing`` (bool), ``input_bits``, ``input_frac_bits``, ``weight_frac_bits``,
          ``stream_width``, ``slice_width``, ``n_streams``;
        * conv only: ``stride``, ``padding``, ``dilation`` (tuples as lists), ``kernel_size``.

        Returns:
            The state dict described above.
        """
        cfg = self.config
        out: dict[str, Any] = {
            "groups": self.groups,
            "tile_size": cfg.tile_size,
            "rows_per_group": self.rows_per_group,
            "cols_per_group": self.cols_per_group,
            "n_row_tiles": self.n_row_tiles,
            "n_slices": self.n_slices,
            "w_tiles": self.w_tiles.detach().clone(),
            "w_dense": self.w_dense.detach().clone(),
            "read_noise": cfg.has_read_noise,
            "noise_tiles": self.noise_tiles.detach().clone(),
            "bit_slicing": cfg.bit_slicing,
            "input_bits": cfg.input_bits,
            "input_frac_bits": cfg.input_frac_bits,
            "weight_frac_bits": cfg.weight_frac_bits,
            "stream_width": cfg.stream_width,
            "slice_width": cfg.slice_width,
            "n_streams": cfg.n_streams,
            "dac_bits": 0 if cfg.dac_bits is None or cfg.bit_slicing else cfg.dac_bits,
            "adc_bits": 0 if cfg.adc_bits is None else cfg.adc_bits,
            "act_bits": 0 if self.act_bits is None else self.act_bits,
            "act_signed": bool(self.act_bits is not None and self.act_signed),
        }
        if self.bias is not None:
            out["bias"] = self.bias.detach().clone()
        if out["dac_bits"]:
            qmax = 2 ** (cfg.dac_bits - 1) - 1  # type: ignore[operator]
            out["dac_qmax"] = qmax
            out["dac_step"] = float(self.dac_range) / qmax
        if out["adc_bits"]:
            step, qmax = self._adc_params()
            out["adc_qmax"] = qmax
            out["adc_step"] = float(step)
        out.update(self._extra_state())
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def extra_repr(self) -> str:
        """Summarize the mapping."""
        return (
            f"config={self.config.name!r}, groups={self.groups}, K={self.rows_per_group}, "
            f"O={self.cols_per_group}, tiles={self.groups}x{self.n_row_tiles}x{self.n_col_tiles} "
            f"of {self.config.tile_size}x{self.config.tile_size}, seed={self.seed}"
            + (f", act_bits={self.act_bits}" if self.act_bits is not None else "")
            + (", act_signed=True" if self.act_bits is not None and self.act_signed else "")
        )


class CrossbarLinear(CrossbarLayer):
    """``nn.Linear`` on simulated crossbars (see :class:`CrossbarLayer` for the equations).

    Args:
        config: Chip configuration.
        weight: ``[out_features, in_features]`` weights.
        bias: ``[out_features]`` or ``None``.
        seed: Chip seed of this layer (variation and faults).
        act_bits: DoReFa input quantizer bits (``None`` = none), see :class:`CrossbarLayer`.
        act_signed: Signed input quantizer levels in [-1, 1] (Tanh inputs).
        input_dropout: ``p`` of the dropout feeding the layer (training-mode quantizer).
    """

    def __init__(
        self,
        config: CrossbarConfig,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        seed: int,
        act_bits: int | None = None,
        act_signed: bool = False,
        input_dropout: float = 0.0,
    ) -> None:
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        super().__init__(
            config,
            weight,
            bias,
            seed=seed,
            groups=1,
            act_bits=act_bits,
            act_signed=act_signed,
            input_dropout=input_dropout,
        )

    @classmethod
    def from_module(cls, module: nn.Linear, config: CrossbarConfig, *, seed: int) -> CrossbarLinear:
        """Program a copy of ``module`` onto a simulated chip.

        A DoReFa layer (one with ``effective_weight`` and ``act_bits``, e.g.
        ``nvmpriv.quantization.QuantLinear``) is programmed from its quantized
        ``effective_weight`` and keeps its input quantizer (see :func:`quant_source`).

        Args:
            module: The digital layer (left untouched).
            config: Chip configuration.
            seed: Chip seed of this layer.

        Returns:
            The crossbar layer.
        """
        weight, quant = quant_source(module)
        layer = cls(
            config,
            weight,
            module.bias,
            seed=seed,
            act_bits=quant.bits,
            act_signed=quant.signed,
            input_dropout=quant.dropout,
        )
        return layer.to(module.weight.device)

    def _matrix_shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _weight_matrix(self) -> torch.Tensor:
        return self.weight.t().unsqueeze(0)

    def _dense_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m[0].t()

    def _dense_mvm(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.linear(x, w, bias)

    def _tile_partial_sums(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n, n_r = self.config.tile_size, self.n_row_tiles
        lead = x.shape[:-1]
        x2 = F.pad(x.reshape(-1, self.in_features), (0, n_r * n - self.in_features))
        xt = x2.view(-1, n_r, n).transpose(0, 1)  # [n_r, B, N]
        p = torch.bmm(xt, w[0])  # [n_r, B, T*O]
        return p.view(n_r, *lead, p.shape[-1])

    def _fast_tiled(
        self, u: torch.Tensor, unit: float, detect: bool = False
    ) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        # Chunked over tile rows so that the partial sums stay in cache; the DAC and ADC scales
        # are folded into the weights, so each chunk needs only round (+ clamp) and a sum.
        n, n_r = self.config.tile_size, self.n_row_tiles
        lead = u.shape[:-1]
        u2 = u.reshape(-1, self.in_features)
        x2 = _workspace("rows", (u2.shape[0], n_r * n), u)
        x2[:, : self.in_features].copy_(u2)
        x2[:, self.in_features :].zero_()
        xt = x2.view(-1, n_r, n).transpose(0, 1)  # [n_r, B, N]
        step, qmax = self._adc_params()
        w_all, l1_all = self._adc_tiles(unit)
        w = w_all[0]
        b, m = xt.shape[1], w.shape[-1]
        kernel = _native_kernel(u, qmax)
        if kernel is not None:
            check = _clip_checks(l1_all[0], u2, qmax, detect)
            cache = self._packed_cache
            if cache is None or cache[0] is not w_all:
                cache = (w_all, kernel.pack(w))
                self._packed_cache = cache
            out = torch.empty(b, m, dtype=u.dtype)
            rows = kernel.matmul(
                xt,
                cache[1],
                out,
                qmax=qmax,
                scale=float(step),
                packed=True,
                check=check,
                rows=self.in_features,
            )
            return out.view(*lead, m), [(0, r) for r in rows]
        clip, check = _row_flags(l1_all[0], _abs_max(u2), qmax, detect)
        reach: list[tuple[int, int]] = []
        chunk = max(1, min(n_r, _CHUNK_ELEMENTS // max(1, b * m)))
        buf = _workspace("psum", (chunk, b, m), u)
        y: torch.Tensor | None = None
        for r0 in range(0, n_r, chunk):
            r1 = min(n_r, r0 + chunk)
            p = torch.bmm(xt[r0:r1], w[r0:r1], out=buf[: r1 - r0])
            rows = _quantize_rows(p, qmax, clip[r0:r1], check[r0:r1])
            reach += [(0, r0 + i) for i in rows]
            if y is None:
                y = p[0].clone() if r1 - r0 == 1 else p.sum(0)
            else:
                y.add_(p[0] if r1 - r0 == 1 else p.sum(0))
        assert y is not None
        y = y.mul_(step) if not (isinstance(step, float) and step == 1.0) else y
        return y.view(*lead, m), reach

    def _clip_correction(self, xq: torch.Tensor, reach: list[tuple[int, int]]) -> torch.Tensor:
        n, k = self.config.tile_size, self.in_features
        step, qmax = self._adc_params()
        x2 = xq.reshape(-1, k)
        out = torch.zeros(x2.shape[0], self.out_features, dtype=xq.dtype, device=xq.device)
        for _, r in reach:
            rows = min(n, k - r * n)
            # the reference path's partial sum of tile row r, by the same kind of GEMM
            p = torch.bmm(x2[None, :, r * n : r * n + rows], self.w_tiles[0, r : r + 1, :rows])[0]
            out = out + (XF.quantize_ste(p, step, qmax) - p)
        return out.view(*xq.shape[:-1], self.out_features)

    def _shift_add(self, y: torch.Tensor, coeff: torch.Tensor, batch: int) -> torch.Tensor:
        n_s, n_t = coeff.shape
        lead = y.shape[:-1]
        y = y.reshape(n_s, batch, -1, n_t, self.out_features)
        out = torch.einsum("sbmto,st->bmo", y, coeff)
        return out.reshape(batch, *lead[1:], self.out_features)

    def _digital(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def _extra_state(self) -> dict[str, Any]:
        return {"kind": "linear"}


class CrossbarConv2d(CrossbarLayer):
    """``nn.Conv2d`` (incl. grouped and depthwise) on simulated crossbars.

    The per-tile partial sums of a convolution are computed without im2col: tile row ``r``
    covers a contiguous range of the ``(c, kh, kw)`` rows, i.e. a few input channels with some
    taps masked, so all tile rows of all groups run as one grouped convolution over a gathered
    copy of the input (``chan_index``) with masked per-tile kernels (``w_split``).

    Args:
        config: Chip configuration.
        weight: ``[Cout, Cin/groups, kh, kw]`` weights.
        bias: ``[Cout]`` or ``None``.
        seed: Chip seed of this layer.
        stride: As ``nn.Conv2d``.
        padding: As ``nn.Conv2d`` (zeros padding only).
        dilation: As ``nn.Conv2d``.
        groups: As ``nn.Conv2d``.
        act_bits: DoReFa input quantizer bits (``None`` = none), see :class:`CrossbarLayer`.
        act_signed: Signed input quantizer levels in [-1, 1] (Tanh inputs).
        input_dropout: ``p`` of the dropout feeding the layer (training-mode quantizer).
    """

    _tile_dim = 2
    chan_index: torch.Tensor
    w_split: torch.Tensor
    noise_split: torch.Tensor

    def __init__(
        self,
        config: CrossbarConfig,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        seed: int,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        act_bits: int | None = None,
        act_signed: bool = False,
        input_dropout: float = 0.0,
    ) -> None:
        self.out_channels = int(weight.shape[0])
        self.in_channels = int(weight.shape[1]) * groups
        self.kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self._groups_init = groups
        self._adc_t_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        super().__init__(
            config,
            weight,
            bias,
            seed=seed,
            groups=groups,
            act_bits=act_bits,
            act_signed=act_signed,
            input_dropout=input_dropout,
        )

    @classmethod
    def from_module(cls, module: nn.Conv2d, config: CrossbarConfig, *, seed: int) -> CrossbarConv2d:
        """Program a copy of ``module`` onto a simulated chip.

        A DoReFa layer (``nvmpriv.quantization.QuantConv2d``) is programmed from its quantized
        ``effective_weight`` and keeps its input quantizer (see :func:`quant_source`).

        Args:
            module: The digital layer (left untouched; ``padding_mode`` must be ``zeros``).
            config: Chip configuration.
            seed: Chip seed of this layer.

        Returns:
            The crossbar layer.

        Raises:
            ValueError: If ``padding_mode`` is not ``zeros``.
        """
        if module.padding_mode != "zeros":
            raise ValueError(
                f"Conv2d padding_mode={module.padding_mode!r} is not supported: allowed 'zeros'"
            )
        weight, quant = quant_source(module)
        layer = cls(
            config,
            weight,
            module.bias,
            seed=seed,
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            groups=module.groups,
            act_bits=quant.bits,
            act_signed=quant.signed,
            input_dropout=quant.dropout,
        )
        return layer.to(module.weight.device)

    def _matrix_shape(self) -> tuple[int, int]:
        kh, kw = self.kernel_size
        g = self._groups_init
        return self.in_channels // g * kh * kw, self.out_channels // g

    def _weight_matrix(self) -> torch.Tensor:
        g = self.groups
        o = self.out_channels // g
        return self.weight.reshape(g, o, -1).transpose(1, 2)  # [G, K, O]

    def _dense_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        return m.transpose(1, 2).reshape(self.out_channels, -1, kh, kw)

    def _conv(
        self, x: torch.Tensor, w: torch.Tensor, groups: int, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, groups)

    def _dense_mvm(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._conv(x, w, self.groups, bias)

    def _build_tiled(self) -> None:
        self._adc_t_cache = None
        if not self.tiled_path:
            for name in ("chan_index", "w_split", "noise_split"):
                self.register_buffer(name, torch.empty(0), False)
            return
        n = self.config.tile_size
        kh, kw = self.kernel_size
        taps = kh * kw
        k, n_r, n_g = self.rows_per_group, self.n_row_tiles, self.groups
        cin_g = self.in_channels // n_g
        r = torch.arange(n_r)
        first = r * n
        last = torch.clamp((r + 1) * n, max=k) - 1
        c0 = first // taps
        c_max = int((last // taps - c0).max()) + 1
        m = torch.arange(c_max)
        rows = (c0.view(-1, 1, 1) + m.view(1, -1, 1)) * taps + torch.arange(taps).view(1, 1, -1)
        valid = (rows >= first.view(-1, 1, 1)) & (rows <= last.view(-1, 1, 1))  # [n_r, c_max, taps]
        rows_c = torch.where(valid, rows, torch.zeros_like(rows))
        chan = torch.clamp(c0.view(-1, 1) + m.view(1, -1), max=cin_g - 1)  # [n_r, c_max]
        chan_index = (torch.arange(n_g).view(-1, 1, 1) * cin_g + chan.unsqueeze(0)).reshape(-1)
        self.register_buffer("chan_index", chan_index.to(self.w_tiles.device), False)

        def split(t: torch.Tensor) -> torch.Tensor:
            flat = t.reshape(n_g, n_r * n, -1)  # [G, Kp, T*O]
            g = flat[:, rows_c.reshape(-1)].view(n_g, n_r, c_max, taps, -1)
            g = g * valid.view(1, n_r, c_max, taps, 1).to(g.dtype)
            # -> [G, n_r, T*O, c_max, taps] -> conv weight [G*n_r*T*O, c_max, kh, kw]
            return g.permute(0, 1, 4, 2, 3).reshape(-1, c_max, kh, kw).contiguous()

        self.register_buffer("w_split", split(self.w_tiles), False)
        self.register_buffer(
            "noise_split",
            split(self.noise_tiles) if self.noise_tiles.numel() else torch.empty(0),
            False,
        )
        identity = chan_index.numel() == self.in_channels and bool(
            (chan_index == torch.arange(self.in_channels)).all()
        )
        self._gather_identity = identity

    def _tile_partial_sums(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xg = x if self._gather_identity else x.index_select(1, self.chan_index)
        split = self.w_split if w is self.w_tiles else self.noise_split
        n_g, n_r = self.groups, self.n_row_tiles
        y = self._conv(xg, split, n_g * n_r)  # [B, G*n_r*M, H, W]
        return y.view(y.shape[0], n_g, n_r, -1, *y.shape[2:])

    def _fast_tiled(
        self, u: torch.Tensor, unit: float, detect: bool = False
    ) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        if isinstance(self.padding, str) or u.dim() != 4:
            y, reach = super()._fast_tiled(u, unit, detect)  # [B, G, M, H, W]
            return y.reshape(y.shape[0], -1, *y.shape[3:]), reach
        # im2col: the (c, kh, kw) rows of the unfolded input are exactly the crossbar rows, so
        # each tile row is one GEMM [M, N] x [N, B*L]; chunked over tile rows with the DAC and
        # ADC scales folded into the weights (only round, clamp and a sum per chunk).
        n_r, n_g = self.n_row_tiles, self.groups
        b = u.shape[0]
        step, qmax = self._adc_params()
        w_all, l1_all = self._adc_tiles(unit)
        if n_r == 1 and not self.config.bit_slicing:
            # One tile row: each partial sum is a whole output, so the digital conv kernel
            # computes the partial sums directly (no gather needed).
            p = self._conv(u, self._adc_layout(w_all)[1], n_g)
            clip, check = _row_flags(l1_all[:, 0], _abs_max(u), qmax, detect)
            groups = p.view(b, n_g, -1).transpose(0, 1)  # [G, B, M*H*W] view
            reach = [(g, 0) for g in _quantize_rows(groups, qmax, clip, check)]
            return p.mul_(step), reach
        wt = self._adc_layout(w_all)[0]  # [G, n_r, M, N]
        m = wt.shape[2]
        kernel = _native_kernel(u, qmax)
        if kernel is not None:
            # im2col gathered panel by panel inside the kernel, codes summed in registers and
            # written straight into NCHW: no unfolded matrix, no partial sums, no transpose
            xp, h_out, w_out = self._padded_input(u)
            big_l = h_out * w_out
            checks = _clip_checks(l1_all, u, qmax, detect)
            out = torch.empty(b, n_g * m, h_out, w_out, dtype=u.dtype, device=u.device)
            cin_g = self.in_channels // n_g
            geometry = (*self.kernel_size, *self.stride, *self.dilation, h_out, w_out)
            found: list[tuple[int, int]] = []
            for g in range(n_g):
                rows = kernel.matmul(
                    wt[g],
                    xp,
                    out[:, g * m :],
                    qmax=qmax,
                    scale=float(step),
                    packed=False,
                    check=None if checks is None else checks[g],
                    out_strides=(big_l, big_l, n_g * m * big_l),
                    n_cols=b * big_l,
                    conv=(g * cin_g, *geometry, self.rows_per_group),
                )
                found += [(g, r) for r in rows]
            return out, found
        xt, h_out, w_out = self._im2col_tiles(u)  # [G, n_r, N, B*L]
        big_l = h_out * w_out
        clip, check = _row_flags(l1_all, _abs_max(u), qmax, detect)
        reach = []
        y = _workspace("acc", (n_g, m, b * big_l), u)
        if n_r == 1:  # one tile row per output: a single batched GEMM over the groups
            p = torch.bmm(wt[:, 0], xt[:, 0], out=y)
            rows = _quantize_rows(p, qmax, [c[0] for c in clip], [c[0] for c in check])
            reach = [(g, 0) for g in rows]
        else:
            chunk = max(1, min(n_r, _CHUNK_ELEMENTS // max(1, m * b * big_l)))
            buf = _workspace("psum", (chunk, m, b * big_l), u)
            for g in range(n_g):
                for r0 in range(0, n_r, chunk):
                    r1 = min(n_r, r0 + chunk)
                    p = torch.bmm(wt[g, r0:r1], xt[g, r0:r1], out=buf[: r1 - r0])
                    rows = _quantize_rows(p, qmax, clip[g][r0:r1], check[g][r0:r1])
                    reach += [(g, r0 + i) for i in rows]
                    part = p[0] if r1 - r0 == 1 else p.sum(0)
                    if r0 == 0:
                        y[g].copy_(part)
                    else:
                        y[g].add_(part)
        if not (isinstance(step, float) and step == 1.0):
            y.mul_(step)
        # [G, M, B, L] -> [B, G*M, H', W'] (a fresh tensor: y is scratch space)
        out = torch.empty(b, n_g * m, h_out, w_out, dtype=u.dtype, device=u.device)
        out.view(b, n_g * m, big_l).copy_(y.view(n_g * m, b, big_l).transpose(0, 1))
        return out, reach

    def _clip_correction(self, xq: torch.Tensor, reach: list[tuple[int, int]]) -> torch.Tensor:
        step, qmax = self._adc_params()
        n_g, n_r = self.groups, self.n_row_tiles
        m = self.out_channels // n_g
        chans = self.chan_index.view(n_g, n_r, -1)
        kernels = self.w_split.view(n_g, n_r, m, *self.w_split.shape[1:])
        parts: dict[int, torch.Tensor] = {}
        for g, r in reach:
            # the reference path's partial sum of tile row r of group g (its grouped conv,
            # restricted to that one group of channels and kernel rows)
            p = self._conv(xq.index_select(1, chans[g, r]), kernels[g, r], 1)
            c = XF.quantize_ste(p, step, qmax) - p
            parts[g] = c if g not in parts else parts[g] + c
        zero = torch.zeros_like(next(iter(parts.values())))
        return torch.cat([parts.get(g, zero) for g in range(n_g)], 1)

    def _padded_input(self, u: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Zero-padded input (a scratch buffer when padding is needed) and the output size."""
        kh, kw = self.kernel_size
        ph, pw = (int(v) for v in self.padding)
        if ph or pw:
            b, c, h, w = u.shape
            xp = _workspace("pad", (b, c, h + 2 * ph, w + 2 * pw), u)
            xp.zero_()  # one pass: zeroing the border alone is slower (strided 1-wide fills)
            xp[:, :, ph : ph + h, pw : pw + w].copy_(u)
        else:
            xp = u
        dh, dw = self.dilation
        sh, sw = self.stride
        h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        return xp, h_out, w_out

    def _im2col_tiles(self, u: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Unfolded input as crossbar rows per tile: ``[G, n_r, N, B*H'*W']`` (one gather copy).

        Row ``(c, i, j)`` of group ``g`` holds ``u_pad[b, g*Cin_g + c, h*s + i*d, w*s + j*d]``
        for every output position ``(b, h, w)``; rows past K (tile padding) are zero.
        """
        n, n_r, n_g = self.config.tile_size, self.n_row_tiles, self.groups
        kh, kw = self.kernel_size
        xp, h_out, w_out = self._padded_input(u)
        b, c = xp.shape[:2]
        dh, dw = self.dilation
        sh, sw = self.stride
        s_b, s_c, s_h, s_w = xp.stride()
        patches = xp.as_strided(
            (b, c, kh, kw, h_out, w_out), (s_b, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw)
        )
        k = self.rows_per_group
        cin_g = c // n_g
        cols = _workspace("im2col", (n_g, n_r * n, b, h_out, w_out), u)
        dest = cols[:, :k].view(n_g, cin_g, kh, kw, b, h_out, w_out)
        dest.copy_(patches.permute(1, 2, 3, 0, 4, 5).view(n_g, cin_g, kh, kw, b, h_out, w_out))
        if n_r * n > k:
            cols[:, k:].zero_()
        return cols.view(n_g, n_r, n, b * h_out * w_out), h_out, w_out

    def _adc_layout(self, w_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled tiles ``[G, n_r, N, M]`` laid out for the conv fast path (cached with them).

        Returns:
            GEMM operands ``[G, n_r, M, N]`` (contiguous) and, for a single tile row, the same
            weights as a conv kernel in the layer's weight shape (else an empty tensor).
        """
        cache = self._adc_t_cache
        if cache is None or cache[0] is not w_all:
            dense = torch.empty(0)
            if self.n_row_tiles == 1 and not self.config.bit_slicing:
                dense = self._dense_from_matrix(w_all[:, 0, : self.rows_per_group]).contiguous()
            cache = (w_all, w_all.transpose(-1, -2).contiguous(), dense)
            self._adc_t_cache = cache
        return cache[1], cache[2]

    def _chip_reference(self, x: torch.Tensor) -> torch.Tensor:
        y = super()._chip_reference(x)
        if y.dim() == 5:  # [B, G, M, H, W] from the tiled path
            y = y.reshape(y.shape[0], -1, *y.shape[3:])
        return y

    def _shift_add(self, y: torch.Tensor, coeff: torch.Tensor, batch: int) -> torch.Tensor:
        n_s, n_t = coeff.shape
        o = self.out_channels // self.groups
        y = y.reshape(n_s, batch, self.groups, n_t, o, *y.shape[-2:])
        out = torch.einsum("sbgtohw,st->bgohw", y, coeff)
        return out.reshape(batch, self.groups * o, *y.shape[-2:])

    def _digital(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight, self.groups)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "kind": "conv2d",
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "kernel_size": list(self.kernel_size),
            "chan_index": self.chan_index.detach().clone(),
            "w_split": self.w_split.detach().clone(),
        }
