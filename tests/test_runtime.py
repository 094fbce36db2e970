"""The ONNX evaluator: parity of onnxruntime and the numpy reference against the torch simulator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from nvmpriv import nets, runtime
from nvmpriv.crossbar import convert, get_preset
from nvmpriv.export import ExportError, export_model

ROOT = Path(__file__).resolve().parents[1]
NOISY = get_preset("64x64_100k").replace(name="noisy", read_noise=True, read_noise_sigma=0.2)


def _fc() -> nn.Module:
    torch.manual_seed(0)
    net = nets.ColumnFC(64, 10).eval()
    with torch.no_grad():  # peaked outputs so that probabilities are informative
        net.net[-1].weight.mul_(8)
    return net


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    ).eval()


def _resnet() -> nn.Module:
    torch.manual_seed(2)
    return nets.CifarResNet(depth=10, width=1, num_classes=10).eval()


def _export(
    tmp_path: Path, net: nn.Module, cfg_name: str, shape: list[int]
) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(3)
    x = torch.rand(32, *shape)
    cfg = (
        None if cfg_name == "digital" else (NOISY if cfg_name == "noisy" else get_preset(cfg_name))
    )
    path = export_model(
        net, cfg, tmp_path / f"{cfg_name}.onnx", input_shape=shape, chip_seed=5, calibration=x
    )
    return path, x


def _torch_probs(net: nn.Module, cfg_name: str, x_cal: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        model = (
            net
            if cfg_name == "digital"
            else convert(net, get_preset(cfg_name), seed=5, calibration=x_cal).eval()
        )
        return torch.softmax(model(x), 1).double().numpy()


CASES = [
    pytest.param("fc", "ideal", id="fc-ideal"),
    pytest.param("fc", "64x64_100k", id="fc-64x64_100k"),
    pytest.param("fc", "64x64_100k_bitsliced", id="fc-bitsliced"),
    pytest.param("cnn", "64x64_100k_bitsliced", id="cnn-bitsliced"),
    pytest.param("resnet", "ideal", id="resnet10-ideal"),
    pytest.param("resnet", "64x64_100k", id="resnet10-64x64_100k"),
    pytest.param("resnet", "64x64_100k_bitsliced", id="resnet10-bitsliced"),
]


@pytest.mark.parametrize(("arch", "cfg_name"), CASES)
def test_parity_torch_onnxruntime_reference(tmp_path: Path, arch: str, cfg_name: str) -> None:
    net, shape = {
        "fc": (_fc, [64]),
        "cnn": (_tiny_cnn, [3, 8, 8]),
        "resnet": (_resnet, [3, 32, 32]),
    }[arch]
    model = net()
    path, x_cal = _export(tmp_path, model, cfg_name, shape)
    x = x_cal[:2] if arch == "resnet" else x_cal[:8]
    expected = _torch_probs(model, cfg_name, x_cal, x)
    fast = runtime.load(path).predict_proba(x.numpy())  # native kernel where nodes qualify
    stock = runtime.load(path, native=False).predict_proba(x.numpy())  # the function bodies
    ref = runtime.load(path, reference=True).predict_proba(x.numpy())
    # relative 1e-4 on the probabilities (and their logs, which resolve small classes)
    for got in (fast, stock, ref):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(np.log(got), np.log(expected), rtol=1e-4, atol=1e-5)
    # the chip is not the digital net: the comparison above can fail
    digital = _torch_probs(model, "digital", x_cal, x)
    if cfg_name != "ideal":
        assert np.abs(digital - expected).max() > 1e-4


def test_noisy_outputs_agree_in_distribution(tmp_path: Path) -> None:
    model = _fc()
    path, x_cal = _export(tmp_path, model, "noisy", [64])
    x = x_cal[:1].repeat(400, 1)  # one sample, 400 independent noise draws per call
    torch.manual_seed(0)
    with torch.no_grad():
        chip = convert(model, NOISY, seed=5, calibration=x_cal).eval()
        t = torch.softmax(chip(x), 1).double().numpy()
    fast = runtime.load(path)
    a, a2 = fast.predict_proba(x.numpy()), fast.predict_proba(x.numpy())
    r = runtime.load(path, reference=True).predict_proba(x.numpy())
    assert not np.allclose(a, a2)  # fresh noise at every call
    assert t.std(0).max() > 1e-3  # the noise is visible at the output
    for got in (a, r):
        se = np.sqrt(t.var(0) / len(t) + got.var(0) / len(got))
        assert np.all(np.abs(got.mean(0) - t.mean(0)) < 5 * se + 1e-6)
        np.testing.assert_allclose(got.std(0), t.std(0), rtol=0.2, atol=1e-4)
    # a new session replays the same sequence (also with several threads: noisy files are not
    # split into concurrent chunks); another seed gives another one
    replay = runtime.load(path, threads=2)
    assert replay._workers == 1
    np.testing.assert_array_equal(replay.predict_proba(x.numpy()), a)
    assert not np.allclose(runtime.load(path, seed=99).predict_proba(x.numpy()), a)


def test_concurrent_chunks_equal_one_thread(tmp_path: Path) -> None:
    chip, x = _export(tmp_path, _tiny_cnn(), "64x64_100k", [3, 8, 8])
    digital, _ = _export(tmp_path, _tiny_cnn(), "digital", [3, 8, 8])
    xs = np.concatenate([x.numpy()] * 3)[:87]  # 87 rows: uneven chunks
    # the function bodies on onnxruntime (the native engine threads inside its kernel instead)
    one = runtime.load(chip, threads=1, native=False)
    many = runtime.load(chip, threads=3, native=False)
    assert (one._workers, many._workers) == (1, 3)
    assert runtime.load(digital, threads=3)._workers == 1  # intra-op threads instead
    assert many._min_rows >= 1 and many.queries == 0  # the load-time probe is not a query
    expected = one.predict_proba(xs, batch_size=1000)
    many._min_rows = 10**6  # unsplit: one piece on the 3-thread session
    np.testing.assert_array_equal(many.predict_proba(xs), expected)
    many._min_rows = 1  # split into concurrent chunks on the single-threaded session
    for batch_size in (1000, 10, 1):
        np.testing.assert_array_equal(many.predict_proba(xs, batch_size=batch_size), expected)
    assert many.queries == 4 * len(xs)


@pytest.fixture(scope="module")
def fc_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = _export(tmp_path_factory.mktemp("rt"), _fc(), "64x64_100k", [64])
    return path


def test_predict_proba_shape_checks(fc_file: Path) -> None:
    model = runtime.load(fc_file)
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    p = model.predict_proba(x)
    assert p.shape == (3, 10) and np.allclose(p.sum(1), 1)
    np.testing.assert_allclose(model.predict_proba(x[0]), p[:1], rtol=1e-6)
    np.testing.assert_allclose(model.predict_proba(x, batch_size=2), p, rtol=1e-6)
    with pytest.raises(runtime.OnnxModelError, match=r"expects \(n, 64\)"):
        model.predict_proba(np.zeros((3, 63), np.float32))
    assert model.queries == 3 + 1 + 3


def test_bad_files_give_clear_errors(tmp_path: Path, fc_file: Path) -> None:
    with pytest.raises(runtime.OnnxModelError, match="not found"):
        runtime.load(tmp_path / "missing.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    with pytest.raises(runtime.OnnxModelError, match="not an ONNX model"):
        runtime.load(text)
    data = fc_file.read_bytes()
    for i, cut in enumerate((len(data) // 2, len(data) - 7)):
        part = tmp_path / f"truncated{i}.onnx"
        part.write_bytes(data[:cut])
        with pytest.raises(runtime.OnnxModelError, match=part.name):
            runtime.load(part)
    model = onnx.load(fc_file)
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, bare)
    with pytest.raises(runtime.OnnxModelError, match="missing nvmpriv metadata"):
        runtime.load(bare)


def test_modified_or_corrupted_content_is_refused(tmp_path: Path, fc_file: Path) -> None:
    model = onnx.load(fc_file)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[runtime.CONTENT_DIGEST_KEY] == runtime.content_digest(model)
    # one byte flipped inside the largest initializer still parses, checks and runs
    data = bytearray(fc_file.read_bytes())
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    at = bytes(data).index(big.raw_data[:64]) + len(big.raw_data) // 2
    data[at] ^= 0x40
    flipped = tmp_path / "flipped.onnx"
    flipped.write_bytes(bytes(data))
    parsed = onnx.load(flipped)
    onnx.checker.check_model(parsed)
    assert runtime.content_digest(parsed) != meta[runtime.CONTENT_DIGEST_KEY]
    for reference in (False, True):
        with pytest.raises(runtime.OnnxModelError, match=r"flipped\.onnx: content does not match"):
            runtime.load(flipped, reference=reference)
    # an edited metadata entry (here the crossbar name) is content too
    for prop in model.metadata_props:
        if prop.key == "nvmpriv.crossbar_name":
            prop.value = "ideal"
    edited = tmp_path / "edited.onnx"
    onnx.save(model, edited)
    with pytest.raises(runtime.OnnxModelError, match="modified or corrupted after export"):
        runtime.load(edited)
    # files written before the digest existed still load
    for i, prop in enumerate(model.metadata_props):
        if prop.key == runtime.CONTENT_DIGEST_KEY:
            del model.metadata_props[i]
            break
    older = tmp_path / "older.onnx"
    onnx.save(model, older)
    assert runtime.load(older).predict_proba(np.zeros((2, 64), np.float32)).shape == (2, 10)


def test_runtime_and_score_attacks_import_no_torch(fc_file: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "import nvmpriv.runtime as rt, nvmpriv.attacks as A\n"
        f"m = rt.load({str(fc_file)!r})\n"
        "p = m.predict_proba(np.zeros((4, 64), np.float32))\n"
        "A.run_attack('confidence', A.AttackInputs(p[:2], [0, 1], p[2:], [1, 2]))\n"
        "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if 'torch' in k)\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_rows_per_chunk_from_probe_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])

    def run_at(seconds_per_row: float) -> object:
        def run(x: np.ndarray) -> None:
            clock[0] += seconds_per_row * len(x)

        return run

    # 0.1 ms a row: 4 rows (0.4 ms) are too short to time, 16 rows take 1.6 ms -> 5 ms = 50 rows
    assert runtime._rows_per_chunk(run_at(1e-4), (3,)) in (50, 51)
    # 1 us a row: probes grow to 256 rows (0.26 ms) and stop -> 5000 rows
    assert runtime._rows_per_chunk(run_at(1e-6), (3,)) in (5000, 5001)
    # 30 ms a row (a large conv net): every row is worth a chunk
    assert runtime._rows_per_chunk(run_at(3e-2), (3,)) == 1


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("nvmpriv.domain_version", "7", r"newer nvmpriv .*v7; this evaluator knows v2.*upgrade"),
        ("nvmpriv.output", "logits", "its output is 'logits', not 'probabilities'"),
        ("nvmpriv.input_name", "x", r"names input 'x' .* graph has inputs \['input'\]"),
        ("nvmpriv.output_name", "y", r"output 'y' .* outputs \['probabilities'\]"),
        ("nvmpriv.input_shape", "[32]", r"input_shape \[32\] disagrees with the graph input"),
        ("nvmpriv.input_shape", "[8, 8]", r"input_shape \[8, 8\] disagrees"),
        ("nvmpriv.input_shape", "[64.5]", r"malformed nvmpriv.input_shape \[64.5\]"),
        ("nvmpriv.input_shape", "[true]", r"malformed nvmpriv.input_shape \[True\]"),
        ("nvmpriv.input_shape", "[]", r"malformed nvmpriv.input_shape \[\]"),
        ("nvmpriv.num_classes", "5", "num_classes 5 disagrees with the graph output's 10"),
        ("nvmpriv.num_classes", "1", r"malformed nvmpriv.num_classes 1 \(at least 2\)"),
        ("nvmpriv.crossbar", "{not json", "malformed nvmpriv metadata"),
        ("nvmpriv.crossbar", "[1, 2]", "neither 'digital' nor a JSON object"),
    ],
)
def test_metadata_the_evaluator_cannot_honour(
    tmp_path: Path, fc_file: Path, key: str, value: str, match: str
) -> None:
    model = onnx.load(fc_file)
    meta = {p.key: p.value for p in model.metadata_props} | {key: value}
    onnx.helper.set_model_props(model, meta)
    # a consistent file (its digest recomputed): the check under test is the only obstacle
    digest = runtime.content_digest(model)
    onnx.helper.set_model_props(model, meta | {runtime.CONTENT_DIGEST_KEY: digest})
    path = tmp_path / "other.onnx"
    onnx.save(model, path)
    with pytest.raises(runtime.OnnxModelError, match=match):
        runtime.load(path)


def test_digest_survives_resaving_with_external_data(tmp_path: Path, fc_file: Path) -> None:
    model = onnx.load(fc_file)
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save_model(model, ext, save_as_external_data=True, size_threshold=0)
    assert any(p.name != "model.onnx" for p in ext.parent.iterdir())  # weights left the file
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    expected = runtime.load(fc_file).predict_proba(x)
    np.testing.assert_array_equal(runtime.load(ext).predict_proba(x), expected)
    inline = tmp_path / "inline.onnx"
    onnx.save(onnx.load(ext), inline)  # back inline: data_location fields now set
    np.testing.assert_array_equal(runtime.load(inline).predict_proba(x), expected)
    for extra in ext.parent.iterdir():
        if extra.name != "model.onnx":
            extra.unlink()
    with pytest.raises(runtime.OnnxModelError, match="external weight files cannot be read"):
        runtime.load(ext)


def _resave(model: onnx.ModelProto, path: Path, *, digest: bool = True) -> Path:
    """Save an edited export as a consistent file (digest recomputed) or as an undigested one."""
    meta = {p.key: p.value for p in model.metadata_props}
    meta.pop(runtime.CONTENT_DIGEST_KEY, None)
    onnx.helper.set_model_props(model, meta)
    if digest:
        meta[runtime.CONTENT_DIGEST_KEY] = runtime.content_digest(model)
        onnx.helper.set_model_props(model, meta)
    onnx.save(model, path)
    return path


def test_crossbar_nodes_without_their_function_bodies_are_refused(
    tmp_path: Path, fc_file: Path
) -> None:
    """A file cut inside its metadata can keep every required key yet lose the digest and the
    function bodies (they are stored after the metadata): it must not load as an older file."""
    for digest in (True, False):
        model = onnx.load(fc_file)
        del model.functions[:]
        path = _resave(model, tmp_path / f"cut{digest}.onnx", digest=digest)
        for reference in (False, True):
            with pytest.raises(runtime.OnnxModelError, match=r"lack their ONNX function bodies"):
                runtime.load(path, reference=reference)


def test_outputs_that_are_not_probabilities_are_refused(tmp_path: Path) -> None:
    path, _ = _export(tmp_path, _fc(), "digital", [64])
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    for reference in (False, True):  # finite inputs that overflow inside the net
        with pytest.raises(runtime.OnnxModelError, match="NaN/inf for finite inputs"):
            runtime.load(path, reference=reference).predict_proba(np.full((2, 64), 3e38))
    model = onnx.load(path)
    (soft,) = [n for n in model.graph.node if n.op_type == "Softmax"]
    model.graph.node.remove(soft)
    for node in model.graph.node:  # the logits become the output, still named "probabilities"
        for i, name in enumerate(node.output):
            if name == soft.input[0]:
                node.output[i] = soft.output[0]
    logits = _resave(model, tmp_path / "logits.onnx")
    for reference in (False, True):
        with pytest.raises(runtime.OnnxModelError, match=r"logits\.onnx: output is not probab"):
            runtime.load(logits, reference=reference).predict_proba(x)


def test_queries_that_are_not_real_finite_arrays(fc_file: Path) -> None:
    model = runtime.load(fc_file)
    x = np.random.default_rng(0).random((3, 64))
    cases = [
        (x + 1j, "dtype complex128; query real numbers"),
        (np.full((2, 64), "a"), "dtype <U1"),
        ([[0.0] * 64, [0.0] * 63], "not a rectangular array"),
        (np.full((2, 64), 1e39), "reach 1e\\+39, beyond float32"),
        (np.full((2, 64), np.nan), "NaN/inf"),
    ]
    for bad, match in cases:
        with pytest.raises(runtime.OnnxModelError, match=match):
            model.predict_proba(bad)
    for size in (0, -3, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            model.predict_proba(x, batch_size=size)
    assert model.predict_proba(x.astype(int)).shape == (3, 10)  # integers are real numbers


def test_noise_seeds_stay_exact_in_float32(tmp_path: Path) -> None:
    """onnxruntime's RandomNormalLike seed is a float32: seeds from 2**24 on would round onto
    each other (seed and seed + 1 giving one noise stream), so they are refused."""
    path, x = _export(tmp_path, _fc(), "noisy", [64])
    assert runtime.read_metadata(path)["nvmpriv.noise_seed"] == "5"  # the chip seed by default
    n_nodes = sum(n.domain == "nvmpriv" for n in onnx.load(path).graph.node)
    top = runtime.NOISE_SEED_LIMIT - n_nodes
    q = x.numpy()
    first, second = (runtime.load(path, seed=s).predict_proba(q) for s in (top - 1, top))
    assert not np.array_equal(first, second)
    for bad in (top + 1, 2**26, -1):
        with pytest.raises(runtime.OnnxModelError, match=rf"noise seed {bad} is out of range"):
            runtime.load(path, seed=bad)
    with pytest.raises(ExportError, match=r"--noise-seed: noise seed 67108864 is out of range"):
        export_model(
            _fc(), NOISY, tmp_path / "n1.onnx", input_shape=[64], calibration=x, noise_seed=2**26
        )
    with pytest.raises(ExportError, match=r"--seed \(the default noise seed\)"):
        export_model(
            _fc(), NOISY, tmp_path / "n2.onnx", input_shape=[64], calibration=x, chip_seed=2**30
        )
    assert not (tmp_path / "n1.onnx").exists() and not (tmp_path / "n2.onnx").exists()
    given = export_model(
        _fc(), NOISY, tmp_path / "n3.onnx", input_shape=[64], calibration=x, noise_seed=11
    )
    assert runtime.read_metadata(given)["nvmpriv.noise_seed"] == "11"
    # the chip seed alone is free when there is no read noise
    export_model(
        _fc(), get_preset("ideal"), tmp_path / "big.onnx", input_shape=[64], chip_seed=2**30
    )


def test_export_into_a_file_instead_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(ExportError, match=r"afile is not a folder \(a file is in the way\)"):
        export_model(_fc(), None, tmp_path / "afile" / "m.onnx", input_shape=[64])
    assert (tmp_path / "afile").read_text() == "keep me"
