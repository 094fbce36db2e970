"""The shipped CLI and configs, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from nvmpriv.__main__ import main
from nvmpriv.data import Splits

CONFIGS = sorted(p for p in (ROOT / "lightning_configs").rglob("*.yaml") if "sweeps" not in p.parts)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nvmpriv", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_environment_imports_together() -> None:
    code = (
        "import torch, torchvision, torchmetrics, lightning;"
        "from torchvision.ops import nms;"
        "print(nms(torch.tensor([[0.,0.,1.,1.],[0.,0.,1.,1.]]), torch.tensor([1.,.5]), .5).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0]"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.parent.name + "/" + c.stem for c in CONFIGS])
def test_print_config_and_help(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: nvmpriv.methods." in printed and "class_path: nvmpriv.data." in printed
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--help"])
    assert done.value.code in (0, None)
    assert "--trainer.max_epochs" in capsys.readouterr().out


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_other_subcommands_help(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([sub, "--help"])
    assert "--ckpt_path" in capsys.readouterr().out


def test_unknown_command_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fitt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown command 'fitt'") and len(err.splitlines()) == 1
    assert all(c in err for c in ("fit", "predict", "crossbar", "export", "attack", "sweep"))
    assert main(["--help"]) == 0
    assert "membership inference against an exported ONNX file" in capsys.readouterr().out


@pytest.mark.parametrize("sub", ["attack", "export", "sweep"])
def test_extra_subcommands_help_shows_defaults(
    sub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([sub, "--help"])
    assert done.value.code in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    assert "default: None" not in text and "default: False" not in text
    expected = {
        "attack": ["(default: 30)", "(default: 0)", "(default: all)", "lira_online"],
        "export": ["(default: digital)", "(default: target_train)"],
        "sweep": ["trainer.devices=2"],
    }[sub]
    assert all(e in text for e in expected), text


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("quick")
    out = run_cli("fit", "--config", str(ROOT / "lightning_configs/quickstart.yaml"), cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    return work / "logs" / "quickstart" / "version_0"


def test_quickstart_reaches_accuracy_and_logs_tags(quickstart_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(quickstart_run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= tags
    best = max(event.value for event in acc.Scalars("val/acc"))
    assert best >= 0.90
    assert (quickstart_run / "checkpoints" / "last.ckpt").exists()
    assert (quickstart_run / "splits.npz").exists()


def test_last_checkpoint_is_the_final_epoch(quickstart_run: Path) -> None:
    last = torch.load(quickstart_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 39  # max_epochs 40, whichever epoch was the best


def test_predict_writes_probabilities(quickstart_run: Path) -> None:
    from nvmpriv.data import Digits
    from nvmpriv.methods import StandardTraining
    from nvmpriv.nets import ColumnFC

    work = quickstart_run.parents[2]
    ckpt = quickstart_run / "checkpoints" / "last.ckpt"
    before = sorted(p.name for p in (work / "logs" / "quickstart").iterdir())
    config = str(ROOT / "lightning_configs/quickstart.yaml")
    out = run_cli("predict", "--config", config, f"--ckpt_path={ckpt}", cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    (new,) = sorted(set(p.name for p in (work / "logs" / "quickstart").iterdir()) - set(before))
    saved = np.load(work / "logs" / "quickstart" / new / "predictions.npz")
    module = StandardTraining.load_from_checkpoint(ckpt, net=ColumnFC(64, 10), map_location="cpu")
    dm = Digits(seed=0)
    dm.setup()
    x, y = dm.arrays("target_test")
    with torch.no_grad():
        expected = torch.softmax(module.eval()(torch.as_tensor(x).float()), 1).numpy()
    np.testing.assert_allclose(saved["probabilities"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(saved["labels"], y)
    assert str(saved["role"]) == "target_test"


def test_audit_crossbars_option_replaces_the_audits_presets(quickstart_run: Path) -> None:
    work = quickstart_run.parents[2]
    ckpt = quickstart_run / "checkpoints" / "last.ckpt"
    config = str(ROOT / "lightning_configs/quickstart.yaml")
    before = set((work / "logs" / "quickstart").iterdir())
    out = run_cli(
        "validate", "--config", config, f"--ckpt_path={ckpt}", "--audit_crossbars=[ideal]", cwd=work
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (new,) = set((work / "logs" / "quickstart").iterdir()) - before
    results = json.loads((new / "results.json").read_text())
    assert set(results["configs"]) == {"digital", "ideal"}
    for bad, needle in [
        ("--audit_crossbars=[no_such_chip]", "known presets"),
        ("--trainer.callbacks=[]", "no nvmpriv.callbacks.CrossbarAudit callback"),
    ]:
        args = ["validate", "--config", config, f"--ckpt_path={ckpt}", bad]
        if "callbacks" in bad:
            args.append("--audit_crossbars=[ideal]")
        out = run_cli(*args, cwd=work)
        assert out.returncode == 2 and needle in out.stderr, out.stderr[-2000:]


def test_validate_reuses_checkpoint_split(quickstart_run: Path) -> None:
    work = quickstart_run.parents[2]
    ckpt = quickstart_run / "checkpoints" / "last.ckpt"
    before = {p.name for p in (work / "logs" / "quickstart").iterdir()}
    out = run_cli(
        "validate",
        "--config",
        str(ROOT / "lightning_configs/quickstart.yaml"),
        "--data.init_args.seed=123",
        f"--ckpt_path={ckpt}",
        cwd=work,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    fitted = Splits.load(quickstart_run)
    (new,) = {p.name for p in (work / "logs" / "quickstart").iterdir()} - before
    validated = Splits.load(work / "logs" / "quickstart" / new)
    # the audit names the epoch the checkpoint's weights come from (the last of 40)
    audited = json.loads((work / "logs" / "quickstart" / new / "results.json").read_text())
    assert audited["epoch"] == 39
    assert validated.split_hash == fitted.split_hash
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    stored = state["Digits"]["indices"]["target_train"]
    np.testing.assert_array_equal(np.asarray(stored), fitted.indices["target_train"])


def test_only_set_up_files_mark_a_folder_as_disposable(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from nvmpriv.cli import _holds_set_up_files_only

    run = tmp_path / "version_0"
    run.mkdir()
    for name in ("config.yaml", "hparams.yaml", "splits.npz", "events.out.tfevents.1.vm.1.0"):
        (run / name).write_text("")
    fresh = SimpleNamespace(global_step=0)
    assert _holds_set_up_files_only(run, fresh)
    assert not _holds_set_up_files_only(run, SimpleNamespace(global_step=3))  # it trained
    (run / "results.json").write_text("{}")  # e.g. a validate that failed after its audit
    assert not _holds_set_up_files_only(run, fresh)
    (run / "results.json").unlink()
    (run / "checkpoints").mkdir()
    assert not _holds_set_up_files_only(run, fresh)
    assert not _holds_set_up_files_only(tmp_path / "missing", fresh)
