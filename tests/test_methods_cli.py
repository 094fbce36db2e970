"""Every shipped method config runs through the CLI (fast_dev_run on digits, print_config offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from nvmpriv.__main__ import main

METHODS = ("pgd", "dorefa", "admm", "minmax", "ppb", "admm_minmax", "prune_ppb")
CONFIG_DIR = ROOT / "lightning_configs" / "methods"
NEEDS_SOURCE = ("ppb", "prune_ppb")


def test_every_method_has_three_configs() -> None:
    expected = {f"{m}_{d}.yaml" for m in METHODS for d in ("quickstart", "texas", "cifar10")}
    assert expected <= {p.name for p in CONFIG_DIR.glob("*.yaml")}


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny standard model trained for one epoch through the CLI (the PPB source)."""
    work = tmp_path_factory.mktemp("source")
    config = ROOT / "lightning_configs" / "quickstart.yaml"
    args = ["fit", "--config", str(config), "--trainer.max_epochs=1"]
    args += [f"--trainer.logger.init_args.save_dir={work / 'logs'}"]
    args += [f"--trainer.default_root_dir={work}", "--trainer.callbacks=[]"]
    args += ["--trainer.enable_checkpointing=true", "--trainer.enable_progress_bar=false"]
    assert main(args) == 0
    ckpts = sorted((work / "logs").rglob("*.ckpt"))
    assert ckpts, "the source run wrote no checkpoint"
    return ckpts[-1]


@pytest.mark.parametrize("method", METHODS)
def test_quickstart_config_fast_dev_run(
    method: str, source_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIG_DIR / f"{method}_quickstart.yaml")]
    args += ["--trainer.fast_dev_run=true"]
    if method in NEEDS_SOURCE:
        args.append(f"--model.init_args.source_checkpoint={source_checkpoint}")
    assert main(args) == 0


def test_ppb_config_without_its_source_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIG_DIR / "prune_ppb_quickstart.yaml")]
    assert main([*args, "--trainer.fast_dev_run=true"]) == 2
    err = capsys.readouterr().err
    assert "source_checkpoint=" in err and "does not exist" in err


@pytest.mark.parametrize(
    "config",
    [CONFIG_DIR / f"{m}_{d}.yaml" for m in METHODS for d in ("texas", "cifar10")],
    ids=lambda p: p.stem,
)
def test_data_hungry_configs_parse(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: nvmpriv.methods." in printed
    assert f"name: {config.stem}" in printed
