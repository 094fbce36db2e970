"""Black-box attacks on an exported file: audit parity, run folders without checkpoints, npz data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nvmpriv import runtime_native
from nvmpriv.__main__ import main
from nvmpriv.blackbox import attack_model, load_attack_data
from nvmpriv.runtime import load

SEED = 3
CONFIG = """\
seed_everything: 0
trainer:
  max_epochs: 4
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: "{logs}", name: bb}}
  callbacks:
    - class_path: nvmpriv.callbacks.LastEpochCheckpoint
      init_args: {{save_last: true}}
    - class_path: nvmpriv.callbacks.CrossbarAudit
      init_args:
        crossbars: [64x64_100k]
        attacks: [confidence, loss, entropy]
        chip_seed: {seed}
        layer_samples: 0
        figures: false
        print_table: false
    - class_path: nvmpriv.export_callback.ExportOnnx
      init_args:
        crossbars: [digital, 64x64_100k]
        chip_seed: {seed}
        folder: "{exports}"
model:
  class_path: nvmpriv.methods.StandardTraining
  init_args:
    net:
      class_path: nvmpriv.nets.ColumnFC
      init_args: {{in_features: 64, num_classes: 10}}
data:
  class_path: nvmpriv.data.Digits
  init_args: {{batch_size: 32, seed: 0}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bb")
    cfg = root / "bb.yaml"
    cfg.write_text(CONFIG.format(logs=root / "logs", exports=root / "exports", seed=SEED))
    assert main(["fit", "--config", str(cfg)]) == 0
    run_dir = root / "logs" / "bb" / "version_0"
    chip = root / "exports" / f"bb_version_0_64x64_100k_seed{SEED}.onnx"
    return {
        "root": root,
        "run_dir": run_dir,
        "chip": chip,
        "digital": root / "exports" / "bb_version_0_digital.onnx",
        "audit": json.loads((run_dir / "results.json").read_text()),
    }


def test_export_callback_wrote_both_files(run: dict[str, Any]) -> None:
    assert run["chip"].is_file() and run["digital"].is_file()
    meta = load(run["chip"]).metadata
    assert meta["nvmpriv.chip_seed"] == str(SEED)
    assert meta["nvmpriv.split_hash"] == run["audit"]["split_hash"]


def test_export_of_last_ckpt_is_the_fit_export(run: dict[str, Any]) -> None:
    out = run["root"] / "cli_export.onnx"
    cfg = str(run["root"] / "bb.yaml")
    last = str(run["run_dir"] / "checkpoints" / "last.ckpt")
    args = ["export", "--config", cfg, "--ckpt_path", last, "--crossbar", "64x64_100k"]
    assert main([*args, "--seed", str(SEED), "--output", str(out)]) == 0
    x = np.random.default_rng(1).random((50, 64), dtype=np.float32) * 16
    np.testing.assert_array_equal(load(out).predict_proba(x), load(run["chip"]).predict_proba(x))
    assert load(out).metadata["nvmpriv.run"] == "bb_version_0"


def test_blackbox_matches_audit(run: dict[str, Any]) -> None:
    # Compared: AUC and the upper-bound accuracy (threshold-free / best threshold on the
    # target), the audit's thresholds came from 2-fold CV on the target, the black box's from
    # its own shadow model, so the attacker-side accuracy is not compared.
    data = load_attack_data(run["run_dir"])
    report = attack_model(run["chip"], data, ["confidence", "loss", "entropy"], shadow_epochs=2)
    audit = run["audit"]["configs"]["64x64_100k"]["attacks"]
    for name in ("confidence", "loss", "entropy"):
        got = report["attacks"][name]
        assert abs(got["auc"] - audit[name]["auc"]) <= 0.005, name
        assert abs(got["accuracy_upper_bound"] - audit[name]["acc_upper"]) <= 0.005, name
    assert report["attacks"]["loss"]["queries"] == report["n_members"] + report["n_nonmembers"]
    # the chip and the digital net leak differently: the comparison above is not vacuous
    dig = run["audit"]["configs"]["digital"]["attacks"]["loss"]["auc"]
    assert dig != audit["loss"]["auc"]


def test_cli_attack_without_checkpoints(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(run["run_dir"] / "checkpoints")
    out = run["chip"].with_suffix(".attack.json")  # the default: beside the model
    code = main(
        [
            "attack",
            "--model",
            str(run["chip"]),
            "--data",
            str(run["run_dir"]),
            "--attacks",
            "confidence,loss,lira_offline",
            "--shadow-epochs",
            "2",
            "--n-ref",
            "2",
            "--queries",
            "2",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["attacks"]) == {"confidence", "loss", "lira_offline"}
    for entry in report["attacks"].values():
        assert 0 <= entry["auc"] <= 1 and entry["queries"] > 0 and entry["seconds"] >= 0
        assert "tpr_at_01pct_fpr" in entry and "tpr_at_1pct_fpr" in entry
    n = report["n_members"] + report["n_nonmembers"]
    assert report["attacks"]["confidence"]["queries"] == 2 * n  # k = 2 averaged queries
    assert [r["k"] for r in report["query_averaging"]] == [1, 2]
    for row in report["query_averaging"]:  # the shadow model's threshold, under the bound
        assert 0 <= row["accuracy"] <= row["accuracy_upper_bound"] + 1e-12
    # a deterministic chip: k = 2 averaged queries are the suite's own confidence attack
    assert report["query_averaging"][1]["accuracy"] == report["attacks"]["confidence"]["accuracy"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "lira_offline" in capsys.readouterr().out


def test_cli_engine_choice(run: dict[str, Any], tmp_path: Path) -> None:
    # the gap attack is closed form on the labels the file predicts: every engine that
    # evaluates the same deterministic chip gives the same accuracy, and the report says which
    # engine ran
    reports = {}
    for engine in ("auto", "onnxruntime", "reference"):
        out = tmp_path / f"{engine}.json"
        args = ["attack", "--model", str(run["chip"]), "--data", str(run["run_dir"])]
        args += ["--attacks", "gap", "--max-samples", "60", "--output", str(out)]
        assert main([*args, "--engine", engine]) == 0
        reports[engine] = json.loads(out.read_text())
    assert reports["onnxruntime"]["engine"] == "onnxruntime"
    assert reports["reference"]["engine"] == "reference"
    kernel = runtime_native.native_library() is not None
    auto = "onnxruntime + native crossbar kernel (" if kernel else "onnxruntime"
    assert reports["auto"]["engine"].startswith(auto)
    gaps = {e: r["attacks"]["gap"]["accuracy"] for e, r in reports.items()}
    assert len(set(gaps.values())) == 1, gaps


def test_npz_data_and_errors(
    run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = load_attack_data(run["run_dir"])
    npz = tmp_path / "arrays.npz"
    np.savez(
        npz,
        member_x=data.member_x,
        member_y=data.member_y,
        nonmember_x=data.nonmember_x,
        nonmember_y=data.nonmember_y,
        shadow_x=data.shadow_x,
        shadow_y=data.shadow_y,
    )
    report = attack_model(
        run["digital"], load_attack_data(npz), ["gap", "confidence"], shadow_epochs=1
    )
    # the gap attack's accuracy is closed form: (train_acc + 1 - test_acc) / 2
    p = load(run["digital"])
    acc_in = (p.predict_proba(data.member_x).argmax(1) == data.member_y).mean()
    acc_out = (p.predict_proba(data.nonmember_x).argmax(1) == data.nonmember_y).mean()
    assert report["attacks"]["gap"]["accuracy"] == pytest.approx((acc_in + 1 - acc_out) / 2)
    bad = tmp_path / "bad.npz"
    np.savez(bad, member_x=data.member_x)
    out = str(tmp_path / "r.json")
    assert (
        main(["attack", "--model", str(run["digital"]), "--data", str(bad), "--output", out]) == 2
    )
    assert "lacks arrays" in capsys.readouterr().err
    assert (
        main(
            ["attack", "--model", str(tmp_path / "none.onnx"), "--data", str(npz), "--output", out]
        )
        == 2
    )
    assert (
        main(
            [
                "attack",
                "--model",
                str(run["digital"]),
                "--data",
                str(npz),
                "--attacks",
                "bogus",
                "--output",
                out,
            ]
        )
        == 2
    )


def test_attacks_share_one_shadow_set(run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import nvmpriv.attack_models as M

    calls: list[int] = []
    real = M.train_shadow_models

    def counted(*args: Any, **kwargs: Any) -> list[M.TrainedShadow]:
        calls.append(int(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(M, "train_shadow_models", counted)
    data = load_attack_data(run["run_dir"], max_samples=200)
    report = attack_model(
        run["digital"], data, ["confidence", "ml_leaks", "nn_shadow"], shadow_epochs=2
    )
    # nn_shadow uses 4 shadow models, ml_leaks and the thresholds the first of them
    assert calls == [4]
    assert report["shadow_models"]["n"] == 4 and report["shadow_models"]["seconds"] > 0
    assert report["attacks"]["nn_shadow"]["extra"]["n_shadow"] == 4
    assert report["attacks"]["ml_leaks"]["extra"]["n_shadow"] == 1
