"""The native fused GEMM + ADC kernel vs the torch definition, and its pure-torch fallback."""

import subprocess

import pytest
import torch
from torch import nn

from nvmpriv.crossbar import PRESETS, convert, native
from nvmpriv.crossbar import layers as xbar_layers
from nvmpriv.native import build

kernel = native.adc_gemm_kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason=native.native_status())


def torch_adc_gemm(a, b, qmax, scale):
    """The definition: per tile row, round and clamp the partial sums, sum the codes, scale."""
    return torch.bmm(a, b).round().clamp(-qmax, qmax).sum(0) * scale


def dyadic(shape, gen, lo=-6, hi=7):
    # quarter steps: every partial sum is exact in float32 whatever the summation order, and
    # ties (x.5) occur, so round-half-to-even is exercised
    return torch.randint(lo, hi, shape, generator=gen).float() * 0.25


@needs_kernel
@pytest.mark.parametrize("ts", [32, 64, 128])
@pytest.mark.parametrize(("m", "n"), [(1, 1), (5, 63), (13, 64), (6, 130), (40, 200)])
@pytest.mark.parametrize("packed", [True, False])
def test_kernel_equals_torch_definition(ts, m, n, packed):
    gen = torch.Generator().manual_seed(ts * 1000 + m * 10 + n)
    n_r = 3
    a = dyadic((n_r, m, ts), gen)
    b = dyadic((n_r, ts, n), gen)
    ref = torch_adc_gemm(a, b, 7, 0.375)
    out = torch.full((m, n), float("nan"))
    rhs = kernel.pack(b) if packed else b
    kernel.matmul(a, rhs, out, qmax=7, scale=0.375, packed=packed)
    assert torch.equal(out, ref)


@needs_kernel
def test_kernel_reads_strided_operands_and_writes_a_strided_output():
    gen = torch.Generator().manual_seed(1)
    base = dyadic((20, 4 * 32), gen)  # [rows, n_r * ts] like the Linear input rows
    a = base.view(20, 4, 32).transpose(0, 1)  # [n_r, rows, ts], not contiguous
    b_full = dyadic((4, 32, 90), gen)
    b = b_full[:, :, 5:75]  # unit last stride, row stride 90
    out_full = torch.zeros(20, 100)
    out = out_full[:, 10:80]
    kernel.matmul(a, b, out, qmax=15, scale=1.0, packed=False)
    assert torch.equal(out, torch_adc_gemm(a, b, 15, 1.0))
    assert not out_full[:, :10].any() and not out_full[:, 80:].any()


@needs_kernel
def test_kernel_reports_the_checked_tile_rows_that_reach_the_clip_level():
    gen = torch.Generator().manual_seed(2)
    a = dyadic((5, 8, 16), gen, 0, 2)
    b = dyadic((5, 16, 70), gen, 0, 2)
    b[1] *= 60.0  # tile rows 1 and 3 reach the clip level, 1 is not checked
    b[3] *= 60.0
    out = torch.empty(8, 70)
    reach = kernel.matmul(
        a, b, out, qmax=31, scale=1.0, packed=False, check=[True, False, True, True, True]
    )
    p = torch.bmm(a, b).abs().amax((1, 2))
    assert reach == [3] and float(p[1]) >= 31 and float(p[3]) >= 31
    assert torch.equal(out, torch_adc_gemm(a, b, 31, 1.0))


@needs_kernel
def test_kernel_result_does_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(3)
    a = dyadic((6, 300, 64), gen)
    b = dyadic((6, 64, 700), gen)
    outs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            out = torch.empty(300, 700)
            kernel.matmul(a, kernel.pack(b), out, qmax=100, scale=2.0, packed=True)
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert torch.equal(outs[0], torch_adc_gemm(a, b, 100, 2.0))


@needs_kernel
@pytest.mark.parametrize(
    ("k", "stride", "dilation", "size"), [(3, 1, 1, 8), (3, 2, 1, 9), ((2, 3), 1, 2, 7)]
)
def test_kernel_gathers_convolution_panels_like_unfold(k, stride, dilation, size):
    # oracle: torch's unfold (im2col) followed by the definition, written as NCHW
    gen = torch.Generator().manual_seed(4)
    kh, kw = (k, k) if isinstance(k, int) else k
    b, c, m, ts = 3, 5, 10, 16
    x = dyadic((b, c, size + 2, size + 2), gen)  # already padded
    rows = c * kh * kw
    n_r = -(-rows // ts)
    cols = torch.nn.functional.unfold(x, (kh, kw), dilation=dilation, stride=stride)
    h_out = (size + 2 - dilation * (kh - 1) - 1) // stride + 1
    w_out = (size + 2 - dilation * (kw - 1) - 1) // stride + 1
    big_l = h_out * w_out
    rhs = torch.zeros(n_r * ts, b * big_l)
    rhs[:rows] = cols.permute(1, 0, 2).reshape(rows, b * big_l)
    a = dyadic((n_r, m, ts), gen)
    ref = torch_adc_gemm(a, rhs.view(n_r, ts, -1), 20, 0.5)  # [m, b*L]
    out = torch.full((b, m, h_out, w_out), float("nan"))
    geometry = (kh, kw, stride, stride, dilation, dilation, h_out, w_out, rows)
    kernel.matmul(
        a,
        x,
        out,
        qmax=20,
        scale=0.5,
        packed=False,
        out_strides=(big_l, big_l, m * big_l),
        n_cols=b * big_l,
        conv=(0, *geometry),
    )
    assert torch.equal(out, ref.view(m, b, h_out, w_out).transpose(0, 1))


@needs_kernel
def test_build_without_openmp_splits_panels_over_python_threads(monkeypatch, tmp_path):
    # processes running another OpenMP runtime get a build without -fopenmp, threaded from
    # Python: same result as the definition at any thread count
    monkeypatch.setenv("NVMPRIV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "foreign_openmp_loaded", lambda: True)
    plain = native.NativeAdcGemm(build.build_library(build.find_compiler()))
    assert not plain.openmp
    gen = torch.Generator().manual_seed(5)
    a = dyadic((4, 200, 32), gen)
    b = dyadic((4, 32, 300), gen)
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            out = torch.empty(200, 300)
            reach = plain.matmul(a, b, out, qmax=3, scale=1.0, packed=False, check=[True] * 4)
            assert torch.equal(out, torch_adc_gemm(a, b, 3, 1.0)) and reach == [0, 1, 2, 3]
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_kernel_rejects_bad_operands():
    a = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="qmax"):
        kernel.matmul(a, torch.zeros(2, 8, 4), torch.zeros(3, 4), qmax=0, scale=1.0, packed=False)
    with pytest.raises(ValueError, match="unit last stride"):
        kernel.matmul(
            a, torch.zeros(2, 4, 8).mT, torch.zeros(3, 4), qmax=3, scale=1.0, packed=False
        )
    with pytest.raises(ValueError, match="must fit in out"):
        kernel.matmul(
            a,
            torch.zeros(2, 8, 4),
            torch.zeros(11),
            qmax=3,
            scale=1.0,
            packed=False,
            out_strides=(4, 4, 0),
        )


@needs_kernel
def test_empty_batches_pass_through():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 25, 3)).eval()
    x = torch.randn(6, 4, 5, 5)
    chip = convert(net, PRESETS["32x32_100k"], seed=0, calibration=x).eval()
    with torch.no_grad():
        assert chip(x[:0]).shape == (0, 3)


def _pure_torch(monkeypatch):
    monkeypatch.setattr(xbar_layers, "_native_kernel", lambda u, qmax: None)


def _assert_same_chip_output(y_native, y_torch, step):
    # the partial sums' float summation order differs (MKL vs the kernel's FMA chain), so a sum
    # within an ulp of a rounding boundary may land one ADC code apart, rarely
    diff = (y_native - y_torch).abs()
    assert float(diff.max()) <= 2 * step * (1 + 1e-5)
    assert float((diff > 1e-6 * (1 + y_torch.abs())).float().mean()) <= 1e-3


@needs_kernel
@pytest.mark.parametrize("preset", ["64x64_100k", "32x32_100k", "64x64_100k_bitsliced"])
def test_linear_chip_native_equals_pure_torch(monkeypatch, preset):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(150, 70)).eval()
    x = torch.rand(33, 150).round()
    chip = convert(net, PRESETS[preset], seed=1, calibration=x).eval()
    with torch.no_grad():
        y_native = chip(x)
        _pure_torch(monkeypatch)
        y_torch = chip(x)
    step = float(chip[0].adc_range) / (2 ** (PRESETS[preset].adc_bits - 1) - 1)
    if PRESETS[preset].bit_slicing:  # integer partial sums: exactly the same codes
        assert torch.equal(y_native, y_torch)
    else:
        _assert_same_chip_output(y_native, y_torch, step)


@needs_kernel
@pytest.mark.parametrize(
    ("conv", "width", "rows"),
    [
        (dict(in_channels=8, out_channels=12, kernel_size=3, padding=1), 9, 0),
        (dict(in_channels=16, out_channels=16, kernel_size=3, stride=2, padding=1, groups=16),
         9, 0),
        (dict(in_channels=20, out_channels=6, kernel_size=(3, 2), dilation=2, padding=(2, 1)),
         9, 0),
        (dict(in_channels=24, out_channels=4, kernel_size=1, groups=2), 9, 0),
        # 20 and 19 output columns: row segments read in place (one call per group)
        (dict(in_channels=8, out_channels=12, kernel_size=3, padding=1), 20, 1),
        (dict(in_channels=12, out_channels=8, kernel_size=(3, 2), groups=2, stride=(2, 1)), 20, 2),
    ],
)  # fmt: skip
def test_conv_chip_native_equals_pure_torch(monkeypatch, conv, width: int, rows: int):
    import nvmpriv.crossbar.native as native

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(**conv), nn.ReLU()).eval()
    x = torch.randn(5, conv["in_channels"], 9, width)
    cfg = PRESETS["32x32_100k"]
    chip = convert(net, cfg, seed=2, calibration=x).eval()
    calls: list[int] = []
    real = native.conv_rows
    monkeypatch.setattr(native, "conv_rows", lambda *a, **k: (calls.append(1), real(*a, **k)))
    with torch.no_grad():
        y_native = chip(x)
        assert len(calls) == (rows if native.adc_gemm_kernel().library.openmp else 0)
        _pure_torch(monkeypatch)
        y_torch = chip(x)
    step = float(chip[0].adc_range) / (2 ** (cfg.adc_bits - 1) - 1)
    _assert_same_chip_output(y_native, y_torch, step)


@needs_kernel
def test_straight_through_gradient_and_clip_report_match_pure_torch(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(200, 30)).eval()
    x = torch.rand(16, 200)
    cfg = PRESETS["64x64_100k"].replace(calibration_percentile=50.0)  # ADC clips often
    chip = convert(net, cfg, seed=0, calibration=x).eval()
    xs = x.clone().requires_grad_()
    chip(xs).square().sum().backward()
    g_native = xs.grad.clone()
    _pure_torch(monkeypatch)
    xs.grad = None
    chip(xs).square().sum().backward()
    torch.testing.assert_close(g_native, xs.grad, rtol=1e-4, atol=1e-6)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("NVMPRIV_NATIVE", "0")
    assert native.adc_gemm_kernel() is None
    assert native.native_status() == "pure torch: disabled by NVMPRIV_NATIVE"


def test_build_failure_warns_once_and_the_chip_runs_on_pure_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("NVMPRIV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="native crossbar kernel unavailable"):
        assert native.adc_gemm_kernel() is None
    assert native.adc_gemm_kernel() is None  # remembered: no second warning, no second build
    assert native.native_status().startswith("pure torch: could not compile")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 8)).eval()
    x = torch.rand(4, 100)
    chip = convert(net, PRESETS["64x64_100k"], seed=0, calibration=x).eval()
    with torch.no_grad():
        assert chip(x).shape == (4, 8)


def test_a_failed_self_check_falls_back(monkeypatch, tmp_path):
    if build.find_compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("NVMPRIV_CACHE_DIR", str(tmp_path))

    def wrong(kernel):
        raise RuntimeError("the compiled kernel disagrees with torch on a test problem")

    monkeypatch.setattr(native, "_self_check", wrong)
    with pytest.warns(RuntimeWarning, match="disagrees with torch"):
        assert native.adc_gemm_kernel() is None


def test_build_is_cached_and_reused(monkeypatch, tmp_path):
    cxx = build.find_compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("NVMPRIV_CACHE_DIR", str(tmp_path))
    first = build.build_library(cxx)
    assert first.parent == tmp_path / "native" and first.is_file()
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".adc_gemm-")]

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert build.build_library(cxx) == first
