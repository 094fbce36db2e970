"""Resume after SIGKILL, reproducible results, the non-finite-loss stop and safe loading (CPU).

The oracle of every run comparison is an uninterrupted run of the same config and seed: a resumed
or repeated run must reproduce its ``results.json`` exactly (only the wall-clock ``seconds`` may
differ). Each ``python -m nvmpriv`` start costs seconds, so the runs are few and tiny: Digits,
four epochs, a two-preset audit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ROOT

AUDIT: dict[str, Any] = {
    "crossbars": ["ideal", "32x32_100k"],
    "attacks": ["loss", "confidence"],
    "max_samples": 200,
    "layer_samples": 64,
    "shadow_epochs": 2,  # the shadow model must not depend on the chip seed either
    "figures": False,
    "print_table": False,
}
TIMING = {"seconds"}
RUN = Path("logs") / "rel" / "version_0"


def write_config(folder: Path, *, chip_seed: int = 0, epochs: int = 4) -> Path:
    """Quickstart reduced to a quick audit; a checkpoint (and last.ckpt) after every epoch."""
    config = yaml.safe_load((ROOT / "lightning_configs" / "quickstart.yaml").read_text())
    trainer = config["trainer"]
    trainer["max_epochs"] = epochs
    trainer["enable_progress_bar"] = False
    trainer["logger"]["init_args"]["name"] = "rel"
    trainer["callbacks"] = [
        {
            "class_path": "nvmpriv.callbacks.LastEpochCheckpoint",
            "init_args": {"save_last": True, "every_n_epochs": 1, "save_top_k": -1},
        },
        {"class_path": "nvmpriv.callbacks.FiniteLossGuard"},
        {
            "class_path": "nvmpriv.callbacks.CrossbarAudit",
            "init_args": {**AUDIT, "chip_seed": chip_seed},
        },
    ]
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nvmpriv", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fit(folder: Path, *extra: str, **config: Any) -> dict[str, Any]:
    """Run ``fit`` in ``folder`` and return its results.json."""
    out = cli("fit", "--config", str(write_config(folder, **config)), *extra, cwd=folder)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((folder / RUN / "results.json").read_text())


def without_timing(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if k not in TIMING}


def audit_history(ckpt: Path) -> list[dict[str, Any]]:
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    (key,) = [k for k in state["callbacks"] if k.startswith("CrossbarAudit")]
    return state["callbacks"][key]["history"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The uninterrupted run every other run is compared with."""
    folder = tmp_path_factory.mktemp("reference")
    return folder, fit(folder)


def test_sigkill_then_ckpt_path_last_reproduces_uninterrupted_run(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nvmpriv", "fit", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = tmp_path / RUN / "checkpoints"
    deadline = time.monotonic() + 600
    try:
        while not list(checkpoints.glob("epoch=1-*.ckpt")):
            assert proc.poll() is None, "fit ended before its second checkpoint"
            assert time.monotonic() < deadline, "no second checkpoint within 600 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / RUN / "results.json").exists(), "killed too late: the fit had finished"
    killed = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")
    done_before_kill = audit_history(checkpoints / "last.ckpt")

    out = cli("fit", "--config", str(config), "--ckpt_path", "last", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Restored all states from the checkpoint" in out.stdout + out.stderr
    # The run continued in its own version folder instead of starting a new one from scratch.
    assert sorted(p.name for p in (tmp_path / RUN).parent.iterdir()) == ["version_0"]

    ref_folder, expected = reference
    resumed = json.loads((tmp_path / RUN / "results.json").read_text())
    assert without_timing(resumed) == without_timing(expected)

    # Callback state came back from the checkpoint: audits made before the kill are kept as they
    # were (their own timings included, so they were not recomputed), later ones match the
    # reference run's.
    history = audit_history(tmp_path / RUN / "checkpoints" / "last.ckpt")
    ref_history = audit_history(ref_folder / RUN / "checkpoints" / "last.ckpt")
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[: len(done_before_kill)] == done_before_kill
    assert [without_timing(h) for h in history] == [without_timing(h) for h in ref_history]
    assert (
        killed["Digits"]["indices"]
        == torch.load(ref_folder / RUN / "checkpoints" / "last.ckpt", weights_only=True)["Digits"][
            "indices"
        ]
    )


def test_chip_seed_changes_the_chip_only(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A second fresh process with another chip seed: same training, different simulated chip."""
    _, expected = reference
    other = fit(tmp_path, chip_seed=1)
    # Training and the digital audit do not depend on the chip: identical across processes.
    assert other["configs"]["digital"] == expected["configs"]["digital"]
    assert other["configs"]["ideal"] == expected["configs"]["ideal"]
    assert other["split_hash"] == expected["split_hash"]
    assert other["global_step"] == expected["global_step"]
    # The non-ideal chip is a different draw: its layer SNRs differ.
    ours = expected["configs"]["32x32_100k"]["layers"]
    theirs = other["configs"]["32x32_100k"]["layers"]
    assert ours.keys() == theirs.keys()
    assert all(ours[k]["snr_db"] != theirs[k]["snr_db"] for k in ours)
    assert other["chip_seed"] == 1 and expected["chip_seed"] == 0


@pytest.mark.slow
def test_same_seed_gives_identical_results_json(
    reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    _, expected = reference
    assert without_timing(fit(tmp_path)) == without_timing(expected)


def test_checkpoints_load_with_weights_only(reference: tuple[Path, dict[str, Any]]) -> None:
    """Everything a checkpoint holds (splits, RNG state, audit state) passes torch's safe loader."""
    folder, _ = reference
    state = torch.load(folder / RUN / "checkpoints" / "last.ckpt", weights_only=True)
    rng = state["Digits"]["rng"]
    assert isinstance(rng["torch"], torch.Tensor) and rng["torch"].dtype == torch.uint8
    assert len(rng["numpy"][1]) == 624 and len(rng["python"][1]) == 625


def test_same_chip_seed_same_chip_in_process() -> None:
    """Oracle: programming the same net twice with one seed gives bit-identical outputs."""
    from nvmpriv.crossbar import convert, get_preset
    from nvmpriv.nets import ColumnFC

    torch.manual_seed(0)
    net = ColumnFC(64, 10).eval()
    x = torch.rand(32, 64)
    cfg = get_preset("32x32_100k")

    def outputs(seed: int) -> torch.Tensor:
        torch.manual_seed(123)  # per-query read noise, if the preset has it
        with torch.no_grad():
            return convert(net, cfg, seed=seed, calibration=x)(x)

    assert torch.equal(outputs(0), outputs(0))
    assert not torch.equal(outputs(0), outputs(1))


def test_non_finite_loss_stops_with_epoch_step_and_checkpoint(tmp_path: Path) -> None:
    """Epoch 0 trains normally and is checkpointed; the LR then jumps by 1e30 and the loss blows up."""
    config = write_config(tmp_path, epochs=3)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"] = data["trainer"]["callbacks"][:2]  # no audit: faster
    config.write_text(yaml.safe_dump(data))
    out = cli(
        "fit",
        "--config",
        str(config),
        "--model.init_args.lr_scheduler=torch.optim.lr_scheduler.StepLR",
        "--model.init_args.lr_scheduler.init_args.step_size=1",
        "--model.init_args.lr_scheduler.init_args.gamma=1e30",
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert "non-finite training loss at epoch 1, step" in line
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    assert str(last) in line or "last.ckpt" in line
    good = torch.load(last, weights_only=True)
    assert good["epoch"] == 0
    assert all(
        torch.isfinite(v).all() for v in good["state_dict"].values() if v.is_floating_point()
    )


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_outputs_get_the_umask_mode(tmp_path: Path, umask: int, mode: int) -> None:
    import os

    import matplotlib.pyplot as plt
    import numpy as np

    from nvmpriv import atomic
    from nvmpriv.export import _atomic_write_bytes
    from nvmpriv.plots import save_figure

    old = os.umask(umask)
    atomic._new_file_mode.cache_clear()
    try:
        written = [
            atomic.atomic_write_text(tmp_path / "results.json", "{}"),
            atomic.atomic_save_npz(tmp_path / "splits.npz", a=np.zeros(3)),
            save_figure(plt.figure(), tmp_path / "report.png"),
        ]
        _atomic_write_bytes(tmp_path / "model.onnx", b"x", overwrite=False)
        written.append(tmp_path / "model.onnx")
        for path in written:
            assert path.stat().st_mode & 0o777 == mode, path.name
    finally:
        os.umask(old)
        atomic._new_file_mode.cache_clear()


def test_atomic_outputs_reach_the_disk_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import matplotlib.pyplot as plt
    import numpy as np

    from nvmpriv import atomic
    from nvmpriv.export import _atomic_write_bytes
    from nvmpriv.plots import save_figure

    events: list[str] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def rename(kind: str, real):
        def call(src, dst) -> None:
            events.append(kind)
            real(src, dst)

        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", rename("rename", real_replace))
    monkeypatch.setattr(os, "link", rename("rename", real_link))
    atomic.atomic_write_text(tmp_path / "results.json", "{}")
    atomic.atomic_save_npz(tmp_path / "splits.npz", a=np.zeros(3))
    save_figure(plt.figure(), tmp_path / "report.png")
    _atomic_write_bytes(tmp_path / "model.onnx", b"x", overwrite=False)
    _atomic_write_bytes(tmp_path / "model.onnx", b"y", overwrite=True)
    assert events == ["fsync", "rename"] * 5
    assert (tmp_path / "model.onnx").read_bytes() == b"y"


def test_extending_a_finished_run_replaces_its_own_exports(tmp_path: Path) -> None:
    import numpy as np

    from nvmpriv import nets, runtime

    config = write_config(tmp_path, epochs=2)
    raw = yaml.safe_load(config.read_text())
    raw["trainer"]["callbacks"].append(
        {
            "class_path": "nvmpriv.export_callback.ExportOnnx",
            "init_args": {"crossbars": ["digital"]},
        }
    )
    raw["trainer"]["callbacks"][2]["init_args"]["crossbars"] = ["ideal"]
    config.write_text(yaml.safe_dump(raw))
    export = tmp_path / "exports" / "rel_version_0_digital.onnx"
    assert cli("fit", "--config", str(config), cwd=tmp_path).returncode == 0
    before = runtime.load(export).metadata["nvmpriv.content_sha256"]

    out = cli(
        "fit",
        "--config",
        str(config),
        "--ckpt_path",
        "last",
        "--trainer.max_epochs=3",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / RUN).parent.iterdir()) == ["version_0"]
    # the run's export now holds the model the extended fit ended with
    model = runtime.load(export)
    assert model.metadata["nvmpriv.content_sha256"] != before
    state = torch.load(tmp_path / RUN / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2
    net = nets.ColumnFC(64, 10)
    net.load_state_dict({k[4:]: v for k, v in state["state_dict"].items() if k.startswith("net.")})
    x = np.random.default_rng(0).random((16, 64), dtype=np.float32) * 16
    with torch.no_grad():
        expected = torch.softmax(net.eval()(torch.as_tensor(x)), 1).numpy()
    np.testing.assert_allclose(model.predict_proba(x), expected, rtol=1e-4, atol=1e-6)

    # a new run of the same config is another version: its exports never touch this one's
    assert cli("fit", "--config", str(config), cwd=tmp_path).returncode == 0
    assert (tmp_path / "exports" / "rel_version_1_digital.onnx").exists()
    assert (
        runtime.load(export).metadata["nvmpriv.content_sha256"]
        == (model.metadata["nvmpriv.content_sha256"])
    )
