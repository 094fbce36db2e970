"""``python -m nvmpriv sweep``: grid expansion, end-to-end run, resume, failures, black box."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT

from nvmpriv import sweep as sw
from nvmpriv.data import Digits

SHIPPED = sorted((ROOT / "lightning_configs" / "sweeps").glob("*.yaml"))
TINY_AUDIT = {
    "every_n_epochs": 2,
    "shadow_epochs": None,
    "max_samples": 200,
    "layer_samples": 32,
    "calibration_samples": 32,
    "figures": False,
}


def write_sweep(folder: Path, **extra: object) -> Path:
    """A two-epoch digits sweep: 2 good cells (seeds 0, 1) and 2 cells with a bogus override."""
    spec = {
        "name": "tiny",
        "configs": [
            str(ROOT / "lightning_configs" / "quickstart.yaml"),
            {
                "config": str(ROOT / "lightning_configs" / "quickstart.yaml"),
                "label": "broken",
                "overrides": {"model.init_args.bogus_field": 3},
            },
        ],
        "seeds": [0, 1],
        "crossbars": ["ideal"],
        "attacks": ["confidence", "loss", "gap"],
        "overrides": {"trainer.max_epochs": 2},
        "audit": TINY_AUDIT,
        "max_parallel": 2,
        "threads": 1,
        **extra,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def fit_runs(log: Path) -> int:
    return sum(
        1 for line in log.read_text().splitlines() if line.startswith("$ ") and " fit " in line
    )


# ---------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_sweeps_expand(path: Path, tmp_path: Path) -> None:
    spec = sw.load_sweep(path, output=tmp_path)
    cells = sw.expand_grid(spec)
    # Oracle: product of the axis lengths per config entry times the seeds.
    expected = sum(
        math.prod(len(v) for v in {**spec.axes, **e.axes}.values()) * len(spec.seeds)
        for e in spec.entries
    )
    assert len(cells) == expected
    assert len({c.cell_id for c in cells}) == len(cells)
    for cell in cells:
        config = sw.cell_config(spec, cell)  # every override path fits its base config
        audit = next(
            cb["init_args"]
            for cb in config["trainer"]["callbacks"]
            if cb["class_path"] == sw.AUDIT_CLASS
        )
        assert audit["crossbars"] == list(spec.crossbars or audit["crossbars"])
        assert config["seed_everything"] == cell.seed
        assert config["trainer"]["logger"]["init_args"]["name"] == cell.cell_id
        for key, value in cell.values.items():
            paths = key.split(",")
            for p, v in zip(paths, value if len(paths) > 1 else [value], strict=True):
                node = config
                for part in p.split("."):
                    node = node[part]
                assert node == v


def test_quickstart_sweep_is_the_documented_grid() -> None:
    spec = sw.load_sweep(ROOT / "lightning_configs" / "sweeps" / "quickstart.yaml")
    assert spec.output == Path("results/quickstart")
    assert spec.crossbars == ("ideal", "32x32_100k", "64x64_100k", "128x128_100k")
    assert len(spec.attacks or ()) == 5 and not spec.blackbox and spec.executor == "local"


def test_cell_ids_are_stable_and_track_what_changes_the_run(tmp_path: Path) -> None:
    path = write_sweep(tmp_path)
    ids = [c.cell_id for c in sw.expand_grid(sw.load_sweep(path))]
    assert ids == [c.cell_id for c in sw.expand_grid(sw.load_sweep(path))]
    reordered = write_sweep(tmp_path, seeds=[1, 0])
    assert sorted(ids) == sorted(c.cell_id for c in sw.expand_grid(sw.load_sweep(reordered)))
    changed = write_sweep(tmp_path, crossbars=["ideal", "32x32_100k"])
    assert not set(ids) & {c.cell_id for c in sw.expand_grid(sw.load_sweep(changed))}
    # editing the base config's file (same path) is a change of the run too
    base = tmp_path / "base.yaml"
    base.write_text((ROOT / "lightning_configs" / "quickstart.yaml").read_text())
    own = write_sweep(tmp_path, configs=[str(base)])
    before = [c.cell_id for c in sw.expand_grid(sw.load_sweep(own))]
    base.write_text(base.read_text().replace("lr: 0.001", "lr: 0.5"))
    after = [c.cell_id for c in sw.expand_grid(sw.load_sweep(own))]
    assert len(before) == 2 and not set(before) & set(after)


def test_seed_also_sets_the_split_and_chip_seeds(tmp_path: Path) -> None:
    def seeds(path: Path) -> list[tuple[int, int, int, int]]:
        spec = sw.load_sweep(path)
        out = []
        for cell in sw.expand_grid(spec):
            if cell.entry.label == "broken":
                continue
            config = sw.cell_config(spec, cell)
            sw.check_cell_config(config, cell.cell_id)
            export = sw._find_callback(config, "ExportOnnx")
            assert export is not None
            out.append(
                (
                    config["seed_everything"],
                    config["data"]["init_args"]["seed"],
                    sw._audit_args(config).get("chip_seed", 0),
                    export["init_args"].get("chip_seed", 0),
                )
            )
        return out

    for name in ("plain", "both", "split"):
        (tmp_path / name).mkdir()
    plain = write_sweep(tmp_path / "plain")
    # by default a seed repeats the training only: same split, same chip
    assert seeds(plain) == [(0, 0, 0, 0), (1, 0, 0, 0)]
    both = write_sweep(tmp_path / "both", seed_also=["chip", "split"])
    assert seeds(both) == [(0, 0, 0, 0), (1, 1, 1, 1)]
    split = write_sweep(tmp_path / "split", seed_also=["split"])
    assert seeds(split) == [(0, 0, 0, 0), (1, 1, 0, 0)]
    # a different experiment, so different cell ids; without the key the ids are unchanged
    ids = {c.cell_id for c in sw.expand_grid(sw.load_sweep(plain))}
    assert not ids & {c.cell_id for c in sw.expand_grid(sw.load_sweep(split))}
    with pytest.raises(ValueError, match="seed_also=\\['model'\\] must be a list of"):
        sw.load_sweep(write_sweep(tmp_path, seed_also=["model"]))


def test_zipped_and_per_config_axes(tmp_path: Path) -> None:
    path = tmp_path / "z.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "configs": [
                    {
                        "config": str(ROOT / "lightning_configs/methods/dorefa_quickstart.yaml"),
                        "axes": {
                            "model.init_args.weight_bits,model.init_args.act_bits": [[4, 4], [8, 2]]
                        },
                    },
                    str(ROOT / "lightning_configs/quickstart.yaml"),
                ],
                "axes": {"trainer.max_epochs": [1, 3]},
                "seeds": [5],
            }
        )
    )
    spec = sw.load_sweep(path)
    cells = sw.expand_grid(spec)
    got = sorted(
        (
            c.entry.label,
            sw.cell_config(spec, c)["model"]["init_args"].get("weight_bits"),
            sw.cell_config(spec, c)["model"]["init_args"].get("act_bits"),
            sw.cell_config(spec, c)["trainer"]["max_epochs"],
        )
        for c in cells
    )
    want = sorted(
        [("dorefa_quickstart", w, a, e) for (w, a), e in product([(4, 4), (8, 2)], [1, 3])]
        + [("quickstart", None, None, e) for e in (1, 3)]
    )
    assert got == want


def test_dry_run_lists_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = str(ROOT / "lightning_configs" / "quickstart.yaml")
    path = write_sweep(tmp_path, configs=[good, {"config": good, "label": "b"}])
    assert sw.cli_main(["--config", str(path), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"4 cells -> {tmp_path / 'o'}"
    assert sum(line.startswith("todo ") for line in lines) == 4
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"model.init_args.bogus_field": 3}, r"model: .*unknown init_args \['bogus_field'\]"),
        ({"trainer.max_epoch": 3}, r"trainer: .*unknown init_args \['max_epoch'\]"),
        ({"data.init_args.seed": "zero"}, r"data: .*seed='zero' is a str, expected int"),
        (
            {"model.init_args.net.init_args.in_features": 6.5},
            r"model.init_args.net: .*in_features=6.5",
        ),
        (
            {"trainer.callbacks.2.init_args.every_n_epoch": 1},
            r"trainer.callbacks.1: .*FiniteLossGuard: .*no init_args",
        ),
    ],
)
def test_dry_run_checks_every_cell(tmp_path: Path, override: dict, match: str) -> None:
    path = write_sweep(tmp_path)  # its second entry carries model.init_args.bogus_field
    spec = yaml.safe_load(path.read_text())
    spec["configs"][1]["overrides"] = override
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"cell broken-.*: " + match):
        sw.cli_main(["--config", str(path), "--output", str(tmp_path / "o"), "--dry-run"])
    assert not (tmp_path / "o").exists()


def test_dry_run_reads_each_data_set_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texas = str(ROOT / "lightning_configs" / "texas.yaml")
    empty = tmp_path / "no_data"
    empty.mkdir()
    path = write_sweep(tmp_path, configs=[texas], overrides={"data.init_args.root": str(empty)})
    with pytest.raises(
        ValueError, match=r"cell texas-.*: data: texas100: data file .*feats not found"
    ):
        sw.cli_main(["--config", str(path), "--output", str(tmp_path / "o"), "--dry-run"])
    assert not (tmp_path / "o").exists() and not any(empty.iterdir())
    # download: true is left to the run (a dry run fetches nothing)
    spec = yaml.safe_load(path.read_text())
    spec["overrides"]["data.init_args.download"] = True
    path.write_text(yaml.safe_dump(spec))
    assert sw.cli_main(["--config", str(path), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    assert not any(empty.iterdir())
    # the quickstart data (digits) is read once for its two cells
    reads: list[str] = []
    original = Digits.load_raw
    monkeypatch.setattr(Digits, "load_raw", lambda self: reads.append("x") or original(self))
    (tmp_path / "good").mkdir()
    good = write_sweep(tmp_path / "good", configs=[str(ROOT / "lightning_configs/quickstart.yaml")])
    assert sw.cli_main(["--config", str(good), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    assert reads == ["x"]


def test_set_dotted() -> None:
    config = {"trainer": {"callbacks": [{"init_args": {"a": 1}}]}}
    sw.set_dotted(config, "trainer.callbacks.0.init_args.a", 2)
    sw.set_dotted(config, "model.init_args.lr", 0.1)
    assert config == {
        "trainer": {"callbacks": [{"init_args": {"a": 2}}]},
        "model": {"init_args": {"lr": 0.1}},
    }
    with pytest.raises(ValueError, match=r"use an index 0\.\.0"):
        sw.set_dotted(config, "trainer.callbacks.3.x", 1)
    with pytest.raises(ValueError, match="not a mapping"):
        sw.set_dotted(config, "model.init_args.lr.x", 1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bogus": 1}, "unknown keys \\['bogus'\\]"),
        ({"executor": "slurm"}, "executor='slurm'"),
        ({"crossbars": ["ideal", "999x999"]}, "unknown crossbars \\['999x999'\\]"),
        ({"attacks": ["telepathy"]}, "unknown attacks \\['telepathy'\\]"),
        ({"seeds": "0"}, "seeds must be a non-empty list"),
        ({"max_parallel": 0}, "max_parallel=0"),
        ({"axes": {"model.init_args.a,model.init_args.b": [1]}}, "zipped axis"),
    ],
)
def test_bad_sweep_is_one_clear_error(tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sw.load_sweep(write_sweep(tmp_path, **change))


def test_ray_executor_without_ray_names_the_extra(tmp_path: Path) -> None:
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here; the missing-ray message cannot be exercised")
    spec = sw.load_sweep(write_sweep(tmp_path, executor="ray"), output=tmp_path / "out")
    with pytest.raises(ValueError, match=r"pip install 'nvmpriv\[ray\]'"):
        sw.run_sweep(spec, log=lambda _: None)


def test_ray_executor_runs_cells_on_a_local_ray_instance(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the optional extra nvmpriv[ray] is not installed")
    spec = sw.load_sweep(write_sweep(tmp_path, executor="ray"), output=tmp_path / "out")
    outcome = sw.run_sweep(spec, log=lambda _: None)
    rows = read_csv(tmp_path / "out" / "results.csv")
    done = {r["cell_id"] for r in rows if r["status"] == "done"}
    failed = {r["cell_id"] for r in rows if r["status"] == "failed"}
    assert len(done) == 2 and len(failed) == 2  # the bogus-override cells fail, as locally
    assert outcome is not None


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    folder = tmp_path_factory.mktemp("sweep")
    path = write_sweep(folder)
    out = folder / "out"
    code = sw.cli_main(["--config", str(path), "--output", str(out)])
    return path, out, code


def test_sweep_rows_match_each_cells_results(ran: tuple[Path, Path, int]) -> None:
    _, out, code = ran
    assert code == 1  # the broken cells failed, and the exit code says so
    rows = read_csv(out / "results.csv")
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    # one row per finished cell x audited config (digital + ideal), one per failed cell
    assert sorted((r["cell_id"].split("-")[0], r["seed"], r["crossbar"]) for r in done) == [
        ("quickstart", s, c) for s in ("0", "1") for c in ("digital", "ideal")
    ]
    assert len(failed) == 2
    for row in done:
        results = json.loads((Path(row["run_dir"]) / "results.json").read_text())
        entry = results["configs"][row["crossbar"]]
        assert float(row["acc"]) == pytest.approx(entry["acc"])
        assert float(row["acc_drop"]) == pytest.approx(entry["acc_drop"])
        for attack in ("confidence", "loss", "gap"):
            for metric in ("acc", "auc", "tpr@1%fpr", "tpr@0fpr", "acc_upper"):
                assert float(row[f"mia/{attack}/{metric}"]) == pytest.approx(
                    entry["attacks"][attack][metric]
                )
            # 200 non-members do not measure a TPR at 0.1 % FPR: an empty cell, not a number
            assert entry["attacks"][attack]["tpr@0.1%fpr"] is None
            assert row[f"mia/{attack}/tpr@0.1%fpr"] == ""
            assert row[f"mia/{attack}/degenerate"] in ("0", "1")
        # Closed form of the gap attack's best threshold on balanced sets.
        train, test = float(row["train_acc"]), float(row["acc"])
        assert float(row["mia/gap/acc_upper"]) == pytest.approx(max(0.5, 0.5 + (train - test) / 2))
        if row["crossbar"] == "ideal":
            assert float(row["ns/net.0"]) == 0.0 and float(row["nf"]) == 0.0
    table = (out / "results.md").read_text()
    assert "| quickstart | ideal | 2 |" in table and "bogus_field" in table
    # the AUC table: mean ± std over the two seeds of the csv's AUCs
    auc_part = table.split("## MIA AUC")[1].split("##")[0]
    ideal = [r for r in done if r["crossbar"] == "ideal"]
    aucs = [float(r["mia/confidence/auc"]) for r in ideal]
    assert f"| quickstart | ideal | 2 | {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f} |" in (
        auc_part
    )
    assert "Black-box" not in table  # no --blackbox, no such table
    assert (out / "plots" / "mia_vs_crossbar.png").stat().st_size > 0
    assert (out / "plots" / "acc_drop_vs_crossbar.png").stat().st_size > 0


def test_failed_cell_is_recorded(ran: tuple[Path, Path, int]) -> None:
    _, out, _ = ran
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("broken-*.json")]
    assert len(records) == 2
    for record in records:
        assert record["status"] == "failed" and record["returncode"] == 2
        assert record["error"].startswith("error:") and "bogus_field" in record["error"]


def test_resume_reruns_nothing_finished(ran: tuple[Path, Path, int]) -> None:
    path, out, _ = ran
    done = sorted((out / "cells").glob("quickstart-*.json"))
    before = {p: p.stat().st_mtime_ns for p in done}
    results = sorted((out / "runs").glob("quickstart-*/version_*/results.json"))
    results_before = {p: p.stat().st_mtime_ns for p in results}
    code = sw.cli_main(["--config", str(path), "--output", str(out), "--max-parallel", "2"])
    assert code == 1  # the broken cells are retried and fail again
    assert {p: p.stat().st_mtime_ns for p in done} == before
    assert sorted((out / "runs").glob("quickstart-*/version_*/results.json")) == results
    assert {p: p.stat().st_mtime_ns for p in results} == results_before
    for log in (out / "cells").glob("quickstart-*.log"):
        assert fit_runs(log) == 1
    for log in (out / "cells").glob("broken-*.log"):
        assert fit_runs(log) == 2
    assert len(read_csv(out / "results.csv")) == 6


@pytest.mark.slow
def test_blackbox_step(ran: tuple[Path, Path, int], tmp_path: Path) -> None:
    if importlib.util.find_spec("nvmpriv.export") is None or (
        importlib.util.find_spec("nvmpriv.blackbox") is None
    ):
        pytest.skip("nvmpriv.export / nvmpriv.blackbox are not in this tree yet")
    path, out, _ = ran
    spec = sw.load_sweep(path, output=out)
    spec = replace(
        spec, entries=spec.entries[:1], seeds=(0,), blackbox=True, blackbox_attacks=("gap",)
    )
    outcome = sw.run_sweep(spec, log=lambda _: None)
    # The trained cell is not retrained: only export + attack ran.
    assert len(outcome.ran) == 1 and not outcome.failed
    log = (out / "cells" / f"{outcome.ran[0]}.log").read_text()
    assert sum(1 for ln in log.splitlines() if ln.startswith("$ ") and " fit " in ln) == 1
    rows = [r for r in read_csv(out / "results.csv") if r["cell_id"] == outcome.ran[0]]
    assert {r["crossbar"] for r in rows} == {"digital", "ideal"}
    assert "gap acc / AUC" in (out / "results.md").read_text().split("## Black-box attacks")[1]
    for row in rows:
        # The attack CLI scores every member/non-member, the audit a subset of 200 of each,
        # so the closed form of the gap attack agrees up to sampling error.
        assert float(row["blackbox/gap/accuracy_upper_bound"]) == pytest.approx(
            max(0.5, 0.5 + (float(row["train_acc"]) - float(row["acc"])) / 2), abs=0.05
        )
    assert sw.is_finished(spec, sw.expand_grid(spec)[0])


def test_blackbox_attacks_the_model_fit_left_behind(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "cell-1" / "version_0"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "epoch=3-step=40.ckpt"):
        (run_dir / "checkpoints" / name).write_bytes(b"x")
    exports = tmp_path / "exports"
    exports.mkdir()
    for stem in ("cell-1_version_0_digital", "cell-1_version_0_64x64_100k_seed0"):
        (exports / f"{stem}.onnx").write_bytes(b"x")
    callbacks: list[dict] = [
        {
            "class_path": "nvmpriv.callbacks.LastEpochCheckpoint",
            "init_args": {"monitor": "val/acc", "mode": "max", "save_last": True},
        },
        {
            "class_path": "nvmpriv.export_callback.ExportOnnx",
            "init_args": {
                "crossbars": ["digital", "64x64_100k"],
                "chip_seed": 0,
                "folder": str(exports),
            },
        },
    ]
    config = {"trainer": {"callbacks": callbacks}}
    files = sw._fit_exports(config, run_dir, chip_seed=0)
    assert files == {
        "digital": exports / "cell-1_version_0_digital.onnx",
        "64x64_100k": exports / "cell-1_version_0_64x64_100k_seed0.onnx",
    }
    # another audit chip: only the digital file is the same model
    assert set(sw._fit_exports(config, run_dir, chip_seed=1)) == {"digital"}
    # without RestoreBestWeights the last weights are the final model
    assert sw._export_checkpoint(run_dir, config) == run_dir / "checkpoints" / "last.ckpt"
    callbacks.append(
        {
            "class_path": "nvmpriv.callbacks.RestoreBestWeights",
            "init_args": {"monitor": "val/acc", "mode": "max"},
        }
    )
    assert sw._export_checkpoint(run_dir, config).name == "epoch=3-step=40.ckpt"
    callbacks[0]["class_path"] = "lightning.pytorch.callbacks.ModelCheckpoint"  # Lightning's own
    assert sw._export_checkpoint(run_dir, config).name == "epoch=3-step=40.ckpt"
    callbacks[0]["init_args"]["monitor"] = "val/loss"  # best of another metric: not the same
    assert sw._export_checkpoint(run_dir, config).name == "last.ckpt"


def test_a_sweep_whose_cells_all_fail_keeps_earlier_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = sw.load_sweep(write_sweep(tmp_path), output=tmp_path / "out")
    spec = replace(spec, entries=spec.entries[1:], seeds=(0,))  # the broken cell only
    (tmp_path / "out").mkdir()
    earlier = {"results.csv": "cell_id,status\ngood,done\n", "results.md": "# earlier\n"}
    for name, text in earlier.items():
        (tmp_path / "out" / name).write_text(text)

    def all_fail(tasks: list, max_parallel: int, report: Callable) -> None:
        for task in tasks:
            report({"cell_id": task["cell_id"], "status": "failed", "error": "bad override"})

    monkeypatch.setattr(sw, "_run_local", all_fail)
    outcome = sw.run_sweep(spec, log=lambda _: None)
    assert outcome.failed and outcome.files == []
    for name, text in earlier.items():
        assert (tmp_path / "out" / name).read_text() == text


def test_dry_run_accepts_what_lightningcli_accepts(tmp_path: Path) -> None:
    good = str(ROOT / "lightning_configs" / "quickstart.yaml")
    overrides = {
        "model.class_path": "StandardTraining",  # bare class names, as LightningCLI resolves
        "model.init_args.net.class_path": "ColumnFC",
        "model.init_args.net.init_args.dropout": "1e-1",  # a quoted number
        "data.init_args.max_samples": None,  # None for an optional int
    }
    path = write_sweep(tmp_path, configs=[{"config": good, "label": "b", "overrides": overrides}])
    assert sw.cli_main(["--config", str(path), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
