"""Crossbar layers against independent oracles (digital layers, fixed point, nodal solver)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nvmpriv.crossbar import (
    PRESETS,
    CrossbarConfig,
    CrossbarConv2d,
    CrossbarLinear,
    NotCalibratedError,
    calibrate,
    convert,
    crossbar_layers,
    simulate,
    unsupported_layers,
)
from nvmpriv.crossbar import functional as XF
from nvmpriv.crossbar.circuit import column_currents

IDEAL = PRESETS["ideal"]


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, dilation=1, groups=2, bias=False),  # grouped
        nn.ReLU(),
        nn.Conv2d(6, 5, 1),
    )


@pytest.mark.parametrize("tile", [4, 8, 64])
def test_ideal_equals_digital(tile):
    torch.manual_seed(1)
    fc = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 7))
    cn = _conv_net()
    cfg = IDEAL.replace(tile_size=tile)
    x = torch.randn(5, 30)
    xc = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        for model, inp in ((fc, x), (cn, xc)):
            ref = model(inp)
            out = convert(model, cfg, seed=0)(inp)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            assert torch.equal(out, ref)  # bit-exact: the ideal chip runs the digital kernels


def _tile_oracle_linear(x, w, b, tile, step, qmax):
    """Per-tile partial sums in float64 with a per-tile ADC, then the digital sum."""
    x = x.double().numpy()
    w = w.double().numpy()
    y = np.zeros((x.shape[0], w.shape[0]))
    for r0 in range(0, w.shape[1], tile):
        p = x[:, r0 : r0 + tile] @ w[:, r0 : r0 + tile].T
        y += np.clip(np.round(p / step), -qmax, qmax) * step
    return torch.from_numpy(y + b.double().numpy())


def test_adc_path_matches_tile_oracle_linear():
    torch.manual_seed(2)
    lin = nn.Linear(21, 6)
    cfg = IDEAL.replace(tile_size=8, adc_bits=6)
    x = torch.randn(9, 21)
    layer = convert(lin, cfg, seed=0, calibration=x)
    qmax = 2**5 - 1
    step = float(layer.adc_range) / qmax
    ref = _tile_oracle_linear(x, lin.weight.detach(), lin.bias.detach(), 8, step, qmax)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the autograd (STE) path computes the same function
    out_grad = layer(x.clone().requires_grad_(True))
    torch.testing.assert_close(out_grad.detach().double(), ref, rtol=1e-5, atol=1e-5)
    # calibration used max |partial sum|
    p = torch.stack([x[:, r : r + 8] @ lin.weight.detach()[:, r : r + 8].T for r in (0, 8, 16)])
    assert float(layer.adc_range) == pytest.approx(float(p.abs().max()), rel=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_adc_path_matches_unfold_oracle_conv(groups):
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=1, groups=groups)
    cfg = IDEAL.replace(tile_size=8, adc_bits=7, dac_bits=6)
    x = torch.randn(2, 4, 5, 5)
    layer = convert(conv, cfg, seed=0, calibration=x)
    qd = 2**5 - 1
    sd = float(layer.dac_range) / qd
    assert float(layer.dac_range) == pytest.approx(float(x.abs().max()))
    xq = torch.clamp(torch.round(x / sd), -qd, qd) * sd
    qa = 2**6 - 1
    sa = float(layer.adc_range) / qa
    cols = F.unfold(xq.double(), 3, padding=1)  # [B, Cin*9, L]
    cin_g, cout_g = 4 // groups, 6 // groups
    k = cin_g * 9
    w = conv.weight.detach().double().reshape(groups, cout_g, k)
    outs = []
    for g in range(groups):
        xg = cols[:, g * k : (g + 1) * k]
        acc = 0
        for r0 in range(0, k, 8):
            p = torch.einsum("bkl,ok->bol", xg[:, r0 : r0 + 8], w[g][:, r0 : r0 + 8])
            acc = acc + torch.clamp(torch.round(p / sa), -qa, qa) * sa
        outs.append(acc)
    ref = torch.cat(outs, 1).reshape(2, 6, 5, 5) + conv.bias.detach().double().view(1, -1, 1, 1)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_ir_drop_layer_matches_nodal_solver():
    torch.manual_seed(4)
    lin = nn.Linear(12, 10)
    cfg = CrossbarConfig(tile_size=8, r_wire=5.0, r_source=300.0, r_sink=200.0)
    layer = convert(lin, cfg, seed=0)
    x = torch.randn(3, 12)
    w = lin.weight.detach().double().numpy().T  # [K, O]
    w_max = np.abs(w).max()
    dg = cfg.g_max - cfg.g_min
    wp = np.zeros((16, 16))
    wn = np.zeros((16, 16))
    wp[:12, :10] = np.maximum(w, 0) / w_max
    wn[:12, :10] = np.maximum(-w, 0) / w_max
    xv = np.zeros((16, 3))
    xv[:12] = x.double().numpy().T * 0.1  # any voltage scale: the circuit is linear
    y = np.zeros((16, 3))
    kw = dict(r_wire=5.0, r_source=300.0, r_sink=200.0)
    for r in range(2):
        for c in range(2):
            rs, cs = slice(8 * r, 8 * r + 8), slice(8 * c, 8 * c + 8)
            ip = column_currents(cfg.g_min + wp[rs, cs] * dg, xv[rs], **kw)
            im = column_currents(cfg.g_min + wn[rs, cs] * dg, xv[rs], **kw)
            y[cs] += (ip - im) * w_max / dg / 0.1
    ref = torch.from_numpy(y[:10].T) + lin.bias.detach().double()
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert (out.double() - (x @ lin.weight.detach().T + lin.bias.detach())).abs().max() > 1e-3


def _fix(t, bits, frac):
    q = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(t.double() * 2.0**frac), -q, q) * 2.0**-frac


def test_bit_sliced_ideal_equals_fixed_point_linear():
    torch.manual_seed(5)
    lin = nn.Linear(19, 7)
    cfg = IDEAL.replace(
        tile_size=8,
        bit_slicing=True,
        adc_bits=15,
        input_bits=16,
        input_int_bits=4,
        weight_bits=16,
        weight_int_bits=2,
        stream_width=4,
        slice_width=4,
    )
    layer = convert(lin, cfg, seed=0)
    assert layer.tiled_path
    x = torch.randn(6, 19) * 2
    ref = _fix(x, 16, 12) @ _fix(lin.weight.detach(), 16, 14).T + lin.bias.detach().double()
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # a coarse ADC (drops LSBs) must change the result, and so must 2-bit streams of 8 bits
    coarse = convert(lin, cfg.replace(adc_bits=6), seed=0)
    assert not torch.allclose(coarse(x).double(), ref, atol=1e-3)


def test_bit_sliced_ideal_equals_fixed_point_conv():
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
    cfg = IDEAL.replace(
        tile_size=8,
        bit_slicing=True,
        adc_bits=15,
        input_bits=8,
        input_int_bits=3,
        weight_bits=8,
        weight_int_bits=1,
        stream_width=2,
        slice_width=4,
    )
    x = torch.randn(2, 3, 5, 5)
    layer = convert(conv, cfg, seed=0)
    ref = F.conv2d(
        _fix(x, 8, 5), _fix(conv.weight.detach(), 8, 7), conv.bias.detach().double(), padding=1
    )
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # without ADC the sliced chip collapses to one conv with the same result
    dense = convert(conv, cfg.replace(adc_bits=None), seed=0)
    assert not dense.tiled_path
    torch.testing.assert_close(dense(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_same_seed_same_chip_different_seed_different_chip():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 4))
    cfg = PRESETS["32x32_100k"].replace(tile_size=8, p_stuck_min=0.05)
    x = torch.randn(8, 20)
    a = convert(model, cfg, seed=11, calibration=x)
    b = convert(model, cfg, seed=11, calibration=x)
    c = convert(model, cfg, seed=12, calibration=x)
    for name, layer in crossbar_layers(a).items():
        assert torch.equal(layer.w_tiles, crossbar_layers(b)[name].w_tiles)
        assert not torch.equal(layer.w_tiles, crossbar_layers(c)[name].w_tiles)
    # two layers of the same chip do not share their random draws
    la, lb = crossbar_layers(a).values()
    assert la.seed != lb.seed
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        with simulate(model, cfg, seed=11, calibration=x) as m:
            assert torch.equal(m(x), a(x))  # simulate builds the same chip as convert


def test_simulate_restores_exactly_also_on_error():
    torch.manual_seed(8)
    model = _conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    cfg = PRESETS["32x32_100k"].replace(tile_size=16)
    x = torch.randn(2, 3, 8, 8)
    with (
        pytest.raises(RuntimeError, match="boom"),
        simulate(model, cfg, seed=0, calibration=x) as m,
    ):
        assert isinstance(m[0], CrossbarConv2d)
        m(x).sum().backward()
        raise RuntimeError("boom")
    assert all(modules_before[n] is m for n, m in model.named_modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(isinstance(m, CrossbarConv2d) for m in model.modules())


def test_convert_leaves_original_untouched():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(5, 3))
    w = model[0].weight.detach().clone()
    chip = convert(
        model, PRESETS["32x32_100k"].replace(tile_size=4), seed=0, calibration=torch.randn(4, 5)
    )
    assert isinstance(chip[0], CrossbarLinear) and isinstance(model[0], nn.Linear)
    with torch.no_grad():
        chip[0].weight.mul_(2)
    assert torch.equal(model[0].weight, w)


def test_uncalibrated_converters_raise():
    layer = convert(nn.Linear(4, 2), IDEAL.replace(adc_bits=8), seed=0)
    with pytest.raises(NotCalibratedError, match="calibrate"):
        layer(torch.randn(1, 4))
    calibrate(layer, torch.randn(3, 4))
    layer(torch.randn(1, 4))


def test_noisy_calibration_depends_on_the_chip_seed_only():
    cfg = CrossbarConfig(
        tile_size=8, dac_bits=8, adc_bits=8, read_noise=True, read_noise_sigma=0.05
    )
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.rand(64, 16)

    def ranges(global_seed: int, chip_seed: int) -> list[float]:
        torch.manual_seed(global_seed)
        chip = convert(net, cfg, seed=chip_seed, calibration=x)
        after = torch.rand(1)  # the caller's stream continues as if nothing had run
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))
        return [
            float(r) for m in chip if hasattr(m, "adc_range") for r in (m.dac_range, m.adc_range)
        ]

    assert ranges(1, 0) == ranges(2, 0)
    assert ranges(1, 0) != ranges(1, 1)


def test_gradients_ste_and_digital():
    torch.manual_seed(10)
    lin = nn.Linear(10, 5)
    cfg = CrossbarConfig(tile_size=4, r_wire=20.0, r_source=500.0, r_sink=500.0)
    layer = convert(lin, cfg, seed=0)
    x = torch.randn(3, 10, requires_grad=True)
    g = torch.randn(3, 5)
    layer(x).backward(g)
    w_eff = layer.w_dense.detach()
    torch.testing.assert_close(x.grad, g @ w_eff, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, g.T @ x.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w_eff, lin.weight)
    dig = convert(lin, cfg.replace(gradient="digital"), seed=0)
    x2 = x.detach().clone().requires_grad_(True)
    y = dig(x2)
    y.backward(g)
    torch.testing.assert_close(x2.grad, g @ lin.weight.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(y, layer(x), rtol=1e-6, atol=1e-6)  # forward is the chip's
    # quantizers pass gradients inside their range (clipped STE)
    q = convert(lin, IDEAL.replace(dac_bits=4, adc_bits=6), seed=0, calibration=x.detach() * 10)
    x3 = x.detach().clone().requires_grad_(True)
    q(x3).backward(g)
    torch.testing.assert_close(x3.grad, g @ lin.weight.detach(), rtol=1e-5, atol=1e-6)


def test_stuck_at_and_drift_closed_forms():
    torch.manual_seed(11)
    lin = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    for p, stuck in (({"p_stuck_max": 1.0}, IDEAL.g_max), ({"p_stuck_min": 1.0}, IDEAL.g_min)):
        layer = convert(lin, CrossbarConfig(tile_size=4, **p), seed=0)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), lin.bias.detach().expand(3, 4))
        # every device of both arrays (padding included) holds the stuck conductance
        probe = convert(lin, CrossbarConfig(tile_size=4, **p, **_PROBE), seed=0)
        gp, gn = _programmed_pair(probe, pad=True)
        for g in (gp, gn):
            torch.testing.assert_close(g, torch.full_like(g, stuck), rtol=1e-5, atol=0)
    cfg = CrossbarConfig(tile_size=4, drift_nu=0.05, drift_time=100.0, drift_t0=1.0)
    layer = convert(lin, cfg, seed=0)
    with torch.no_grad():
        ref = 100.0**-0.05 * (x @ lin.weight.T) + lin.bias
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
    # stuck-at fractions: test_stuck_at_fractions_and_values_match_config


# Read noise stores Nt = sigma^2 (G+^2 + G-^2) per cell (weight units), which together with
# w_tiles = G+ - G- determines both programmed conductances of every cell.
_PROBE = {"read_noise": True, "read_noise_sigma": 0.5}


def _programmed_pair(layer, pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Programmed ``(G+, G-)`` in siemens, ``[K, O]`` (``pad``: all tile rows/columns).

    Decoded from the documented programmed state (no parasitics): ``w_tiles = (G+ - G-) s`` and
    ``noise_tiles = sigma^2 (G+^2 + G-^2) s^2`` with ``s = w_max / (g_max - g_min)``, so
    ``G+ + G- = sqrt(2 (G+^2 + G-^2) - (G+ - G-)^2)``.
    """
    cfg = layer.config
    assert cfg.has_read_noise and not cfg.has_parasitics and not cfg.bit_slicing
    state = layer.programmed_state()
    k, o = state["rows_per_group"], state["cols_per_group"]
    scale = (float(layer.weight.detach().double().abs().max()) or 1.0) / (cfg.g_max - cfg.g_min)
    d = state["w_tiles"].double().reshape(-1, o) / scale
    s = state["noise_tiles"].double().reshape(-1, o) / (cfg.read_noise_sigma * scale) ** 2
    total = torch.sqrt(torch.clamp(2 * s - d * d, min=0))
    gp, gn = (total + d) / 2, (total - d) / 2
    return (gp, gn) if pad else (gp[:k], gn[:k])


def _targets(w: torch.Tensor, cfg: CrossbarConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ``(G+, G-)`` of a ``[O, K]`` weight as ``[K, O]`` (conductance_pair's closed form)."""
    w = w.detach().double().T
    frac = (cfg.g_max - cfg.g_min) / w.abs().max()
    return cfg.g_min + torch.relu(w) * frac, cfg.g_min + torch.relu(-w) * frac


def _binomial_ok(hits: torch.Tensor, p: float, z: float = 5.0) -> bool:
    """``mean(hits)`` within ``z`` binomial standard errors of ``p``."""
    n = hits.numel()
    return abs(float(hits.double().mean()) - p) <= z * math.sqrt(p * (1 - p) / n) + 1 / n


def test_stuck_at_fractions_and_values_match_config():
    """Oracle: binomial counts of devices decoded at exactly g_min / g_max (5 standard errors)."""
    p_min, p_max = 0.1, 0.05
    cfg = CrossbarConfig(tile_size=64, p_stuck_min=p_min, p_stuck_max=p_max, **_PROBE)
    torch.manual_seed(14)
    lin = nn.Linear(128, 128, bias=False)
    with torch.no_grad():
        lin.weight.uniform_(-1.0, 1.0)
    layer = convert(lin, cfg, seed=5)
    gp, gn = _programmed_pair(layer)
    tp, tn = _targets(lin.weight, cfg)
    g, t = torch.cat([gp.flatten(), gn.flatten()]), torch.cat([tp.flatten(), tn.flatten()])

    def at(value: torch.Tensor | float) -> torch.Tensor:
        return torch.isclose(g, torch.as_tensor(value, dtype=g.dtype).expand_as(g), rtol=1e-5)

    off, on, kept = at(cfg.g_min), at(cfg.g_max), at(t)
    assert bool((off | on | kept).all())  # a device is either intact or stuck at a rail
    dg = cfg.g_max - cfg.g_min
    mid = (t > cfg.g_min + 0.01 * dg) & (t < cfg.g_max - 0.01 * dg)  # both faults visible
    low = t == cfg.g_min  # only stuck-on visible
    assert int(mid.sum()) > 15000 and int(low.sum()) > 15000
    assert _binomial_ok(off[mid], p_min), float(off[mid].double().mean())
    assert _binomial_ok(on[mid], p_max), float(on[mid].double().mean())
    assert _binomial_ok(on[low], p_max), float(on[low].double().mean())
    assert _binomial_ok(kept[mid], 1 - p_min - p_max)


def test_apply_stuck_at_is_exact_and_binomial():
    """Oracle: exact rail values and binomial fractions on 200k devices (5 standard errors)."""
    g_min, g_max = 1e-6, 1e-5
    g = torch.full((200_000,), 4e-6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    out = XF.apply_stuck_at(g, 0.2, 0.07, g_min, g_max, gen)
    off, on, kept = out == g_min, out == g_max, out == 4e-6
    assert bool((off | on | kept).all())
    assert _binomial_ok(off, 0.2) and _binomial_ok(on, 0.07) and _binomial_ok(kept, 0.73)
    same = XF.apply_stuck_at(g, 0.2, 0.07, g_min, g_max, torch.Generator().manual_seed(3))
    assert torch.equal(out, same)


@pytest.mark.parametrize("model", ["lognormal", "gaussian"])
def test_device_variation_distribution_and_static_per_seed(model):
    """Oracle: log(G/G_target) ~ N(-s^2/2, s^2) with s^2 = ln(1 + sigma^2) (lognormal) or
    G/G_target - 1 ~ N(0, sigma^2) (gaussian), both standardized to N(0, sigma^2): mean within
    5 sigma/sqrt(n), std within 5 sigma/sqrt(2n), 1-sigma mass 0.6827 within 5 binomial standard
    errors, G+ and G- uncorrelated (5/sqrt(n)); and for both, G/G_target has mean 1 and relative
    standard deviation sigma (the field's meaning)."""
    sigma = 0.1
    cfg = CrossbarConfig(tile_size=64, variation_sigma=sigma, variation_model=model, **_PROBE)
    torch.manual_seed(15)
    lin = nn.Linear(128, 128, bias=False)
    with torch.no_grad():
        lin.weight.uniform_(-1.0, 1.0)
    layer = convert(lin, cfg, seed=21)
    gp, gn = _programmed_pair(layer)
    tp, tn = _targets(lin.weight, cfg)

    s2 = math.log1p(sigma**2)

    def dev(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if model == "lognormal":
            return (torch.log(g / t) + s2 / 2) * sigma / math.sqrt(s2)
        return g / t - 1

    ep, en = dev(gp, tp).flatten(), dev(gn, tn).flatten()
    e = torch.cat([ep, en])
    n = e.numel()
    rel = torch.cat([(gp / tp).flatten(), (gn / tn).flatten()]).double() - 1
    assert abs(float(rel.mean())) <= 5 * sigma / math.sqrt(n)
    assert abs(float(rel.std()) - sigma) <= 10 * sigma / math.sqrt(2 * n)
    assert abs(float(e.mean())) <= 5 * sigma / math.sqrt(n)
    assert abs(float(e.std()) - sigma) <= 5 * sigma / math.sqrt(2 * n)
    assert _binomial_ok(e.abs() <= sigma, math.erf(1 / math.sqrt(2)))
    assert abs(float(torch.corrcoef(torch.stack([ep, en]))[0, 1])) <= 5 / math.sqrt(n / 2)
    # static per chip: same seed -> same devices, also after reprogramming and forwards
    tiles = layer.w_tiles.clone()
    with torch.no_grad():
        layer(torch.randn(4, 128))
    layer.program()
    assert torch.equal(layer.w_tiles, tiles)
    assert torch.equal(convert(lin, cfg, seed=21).w_tiles, tiles)
    # another seed draws independent devices
    other = dev(_programmed_pair(convert(lin, cfg, seed=22))[0], tp).flatten()
    assert abs(float(torch.corrcoef(torch.stack([ep, other]))[0, 1])) <= 5 / math.sqrt(n / 2)


def test_levels_quantize_weights():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.4, -0.2], [-0.9, 0.6, 0.0]]))
    layer = convert(lin, IDEAL.replace(levels=3, tile_size=4), seed=0)
    expect = torch.tensor([[1.0, 0.5, 0.0], [-1.0, 0.5, 0.0]])  # 3 levels: {0, 0.5, 1} * w_max
    torch.testing.assert_close(layer.w_dense, expect)


def test_read_noise_is_per_query_with_exact_variance():
    torch.manual_seed(12)
    lin = nn.Linear(8, 3, bias=False)
    sigma = 0.1
    cfg = CrossbarConfig(tile_size=4, read_noise=True, read_noise_sigma=sigma)
    layer = convert(lin, cfg, seed=0)
    x = torch.randn(1, 8)
    with torch.no_grad():
        draws = torch.stack([layer(x)[0] for _ in range(4000)])
    w = lin.weight.detach().double()
    w_max = w.abs().max()
    dg = cfg.g_max - cfg.g_min
    gp = cfg.g_min + torch.relu(w) / w_max * dg
    gn = cfg.g_min + torch.relu(-w) / w_max * dg
    var = (x.double() ** 2 @ ((gp**2 + gn**2) * (sigma * w_max / dg) ** 2).T)[0]
    torch.testing.assert_close(draws.double().var(0), var, rtol=0.1, atol=0)
    torch.testing.assert_close(
        draws.double().mean(0), (x.double() @ w.T)[0], rtol=0, atol=4 * float(var.max().sqrt()) / 60
    )
    assert not torch.equal(draws[0], draws[1])


def test_programmed_state_reproduces_forward():
    torch.manual_seed(13)
    lin = nn.Linear(21, 5)
    cfg = PRESETS["32x32_100k"].replace(tile_size=8)
    x = torch.randn(4, 21)
    layer = convert(lin, cfg, seed=3, calibration=x)
    s = layer.programmed_state()
    xq = torch.clamp(torch.round(x / s["dac_step"]), -s["dac_qmax"], s["dac_qmax"]) * s["dac_step"]
    xp = F.pad(xq, (0, s["n_row_tiles"] * s["tile_size"] - 21)).view(4, -1, 8).transpose(0, 1)
    p = torch.bmm(xp, s["w_tiles"][0])
    y = (
        torch.clamp(torch.round(p / s["adc_step"]), -s["adc_qmax"], s["adc_qmax"]) * s["adc_step"]
    ).sum(0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y + s["bias"], rtol=1e-5, atol=1e-5)
    # state dict round trip rebuilds the same chip
    fresh = convert(lin, cfg, seed=99)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x))


def test_unsupported_layers_lists_digital_modules():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv1d(2, 2, 1),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    reasons = unsupported_layers(model)
    assert set(reasons) == {"1", "2", "3"}
    assert "BatchNorm2d" in reasons["1"] and "reflect" in reasons["3"]
    chip = convert(model, IDEAL, seed=0)
    assert isinstance(chip[3], nn.Conv2d) and not isinstance(chip[3], CrossbarConv2d)


def test_non_finite_weights_are_refused_with_the_layer_name() -> None:
    net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[2].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"layer 2: bias holds NaN/inf values"):
        convert(net, PRESETS["32x32_100k"], seed=0)
    with (
        pytest.raises(ValueError, match=r"layer 2: bias"),
        simulate(net, PRESETS["ideal"], seed=0),
    ):
        pass
    assert isinstance(net[2], nn.Linear)  # simulate left the model as it was


@pytest.mark.parametrize(
    ("preset", "band"), [("32x32_100k", (0.93, 1.05)), ("pytorx_32", (0.75, 1.10))]
)
def test_read_noise_under_ir_drop_matches_a_monte_carlo_of_the_circuit(preset, band):
    """Oracle: per-device fluctuations G (1 + sigma z) solved exactly by circuit.column_currents.

    The simulator's noise std (attenuated like the signal, first order) is within ``band`` of
    the exact std on every column's mean; using the unattenuated G (the first-order model
    without IR drop) gives 0.92x and 0.48x here, outside both bands.
    """
    n, sigma, draws = 32, 0.05, 300
    cfg = PRESETS[preset].replace(
        tile_size=n,
        dac_bits=None,
        adc_bits=None,
        variation_sigma=0.0,
        p_stuck_min=0.0,
        p_stuck_max=0.0,
        levels=None,
        read_noise=True,
        read_noise_sigma=sigma,
    )
    torch.manual_seed(0)
    lin = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0.0, 1.0)
    layer = convert(lin, cfg, seed=0)
    x = torch.rand(n, dtype=torch.float64)
    gp, gn = _targets(lin.weight, cfg)
    scale = float(lin.weight.detach().abs().max()) / (cfg.g_max - cfg.g_min)
    kw = {"r_wire": cfg.r_wire, "r_source": cfg.r_source, "r_sink": cfg.r_sink}
    rng = np.random.default_rng(0)
    outs = [
        (
            column_currents(gp.numpy() * (1 + sigma * rng.standard_normal((n, n))), x.numpy(), **kw)
            - column_currents(
                gn.numpy() * (1 + sigma * rng.standard_normal((n, n))), x.numpy(), **kw
            )
        )
        * scale
        for _ in range(draws)
    ]
    exact = np.std(outs, axis=0)
    model = np.sqrt((x**2 @ layer.noise_tiles.double().reshape(-1, n)[:n]).numpy())
    ratio = exact / model
    assert band[0] <= ratio.mean() <= band[1], ratio.mean()
    assert ratio.min() > 0.65, ratio.min()
