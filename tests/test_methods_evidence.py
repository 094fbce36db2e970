"""Each method against its own claim, compared with standard training on the same data and seed."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_curve

from nvmpriv.adversarial import pgd_attack
from nvmpriv.attack_models import (
    MembershipSplit,
    TrainConfig,
    predict_proba_fn,
    samia_attack,
    train_shadow_models,
)
from nvmpriv.callbacks import RestoreBestWeights
from nvmpriv.data import Digits
from nvmpriv.methods import (
    ADMMPruning,
    DoReFaTraining,
    MinMaxTraining,
    PGDTraining,
    PPBFineTuning,
    StandardTraining,
)
from nvmpriv.methods._common import collect_logits, loss_threshold_attack_accuracy
from nvmpriv.methods.dorefa import quantized_layers
from nvmpriv.methods.pgd import adversarial_accuracy
from nvmpriv.methods.ppb import sorted_posterior_divergence as ppb_divergence
from nvmpriv.nets import ColumnFC
from nvmpriv.pruning import num_pruned, prunable_weights
from nvmpriv.quantization import dorefa_activation


def trainer(root: Path, epochs: int, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_epochs": epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def small_digits(**kwargs: Any) -> Digits:
    """Few members (about 180) and a 30% defender reference/validation set: the baseline overfits."""
    return Digits(batch_size=32, seed=0, train_fraction=0.2, val_fraction=0.3, **kwargs)


def fit(model: pl.LightningModule, dm: Digits, root: Path, epochs: int) -> pl.Trainer:
    t = trainer(root, epochs)
    t.fit(model, datamodule=dm)
    return t


def mia_and_acc(net: torch.nn.Module, dm: Digits) -> tuple[float, float]:
    """Best-threshold loss attack (members target_train vs non-members target_test), test acc."""
    li, yi = collect_logits(net, dm.dataloader("target_train"))
    lo, yo = collect_logits(net, dm.dataloader("target_test"))
    acc = float((lo.argmax(1) == yo).float().mean())
    return loss_threshold_attack_accuracy(li, yi, lo, yo), acc


# --------------------------------------------------------------------------- PGD


def test_pgd_training_is_more_robust_than_standard(tmp_path: Path) -> None:
    eps, alpha, steps, epochs = 0.1, 0.025, 5, 15
    results = {}
    for name in ("standard", "pgd"):
        pl.seed_everything(0)
        dm = Digits(batch_size=64, seed=0)
        if name == "standard":
            model: pl.LightningModule = StandardTraining(ColumnFC(64, 10), 10)
        else:
            model = PGDTraining(ColumnFC(64, 10), 10, eps=eps, alpha=alpha, steps=steps)
        t = fit(model, dm, tmp_path / name, epochs)
        gen = torch.Generator().manual_seed(0)
        robust = adversarial_accuracy(
            model.net, dm.dataloader("target_test"), eps=eps, alpha=alpha, steps=10, generator=gen
        )
        results[name] = (robust, mia_and_acc(model.net, dm)[1], t.callback_metrics)
    std_robust, std_acc, _ = results["standard"]
    pgd_robust, pgd_acc, metrics = results["pgd"]
    # Measured (torch 2.13 CPU): PGD accuracy at eps 0.1 is 0.547 standard vs 0.708 PGD-trained.
    assert pgd_robust > std_robust + 0.1, results
    assert pgd_acc >= std_acc - 0.1, results  # clean accuracy within 10 points
    # val/pgd_acc of the last epoch, recomputed with nvmpriv.adversarial.pgd_attack directly:
    # the first val_batches validation batches, val_steps steps with alpha rescaled to keep
    # alpha * steps, the random start seeded per (epoch, batch) as documented.
    pgd_model = model
    assert isinstance(pgd_model, PGDTraining)
    net = pgd_model.net.eval()
    correct = clean_correct = total = 0
    for i, (x, y) in enumerate(dm.val_dataloader()):
        if i >= pgd_model.val_batches:
            break
        gen = torch.Generator().manual_seed(1_000_003 * (epochs - 1) + i)
        x_adv = pgd_attack(
            net, x, y, eps=eps, alpha=alpha * steps / pgd_model.val_steps,
            steps=pgd_model.val_steps, random_start=True, clamp=(0.0, 1.0), generator=gen,
        )  # fmt: skip
        with torch.no_grad():
            correct += int((net(x_adv).argmax(1) == y).sum())
            clean_correct += int((net(x).argmax(1) == y).sum())
        total += len(y)
    assert float(metrics["val/pgd_acc"]) == pytest.approx(correct / total, abs=1e-6)
    assert correct < clean_correct  # the attack changed predictions on these batches


def test_pgd_examples_stay_in_the_ball_and_the_valid_range() -> None:
    torch.manual_seed(0)
    model = PGDTraining(ColumnFC(64, 10), 10, eps=0.2, alpha=0.1, steps=5)
    x = torch.rand(32, 64)
    x[:, :8] = 0.0
    x[:, 8:16] = 1.0
    y = torch.randint(0, 10, (32,))
    x_adv = model.adversarial_examples(x, y)
    assert ((x_adv - x).abs() <= 0.2 + 1e-6).all()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert (x_adv - x).abs().max() > 0.1  # it did move
    loss, logits = model.training_loss(x, y)
    assert logits.shape == (32, 10) and loss.requires_grad


def test_pgd_accuracy_works_under_inference_mode() -> None:
    """Under inference mode (Lightning's validation) the attack must still run: same result
    as outside it, and below clean accuracy on a trained net."""
    torch.manual_seed(0)
    digits = load_digits()
    x_all = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y_all = torch.tensor(digits.target)
    net = ColumnFC(64, 10, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x_all), y_all).backward()
        opt.step()
    batches = [(x_all[:200], y_all[:200])]
    with torch.inference_mode():
        robust = adversarial_accuracy(
            net, batches, eps=0.1, alpha=0.05, steps=3, generator=torch.Generator().manual_seed(1)
        )
        clean = adversarial_accuracy(net, batches, eps=0.0, alpha=0.0, steps=0)
    outside = adversarial_accuracy(
        net, batches, eps=0.1, alpha=0.05, steps=3, generator=torch.Generator().manual_seed(1)
    )
    expected = float((net.eval()(batches[0][0]).argmax(1) == batches[0][1]).float().mean())
    assert clean == pytest.approx(expected) and clean > 0.9
    assert robust == outside
    assert robust < clean - 0.2  # eps 0.1 on 0..1 pixels breaks an undefended net


# --------------------------------------------------------------------------- DoReFa


@pytest.mark.parametrize(("w_bits", "a_bits"), [(2, 2), (4, 4), (16, 4)])
def test_dorefa_layers_use_at_most_2k_levels(tmp_path: Path, w_bits: int, a_bits: int) -> None:
    pl.seed_everything(0)
    dm = Digits(batch_size=64, seed=0, max_samples=600)
    model = DoReFaTraining(ColumnFC(64, 10), 10, weight_bits=w_bits, act_bits=a_bits)
    t = fit(model, dm, tmp_path, 3)
    layers = quantized_layers(model.net)
    assert list(layers) == ["net.3", "net.6"]  # first layer untouched, last full-precision w
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
        for name, layer in layers.items()
    ]
    x, _ = dm.arrays("target_test")
    model.net.eval()
    with torch.no_grad():
        model.net(torch.as_tensor(x))
    for h in hooks:
        h.remove()
    for name, layer in layers.items():
        if layer.weight_bits is not None:
            assert layer.weight_bits == w_bits
            levels = torch.unique(layer.effective_weight.detach()).numel()
            assert 2 <= levels <= 2**w_bits, (name, levels)
        assert layer.act_bits == a_bits
        quantized_input = dorefa_activation(inputs[name], a_bits)
        assert torch.unique(quantized_input).numel() <= 2**a_bits
        # The layer really computes with these quantized values.
        with torch.no_grad():
            expected = F.linear(quantized_input, layer.effective_weight, layer.bias)
            torch.testing.assert_close(layer(inputs[name]), expected)
    # Checkpoints hold the quantized structure: a reload reproduces the outputs exactly.
    path = tmp_path / "q.ckpt"
    t.save_checkpoint(path)
    again = DoReFaTraining.load_from_checkpoint(path, net=ColumnFC(64, 10))
    again.eval()
    xt = torch.as_tensor(x[:50])
    with torch.no_grad():
        torch.testing.assert_close(again(xt), model.net(xt))
    assert again.hparams["weight_bits"] == w_bits and again.hparams["act_bits"] == a_bits


# --------------------------------------------------------------------------- ADMM

TARGETS = {"net.0.weight": 0.5, "net.3.weight": 0.8, "net.6.weight": 0.3}


def test_admm_is_exactly_sparse_and_close_to_dense(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dense = StandardTraining(ColumnFC(64, 10), 10)
    dm = Digits(batch_size=64, seed=0)
    fit(dense, dm, tmp_path / "dense", 30)
    _, dense_acc = mia_and_acc(dense.net, dm)
    pl.seed_everything(0)
    model = ADMMPruning(
        ColumnFC(64, 10), 10, sparsity=TARGETS, rho=0.01, admm_epochs=10, retrain_epochs=20
    )
    t = trainer(tmp_path / "admm", 100)  # the method stops itself after 10 + 20 epochs
    t.fit(model, datamodule=dm)
    assert t.current_epoch == 30 and model.phase == "retrain"
    weights = prunable_weights(model.net)
    for name, s in TARGETS.items():
        zeros = int((weights[name] == 0).sum())
        assert zeros == num_pruned(weights[name].numel(), s), name
        assert float(t.callback_metrics[f"prune/sparsity/{name}"]) == pytest.approx(
            zeros / weights[name].numel()
        )
    _, acc = mia_and_acc(model.net, dm)
    print("ADMM test acc vs dense:", acc, dense_acc)
    # Stated margin: within 3 points of the dense model trained as long.
    assert acc >= dense_acc - 0.03, (acc, dense_acc)


def test_admm_resumes_in_the_retraining_phase(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = Digits(batch_size=64, seed=0, max_samples=600)
    model = ADMMPruning(
        ColumnFC(64, 10), 10, sparsity=0.6, rho=0.01, admm_epochs=2, retrain_epochs=2
    )
    t = trainer(tmp_path / "a", 3, enable_checkpointing=False)
    with pytest.raises(ValueError, match="max_epochs=3 < admm_epochs"):
        t.fit(model, datamodule=dm)
    t = trainer(tmp_path / "a", 4)
    t.fit(model, datamodule=dm)
    path = tmp_path / "mid.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["nvmpriv_admm"]
    assert saved["phase"] == "retrain" and set(saved["masks"]) == set(prunable_weights(model.net))
    resumed = ADMMPruning(
        ColumnFC(64, 10), 10, sparsity=0.6, rho=0.01, admm_epochs=2, retrain_epochs=4
    )
    t2 = trainer(tmp_path / "b", 6)
    t2.fit(resumed, datamodule=Digits(batch_size=64, seed=0, max_samples=600), ckpt_path=path)
    assert resumed.phase == "retrain" and t2.current_epoch == 6
    for name, w in prunable_weights(resumed.net).items():
        assert torch.equal(w != 0, saved["masks"][name]), name


def test_admm_penalty_pulls_the_pruned_entries_to_zero_before_the_hard_prune(
    tmp_path: Path,
) -> None:
    """The ADMM phase must train with rho/2 ||W - Z + U||^2: with rho > 0 the entries that the
    hard prune will remove carry much less of the weights' energy than without the penalty."""

    class EnergyBeforePrune(pl.Callback):
        share = 1.0

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch != 2:  # last ADMM epoch; the hard prune follows
                return
            small = total = 0.0
            for w in prunable_weights(pl_module.net).values():
                sq = w.detach().flatten().pow(2).sort().values
                small += float(sq[: num_pruned(w.numel(), 0.7)].sum())
                total += float(sq.sum())
            self.share = small / total

    shares = {}
    for rho in (0.0, 1.0):
        pl.seed_everything(0)
        model = ADMMPruning(
            ColumnFC(64, 10),
            10,
            sparsity=0.7,
            rho=rho,
            admm_epochs=3,
            retrain_epochs=1,
            optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        )
        probe = EnergyBeforePrune()
        t = trainer(tmp_path / str(rho), 4, callbacks=[probe])
        t.fit(model, datamodule=Digits(batch_size=64, seed=0, max_samples=600))
        shares[rho] = probe.share
    # measured: 0.268 without the penalty, 0.082 with rho = 1
    assert shares[1.0] < 0.5 * shares[0.0], shares


def test_admm_without_retraining_stops_sparse_and_validates_the_sparse_net(
    tmp_path: Path,
) -> None:
    class RecordValidationSparsity(pl.Callback):
        def __init__(self) -> None:
            self.zeros: list[float] = []

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            w = next(iter(prunable_weights(pl_module.net).values()))
            self.zeros.append(float((w == 0).float().mean()))

    pl.seed_everything(0)
    model = ADMMPruning(
        ColumnFC(64, 10), 10, sparsity=0.6, rho=0.01, admm_epochs=2, retrain_epochs=0
    )
    record = RecordValidationSparsity()
    t = trainer(tmp_path, 5, callbacks=[record])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, datamodule=Digits(batch_size=64, seed=0, max_samples=600))
    assert not [w for w in caught if "ADMM phase" in str(w.message)]
    # two ADMM epochs, no masked retraining, although max_epochs allowed five
    assert t.current_epoch == 2 and model.phase == "retrain"
    # the first validation sees dense ADMM weights, the last one the hard-pruned net
    assert record.zeros[0] < 0.1 and record.zeros[-1] == pytest.approx(0.6, abs=1e-3)
    for name, w in prunable_weights(model.net).items():
        s = model.admm_state.sparsities[name]
        assert int((w == 0).sum()) == num_pruned(w.numel(), s), name


def test_mia_pruning_choice_matches_a_brute_force_oracle() -> None:
    from nvmpriv.methods.admm import select_sparsities

    torch.manual_seed(0)
    net = ColumnFC(64, 10, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.rand(120, 64), torch.randint(0, 10, (120,))
    for _ in range(100):  # overfit 60 members
        opt.zero_grad()
        F.cross_entropy(net(x[:60]), y[:60]).backward()
        opt.step()
    members, held_out = (x[:60], y[:60]), (x[60:], y[60:])
    cands = [0.0, 0.5, 0.9]
    chosen, table = select_sparsities(net, cands, members, held_out, max_acc_drop=1.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def oracle_gain(model: torch.nn.Module) -> float:
        with torch.no_grad():
            model.eval()
            loss_in = F.cross_entropy(model(x[:60]), y[:60], reduction="none")
            loss_out = F.cross_entropy(model(x[60:]), y[60:], reduction="none")
        labels = np.r_[np.ones(60), np.zeros(60)]
        fpr, tpr, _ = roc_curve(labels, -np.r_[loss_in.numpy(), loss_out.numpy()])
        return float(np.max((tpr + 1 - fpr) / 2)) - 0.5

    for name in prunable_weights(net):
        gains = []
        for s in cands:
            pruned = ColumnFC(64, 10, dropout=0.0)
            pruned.load_state_dict(before)
            w = dict(pruned.named_parameters())[name]
            k = num_pruned(w.numel(), s)
            with torch.no_grad():
                flat = w.view(-1)
                flat[torch.sort(flat.abs(), stable=True).indices[:k]] = 0.0
            gains.append(oracle_gain(pruned))
        assert [round(g, 6) for _, g, _ in table[name]] == [round(g, 6) for g in gains]
        best = min(range(len(cands)), key=lambda i: (round(gains[i], 9), -cands[i]))
        assert chosen[name] == cands[best], (name, gains)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # restored bit-exactly


# --------------------------------------------------------------------------- Min-Max


def test_minmax_lowers_membership_attack_accuracy(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = small_digits()
    std = StandardTraining(ColumnFC(64, 10, dropout=0.0), 10)
    fit(std, dm, tmp_path / "std", 60)
    std_mia, std_acc = mia_and_acc(std.net, dm)
    pl.seed_everything(0)
    dm = small_digits()
    mm = MinMaxTraining(ColumnFC(64, 10, dropout=0.0), 10, lam=2.0, attack_steps=3, attack_lr=1e-3)
    t = fit(mm, dm, tmp_path / "mm", 60)
    mm_mia, mm_acc = mia_and_acc(mm.net, dm)
    # Measured (torch 2.13 CPU): standard 0.621 MIA / 0.929 acc; Min-Max 0.606 / 0.898.
    assert mm_mia < std_mia - 0.01, (mm_mia, std_mia)
    assert mm_acc >= std_acc - 0.08, (mm_acc, std_acc)  # stated margin: 8 points
    assert "train/attack_acc" in t.callback_metrics


# --------------------------------------------------------------------------- PPB


def sorted_posterior_divergence(net: torch.nn.Module, dm: Digits) -> float:
    """KL(mean sorted member posterior || mean sorted non-member posterior), in nats."""
    li, _ = collect_logits(net, dm.dataloader("target_train"))
    lo, _ = collect_logits(net, dm.dataloader("target_test"))
    return ppb_divergence(li, lo)


def test_ppb_balances_member_and_nonmember_posteriors(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = small_digits()
    source = StandardTraining(ColumnFC(64, 10, dropout=0.0), 10)
    t = fit(source, dm, tmp_path / "src", 60)
    path = tmp_path / "source.ckpt"
    t.save_checkpoint(path)
    out = {}
    for lam in (0.0, 16.0):
        pl.seed_everything(0)
        model = PPBFineTuning(
            ColumnFC(64, 10, dropout=0.0), 10, source_checkpoint=str(path), sparsity=0.7, lam=lam
        )
        fit(model, dm, tmp_path / f"ft{lam}", 30)
        for name, w in prunable_weights(model.net).items():
            assert int((w == 0).sum()) == num_pruned(w.numel(), 0.7), name  # masks kept
        out[lam] = (sorted_posterior_divergence(model.net, dm), *mia_and_acc(model.net, dm))
    # Measured: divergence 0.0444 (plain) vs 0.0359 (PPB, lam 16). The loss-threshold attack is NOT
    # lowered here (0.632 plain vs 0.657 PPB); see the report.
    assert out[16.0][0] < 0.9 * out[0.0][0], out
    assert out[16.0][2] >= out[0.0][2] - 0.03, out
    print("PPB evidence (divergence, loss-attack acc, test acc):", out)


def _shadow_net() -> torch.nn.Module:
    return ColumnFC(64, 10, dropout=0.0)


def _ppb_paper_protocol(source: Path, root: Path, lam: float) -> PPBFineTuning:
    """Prune 0.7 and fine-tune as the shipped PPB configs do (Yuan & Zhang's protocol)."""
    model = PPBFineTuning(
        ColumnFC(64, 10, dropout=0.0),
        10,
        source_checkpoint=str(source),
        sparsity=0.7,
        lam=lam,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=5e-4),
    )
    callbacks = [
        pl.callbacks.EarlyStopping(monitor="val/acc", mode="max", patience=5),
        RestoreBestWeights(monitor="val/acc", mode="max"),
    ]
    trainer(root, 30, callbacks=callbacks).fit(model, datamodule=small_digits())
    return model


@pytest.mark.slow
@pytest.mark.timeout(3000)  # ~15 min on an idle core (SAMIA's Transformer, 12 attacks)
def test_ppb_lowers_samia_under_the_paper_protocol(tmp_path: Path) -> None:
    """PPB (lam 4) vs plain fine-tuning of the same pruned net, SAMIA with 5 normal shadows.

    Measured (scripts/ppb_digits_study.py, seeds 0-5): SAMIA 0.599 -> 0.586, lower in 6 of 6
    seeds; the sorted-posterior divergence lower in 6 of 6; threshold attacks unchanged (+-0.2
    points). The paper's "near 50 %" does not reproduce on digits: see docs/REPRODUCTION.md.
    """
    deltas, divergence = [], []
    for seed in range(6):
        pl.seed_everything(seed)
        dm = small_digits()
        source = StandardTraining(ColumnFC(64, 10, dropout=0.0), 10)
        t = fit(source, dm, tmp_path / f"src{seed}", 60)
        ckpt = tmp_path / f"src{seed}.ckpt"
        t.save_checkpoint(ckpt)
        px, py = dm.arrays("population")
        shadows = train_shadow_models(
            _shadow_net,
            px,
            py,
            5,
            train=TrainConfig(epochs=60, lr=1e-3, batch_size=32),
            seed=seed,
        )
        split = MembershipSplit(*dm.arrays("target_train"), *dm.arrays("target_test"))
        samia, div = {}, {}
        for lam in (0.0, 4.0):
            pl.seed_everything(seed)
            net = _ppb_paper_protocol(ckpt, tmp_path / f"ft{seed}_{lam}", lam).net
            result = samia_attack(
                predict_proba_fn(net), split, px, py, _shadow_net, seed=seed, shadows=shadows
            )
            assert result.accuracy is not None
            samia[lam] = result.accuracy
            div[lam] = sorted_posterior_divergence(net, dm)
        print(f"seed {seed}: SAMIA {samia}, divergence {div}", flush=True)
        deltas.append(samia[4.0] - samia[0.0])
        divergence.append(div[4.0] - div[0.0])
    assert np.mean(deltas) < 0 and sum(d < 0 for d in deltas) >= 5, deltas
    assert sum(d < 0 for d in divergence) >= 5, divergence
