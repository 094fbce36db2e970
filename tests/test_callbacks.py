"""The crossbar audit callback: tags, results.json, untouched model, resume, DDP parity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT

from nvmpriv import attacks as mia
from nvmpriv.callbacks import (
    CrossbarAudit,
    FiniteLossGuard,
    LastEpochCheckpoint,
    RestoreBestWeights,
    WritePredictions,
    format_table,
    weights_fingerprint,
)
from nvmpriv.data import Digits
from nvmpriv.methods import StandardTraining
from nvmpriv.nets import ColumnFC

AUDIT = {
    "crossbars": ["ideal", "32x32_100k"],
    "attacks": ["loss", "confidence", "gap"],
    "max_samples": 200,
    "layer_samples": 64,
    "calibration_samples": 64,
    "figures": True,
}


def make_trainer(tmp_path: Path, audit: CrossbarAudit, epochs: int = 2, **kw: object) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="run"),
        callbacks=[audit, pl.callbacks.ModelCheckpoint(save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def fitted(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pl.Trainer, StandardTraining, CrossbarAudit, Path]:
    tmp = tmp_path_factory.mktemp("audit")
    pl.seed_everything(0)
    audit = CrossbarAudit(**AUDIT, print_table=False)
    module = StandardTraining(ColumnFC(64, 10), num_classes=10)
    trainer = make_trainer(tmp, audit)
    trainer.fit(module, datamodule=Digits(batch_size=32))
    return trainer, module, audit, Path(trainer.log_dir or "")


def test_tags_in_event_files(fitted: tuple) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, _, run = fitted
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for cfg in ("digital", "ideal", "32x32_100k"):
        assert f"xbar/{cfg}/acc" in scalars and f"xbar/{cfg}/acc_drop" in scalars
        for attack in ("loss", "confidence", "gap"):
            for key in ("acc", "auc", "tpr@1%fpr", "tpr@0fpr"):
                assert f"mia/{cfg}/{attack}/{key}" in scalars, (cfg, attack, key)
            # 200 non-members cannot measure a TPR at 0.1 % FPR: not logged as one
            assert f"mia/{cfg}/{attack}/tpr@0.1%fpr" not in scalars
    assert "xbar/32x32_100k/nf" in scalars
    assert any(t.startswith("xbar/32x32_100k/snr_db/") for t in scalars)
    assert any(t.startswith("xbar/32x32_100k/ns/") for t in scalars)
    assert any(t.startswith("mia/digital/confidence/members") for t in acc.Tags()["histograms"])
    assert any(t.startswith("figures/32x32_100k/roc") for t in acc.Tags()["images"])
    # audited every epoch
    assert len(acc.Scalars("mia/digital/loss/auc")) == 2


def test_results_json_schema_and_values(fitted: tuple) -> None:
    trainer, module, _, run = fitted
    payload = json.loads((run / "results.json").read_text())
    assert set(payload["configs"]) == {"digital", "ideal", "32x32_100k"}
    assert payload["split_hash"] == trainer.datamodule.splits.split_hash
    digital = payload["configs"]["digital"]
    assert digital["acc_drop"] == 0.0
    for cfg in payload["configs"].values():
        for values in cfg["attacks"].values():
            assert 0.0 <= values["auc"] <= 1.0 and 0.0 <= values["acc"] <= 1.0
    # the ideal crossbar is the digital model: identical MIA numbers
    assert payload["configs"]["ideal"]["attacks"] == digital["attacks"]
    # the logged AUC is the oracle AUC of the loss scores of the digital model
    dm = trainer.datamodule
    # the audit's capped sets: the split's fixed random subsets of the roles
    (xm, ym), (xn, yn) = dm.arrays("target_train", 200), dm.arrays("target_test", 200)
    with torch.no_grad():
        pm = torch.softmax(module.net.eval()(torch.as_tensor(xm)), 1).double().numpy()
        pn = torch.softmax(module.net(torch.as_tensor(xn)), 1).double().numpy()
    from sklearn.metrics import roc_auc_score

    s = np.concatenate([mia.loss_scores(pm, ym), mia.loss_scores(pn, yn)])
    truth = np.r_[np.ones(len(pm)), np.zeros(len(pn))]
    assert digital["attacks"]["loss"]["auc"] == pytest.approx(roc_auc_score(truth, s), abs=1e-6)
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(truth, s)
    loss = digital["attacks"]["loss"]
    assert loss["tpr@0fpr"] == pytest.approx(tpr[fpr == 0].max(), abs=1e-12)
    assert loss["tpr@1%fpr"] == pytest.approx(tpr[fpr <= 0.01 + 1e-12].max(), abs=1e-12)
    assert loss["tpr@0.1%fpr"] is None  # 200 non-members: below 1/n, not measured
    assert loss["degenerate"] is False and loss["degenerate_reason"] is None
    assert "digital" in format_table(payload)
    assert "degenerate attack" not in format_table(payload)
    flagged = json.loads(json.dumps(payload))
    flagged["configs"]["digital"]["attacks"]["gap"]["degenerate"] = True
    table = format_table(flagged)
    rows = [ln for ln in table.splitlines() if "!" in ln and not ln.startswith("(")]
    assert "degenerate attack" in table and len(rows) == 1 and rows[0].startswith("digital")


def test_results_json_is_strict_json_with_layers_in_network_order(fitted: tuple) -> None:
    _, module, _, run = fitted

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant} in results.json")

    payload = json.loads((run / "results.json").read_text(), parse_constant=refuse)
    linear = [n for n, m in module.net.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 3
    for name in ("ideal", "32x32_100k"):
        entry = payload["configs"][name]
        order = [ly.rsplit(".", 1)[-1] for ly in entry["layer_order"]]
        assert order == [n.rsplit(".", 1)[-1] for n in linear]
        assert set(entry["layer_order"]) == set(entry["layers"])
    # an exact crossbar's infinite SNR is written as null
    assert all(v["snr_db"] is None for v in payload["configs"]["ideal"]["layers"].values())
    assert all(v["snr_db"] > 0 for v in payload["configs"]["32x32_100k"]["layers"].values())


def snapshot(module: torch.nn.Module, trainer: pl.Trainer) -> tuple:
    state = {k: v.clone() for k, v in module.state_dict().items()}
    modes = [m.training for m in module.modules()]
    opt = trainer.optimizers[0].state_dict()
    opt_state = {
        k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)}
        for k, v in opt["state"].items()
    }
    return state, modes, opt_state, torch.get_rng_state()


def assert_same(a: tuple, b: tuple) -> None:
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1] == b[1]
    for k in a[2]:
        for n in a[2][k]:
            assert torch.equal(a[2][k][n], b[2][k][n])
    assert torch.equal(a[3], b[3])


def test_model_untouched_by_audit(fitted: tuple) -> None:
    trainer, module, audit, _ = fitted
    module.train()
    before = snapshot(module, trainer)
    audit.audit(trainer, module)
    assert_same(before, snapshot(module, trainer))


def test_model_untouched_when_attack_raises(fitted: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, module, audit, _ = fitted
    module.train()
    before = snapshot(module, trainer)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("attack failed")

    monkeypatch.setattr(mia, "run_attack", boom)
    with pytest.raises(RuntimeError, match="attack failed"):
        audit.audit(trainer, module)
    assert_same(before, snapshot(module, trainer))


def test_state_survives_checkpoint_resume(tmp_path: Path) -> None:
    pl.seed_everything(0)
    first = CrossbarAudit(
        **{**AUDIT, "crossbars": ["ideal"], "layer_samples": 0}, print_table=False
    )
    trainer = make_trainer(tmp_path, first, epochs=2)
    trainer.fit(
        StandardTraining(ColumnFC(64, 10), num_classes=10), datamodule=Digits(batch_size=32)
    )
    ckpt = Path(trainer.checkpoint_callback.last_model_path)  # type: ignore[union-attr]
    resumed = CrossbarAudit(
        **{**AUDIT, "crossbars": ["ideal"], "layer_samples": 0}, print_table=False
    )
    trainer2 = make_trainer(tmp_path, resumed, epochs=3)
    trainer2.fit(
        StandardTraining(ColumnFC(64, 10), num_classes=10),
        datamodule=Digits(batch_size=32),
        ckpt_path=str(ckpt),
    )
    assert len(resumed.history) == 3
    assert resumed.history[:2] == first.history[:2]


def test_bad_attack_name() -> None:
    with pytest.raises(ValueError, match="unknown attacks"):
        CrossbarAudit(attacks=["nope"])


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="nope"):
        CrossbarAudit(crossbars=["nope"])


def test_finite_loss_guard_stops(tmp_path: Path) -> None:
    class Exploding(StandardTraining):
        def training_loss(
            self, x: torch.Tensor, y: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            loss, logits = super().training_loss(x, y)
            return loss * float("nan") if self.global_step >= 3 else loss, logits

    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        callbacks=[FiniteLossGuard()],
        default_root_dir=str(tmp_path),
    )
    with pytest.raises(FloatingPointError, match="epoch 0, step 3"):
        trainer.fit(Exploding(ColumnFC(64, 10), num_classes=10), datamodule=Digits(batch_size=32))


def _audit_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "lightning_configs" / "quickstart.yaml").read_text())
    callbacks = [
        c for c in config["trainer"]["callbacks"] if "RichProgressBar" not in c["class_path"]
    ]
    for c in callbacks:
        if c["class_path"].endswith("CrossbarAudit"):
            c["init_args"] = {
                **AUDIT,
                "crossbars": ["ideal", "32x32_100k"],
                "figures": False,
                "layer_samples": 0,
            }
    config["trainer"]["callbacks"] = callbacks
    config["trainer"]["max_epochs"] = 3
    config["trainer"]["enable_progress_bar"] = False
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    config = _audit_config(tmp_path)
    cmd = [sys.executable, "-m", "nvmpriv"]
    fit = subprocess.run(
        [*cmd, "fit", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "logs/quickstart/version_0/checkpoints/last.ckpt"
    outs = []
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        run = subprocess.run(
            [
                *cmd,
                "validate",
                "--config",
                str(config),
                f"--ckpt_path={ckpt}",
                f"--trainer.devices={devices}",
                f"--trainer.strategy={strategy}",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        latest = max(
            (tmp_path / "logs/quickstart").glob("version_*"),
            key=lambda p: int(p.name.split("_")[1]),
        )
        outs.append(json.loads((latest / "results.json").read_text()))
    one, two = outs
    for cfg in one["configs"]:
        for attack, values in one["configs"][cfg]["attacks"].items():
            for key in ("acc", "auc", "tpr@1%fpr"):
                assert two["configs"][cfg]["attacks"][attack][key] == pytest.approx(
                    values[key], abs=1e-6
                )
        assert two["configs"][cfg]["acc"] == pytest.approx(one["configs"][cfg]["acc"], abs=1e-9)


class ScriptedMetric(pl.Callback):
    """Logs a scripted ``val/score`` per epoch and records the weights each validation saw."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.seen: list[str] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("val/score", self.values[trainer.current_epoch])
        self.seen.append(weights_fingerprint(pl_module.net))  # type: ignore[arg-type]


@pytest.mark.parametrize(("mode", "best"), [("max", 1), ("min", 3)])
def test_restore_best_weights_and_the_audit_sees_them(tmp_path: Path, mode: str, best: int) -> None:
    pl.seed_everything(0)
    script = ScriptedMetric([0.2, 0.9, 0.5, 0.1])
    restore = RestoreBestWeights(monitor="val/score", mode=mode)
    audit = CrossbarAudit(
        crossbars=["ideal"],
        attacks=["loss"],
        max_samples=64,
        layer_samples=0,
        figures=False,
        every_n_epochs=2,
        print_table=False,
    )
    module = StandardTraining(ColumnFC(64, 10), num_classes=10)
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[script, audit, restore],
    )
    trainer.fit(module, datamodule=Digits(batch_size=32))
    assert len(set(script.seen)) == 4  # the weights differ between epochs
    assert weights_fingerprint(module.net) == script.seen[best]
    assert restore.best_epoch == best
    assert restore.best == pytest.approx([0.2, 0.9, 0.5, 0.1][best])
    # The last scheduled audit (epoch 3) saw the last weights: unless they are the best ones, the
    # fit-end audit runs again on the restored weights.
    results = json.loads((tmp_path / "results.json").read_text())
    assert results.get("restored_best_epoch") == (best if best != 3 else None)
    # the fit-end audit names the last trained epoch (0-based), as the scheduled audits do
    assert results["epoch"] == 3 and [h["epoch"] for h in audit.history][:2] == [1, 3]
    assert audit._audited_weights == script.seen[best]


def test_restore_best_weights_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose 'max' or 'min'"):
        RestoreBestWeights(mode="highest")
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[RestoreBestWeights(monitor="val/accuracy")],
    )
    with pytest.raises(ValueError, match=r"'val/accuracy' is not logged .*val/acc"):
        trainer.fit(StandardTraining(ColumnFC(64, 10), num_classes=10), datamodule=Digits())


def test_last_checkpoint_is_the_last_epoch_when_the_metric_stops_improving(tmp_path: Path) -> None:
    pl.seed_everything(0)
    script = ScriptedMetric([0.2, 0.9, 0.5, 0.1])  # best at epoch 1, then worse
    ckpt = LastEpochCheckpoint(monitor="val/score", mode="max", save_last=True)
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[script, ckpt],
    )
    module = StandardTraining(ColumnFC(64, 10), num_classes=10)
    trainer.fit(module, datamodule=Digits(batch_size=32))
    last = torch.load(ckpt.last_model_path, weights_only=True)
    best = torch.load(ckpt.best_model_path, weights_only=True)
    assert (last["epoch"], best["epoch"]) == (3, 1)
    final = {k: v for k, v in module.state_dict().items()}
    for key, value in last["state_dict"].items():
        assert torch.equal(value, final[key]), key
    assert len(list(Path(ckpt.dirpath).glob("*.ckpt"))) == 2  # best + last, nothing else


def test_last_checkpoint_after_steps_no_validation_followed(tmp_path: Path) -> None:
    pl.seed_everything(0)
    ckpt = LastEpochCheckpoint(monitor="val/acc", mode="max", save_last=True)
    trainer = pl.Trainer(
        max_epochs=5,
        check_val_every_n_epoch=2,  # validations after epochs 1 and 3 only
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[ckpt],
    )
    module = StandardTraining(ColumnFC(64, 10), num_classes=10)
    trainer.fit(module, datamodule=Digits())
    last = torch.load(ckpt.last_model_path, weights_only=True)
    # saved when training ended: the epoch counter already stands after the fifth epoch
    assert (last["epoch"], last["global_step"]) == (5, trainer.global_step)
    for key, value in module.state_dict().items():
        assert torch.equal(last["state_dict"][key], value), key


def test_last_epoch_checkpoint_options() -> None:
    with pytest.raises(ValueError, match="save_last='link'"):
        LastEpochCheckpoint(save_last="link")
    kwargs = {"monitor": "val/acc", "mode": "max", "save_last": True}
    assert (
        LastEpochCheckpoint(**kwargs).state_key == pl.callbacks.ModelCheckpoint(**kwargs).state_key
    )


def test_write_predictions_refuses_what_it_cannot_write() -> None:
    from types import SimpleNamespace

    writer = WritePredictions()
    with pytest.raises(ValueError, match=r"--trainer.devices=1\), not 2"):
        writer.setup(SimpleNamespace(world_size=2), None, "predict")  # type: ignore[arg-type]
    writer.setup(SimpleNamespace(world_size=2), None, "fit")  # type: ignore[arg-type]
    two = [[torch.ones(2, 3)], [torch.ones(2, 3)]]
    with pytest.raises(ValueError, match="2 predict dataloaders"):
        writer.write_on_epoch_end(SimpleNamespace(is_global_zero=True), None, two, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bare file name"):
        WritePredictions("out/p.npz")
