"""Crossbar metrics: per-layer SNR and noise sensitivity (Roy et al.), non-ideality factor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nvmpriv.crossbar.circuit import effective_conductance
from nvmpriv.crossbar.config import CrossbarConfig
from nvmpriv.crossbar.functional import conductance_pair, quantize_levels
from nvmpriv.crossbar.layers import CrossbarLayer

__all__ = [
    "ColumnError",
    "LayerNoise",
    "column_error",
    "layer_noise",
    "noise_sensitivity",
    "nonideality_factor",
    "snr",
]


def _per_sample_sq(z: torch.Tensor) -> torch.Tensor:
    return z.detach().double().reshape(z.shape[0], -1).pow(2).sum(1)


def snr(z_digital: torch.Tensor, z_analog: torch.Tensor) -> float:
    r"""Signal-to-noise ratio of a layer's pre-activation output (Roy et al.).

    .. math::
        \mathrm{SNR} = \log_{10} \frac{1}{n}\sum_k
        \frac{\lVert Z^{a}_k \rVert^2}{\lVert Z^{d}_k - Z^{a}_k \rVert^2}

    (decimal log of the mean per-sample power ratio, as Roy et al.'s code computes it, i.e.
    bels; multiply by 10 for dB). The log of the mean, not the mean of the logs: by Jensen's
    inequality the latter is lower whenever the ratios vary between samples.

    Args:
        z_digital: Digital outputs ``[n, ...]`` (first axis = samples).
        z_analog: Crossbar outputs, same shape.

    Returns:
        ``log10`` of the mean per-sample ratio (``inf`` if identical).
    """
    num = _per_sample_sq(z_analog)
    den = _per_sample_sq(z_digital - z_analog)
    return float(torch.log10((num / den).mean()))


def noise_sensitivity(z_digital: torch.Tensor, z_analog: torch.Tensor) -> float:
    r"""Noise sensitivity of a layer (Roy et al.).

    .. math::
        \mathrm{NS} = \frac{1}{n}\sum_k
        \frac{\lVert Z^{d}_k - Z^{a}_k \rVert^2}{\lVert Z^{d}_k \rVert^2}

    Args:
        z_digital: Digital outputs ``[n, ...]`` (first axis = samples).
        z_analog: Crossbar outputs, same shape.

    Returns:
        The mean over samples of the per-sample ratio (unitless).
    """
    return float((_per_sample_sq(z_digital - z_analog) / _per_sample_sq(z_digital)).mean())


@dataclass(frozen=True)
class LayerNoise:
    """SNR and noise sensitivity of one layer.

    Attributes:
        snr: log10 of the mean per-sample power ratio (bels).
        noise_sensitivity: Mean per-sample relative error power (unitless).
    """

    snr: float
    noise_sensitivity: float

    @property
    def snr_db(self) -> float:
        """SNR in decibels (10 x bels)."""
        return 10.0 * self.snr


@torch.no_grad()
def layer_noise(
    digital: nn.Module, analog: nn.Module, inputs: torch.Tensor
) -> dict[str, LayerNoise]:
    """Per-layer SNR and NS between a digital model and its crossbar version.

    Forward hooks capture the output (pre-activation) of every crossbar layer of ``analog``
    and of the same-named module of ``digital``; both models see the same ``inputs``, and in
    ``analog`` every layer receives the (noisy) outputs of the crossbar layers before it, as
    on the chip. Both run in eval mode (dropout off, BatchNorm on its running statistics, which
    stay untouched), and each module's train/eval flag is restored afterwards.

    Args:
        digital: The digital model.
        analog: ``convert(digital, ...)`` (same module names).
        inputs: A batch of inputs (first axis = samples).

    Returns:
        Mapping from layer name to :class:`LayerNoise`.

    Raises:
        ValueError: If ``analog`` has no crossbar layers or names do not match.
    """
    names = [n for n, m in analog.named_modules() if isinstance(m, CrossbarLayer)]
    if not names:
        raise ValueError("analog model has no crossbar layers; pass convert(digital, config)")
    dig_modules = dict(digital.named_modules())
    ana_modules = dict(analog.named_modules())
    missing = [n for n in names if n not in dig_modules]
    if missing:
        raise ValueError(f"layers {missing} of the analog model are missing in the digital one")
    outs: dict[tuple[str, str], torch.Tensor] = {}
    handles = []
    for n in names:
        for tag, mod in (("d", dig_modules[n]), ("a", ana_modules[n])):

            def hook(_m: nn.Module, _i: object, out: torch.Tensor, key=(tag, n)) -> None:
                outs[key] = out.detach()

            handles.append(mod.register_forward_hook(hook))
    # In train mode dropout would draw different masks for the two models (noise that is not
    # the chip's) and BatchNorm would normalize by batch statistics and update the caller's.
    modes = [(m, m.training) for model in (digital, analog) for m in model.modules()]
    try:
        digital.eval()
        analog.eval()
        digital(inputs)
        analog(inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return {
        n: LayerNoise(
            snr=snr(outs[("d", n)], outs[("a", n)]),
            noise_sensitivity=noise_sensitivity(outs[("d", n)], outs[("a", n)]),
        )
        for n in names
    }


@dataclass(frozen=True)
class ColumnError:
    """Column-current error statistics of a configuration's tiles.

    Attributes:
        nf: Non-ideality factor ``mean((I_ideal - I_nonideal) / I_ideal)`` (unitless).
        mean_abs_rel: ``mean(|I_ideal - I_nonideal| / I_ideal)`` (unitless).
        n_samples: Number of column currents averaged (count).
    """

    nf: float
    mean_abs_rel: float
    n_samples: int


@torch.no_grad()
def column_error(
    config: CrossbarConfig,
    *,
    n_tiles: int = 32,
    n_inputs: int = 8,
    seed: int = 0,
    tile_size: int | None = None,
    conductances: str = "uniform",
) -> ColumnError:
    """Measure the column-current error caused by a configuration's parasitics.

    Protocol: ``n_tiles`` random N x N arrays; ``n_inputs`` input vectors per array with every
    row voltage i.i.d. uniform in ``[0, v_read]``; ideal currents ``G^T V``; non-ideal currents
    from the exact effective matrices (equal to the nodal solution); statistics over all tiles x
    inputs x columns. Draws come from ``torch.Generator().manual_seed(seed)`` in float64.

    The conductances are either i.i.d. uniform in ``[g_min, g_max]`` (``"uniform"``, mean
    ``(g_min + g_max) / 2``: the protocol the 100k presets were fitted with) or the ``G+``
    array of i.i.d. standard-normal weights programmed like a layer (``"gaussian_weights"``:
    the tile's largest ``|w|`` at ``g_max``, ``config.levels`` states, negative weights at
    ``g_min``; mean about ``0.1 g_max``). Trained layers look like the second; IR drop grows
    with the load on the lines, so it gives a smaller NF (PytorX's published column errors were
    measured that way, see README "Modelling choices").

    Args:
        config: The configuration (its ``tile_size``, ``g_min``, ``g_max``, ``v_read``,
            ``r_wire``, ``r_source``, ``r_sink``, ``levels`` are used).
        n_tiles: Random arrays (count).
        n_inputs: Input vectors per array (count).
        seed: Seed of the draws.
        tile_size: Override of N (count), e.g. to sweep sizes.
        conductances: ``"uniform"`` or ``"gaussian_weights"``.

    Returns:
        The statistics.

    Raises:
        ValueError: On an unknown ``conductances``.
    """
    n = config.tile_size if tile_size is None else tile_size
    gen = torch.Generator().manual_seed(seed)
    if conductances == "uniform":
        g = config.g_min + (config.g_max - config.g_min) * torch.rand(
            n_tiles, n, n, generator=gen, dtype=torch.float64
        )
    elif conductances == "gaussian_weights":
        w = torch.randn(n_tiles, n, n, generator=gen, dtype=torch.float64)
        w = w / w.abs().amax(dim=(1, 2), keepdim=True)  # each tile's largest |w| at g_max
        w = quantize_levels(w, 1.0, config.levels)
        g = conductance_pair(w, 1.0, config.g_min, config.g_max)[0]
    else:
        raise ValueError(f"conductances={conductances!r}; choose 'uniform' or 'gaussian_weights'")
    v = config.v_read * torch.rand(n_tiles, n, n_inputs, generator=gen, dtype=torch.float64)
    ideal = g.transpose(1, 2) @ v
    if config.has_parasitics:
        a = effective_conductance(
            g, r_wire=config.r_wire, r_source=config.r_source, r_sink=config.r_sink
        )
        real = a.transpose(1, 2) @ v
    else:
        real = ideal
    rel = (ideal - real) / ideal
    return ColumnError(
        nf=float(rel.mean()), mean_abs_rel=float(rel.abs().mean()), n_samples=rel.numel()
    )


def nonideality_factor(config: CrossbarConfig, **kwargs: Any) -> float:
    """Non-ideality factor NF of a configuration (Roy et al.), see :func:`column_error`.

    Args:
        config: The configuration.
        **kwargs: ``n_tiles``, ``n_inputs``, ``seed``, ``tile_size``, ``conductances`` of
            :func:`column_error`.

    Returns:
        ``NF = mean((I_ideal - I_nonideal) / I_ideal)`` (unitless).
    """
    nf = column_error(config, **kwargs).nf
    return 0.0 if math.isclose(nf, 0.0, abs_tol=1e-15) else nf
