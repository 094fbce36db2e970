"""The torch-free evaluator's native engine: fused kernel nodes + onnxruntime segments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from nvmpriv import nets, runtime, runtime_native
from nvmpriv.crossbar import get_preset
from nvmpriv.export import export_model
from nvmpriv.native import build

ROOT = Path(__file__).resolve().parents[1]
lib = runtime_native.native_library()
needs_kernel = pytest.mark.skipif(lib is None, reason="no native kernel (no C++ compiler?)")


def _export(tmp_path: Path, net: nn.Module, cfg, shape: list[int], name: str = "chip") -> Path:
    torch.manual_seed(3)
    x = torch.rand(48, *shape)
    return export_model(
        net.eval(), cfg, tmp_path / f"{name}.onnx", input_shape=shape, chip_seed=5, calibration=x
    )


def _queries(shape: list[int], n: int = 37) -> np.ndarray:
    return np.random.default_rng(1).random((n, *shape), dtype=np.float32)


def _grouped_cnn() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=(1, 2), groups=2, stride=(1, 2)),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding="same", dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(6 * 9 * 6, 5),
    )


def _dorefa_fc() -> nn.Module:
    from nvmpriv.quantization import quantize_model

    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 10))
    return quantize_model(net, weight_bits=4, act_bits=4)


def _batchnorm_stats(net: nn.Module, seed: int = 8) -> nn.Module:
    """``net`` with trained-looking BatchNorm statistics and affine parameters (not 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
            mod.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            mod.weight.data.copy_(0.5 + torch.rand(c, generator=gen))
            mod.bias.data.copy_(0.2 * torch.randn(c, generator=gen))
    return net


NO_DAC = get_preset("64x64_100k").replace(name="adc_only", dac_bits=None)
CASES = [
    pytest.param(lambda: nets.ColumnFC(100, 10), [100], "64x64_100k", id="fc-64"),
    pytest.param(lambda: nets.ColumnFC(100, 10), [100], "32x32_100k", id="fc-32"),
    pytest.param(lambda: nets.ColumnFC(100, 10), [100], NO_DAC, id="fc-no-dac"),
    pytest.param(lambda: nets.LeNet5(1, 10), [1, 28, 28], "64x64_100k", id="lenet"),
    pytest.param(_grouped_cnn, [4, 9, 9], "32x32_100k", id="grouped-same-dilated"),
    pytest.param(
        lambda: _batchnorm_stats(nets.CifarResNet(10, 1, 10)),
        [3, 16, 16],
        "64x64_100k",
        id="resnet10",
    ),
    pytest.param(lambda: nets.ColumnFC(20, 3), [20], "64x64_100k", id="fc-one-tile-row"),
    pytest.param(_dorefa_fc, [64], "32x32_100k", id="dorefa-signed"),
]


@needs_kernel
@pytest.mark.parametrize(("make", "shape", "preset"), CASES)
def test_native_engine_equals_function_bodies(
    tmp_path: Path, make, shape: list[int], preset
) -> None:
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    path = _export(tmp_path, make(), cfg, shape)
    n_xbar = sum(n.domain == "nvmpriv" for n in onnx.load(path).graph.node)
    native = runtime.load(path, threads=2)
    stock = runtime.load(path, native=False, threads=1)
    assert native.engine == f"onnxruntime + native crossbar kernel ({n_xbar} nodes)"
    assert stock.engine == "onnxruntime"
    x = _queries(shape)
    got, want = native.predict_proba(x), stock.predict_proba(x)
    # another summation order than onnxruntime's GEMM: a partial sum within float32 rounding of
    # a half step may take the neighbouring code, so agreement is to float32 precision
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    for batch_size in (1, 5):  # odd batches (kernel row remainders) give the same rows
        np.testing.assert_allclose(
            native.predict_proba(x[:7], batch_size=batch_size), got[:7], rtol=1e-5, atol=1e-8
        )
    assert native.predict_proba(x[:0]).shape == (0, want.shape[1])


def _shared_output_fc() -> nn.Module:
    class SkipFC(nn.Module):
        """A crossbar output read by a Relu and by an Add: the Relu cannot be fused."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(30, 30), nn.Linear(30, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc1(x)
            return self.fc2(torch.relu(y) + y)

    torch.manual_seed(7)
    return SkipFC()


@needs_kernel
def test_relus_that_only_read_a_crossbar_output_run_in_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lenet = runtime.load(
        _export(tmp_path, nets.LeNet5(1, 10), get_preset("64x64_100k"), [1, 28, 28])
    )
    skip = runtime.load(_export(tmp_path, _shared_output_fc(), get_preset("32x32_100k"), [30], "s"))
    fused = [
        [s.relu for s in p._runner._steps if isinstance(s, runtime_native._NativeNode)]
        for p in (lenet, skip)
    ]
    assert fused == [[True, True, True, True, False], [False, False]]
    convs = [s for s in lenet._runner._steps if getattr(s, "spec", None) and s.spec.conv]
    # 6@5x5 on one channel, 28 output columns: row segments; 16@5x5 on six: 150 rows, 16
    # channels, 10 columns: direct
    paths = [s.conv_path(w) for s, w in zip(convs, (28, 10), strict=True)]
    assert paths == (["rows", "direct"] if lib.openmp else ["gathered", "gathered"])
    # and a query takes them: one call of each per convolution
    calls: list[str] = []
    for name in ("conv_rows", "conv_direct"):
        real = getattr(runtime_native, name)
        monkeypatch.setattr(
            runtime_native, name, lambda *a, _f=real, _n=name, **k: (calls.append(_n), _f(*a, **k))
        )
    lenet.predict_proba(_queries([1, 28, 28], 4))
    assert calls == (["conv_rows", "conv_direct"] if lib.openmp else [])
    graph = onnx.load(lenet.path).graph
    relus = {n.output[0] for n in graph.node if n.op_type == "Relu"}
    assert {s.y_name for s in lenet._runner._steps if getattr(s, "relu", None)} <= relus
    # results: test_native_engine_equals_function_bodies (LeNet-5) and below (the shared output)
    x = _queries([30])
    stock = runtime.load(skip.path, native=False)
    np.testing.assert_allclose(skip.predict_proba(x), stock.predict_proba(x), rtol=1e-4, atol=1e-7)


class _Branches(nn.Module):
    """A BatchNormalization read twice (only it is fused) and an Add that broadcasts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv1(x))
        z = torch.relu(self.conv2(torch.relu(y)) + y[:, :1])  # [B, 8, H, W] + [B, 1, H, W]
        return self.fc(z.flatten(1))


def _tails(model: runtime.Predictor) -> list[list[str]]:
    graph = onnx.load(model.path).graph
    return [
        [graph.node[j].op_type for j in s.tail]
        for s in model._runner._steps
        if isinstance(s, runtime_native._NativeNode)
    ]


@needs_kernel
def test_batchnorm_residual_add_and_relu_run_in_the_kernel(tmp_path: Path) -> None:
    # the results against onnxruntime on the function bodies: test_native_engine_equals_...
    # (resnet10, with non-trivial BatchNorm statistics) and below (the broadcasting Add)
    resnet = runtime.load(
        _export(tmp_path, _batchnorm_stats(nets.CifarResNet(10, 1, 10)), get_preset("64x64_100k"),
                [3, 16, 16], "resnet"),
    )  # fmt: skip
    tails = _tails(resnet)
    # the stem and each block's first convolution, each block's second, 1x1 shortcuts, the fc
    allowed = [["BatchNormalization", "Relu"], ["BatchNormalization", "Add", "Relu"]]
    assert all(t in [*allowed, ["BatchNormalization"], []] for t in tails)
    graph = onnx.load(resnet.path).graph
    absorbed = {j for s in resnet._runner._steps if isinstance(s, runtime_native._NativeNode)
                for j in s.tail}  # fmt: skip
    left = {n.op_type for j, n in enumerate(graph.node) if j not in absorbed}
    assert not left & {"BatchNormalization", "Add", "Relu"}
    assert tails.count(allowed[1]) == sum(n.op_type == "Add" for n in graph.node) == 4
    # a BatchNormalization parameter behind an Identity node (as torch writes shared ones)
    path = _export(tmp_path, _batchnorm_stats(_Branches()), get_preset("32x32_100k"), [3, 6, 6])
    model = onnx.load(path)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    init = next(t for t in model.graph.initializer if t.name == bn.input[1])
    init.name = f"{bn.input[1]}.source"
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [init.name], [bn.input[1]]))
    meta = {p.key: p.value for p in model.metadata_props}
    meta[runtime.CONTENT_DIGEST_KEY] = runtime.content_digest(model)
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, tmp_path / "identity.onnx")
    for file in (path, tmp_path / "identity.onnx"):
        native = runtime.load(file, threads=2)
        assert _tails(native) == [["BatchNormalization"], ["Add", "Relu"], []]
        x = _queries([3, 6, 6])
        want = runtime.load(file, native=False).predict_proba(x)
        np.testing.assert_allclose(native.predict_proba(x), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("axis", [0, 1, 2, -1, 4])
def test_flatten_segments_run_as_numpy_reshapes_like_onnxruntime(axis: int) -> None:
    import onnxruntime as ort

    nodes = [
        onnx.helper.make_node("Identity", ["x"], ["i"]),
        onnx.helper.make_node("Flatten", ["i"], ["y"], axis=axis),
    ]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, None)],
        [onnx.helper.make_tensor_value_info("y", 1, None)],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    x = _queries([2, 3, 4, 5], 0) if axis == 4 else _queries([3, 4, 5], 2)
    (want,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert runtime_native._ReshapeSegment.takes(nodes, {})
    values = {"x": x}
    runtime_native._ReshapeSegment(nodes).run(values)
    assert values["y"].shape == want.shape
    np.testing.assert_array_equal(values["y"], want)


@needs_kernel
def test_a_flatten_only_segment_skips_onnxruntime(tmp_path: Path) -> None:
    # ColumnFC: Flatten, three crossbar layers, Softmax (results: test_native_engine_equals_...)
    model = runtime.load(_export(tmp_path, nets.ColumnFC(100, 10), get_preset("64x64_100k"), [100]))
    kinds = [type(s).__name__ for s in model._runner._steps]
    assert kinds == ["_ReshapeSegment", *["_NativeNode"] * 3, "_Segment"]


def _dyadic(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/8 in [-2, 2]: sums of products are exact in float32 and float64."""
    return (rng.integers(-16, 17, shape) / 8).astype(np.float32)


@needs_kernel
@pytest.mark.parametrize(
    ("m", "n", "threads"), [(1, 10, 2), (500, 10, 2), (256, 70, 2), (13, 200, 1)]
)
@pytest.mark.parametrize(("axis", "relu"), [(None, False), (0, True), (1, True), (1, False)])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("fold", [False, True], ids=["scale", "row-scale-residual"])
def test_kernel_epilogue_and_padding_rows_match_numpy(
    m, n, threads, axis, relu, packed, fold
) -> None:
    # oracle: the definition in float64 on the real rows; the padding rows hold NaN, so the
    # kernel must skip them; 500 x 10 has one panel, so its rows are shared over the threads
    assert lib is not None
    rng = np.random.default_rng(m + n)
    n_r, ts, rows, qmax, scale = 3, 64, 150, 40, 0.5
    a, b = _dyadic(rng, (n_r, m, ts)), _dyadic(rng, (n_r, ts, n))
    real = rows - (n_r - 1) * ts
    want = np.zeros((m, n))
    for t in range(n_r):
        k = ts if t < n_r - 1 else real
        want += np.clip(np.rint(a[t, :, :k].astype(np.float64) @ b[t, :k]), -qmax, qmax)
    a[-1, :, real:], b[-1, real:] = np.nan, np.nan
    bias = _dyadic(rng, (m if axis == 0 else n,))
    # fold: a per-row factor instead of the scale (a folded BatchNormalization), and a residual
    row_scale, res = _dyadic(rng, (m,)), _dyadic(rng, (m, n))
    want = want * (row_scale[:, None] if fold else scale)
    want = (
        want + (0 if axis is None else bias[:, None] if axis == 0 else bias) + (res if fold else 0)
    )
    want = np.maximum(want, 0) if relu else want
    rhs = b
    if packed:
        rhs = np.empty(lib.packed_size(n_r, ts, n), np.float32)
        lib.pack(b.ctypes.data, ts * n, n, n_r, ts, n, rhs.ctypes.data)
    out = np.full((m, n), np.nan, np.float32)
    lib.gemm(
        (a.ctypes.data, m * ts, ts), (rhs.ctypes.data, ts * n, n), (out.ctypes.data, n, n, 0),
        m=m, n=n, n_r=n_r, ts=ts, qmax=qmax, scale=scale, packed=packed, conv=None, check=None,
        threads=threads, rows=rows, bias=None if axis is None else (bias.ctypes.data, axis),
        relu=relu, row_scale=row_scale.ctypes.data if fold else None,
        res=res.ctypes.data if fold else None,
    )  # fmt: skip
    np.testing.assert_array_equal(out, want.astype(np.float32))
    with pytest.raises(ValueError, match="real rows"):
        lib.gemm(
            (a.ctypes.data, m * ts, ts), (rhs.ctypes.data, ts * n, n), (out.ctypes.data, n, n, 0),
            m=m, n=n, n_r=n_r, ts=ts, qmax=qmax, scale=scale, packed=packed, conv=None,
            check=None, threads=1, rows=(n_r - 1) * ts,
        )  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("openmp", [True, False])
def test_packed_gemm_from_many_threads_matches_numpy(monkeypatch, openmp: bool) -> None:
    # PackedGemm fills its call's operands per query: concurrent queries must not see each
    # other's; without OpenMP it takes the general entry points. Odd queries hand it raw
    # inputs, whose DAC codes (ties, clipping) it writes into A first.
    from concurrent.futures import ThreadPoolExecutor

    from nvmpriv.native.library import PackedGemm

    assert lib is not None
    monkeypatch.setattr(lib, "openmp", openmp and lib.openmp)
    rng = np.random.default_rng(5)
    n_r, ts, rows, n, qmax = 2, 32, 50, 20, 30
    w = _dyadic(rng, (n_r, ts, n))
    w[-1, rows - ts :] = 0
    bias = _dyadic(rng, (n,))
    packed = np.empty(lib.packed_size(n_r, ts, n), np.float32)
    lib.pack(w.ctypes.data, ts * n, n, n_r, ts, n, packed.ctypes.data)
    gemm = PackedGemm(
        lib, packed.ctypes.data, (ts, n_r * ts), n=n, n_r=n_r, ts=ts, rows=rows, qmax=qmax,
        scale=0.5, bias=bias.ctypes.data, relu=True, threads=2, dac=(0.25, 7),
    )  # fmt: skip

    def query(m: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.full((m, n_r * ts), np.nan, np.float32)  # past the real rows: skipped
        raw = _dyadic(np.random.default_rng(m), (m, rows))  # multiples of 1/8: ties at 0.25
        x[:, :rows] = np.clip(np.rint(raw / np.float32(0.25)), -7, 7)
        out = np.empty((m, n), np.float32)
        if m % 2:
            a = np.full_like(x, np.nan)
            gemm(a.ctypes.data, out.ctypes.data, m, (raw.ctypes.data, rows))
        else:
            gemm(x.ctypes.data, out.ctypes.data, m)
        real = x[:, :rows].astype(np.float64)
        sums = np.clip(np.rint(real[:, :ts] @ w[0]), -qmax, qmax)
        sums += np.clip(np.rint(real[:, ts:] @ w[1][: rows - ts]), -qmax, qmax)
        return out, np.maximum(sums * 0.5 + bias, 0).astype(np.float32)

    with ThreadPoolExecutor(4) as pool:
        for got, want in pool.map(query, [1 + (i * 7) % 40 for i in range(200)]):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="do not fit"):
        PackedGemm(
            lib, packed.ctypes.data, (ts, n_r * ts), n=n, n_r=n_r, ts=ts, rows=ts, qmax=qmax,
            scale=0.5, bias=None, relu=False, threads=1,
        )  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("fold", [False, True], ids=["scale", "row-scale-residual"])
@pytest.mark.parametrize(
    ("c", "m", "kernel", "stride", "dilation", "ts", "w_out"),
    [
        (6, 16, (5, 5), (1, 1), (1, 1), 64, 20),  # LeNet-5's second convolution
        (8, 20, (3, 3), (2, 1), (1, 2), 32, 16),  # channels padded to 32, strides and dilations
        (3, 80, (2, 3), (1, 2), (2, 1), 16, 9),  # two channel panels (64 + 16), asymmetric kernel
        (2, 5, (1, 1), (1, 1), (1, 1), 64, 70),  # one tile row, a 1x1 kernel, 5 row segments
        (3, 7, (3, 3), (1, 1), (1, 1), 16, 145),  # 10 row segments
        (2, 9, (3, 1), (1, 1), (1, 1), 64, 140),  # 9: the last two in a third item
    ],
)
@pytest.mark.parametrize("relu", [True, False])
def test_direct_and_row_convolutions_equal_the_gathered_one_and_numpy(
    c: int, m: int, kernel, stride: tuple[int, int], dilation, ts: int, w_out: int, fold, relu
) -> None:
    # oracle: the definition on numpy's sliding windows; output positions (batch 3 x 7 rows) are
    # not a multiple of the direct path's 96-position blocks; the row-segment path covers rows
    # of 16 (one segment), 20 (two, overlapping), 70 (five: the lone last one joins the fourth),
    # 140 (nine: items of 4, 3 and 2 segments) and 145 columns, and refuses a width stride of 2
    # and output blocks that split rows
    from nvmpriv.native.library import conv_direct, conv_rows

    assert lib is not None
    if not lib.openmp:
        pytest.skip("the direct path needs an OpenMP build")
    rng = np.random.default_rng(c * m)
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    h_out, b = 7, 3
    h, w = (h_out - 1) * sh + dh * (kh - 1) + 1, (w_out - 1) * sw + dw * (kw - 1) + 1
    x = _dyadic(rng, (b, c, h, w))
    k = c * kh * kw
    n_r = -(-k // ts)
    ts = k if n_r == 1 else ts
    wk = _dyadic(rng, (m, k))
    bias = _dyadic(rng, (m,))
    win = np.lib.stride_tricks.sliding_window_view(
        x, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), (2, 3)
    )
    cols = win[:, :, ::sh, ::sw, ::dh, ::dw].transpose(0, 2, 3, 1, 4, 5).reshape(b, h_out, w_out, k)
    want = np.zeros((b, h_out, w_out, m))
    for t in range(n_r):
        part = cols[..., t * ts : (t + 1) * ts].astype(np.float64) @ wk[:, t * ts : (t + 1) * ts].T
        want += np.clip(np.rint(part), -20, 20)
    # fold: per-channel factors instead of the scale and a residual, as a folded
    # BatchNormalization and an Add before the ReLU
    row_scale, res = _dyadic(rng, (m,)), _dyadic(rng, (b, m, h_out, w_out))
    want = want * (row_scale if fold else 0.5) + bias
    want = want + res.transpose(0, 2, 3, 1) if fold else want
    want = (np.maximum(want, 0) if relu else want).transpose(0, 3, 1, 2).astype(np.float32)
    wpad = np.zeros((m, n_r * ts), np.float32)
    wpad[:, :k] = wk
    gathered = np.ascontiguousarray(wpad.reshape(m, n_r, ts).transpose(1, 0, 2))  # [n_r, m, ts]
    m_pad = -(-m // 16) * 16
    direct = np.zeros((n_r, ts, m_pad), np.float32)
    direct[..., :m] = gathered.transpose(0, 2, 1)
    geo = np.array(
        [c * h * w, h * w, w, 1, 0, kh, kw, sh, sw, dh, dw, h_out, w_out, k, x.size], np.int64
    )
    big_l, n = h_out * w_out, b * h_out * w_out
    outs = [np.full((b, m, h_out, w_out), np.nan, np.float32) for _ in range(3)]
    common = dict(n_r=n_r, ts=ts, rows=k, qmax=20, scale=0.5, relu=relu, threads=2)
    if fold:
        common.update(row_scale=row_scale.ctypes.data, res=res.ctypes.data)
    lib.gemm(
        (gathered.ctypes.data, m * ts, ts), (x.ctypes.data, 0, 0),
        (outs[0].ctypes.data, big_l, big_l, m * big_l), m=m, n=n, packed=False,
        conv=geo.ctypes.data, check=None, bias=(bias.ctypes.data, 0), **common,
    )  # fmt: skip
    conv_direct(
        lib, direct.ctypes.data, x.ctypes.data, (outs[1].ctypes.data, big_l, big_l, m * big_l),
        conv=geo.ctypes.data, m=m, m_pad=m_pad, n=n, bias=bias.ctypes.data, **common,
    )  # fmt: skip
    np.testing.assert_array_equal(outs[0], want)
    np.testing.assert_array_equal(outs[1], want)
    with pytest.raises(ValueError, match="multiple of 16"):
        conv_direct(
            lib, direct.ctypes.data, x.ctypes.data, (outs[1].ctypes.data, big_l, big_l, 0),
            conv=geo.ctypes.data, m=m, m_pad=m_pad + 1, n=n, bias=None, **common,
        )  # fmt: skip
    rows_call = dict(
        conv=geo.ctypes.data,
        m=m,
        n=n,
        bias=bias.ctypes.data,
        **common,  # type: ignore[arg-type]
    )
    if sw != 1:
        with pytest.raises(ValueError, match="width stride 1"):
            conv_rows(lib, gathered.ctypes.data, x.ctypes.data, (outs[2].ctypes.data, big_l,
                      big_l, m * big_l), **rows_call)  # fmt: skip
        return
    conv_rows(lib, gathered.ctypes.data, x.ctypes.data, (outs[2].ctypes.data, big_l, big_l,
              m * big_l), **rows_call)  # fmt: skip
    np.testing.assert_array_equal(outs[2], want)
    with pytest.raises(ValueError, match="blocks of whole rows"):  # blocks of w_out - 1 columns
        conv_rows(lib, gathered.ctypes.data, x.ctypes.data, (outs[2].ctypes.data, big_l,
                  w_out - 1, m * big_l), **rows_call)  # fmt: skip


_GUARD_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np
from nvmpriv import runtime_native

lib = runtime_native.native_library()
page = mmap.PAGESIZE
region = mmap.mmap(-1, 3 * page)
base = ctypes.addressof(ctypes.c_char.from_buffer(region))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(base + 2 * page, page, 0) == 0  # PROT_NONE: reading past the input faults
b, c, h, w, kh = 2, 3, 10, 19, 3  # 272 positions: the last panel is partial; rows of 17
size = b * c * h * w
x = np.frombuffer(region, np.float32, size, 2 * page - 4 * size).reshape(b, c, h, w)
x[...] = np.arange(size, dtype=np.float32).reshape(x.shape) % 7 - 3
k, m, ho, wo = c * kh * kh, 5, h - kh + 1, w - kh + 1
wt = np.ones((1, m, k), np.float32)
out = np.empty((b, m, ho, wo), np.float32)
geo = np.array([c * h * w, h * w, w, 1, 0, kh, kh, 1, 1, 1, 1, ho, wo, k, size], np.int64)
lib.gemm(
    (wt.ctypes.data, m * k, k), (x.ctypes.data, 0, 0), (out.ctypes.data, ho * wo, ho * wo, m * ho * wo),
    m=m, n=b * ho * wo, n_r=1, ts=k, qmax=1000, scale=1.0, packed=False, conv=geo.ctypes.data,
    check=None, threads=1, rows=k,
)
win = np.lib.stride_tricks.sliding_window_view(x, (kh, kh), axis=(2, 3)).sum(axis=(1, 4, 5))
assert np.array_equal(out, np.repeat(win[:, None], m, axis=1)), "wrong result"
if lib.openmp:  # the row-segment path reads the input in place, 16 floats at a time
    out[...] = np.nan
    from nvmpriv.native.library import conv_rows
    conv_rows(
        lib, wt.ctypes.data, x.ctypes.data, (out.ctypes.data, ho * wo, ho * wo, m * ho * wo),
        conv=geo.ctypes.data, m=m, n=b * ho * wo, n_r=1, ts=k, rows=k, qmax=1000, scale=1.0,
        bias=None, relu=False, threads=1,
    )
    assert np.array_equal(out, np.repeat(win[:, None], m, axis=1)), "wrong result (rows)"
print("ok")
"""


@needs_kernel
def test_convolution_gather_never_reads_past_its_input(tmp_path: Path) -> None:
    # the input ends where an unreadable page begins: a vector copy that ran past the input
    # (the gather copies short runs as whole vectors where there is room) would crash
    done = subprocess.run(
        [sys.executable, "-c", _GUARD_SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@needs_kernel
@pytest.mark.parametrize("bits", [2, 8])
def test_dac_codes_match_numpy_quantizer(bits: int) -> None:
    assert lib is not None
    rng = np.random.default_rng(0)
    qmax = 2 ** (bits - 1) - 1
    step = np.float32(0.25)
    # quarter-step grid: exact ties at x / step = k + 0.5 (round half to even), and clipping
    # 3*250*130 elements: above the kernel's threshold for sharing rows over threads
    x = (rng.integers(-4 * qmax - 12, 4 * qmax + 13, (3, 250, 130)) * np.float32(0.125)).astype(
        np.float32
    )
    want = np.clip(np.rint(x / step), -qmax, qmax)
    dst = np.full((3, 252, 140), 9.0, np.float32)  # padded destination: borders untouched
    view = dst[:, 1:251, 4:134]
    lib.dac_codes(
        (x.ctypes.data, 250 * 130, 130),
        (view.ctypes.data, 252 * 140, 140),
        (3, 250, 130),
        step=float(step),
        qmax=qmax,
        threads=2,
    )
    np.testing.assert_array_equal(view, want)
    assert (dst[:, 0] == 9).all() and (dst[:, 251] == 9).all()
    assert (dst[:, :, :4] == 9).all() and (dst[:, :, 134:] == 9).all()
    assert ((x / step) % 1 == 0.5).any()  # ties were exercised
    lib.dac_codes(  # step <= 0: plain copy, and the planes' borders zeroed
        (x.ctypes.data, 250 * 130, 130), (view.ctypes.data, 252 * 140, 140), (3, 250, 130),
        step=0.0, qmax=1, threads=2, pad=(1, 4, 1, 6),
    )  # fmt: skip
    np.testing.assert_array_equal(view, x)
    assert not dst[:, [0, 251]].any() and not dst[:, :, :4].any() and not dst[:, :, 134:].any()


@needs_kernel
@pytest.mark.parametrize(
    "cfg",
    [
        get_preset("ideal"),
        get_preset("64x64_100k_bitsliced"),
        get_preset("64x64_100k").replace(name="noisy", read_noise=True, read_noise_sigma=0.2),
        None,
    ],
    ids=["ideal", "bitsliced", "noisy", "digital"],
)
def test_files_without_qualifying_nodes_stay_on_onnxruntime(tmp_path: Path, cfg) -> None:
    path = _export(tmp_path, nets.ColumnFC(20, 3), cfg, [20])
    assert runtime_native.native_nodes(onnx.load(path)) == []
    assert runtime.load(path).engine == "onnxruntime"


@needs_kernel
def test_switches_and_a_missing_kernel_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _export(tmp_path, nets.ColumnFC(20, 3), get_preset("64x64_100k"), [20])
    x = _queries([20], 9)
    want = runtime.load(path, native=False).predict_proba(x)
    monkeypatch.setenv("NVMPRIV_NATIVE", "0")
    off = runtime.load(path)
    assert off.engine == "onnxruntime"
    np.testing.assert_array_equal(off.predict_proba(x), want)
    monkeypatch.delenv("NVMPRIV_NATIVE")
    monkeypatch.setattr(runtime_native, "_STATE", {})
    monkeypatch.setenv("NVMPRIV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="native crossbar kernel unavailable"):
        fallback = runtime.load(path)
    assert fallback.engine == "onnxruntime"
    np.testing.assert_array_equal(fallback.predict_proba(x), want)
    # a build that fails its self-check is not used either (the usual cache: no new build)
    monkeypatch.delenv("CXX")
    monkeypatch.delenv("NVMPRIV_CACHE_DIR")
    monkeypatch.setattr(runtime_native, "_STATE", {})

    def wrong(lib: object) -> None:
        raise RuntimeError("the compiled kernel disagrees with numpy on a test problem")

    monkeypatch.setattr(runtime_native, "_self_check", wrong)
    with pytest.warns(RuntimeWarning, match="disagrees with numpy"):
        assert runtime.load(path).engine == "onnxruntime"


def _edit(path: Path, out: Path, index: int, **changes: object) -> Path:
    """A hand-edited copy of an export: node ``index`` of the crossbar nodes gets ``changes``
    as attributes, and the file a fresh content digest (as a careful forger would)."""
    model = onnx.load(path)
    node = [n for n in model.graph.node if n.domain == "nvmpriv"][index]
    for name, value in changes.items():
        keep = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*keep, onnx.helper.make_attribute(name, value)])
    meta = {p.key: p.value for p in model.metadata_props}
    meta[runtime.CONTENT_DIGEST_KEY] = runtime.content_digest(model)
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, out)
    return out


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lenet")
    return _export(folder, nets.LeNet5(1, 10), get_preset("64x64_100k"), [1, 28, 28])


@needs_kernel
@pytest.mark.parametrize(
    ("index", "changes", "natives"),
    [
        (4, {"adc_step": 0.3}, 4),  # another step than the body's constants
        (0, {"adc_qmax": 1}, 4),  # another clip level
        (1, {"pads": [1, 1, 1, 1]}, 4),  # another geometry: another output shape
        (1, {"dac_step": 1e-3}, 4),  # another DAC
        (2, {"act_bits": 2}, 4),  # a quantizer the body does not have
        (3, {"adc_step": [0.1, 0.2]}, 4),  # an attribute of the wrong type
        (0, {"kernel_shape": [5, 5, 1]}, 4),
        (2, {"rows_per_group": 7}, 4),  # contradicts the weight tensor's size
        (4, {"read_noise": 1}, 4),  # claims noise: the body's noise would be skipped
    ],
)
def test_hand_edited_attributes_leave_the_node_to_onnxruntime(
    tmp_path: Path, lenet_file: Path, index: int, changes: dict, natives: int
) -> None:
    # the native engine computes what the attributes say, onnxruntime what the function body
    # says: a node whose attributes contradict its body stays on onnxruntime
    edited = _edit(lenet_file, tmp_path / "edited.onnx", index, **changes)
    model = runtime.load(edited)
    assert model.engine == f"onnxruntime + native crossbar kernel ({natives} nodes)"
    x = _queries([1, 28, 28], 8)
    want = runtime.load(lenet_file, native=False).predict_proba(x)
    np.testing.assert_allclose(model.predict_proba(x), want, rtol=1e-4, atol=1e-7)


@needs_kernel
def test_empty_batches_run_through_the_native_nodes(lenet_file: Path) -> None:
    runner = runtime.load(lenet_file)._runner
    (probs,) = runner.run(None, {"input": np.zeros((0, 1, 28, 28), np.float32)})
    assert probs.shape == (0, 10)


@needs_kernel
def test_concurrent_queries_from_threads_agree(lenet_file: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = runtime.load(lenet_file, threads=2)
    xs = [_queries([1, 28, 28], n) for n in (5, 9, 13, 17)]
    alone = [model.predict_proba(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(model.predict_proba, xs * 8))
    for got, want in zip(together, alone * 8, strict=True):
        np.testing.assert_array_equal(got, want)


@needs_kernel
def test_torch_free_process_uses_the_kernel(tmp_path: Path) -> None:
    path = _export(tmp_path, nets.LeNet5(1, 10), get_preset("64x64_100k"), [1, 28, 28])
    want = runtime.load(path, native=False).predict_proba(_queries([1, 28, 28], 6))
    np.save(tmp_path / "want.npy", want)
    code = (
        "import sys, numpy as np\n"
        "import nvmpriv.runtime as rt\n"
        f"m = rt.load({str(path)!r})\n"
        "x = np.random.default_rng(1).random((6, 1, 28, 28), dtype=np.float32)\n"
        f"want = np.load({str(tmp_path / 'want.npy')!r})\n"
        "np.testing.assert_allclose(m.predict_proba(x), want, rtol=1e-4, atol=1e-7)\n"
        "assert 'torch' not in sys.modules\n"
        "print(m.engine)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "onnxruntime + native crossbar kernel (5 nodes)"


def test_openmp_builds_unless_another_runtime_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "foreign_openmp_loaded", lambda: False)
    assert all("-fopenmp" in f for f in build.flag_sets()[:2])
    monkeypatch.setattr(build, "foreign_openmp_loaded", lambda: True)
    assert not any("-fopenmp" in f for f in build.flag_sets())
