"""ONNX export: graph structure, metadata, checker, CLI, overwrite rules, fit-end callback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import write_location
from torch import nn

from nvmpriv import nets, runtime
from nvmpriv.__main__ import main
from nvmpriv.crossbar import get_preset
from nvmpriv.export import ExportError, export_model, load_crossbar


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("exp")
    torch.manual_seed(0)
    net = nets.ColumnFC(64, 10).eval()
    x = torch.rand(16, 64)
    chip = export_model(
        net,
        get_preset("64x64_100k"),
        folder / "chip.onnx",
        input_shape=[64],
        chip_seed=7,
        calibration=x,
        split_hash="abc123",
    )
    digital = export_model(net, None, folder / "digital.onnx", input_shape=[64])
    return chip, digital


def test_graph_nodes_initializers_and_checker(exported: tuple[Path, Path]) -> None:
    chip, _ = exported
    model = onnx.load(chip)
    onnx.checker.check_model(model, full_check=True)
    xbar = [n for n in model.graph.node if n.domain == "nvmpriv"]
    assert [n.op_type for n in xbar] == ["CrossbarGemm"] * 3  # ColumnFC's three Linear layers
    assert len({n.overload for n in xbar}) == 3
    assert {(f.domain, f.name, f.overload) for f in model.functions} == {
        ("nvmpriv", "CrossbarGemm", n.overload) for n in xbar
    }
    init = {i.name: i for i in model.graph.initializer}
    first = xbar[0]
    w = onnx.numpy_helper.to_array(init[first.input[1]])
    assert w.shape == (1, 1, 64, 256)  # [groups, n_row_tiles, N, O] of the 64 -> 256 layer
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in first.attribute}
    assert attrs["dac_bits"] == 8 and attrs["adc_bits"] == 10 and attrs["tile_size"] == 64
    assert attrs["dac_step"] > 0 and attrs["adc_step"] > 0
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # dynamic batch
    # every recorded intermediate and output keeps the batch dynamic (a traced size of 2 here
    # would make onnxruntime warn on every other batch size)
    for v in [*model.graph.value_info, *model.graph.output]:
        d0 = v.type.tensor_type.shape.dim[0]
        assert d0.dim_param and not d0.dim_value, v.name
    assert model.graph.input[0].name == "input" and model.graph.output[0].name == "probabilities"
    assert {(o.domain, o.version) for o in model.opset_import} >= {
        ("", 18),
        ("nvmpriv", runtime.DOMAIN_VERSION),
    }


def test_metadata(exported: tuple[Path, Path]) -> None:
    chip, digital = exported
    meta = runtime.read_metadata(chip)
    assert json.loads(meta["nvmpriv.crossbar"])["name"] == "64x64_100k"
    assert meta["nvmpriv.crossbar_name"] == "64x64_100k"
    assert meta["nvmpriv.chip_seed"] == "7" and meta["nvmpriv.split_hash"] == "abc123"
    assert meta["nvmpriv.noise_seed"] == ""  # no read noise in 64x64_100k
    assert json.loads(meta["nvmpriv.input_shape"]) == [64]
    assert meta["nvmpriv.num_classes"] == "10" and meta["nvmpriv.output"] == "probabilities"
    assert meta["nvmpriv.opset"] == "18"
    dmeta = runtime.read_metadata(digital)
    assert dmeta["nvmpriv.crossbar"] == "digital"
    assert not any(n.domain == "nvmpriv" for n in onnx.load(digital).graph.node)


def test_refuses_overwrite_and_needs_calibration(
    tmp_path: Path, exported: tuple[Path, Path]
) -> None:
    chip, _ = exported
    before = chip.read_bytes()
    net = nets.ColumnFC(64, 10)
    with pytest.raises(ExportError, match="already exists"):
        export_model(net, None, chip, input_shape=[64])
    assert chip.read_bytes() == before
    with pytest.raises(ExportError, match="calibration"):
        export_model(net, get_preset("64x64_100k"), tmp_path / "x.onnx", input_shape=[64])
    assert not list(tmp_path.glob("*"))  # nothing half-written
    with pytest.raises(ValueError, match="unknown crossbar preset"):
        load_crossbar("no_such_chip")


def _write_config(folder: Path) -> Path:
    cfg = folder / "tiny.yaml"
    cfg.write_text(
        "model:\n  class_path: nvmpriv.methods.StandardTraining\n  init_args:\n    net:\n"
        "      class_path: nvmpriv.nets.ColumnFC\n      init_args: {in_features: 64, num_classes: 10}\n"
        "data:\n  class_path: nvmpriv.data.Digits\n  init_args: {batch_size: 32, seed: 0}\n"
    )
    return cfg


def test_cli_export_from_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write_config(tmp_path)
    torch.manual_seed(0)
    net = nets.ColumnFC(64, 10)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    out = tmp_path / "exports" / "m.onnx"
    args = [
        "export",
        "--config",
        str(cfg),
        "--ckpt_path",
        str(ckpt),
        "--crossbar",
        "32x32_100k",
        "--seed",
        "3",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    assert f"wrote {out} (" in (printed := capsys.readouterr().out)
    assert "crossbar 32x32_100k, chip seed 3)" in printed
    model = runtime.load(out)
    assert model.metadata["nvmpriv.chip_seed"] == "3" and model.num_classes == 10
    assert model.metadata["nvmpriv.split_hash"]
    assert model.metadata["nvmpriv.crossbar_spec"] == "32x32_100k"
    assert model.metadata["nvmpriv.run"] == "tiny"  # not under logs/<name>/version_N
    assert main(args) == 2  # exists: refused with a one-line error
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    dig = tmp_path / "d.onnx"
    assert (
        main(
            [
                "export",
                "--config",
                str(cfg),
                "--ckpt_path",
                str(ckpt),
                "--crossbar",
                "digital",
                "--output",
                str(dig),
            ]
        )
        == 0
    )
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    with torch.no_grad():
        expected = torch.softmax(net.eval()(torch.as_tensor(x)), 1).numpy()
    np.testing.assert_allclose(runtime.load(dig).predict_proba(x), expected, rtol=1e-5)
    assert (
        main(
            [
                "export",
                "--config",
                str(cfg),
                "--ckpt_path",
                str(tmp_path / "nope.ckpt"),
                "--output",
                str(tmp_path / "e.onnx"),
            ]
        )
        == 2
    )


def test_cli_export_set_overrides_the_run_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data moved since training: ``--set`` points the run's config at its new place."""
    moved = tmp_path / "new_place"
    moved.mkdir()
    write_location(moved)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model:\n  class_path: nvmpriv.methods.StandardTraining\n  init_args:\n    net:\n"
        "      class_path: nvmpriv.nets.ColumnFC\n"
        "      init_args: {in_features: 446, num_classes: 30}\n"
        "data:\n  class_path: nvmpriv.data.Location30\n"
        f"  init_args: {{root: {tmp_path / 'old_place'}, batch_size: 32, seed: 0}}\n"
    )
    net = nets.ColumnFC(446, 30)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    out = tmp_path / "m.onnx"
    args = ["export", "--config", str(cfg), "--ckpt_path", str(ckpt), "--crossbar", "32x32_100k"]
    args += ["--output", str(out)]
    assert main(args) == 2
    assert "old_place" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--set", f"data.init_args.root={moved}"]) == 0
    assert tuple(runtime.load(out).input_shape) == (446,)
    cfg_before = cfg.read_text()
    for bad, message in [
        ("data.init_args", "expected KEY=VALUE"),
        ("data.init_args.root.x=1", "not a mapping"),
        ("data.init_args.root=[unclosed", "not valid YAML"),
    ]:
        assert main([*args, "--overwrite", "--set", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert cfg.read_text() == cfg_before  # the run's own config is never rewritten


def test_cli_export_ckpt_path_last_finds_the_newest_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write_config(tmp_path)
    cfg.write_text(
        cfg.read_text()
        + "trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.TensorBoardLogger\n"
        "    init_args: {save_dir: logs, name: tiny}\n"
    )
    monkeypatch.chdir(tmp_path)
    args = ["export", "--config", str(cfg), "--ckpt_path", "last", "--crossbar", "digital"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last: no version folder" in err and len(err.strip().splitlines()) == 1
    net = nets.ColumnFC(64, 10)
    for version in (0, 1):
        folder = tmp_path / "logs" / "tiny" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        state = {f"net.{k}": v * (version + 1) for k, v in net.state_dict().items()}
        torch.save({"state_dict": state}, folder / "last.ckpt")
        os.utime(folder / "last.ckpt", (1e9 + version, 1e9 + version))
    assert main(args) == 0
    out = tmp_path / "exports" / "tiny_version_1_digital.onnx"
    assert f"wrote {out.relative_to(tmp_path)}" in capsys.readouterr().out
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    twice = nets.ColumnFC(64, 10)
    twice.load_state_dict({k: v * 2 for k, v in net.state_dict().items()})
    with torch.no_grad():
        expected = torch.softmax(twice.eval()(torch.as_tensor(x)), 1).numpy()
    np.testing.assert_allclose(runtime.load(out).predict_proba(x), expected, rtol=1e-5)


def test_run_name_follows_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nvmpriv.export import run_name

    run = tmp_path / "logs" / "texas" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    # the ExportOnnx callback's <name>_<version>, whichever config file is given
    assert run_name(tmp_path / "texas.yaml", ckpt) == "texas_version_3"
    assert run_name(run / "config.yaml", ckpt) == "texas_version_3"
    # a run folder's own config.yaml (beside splits.npz) names the run, not "config"
    (run / "splits.npz").write_bytes(b"")
    assert run_name(run / "config.yaml", tmp_path / "elsewhere.ckpt") == "texas_version_3"
    assert run_name(tmp_path / "texas.yaml", tmp_path / "elsewhere.ckpt") == "texas"
    # relative paths name the folders they point to
    monkeypatch.chdir(run / "checkpoints")
    assert run_name(tmp_path / "texas.yaml", "last.ckpt") == "texas_version_3"
    monkeypatch.chdir(run)
    assert run_name("config.yaml", "checkpoints/last.ckpt") == "texas_version_3"


def test_cli_export_default_name_is_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write_config(tmp_path)
    net = nets.ColumnFC(64, 10)
    state = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}
    ckpts = []
    for version in (0, 1):
        folder = tmp_path / "logs" / "tiny" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        torch.save(state, folder / "last.ckpt")
        ckpts.append(folder / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    for ckpt in ckpts:
        args = ["export", "--config", str(cfg), "--ckpt_path", str(ckpt), "--crossbar", "digital"]
        assert main(args) == 0, capsys.readouterr().err
    # two runs of one config: two files, named as the callback names them
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [
        "tiny_version_0_digital.onnx",
        "tiny_version_1_digital.onnx",
    ]
    assert runtime.load(tmp_path / "exports" / "tiny_version_1_digital.onnx").metadata[
        "nvmpriv.run"
    ] == ("tiny_version_1")


@pytest.mark.parametrize(
    ("preset", "tanh"),
    [("ideal", False), ("64x64_100k", False), ("ideal", True), ("64x64_100k", True)],
)
def test_dorefa_quantized_net_parity(tmp_path: Path, preset: str, tanh: bool) -> None:
    from nvmpriv.crossbar import convert
    from nvmpriv.quantization import quantize_model

    torch.manual_seed(0)
    source = (
        nn.Sequential(nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 10))
        if tanh
        else nets.ColumnFC(64, 10)
    )
    net = quantize_model(source, weight_bits=4, act_bits=4).eval()
    x = torch.rand(32, 64) if not tanh else torch.randn(32, 64)
    path = export_model(
        net, get_preset(preset), tmp_path / "q.onnx", input_shape=[64], chip_seed=1, calibration=x
    )
    model = onnx.load(path)
    acts = [
        onnx.helper.get_attribute_value(a)
        for n in model.graph.node
        if n.domain == "nvmpriv"
        for a in n.attribute
        if a.name == "act_bits"
    ]
    assert acts == [0, 4, 4]  # first layer full precision, later inputs quantized to 4 bits
    signed = [
        onnx.helper.get_attribute_value(a)
        for n in model.graph.node
        if n.domain == "nvmpriv"
        for a in n.attribute
        if a.name == "act_signed"
    ]
    assert signed == [0, int(tanh), int(tanh)]  # Tanh inputs use the signed levels
    with torch.no_grad():
        expected = torch.softmax(convert(net, get_preset(preset), seed=1, calibration=x)(x), 1)
        digital = torch.softmax(net(x), 1)
    engines = [runtime.load(path, reference=True), runtime.load(path, native=False)]
    engines.append(runtime.load(path))  # the native engine where the nodes have an ADC
    assert ("native" in engines[-1].engine) == (preset != "ideal")
    for engine in engines:
        got = engine.predict_proba(x.numpy())
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-6)
    if preset == "ideal":
        np.testing.assert_allclose(expected.numpy(), digital.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("crossbar", "match"),
    [
        (None, "digital net gives non-finite outputs on the calibration batch"),
        ("64x64_100k", r"'64x64_100k': layer net.0: weight holds NaN/inf values"),
    ],
)
def test_non_finite_model_is_not_exported(tmp_path: Path, crossbar: str | None, match: str) -> None:
    net = nets.ColumnFC(64, 10)
    with torch.no_grad():
        net.net[0].weight[0, 0] = float("nan")  # a diverged run
    x_cal = np.random.default_rng(0).random((32, 64), dtype=np.float32)
    config = None if crossbar is None else get_preset(crossbar)
    state = torch.random.get_rng_state()
    with pytest.raises(ExportError, match=match):
        export_model(net, config, tmp_path / "m.onnx", input_shape=[64], calibration=x_cal)
    assert not list(tmp_path.iterdir())
    assert torch.equal(torch.random.get_rng_state(), state)
