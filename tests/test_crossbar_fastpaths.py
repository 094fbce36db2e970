"""Fast paths of the crossbar package vs independent oracles (exact solver, LAPACK, digital)."""

import numpy as np
import pytest
import torch
from torch import nn

from nvmpriv.crossbar import (
    PRESETS,
    calibrate,
    circuit,
    convert,
    crossbar_layers,
    unsupported_layers,
)
from nvmpriv.crossbar.circuit import column_currents, effective_conductance
from nvmpriv.crossbar.functional import fixed_point, signed_digits
from nvmpriv.crossbar.layers import CrossbarLinear, dorefa_activation
from nvmpriv.quantization import QuantLinear, quantize_model
from nvmpriv.quantization import dorefa_activation as reference_dorefa_activation

G_MIN, G_MAX = 1e-5 / 6, 1e-5


@pytest.mark.parametrize("n", [5, 16, 17, 40, 64])
def test_spd_inverse_matches_lapack(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(3, n, n, generator=gen, dtype=torch.float64)
    m = a @ a.mT + n * torch.eye(n, dtype=torch.float64)
    garbage_upper = m + torch.triu(torch.full_like(m, 7.0), 1)  # only the lower triangle is read
    inv = circuit._spd_inverse(garbage_upper)
    np.testing.assert_allclose(inv.numpy(), np.linalg.inv(m.numpy()), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("force_stable", [False, True])
@pytest.mark.parametrize("params", [(3.4, 400.0, 400.0), (2.0, 0.0, 500.0), (28.0, 4.0, 0.0)])
def test_product_and_log_forms_equal_nodal_solution(monkeypatch, force_stable, params):
    if force_stable:  # every tile takes the overflow-safe exp(log) form of the line inverse
        monkeypatch.setattr(circuit, "_MIN_RATIO_PRODUCT", 1.0)
    rng = np.random.default_rng(7)
    n = 24
    tiles = rng.uniform(G_MIN, G_MAX, (3, n, n))
    kw = dict(r_wire=params[0], r_source=params[1], r_sink=params[2])
    a = effective_conductance(torch.from_numpy(tiles), **kw, chunk=2).numpy()  # 2 chunks
    for t in range(3):
        v = rng.uniform(-0.25, 0.25, (n, 3))
        ref = column_currents(tiles[t], v, **kw)
        assert np.abs(a[t].T @ v - ref).max() / np.abs(ref).max() <= 1e-9


def test_weak_wires_take_the_stable_form_and_stay_exact():
    # gw = 1e-7 S << G: the pivot ratios off/p are ~1e-2, their product over 100 cells would
    # underflow the product form; the effective matrix must still match the nodal solution.
    rng = np.random.default_rng(3)
    g = rng.uniform(G_MIN, G_MAX, (1, 4, 100))
    a = effective_conductance(torch.from_numpy(g), r_wire=1e7, r_source=10.0, r_sink=10.0)
    v = rng.uniform(0, 0.25, (4, 2))
    ref = column_currents(g[0], v, r_wire=1e7, r_source=10.0, r_sink=10.0)
    np.testing.assert_allclose(a[0].numpy().T @ v, ref, rtol=1e-9, atol=1e-22)


@pytest.mark.parametrize("n_tiles", [1, 7])
def test_effective_conductance_threaded_chunks_equal_nodal_and_restore_threads(n_tiles):
    """Oracle: the sparse nodal solver per tile, and the single-threaded result.

    The session runs one torch thread (conftest), so the thread-pool branch needs 2 threads set
    here: 7 tiles with chunk=2 give 4 chunks on the pool; 1 tile runs inline on this thread.
    """
    rng = np.random.default_rng(11)
    n = 8
    tiles = torch.from_numpy(rng.uniform(G_MIN, G_MAX, (n_tiles, n, n)))
    kw = dict(r_wire=3.4, r_source=400.0, r_sink=400.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = effective_conductance(tiles, **kw, chunk=2)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        threaded = effective_conductance(tiles, **kw, chunk=2)
        assert torch.get_num_threads() == 2  # restored, whichever branch ran
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(threaded, serial, rtol=1e-12, atol=0)
    for t in range(n_tiles):
        v = rng.uniform(-0.25, 0.25, (n, 3))
        ref = column_currents(tiles[t].numpy(), v, **kw)
        got = threaded[t].numpy().T @ v
        assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-9, t


def test_bit_sliced_chunked_adc_equals_unchunked(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(200, 40)
    cfg = PRESETS["64x64_100k_bitsliced"]
    layer = CrossbarLinear.from_module(lin, cfg, seed=1).eval()
    x = torch.rand(9, 200) * 2 - 1
    with torch.no_grad():
        fast = layer(x)
        import nvmpriv.crossbar.layers as layers_mod

        monkeypatch.setattr(layers_mod, "_CHUNK_ELEMENTS", 1)  # one tile row per chunk
        tiny_chunks = layer(x)
    slow = layer(x.requires_grad_())  # grad mode: the unfused quantize_ste reference path
    assert torch.equal(fast, tiny_chunks)
    assert torch.equal(fast, slow.detach())


def _adc_oracle(layer: CrossbarLinear, x: torch.Tensor) -> torch.Tensor:
    """Per-tile ADC written out: codes = clamp(round(P / step)), y = step * sum codes + bias."""
    n, n_r = layer.config.tile_size, layer.n_row_tiles
    xp = torch.nn.functional.pad(x, (0, n_r * n - x.shape[1])).view(-1, n_r, n).transpose(0, 1)
    qmax = 2 ** (layer.config.adc_bits - 1) - 1
    step = float(layer.adc_range) / qmax
    p = torch.bmm(xp.double(), layer.w_tiles[0].double())
    codes = torch.clamp(torch.round(p / step), -qmax, qmax)
    return codes.sum(0) * step + layer.bias.double()


@pytest.mark.parametrize("range_factor", [0.05, 1e3])
def test_adc_fast_path_with_and_without_clipping(range_factor):
    # 0.05: most partial sums clip (the clamp must run); 1e3: none can, the clamp is skipped
    torch.manual_seed(1)
    lin = nn.Linear(130, 20)
    layer = CrossbarLinear.from_module(lin, PRESETS["ideal"].replace(adc_bits=6), seed=0).eval()
    x = torch.randn(6, 130)
    calibrate(layer, x)
    layer.adc_range.mul_(range_factor)
    step = float(layer.adc_range) / 31
    with torch.no_grad():
        out = layer(x)
    ref = _adc_oracle(layer, x)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=step * 1e-3 + 1e-6)
    if range_factor < 1:
        assert (ref - layer.bias.double()).abs().max() >= 31 * step * 0.999  # clipping happened


def test_local_dorefa_activation_is_bit_identical():
    x = torch.linspace(-1.5, 1.5, 10001)
    for bits in (1, 2, 4, 8):
        for signed in (False, True):
            for dropout in (0.0, 0.3):
                got = dorefa_activation(x, bits, signed=signed, dropout=dropout)
                ref = reference_dorefa_activation(x, bits, signed=signed, dropout=dropout)
                assert torch.equal(got, ref), (bits, signed, dropout)
    assert dorefa_activation(x, None) is x


def test_dorefa_tanh_dropout_net_on_ideal_chip_equals_it_in_both_modes():
    """The chip takes over the signed levels (Tanh inputs) and the dropout-aware training
    quantizer of the digital layers."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Dropout(0.4), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 4),
    )  # fmt: skip
    q = quantize_model(net, 3, 3)
    chip = convert(q, PRESETS["ideal"], seed=0)
    layers = list(crossbar_layers(chip).values())
    assert [(m.act_signed, m.input_dropout) for m in layers] == [
        (False, 0.0), (True, 0.4), (True, 0.0)
    ]  # fmt: skip
    x = torch.randn(32, 12)
    for train in (False, True):
        q.train(train)
        chip.train(train)
        torch.manual_seed(1)
        expected = q(x)
        torch.manual_seed(1)
        assert torch.equal(chip(x), expected), train


def _relu_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 20),
        nn.ReLU(),
        nn.Linear(20, 5),
    )


def test_dorefa_model_on_ideal_chip_equals_quantized_digital_net():
    torch.manual_seed(0)
    q = quantize_model(_relu_net(), 3, 2).eval()
    assert unsupported_layers(q) == {}  # the Quant* layers are mapped now
    chip = convert(q, PRESETS["ideal"], seed=0).eval()
    layers = crossbar_layers(chip)
    assert len(layers) == 4
    assert [m.act_bits for m in layers.values()] == [None, 2, 2, 2]
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(chip(x), q(x))
    state = layers["5"].programmed_state()
    assert state["act_bits"] == 2
    torch.testing.assert_close(state["w_dense"], q[5].effective_weight.detach(), rtol=0, atol=0)


def test_dorefa_layer_on_nonideal_chip_quantizes_input_then_uses_quantized_weights():
    # oracle: a plain Linear holding the quantized weights, fed the quantized input, on the
    # same chip (same config and seed)
    torch.manual_seed(2)
    q = QuantLinear(70, 30, weight_bits=2, act_bits=3)
    plain = nn.Linear(70, 30)
    with torch.no_grad():
        plain.weight.copy_(q.effective_weight)
        plain.bias.copy_(q.bias)
    cfg = PRESETS["32x32_100k"]
    x = torch.rand(8, 70) * 1.4 - 0.2
    xq = reference_dorefa_activation(x, 3)
    chip_q = convert(q, cfg, seed=4, calibration=x)
    chip_plain = convert(plain, cfg, seed=4, calibration=xq)
    assert torch.equal(chip_q.w_tiles, chip_plain.w_tiles)
    with torch.no_grad():
        torch.testing.assert_close(chip_q(x), chip_plain(xq), rtol=0, atol=0)


def test_bad_act_bits_raises():
    with pytest.raises(ValueError, match="act_bits"):
        CrossbarLinear(PRESETS["ideal"], torch.zeros(2, 3), None, seed=0, act_bits=0)


def test_line_inverse_forms_match_dense_inverse():
    rng = np.random.default_rng(11)
    n, gw = 12, 0.3
    diag = torch.from_numpy(2 * gw + rng.uniform(G_MIN, G_MAX, (2, n)))
    dense = np.stack([np.diag(d) - gw * (np.eye(n, k=1) + np.eye(n, k=-1)) for d in diag.numpy()])
    ref = np.linalg.inv(dense)
    np.testing.assert_allclose(circuit._tridiag_inverse(diag, gw).numpy(), ref, rtol=1e-12)
    log_p, inv_diag = circuit._line_factors(diag, gw)
    g = torch.from_numpy(rng.uniform(G_MIN, G_MAX, (2, n)))
    prod = circuit._semiseparable(log_p, inv_diag, g, stable=False).numpy()
    expect = ref * g.numpy()[:, :, None] * g.numpy()[:, None, :]
    low = np.tril(np.ones((n, n), dtype=bool))
    np.testing.assert_allclose(prod[:, low], expect[:, low], rtol=1e-12)


def _conv_oracle(layer, x: torch.Tensor) -> torch.Tensor:
    """Per-tile ADC of a conv written out with F.unfold: codes per (group, tile row), float64."""
    cfg = layer.config
    n, n_r, n_g = cfg.tile_size, layer.n_row_tiles, layer.groups
    k, m = layer.rows_per_group, layer.cols_per_group
    dac_q = 2 ** (cfg.dac_bits - 1) - 1
    dac_step = float(layer.dac_range) / dac_q
    xq = torch.clamp(torch.round(x.double() / dac_step), -dac_q, dac_q) * dac_step
    cols = nn.functional.unfold(xq, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    b, _, big_l = cols.shape
    cols = nn.functional.pad(cols.view(b, n_g, k, big_l), (0, 0, 0, n_r * n - k))
    w = layer.w_tiles.double()  # [G, n_r, N, M]
    adc_q = 2 ** (cfg.adc_bits - 1) - 1
    adc_step = float(layer.adc_range) / adc_q
    out = torch.zeros(b, n_g, m, big_l, dtype=torch.float64)
    for g in range(n_g):
        for r in range(n_r):
            p = torch.einsum("bnl,nm->bml", cols[:, g, r * n : (r + 1) * n], w[g, r])
            out[:, g] += torch.clamp(torch.round(p / adc_step), -adc_q, adc_q) * adc_step
    h = x.shape[2] + 2 * layer.padding[0] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1
    h = h // layer.stride[0] + 1
    return out.view(b, n_g * m, h, -1) + layer.bias.double().view(1, -1, 1, 1)


@pytest.mark.parametrize(
    "shape",
    [
        # (cin, cout, kernel, stride, padding, dilation, groups): several tile rows, grouped,
        # depthwise (one tile row per group), strided + dilated, 1x1
        (20, 12, 3, 1, 1, 1, 1),
        (16, 8, 3, 2, 2, 2, 2),
        (8, 8, 3, 1, 1, 1, 8),
        (40, 6, 1, 1, 0, 1, 1),
    ],
)
@pytest.mark.parametrize("range_factor", [0.1, 1.0])
def test_conv_im2col_adc_path_equals_unfold_oracle_and_slow_path(shape, range_factor):
    cin, cout, ks, stride, pad, dil, groups = shape
    torch.manual_seed(3)
    conv = nn.Conv2d(cin, cout, ks, stride=stride, padding=pad, dilation=dil, groups=groups)
    cfg = PRESETS["ideal"].replace(tile_size=16, dac_bits=7, adc_bits=6)
    chip = convert(nn.Sequential(conv), cfg, seed=0).eval()
    x = torch.rand(3, cin, 9, 10)
    calibrate(chip, x)
    (layer,) = crossbar_layers(chip).values()
    layer.adc_range.mul_(range_factor)  # 0.1: many partial sums clip
    with torch.no_grad():
        fast = chip(x)
        again = chip(x[:2])  # scratch buffers are reused: earlier outputs must not change
    slow = chip(x.clone().requires_grad_()).detach()  # grouped-conv reference path
    ref = _conv_oracle(layer, x)
    step = float(layer.adc_range) / 31
    torch.testing.assert_close(fast.double(), ref, rtol=0, atol=step * 1e-3 + 1e-6)
    torch.testing.assert_close(fast, slow, rtol=0, atol=step * 1e-3 + 1e-6)
    torch.testing.assert_close(again, fast[:2], rtol=0, atol=step * 1e-3 + 1e-6)


def test_bit_sliced_zero_streams_are_skipped_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(150, 30)
    layer = CrossbarLinear.from_module(lin, PRESETS["64x64_100k_bitsliced"], seed=2).eval()
    cfg = layer.config
    x = torch.rand(5, 150).round()  # binary: 1.0 is a single set bit, in one input stream
    digits = signed_digits(
        fixed_point(x, cfg.input_bits, cfg.input_frac_bits), cfg.stream_width, cfg.n_streams
    )
    assert 0 < sum(bool(d.any()) for d in digits) < cfg.n_streams
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x.clone().requires_grad_()).detach()  # every stream, unfused reference path
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("preset", ["64x64_100k", "64x64_100k_bitsliced"])
def test_fast_paths_follow_a_reloaded_chip(preset):
    # the fused paths cache rescaled weights: loading another chip's state must invalidate them
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 6 * 6, 7))
    x = torch.rand(4, 3, 8, 8)
    cfg = PRESETS[preset].replace(tile_size=16, r_wire=0.0, r_source=0.0, r_sink=0.0)
    a = convert(net, cfg, seed=0, calibration=x).eval()
    other = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 6 * 6, 7))
    b = convert(other, cfg, seed=1, calibration=x).eval()
    with torch.no_grad():
        a(x)  # fill the caches
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def _input_grad(fn, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    xx = x.clone().requires_grad_()
    y = fn(xx)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * g).sum().backward()
    assert xx.grad is not None
    return y.detach(), xx.grad


def _assert_close_up_to_adc_ties(a: torch.Tensor, b: torch.Tensor, step: float) -> None:
    """Equal to 1e-6, except at most 2 outputs one ADC step apart.

    The fused and the unfused paths sum a tile's products in different orders, so a partial sum
    that lands within float rounding of a code boundary (x.5 steps) may round either way.
    """
    diff = (a - b).abs()
    off = diff > 1e-6 * (1 + b.abs())
    assert int(off.sum()) <= 2, f"{int(off.sum())} outputs differ"
    torch.testing.assert_close(diff[off], torch.full_like(diff[off], step), rtol=1e-3, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("range_factor", [1.5, 0.2])
def test_ste_gradient_of_fused_path_equals_unfused_reference(kind, range_factor):
    # 1.5: no partial sum clips, the fused value + dense STE gradient is used;
    # 0.2: partial sums clip, the layer falls back to the unfused differentiable chip
    torch.manual_seed(4)
    if kind == "linear":
        net: nn.Module = nn.Linear(150, 12)
        x = torch.rand(6, 150)
    else:
        net = nn.Conv2d(9, 6, 3, padding=1)
        x = torch.rand(3, 9, 7, 7)
    cfg = PRESETS["64x64_100k"].replace(tile_size=32)
    (layer,) = crossbar_layers(convert(nn.Sequential(net), cfg, seed=0, calibration=x)).values()
    layer.adc_range.mul_(range_factor)
    layer.weight.requires_grad_(False)
    with torch.no_grad():
        plain = layer(x)
        codes, unit = layer._dac_codes(x)
        assert bool(layer._fast_tiled(codes, unit, detect=True)[1]) == (range_factor < 1)
    y_fast, g_fast = _input_grad(layer, x)
    y_ref, g_ref = _input_grad(lambda t: layer._add_bias(layer._chip_reference(t)), x)
    step = float(layer.adc_range) / (2 ** (cfg.adc_bits - 1) - 1)
    _assert_close_up_to_adc_ties(y_fast, plain, step)
    _assert_close_up_to_adc_ties(y_ref, plain, step)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-7)
    assert g_fast.abs().sum() > 0


def test_bit_sliced_chip_passes_a_straight_through_input_gradient():
    torch.manual_seed(5)
    lin = nn.Linear(100, 8)
    layer = CrossbarLinear.from_module(lin, PRESETS["64x64_100k_bitsliced"], seed=0).eval()
    layer.weight.requires_grad_(False)
    cfg = layer.config
    x = torch.rand(4, 100) * 2 - 1
    x[0, :3] = torch.tensor([9.0, -9.0, 20.0])  # outside the fixed-point range: no gradient
    with torch.no_grad():
        plain = layer(x)
    y, g = _input_grad(layer, x, seed=1)
    torch.testing.assert_close(y, plain, rtol=1e-6, atol=1e-6)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    lim = (2 ** (cfg.input_bits - 1) - 1) * 2.0**-cfg.input_frac_bits
    expected = (up @ layer.w_dense) * (x.abs() < lim)  # w_dense: effective [out, in] weight
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)
    assert bool((g[0, :3] == 0).all()) and g.abs().sum() > 0
