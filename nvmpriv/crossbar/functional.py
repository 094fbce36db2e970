"""Crossbar physics as pure functions (torch): mapping, converters, bit slicing, device effects.

Nothing here holds state; layers call these functions when they are programmed (static
effects) or at every forward (converters, read noise).
"""

from __future__ import annotations

import hashlib
import math

import torch

__all__ = [
    "apply_drift",
    "apply_stuck_at",
    "apply_variation",
    "conductance_pair",
    "fixed_point",
    "layer_seed",
    "percentile_abs",
    "quantize_levels",
    "quantize_ste",
    "signed_digits",
    "unsigned_slices",
]


def layer_seed(seed: int, index: int) -> int:
    """Stable 63-bit seed of layer ``index`` of a chip seeded with ``seed``.

    Args:
        seed: Chip seed (any integer).
        index: Position of the layer among the converted layers (0-based).

    Returns:
        A non-negative integer usable with ``torch.Generator.manual_seed``.
    """
    digest = hashlib.sha256(f"nvmpriv-crossbar:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def quantize_ste(x: torch.Tensor, step: torch.Tensor | float, qmax: int) -> torch.Tensor:
    """Uniform symmetric quantizer with a straight-through gradient.

    ``q = clamp(round(x / step), -qmax, qmax) * step``. The gradient is 1 inside the range
    ``[-qmax*step, qmax*step]`` and 0 outside (clipped straight-through estimator).

    Args:
        x: Values (any unit).
        step: Quantization step (unit of ``x``), > 0.
        qmax: Largest code magnitude (count).

    Returns:
        Quantized values, same shape and unit as ``x``.
    """
    lim = qmax * step
    clipped = torch.maximum(torch.minimum(x, torch.as_tensor(lim)), torch.as_tensor(-lim))
    q = torch.round(clipped / step) * step
    return clipped + (q - clipped).detach()


def percentile_abs(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """The given percentile of ``|x|`` (max-abs for 100), robust to huge tensors.

    Args:
        x: Values.
        percentile: Percent in (0, 100].

    Returns:
        A scalar tensor (unit of ``x``), float32.
    """
    a = x.detach().abs().flatten().float()
    if a.numel() == 0:
        return torch.zeros(())
    if percentile >= 100:
        return a.max()
    if a.numel() > 1 << 22:  # deterministic subsample keeps quantile's memory bounded
        a = a[:: a.numel() // (1 << 22) + 1]
    return torch.quantile(a, percentile / 100.0)


def quantize_levels(w: torch.Tensor, w_max: float, levels: int | None) -> torch.Tensor:
    """Round weights to the conductance grid of a differential pair.

    Each device has ``levels`` equally spaced states from g_min to g_max, so a weight of
    magnitude ``|w| <= w_max`` becomes ``round(|w| / w_max * (levels - 1)) / (levels - 1)``.

    Args:
        w: Weights (weight units).
        w_max: Weight mapped to g_max - g_min (weight units), > 0.
        levels: States per device, or ``None`` for continuous programming.

    Returns:
        Quantized weights (weight units).
    """
    if levels is None:
        return w
    k = levels - 1
    return torch.round(w / w_max * k) / k * w_max


def conductance_pair(
    w: torch.Tensor, w_max: float, g_min: float, g_max: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map signed weights to a differential conductance pair.

    ``G+ = g_min + relu(w) / w_max * (g_max - g_min)``, ``G- = g_min + relu(-w) / w_max *
    (g_max - g_min)``, so ``(G+ - G-) * w_max / (g_max - g_min) = w``.

    Args:
        w: Weights (weight units), ``|w| <= w_max``.
        w_max: Weight mapped to the full conductance swing (weight units), > 0.
        g_min: Lowest conductance (siemens).
        g_max: Highest conductance (siemens).

    Returns:
        ``(G+, G-)`` in siemens, same shape as ``w``.
    """
    scale = (g_max - g_min) / w_max
    return g_min + torch.relu(w) * scale, g_min + torch.relu(-w) * scale


def apply_variation(
    g: torch.Tensor, sigma: float, model: str, generator: torch.Generator
) -> torch.Tensor:
    """Static device-to-device programming variation.

    Args:
        g: Target conductances (siemens).
        sigma: Relative standard deviation of the programmed conductance (unitless).
        model: ``lognormal`` (``g * exp(s z - s^2 / 2)`` with ``s^2 = ln(1 + sigma^2)``: mean
            ``g`` and relative standard deviation ``sigma``, like the Gaussian model, but never
            negative) or ``gaussian`` (``g * (1 + sigma z)``, clipped at 0).
        generator: Seeded generator (the chip's randomness).

    Returns:
        Programmed conductances (siemens).
    """
    if sigma <= 0:
        return g
    z = torch.randn(g.shape, generator=generator, dtype=g.dtype)
    if model == "lognormal":
        # exp(sigma z) alone would raise the mean by exp(sigma^2 / 2) (a systematic gain of
        # 65 % at sigma = 1) and give a relative spread above sigma.
        s2 = math.log1p(sigma * sigma)
        return g * torch.exp(math.sqrt(s2) * z - s2 / 2)
    return torch.clamp(g * (1 + sigma * z), min=0.0)


def apply_stuck_at(
    g: torch.Tensor,
    p_min: float,
    p_max: float,
    g_min: float,
    g_max: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Static stuck-at faults: a fraction of devices stuck at g_min, another at g_max.

    Args:
        g: Conductances (siemens).
        p_min: Fraction stuck at ``g_min`` (stuck-off).
        p_max: Fraction stuck at ``g_max`` (stuck-on).
        g_min: Lowest conductance (siemens).
        g_max: Highest conductance (siemens).
        generator: Seeded generator (the chip's randomness).

    Returns:
        Conductances with faults (siemens).
    """
    if p_min <= 0 and p_max <= 0:
        return g
    u = torch.rand(g.shape, generator=generator, dtype=torch.float64)
    g = torch.where(u < p_min, torch.full_like(g, g_min), g)
    return torch.where((u >= p_min) & (u < p_min + p_max), torch.full_like(g, g_max), g)


def apply_drift(g: torch.Tensor, nu: float, t: float, t0: float) -> torch.Tensor:
    """Power-law conductance drift ``G(t) = G0 (t / t0)^-nu``.

    Args:
        g: Conductances at ``t0`` (siemens).
        nu: Drift exponent (unitless).
        t: Read time (seconds).
        t0: Reference time (seconds).

    Returns:
        Conductances at ``t`` (siemens).
    """
    if nu <= 0:
        return g
    return g * (t / t0) ** (-nu)


def fixed_point(x: torch.Tensor, bits: int, frac_bits: int) -> torch.Tensor:
    """Signed fixed-point integer codes ``clamp(round(x 2^frac), +-(2^(bits-1) - 1))``.

    Args:
        x: Real values.
        bits: Total bits, sign included.
        frac_bits: Fractional bits (may be negative).

    Returns:
        Integer-valued codes (same dtype as ``x``); the represented value is ``code *
        2^-frac_bits``.
    """
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x * 2.0**frac_bits), -qmax, qmax)


def signed_digits(codes: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Split signed integer codes into signed base-``2^width`` digits, MSB first.

    ``codes = sum_k digits[k] * 2^(width * (count - 1 - k))`` with every digit carrying the
    sign of its code and a magnitude in ``[0, 2^width - 1]`` (sign-magnitude streaming).

    Args:
        codes: Integer-valued tensor, ``|codes| < 2^(width * count)``.
        width: Digit width (bits).
        count: Number of digits.

    Returns:
        Digits ``[count, *codes.shape]``.
    """
    sign = torch.sign(codes)
    mag = codes.abs()
    return torch.stack(
        [
            sign * torch.remainder(torch.floor(mag / 2.0 ** (width * (count - 1 - k))), 2**width)
            for k in range(count)
        ]
    )


def unsigned_slices(codes: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Split non-negative integer codes into unsigned ``width``-bit slices, MSB first.

    Args:
        codes: Non-negative integer-valued tensor.
        width: Slice width (bits).
        count: Number of slices.

    Returns:
        Slices ``[count, *codes.shape]`` in ``[0, 2^width - 1]``.
    """
    return signed_digits(codes.abs(), width, count)
