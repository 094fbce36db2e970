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


NO_DAC = get_preset("64x64_100k").replace(name="adc_only", dac_bits=None)
CASES = [
    pytest.param(lambda: nets.ColumnFC(100, 10), [100], "64x64_100k", id="fc-64"),
    pytest.param(lambda: nets.ColumnFC(100, 10), [100], "32x32_100k", id="fc-32"),
    pytest.param(lambda: nets.ColumnFC(100, 10), [100], NO_DAC, id="fc-no-dac"),
    pytest.param(lambda: nets.LeNet5(1, 10), [1, 28, 28], "64x64_100k", id="lenet"),
    pytest.param(_grouped_cnn, [4, 9, 9], "32x32_100k", id="grouped-same-dilated"),
    pytest.param(lambda: nets.CifarResNet(10, 1, 10), [3, 16, 16], "64x64_100k", id="resnet10"),
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


@needs_kernel
@pytest.mark.parametrize("bits", [2, 8])
def test_dac_codes_match_numpy_quantizer(bits: int) -> None:
    assert lib is not None
    rng = np.random.default_rng(0)
    qmax = 2 ** (bits - 1) - 1
    step = np.float32(0.25)
    # quarter-step grid: exact ties at x / step = k + 0.5 (round half to even), and clipping
    x = (rng.integers(-4 * qmax - 12, 4 * qmax + 13, (3, 5, 70)) * np.float32(0.125)).astype(
        np.float32
    )
    want = np.clip(np.rint(x / step), -qmax, qmax)
    dst = np.full((3, 7, 80), 9.0, np.float32)  # padded destination: borders untouched
    view = dst[:, 1:6, 4:74]
    lib.dac_codes(
        (x.ctypes.data, 5 * 70, 70),
        (view.ctypes.data, 7 * 80, 80),
        (3, 5, 70),
        step=float(step),
        qmax=qmax,
        threads=2,
    )
    np.testing.assert_array_equal(view, want)
    assert (dst[:, 0] == 9).all() and (dst[:, :, :4] == 9).all() and (dst[:, :, 74:] == 9).all()
    assert ((x / step) % 1 == 0.5).any()  # ties were exercised
    lib.dac_codes(  # step <= 0: plain copy
        (x.ctypes.data, 5 * 70, 70), (view.ctypes.data, 7 * 80, 80), (3, 5, 70),
        step=0.0, qmax=1, threads=1,
    )  # fmt: skip
    np.testing.assert_array_equal(view, x)


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


@needs_kernel
def test_nodes_whose_tensors_contradict_their_attributes_are_left_to_onnxruntime(
    tmp_path: Path,
) -> None:
    # the kernel reads raw memory: a node whose initializer is smaller than its attributes
    # claim must never reach it
    assert lib is not None
    path = _export(tmp_path, nets.ColumnFC(20, 3), get_preset("64x64_100k"), [20])
    model = onnx.load(path)
    node = model.graph.node[runtime_native.native_nodes(model)[0]]
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert runtime_native._prepare(lib, node, attrs, init, 1) is not None
    for key, value in [("n_row_tiles", 3), ("cols_per_group", 999), ("tile_size", 128)]:
        assert runtime_native._prepare(lib, node, {**attrs, key: value}, init, 1) is None
    assert runtime_native._prepare(lib, node, {**attrs, "adc_step": 0.0}, init, 1) is None


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
