"""Bad configuration of the training methods: one-line ValueErrors at construction; helper oracles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_curve

from nvmpriv.methods import (
    ADMMMinMax,
    ADMMPruning,
    DoReFaTraining,
    MinMaxTraining,
    PGDTraining,
    PPBFineTuning,
)
from nvmpriv.methods._common import best_threshold_accuracy
from nvmpriv.methods.ppb import ppb_penalty, sorted_posterior_divergence
from nvmpriv.nets import ColumnFC, NasrFC


def net() -> ColumnFC:
    return ColumnFC(64, 10)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A checkpoint in Lightning's layout (``state_dict`` with ``net.`` keys)."""
    torch.manual_seed(0)
    path = tmp_path / "src.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net().state_dict().items()}}, path)
    return path


@pytest.mark.parametrize(
    ("build", "match"),
    [
        pytest.param(lambda: PGDTraining(net(), 10, eps=-0.1), "eps=-0.1", id="eps<0"),
        pytest.param(lambda: PGDTraining(net(), 10, alpha=-1.0), "alpha=-1.0", id="alpha<0"),
        pytest.param(lambda: PGDTraining(net(), 10, steps=0), "steps=0", id="steps0"),
        pytest.param(lambda: PGDTraining(net(), 10, clean_weight=2.0), "clean_weight", id="cw"),
        pytest.param(lambda: PGDTraining(net(), 10, clamp_min=1.0), "clamp_min", id="clamp"),
        pytest.param(lambda: DoReFaTraining(net(), 10, weight_bits=0), "weight_bits=0", id="w0"),
        pytest.param(lambda: DoReFaTraining(net(), 10, act_bits=33), "act_bits=33", id="a33"),
        pytest.param(lambda: ADMMPruning(net(), 10, sparsity=1.0), "sparsity=1.0", id="s1"),
        pytest.param(lambda: ADMMPruning(net(), 10, sparsity=-0.1), r"sparsity=-0\.1", id="s<0"),
        pytest.param(
            lambda: ADMMPruning(net(), 10, sparsity={"net.0.weight": 1.5}), "1.5", id="s-dict"
        ),
        pytest.param(
            lambda: ADMMPruning(net(), 10, sparsity={"nope.weight": 0.5}), "nope", id="s-name"
        ),
        pytest.param(lambda: ADMMPruning(net(), 10, rho=-1.0), "rho=-1.0", id="rho<0"),
        pytest.param(
            lambda: ADMMPruning(net(), 10, candidates=[0.5, 0.9]), "source_checkpoint", id="cand"
        ),
        pytest.param(
            lambda: ADMMPruning(net(), 10, candidates=[1.2]), r"candidates\[\]=1.2", id="cand>1"
        ),
        pytest.param(lambda: MinMaxTraining(net(), 10, lam=-1.0), "lam=-1.0", id="mm-lam<0"),
        pytest.param(lambda: MinMaxTraining(net(), 10, attack_steps=0), "attack_steps", id="k0"),
        pytest.param(
            lambda: MinMaxTraining(net(), 10, reference_role="target_test"),
            "reference_role='target_test'",
            id="ref-test",
        ),
        pytest.param(
            lambda: MinMaxTraining(net(), 10, reference_role="shadow_train"),
            r"reference_role='shadow_train' is invalid \(the attacker's data\)",
            id="ref-shadow",
        ),
        pytest.param(
            lambda: ADMMMinMax(net(), 10, reference_role="population"),
            r"reference_role='population' is invalid \(the attacker's data\)",
            id="ref-population",
        ),
        pytest.param(
            lambda: MinMaxTraining(net(), 10, attack_features="x"), "attack_features", id="feat"
        ),
        pytest.param(lambda: ADMMMinMax(net(), 10, lam=-2.0), "lam=-2.0", id="admm-mm-lam"),
        pytest.param(lambda: PPBFineTuning(net(), 10), "source_checkpoint is not set", id="no-src"),
        pytest.param(
            lambda: PPBFineTuning(net(), 10, source_checkpoint="missing.ckpt"),
            "does not exist",
            id="src-missing",
        ),
    ],
)
def test_bad_knobs_raise_one_line_errors(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match) as info:
        build()
    assert "\n" not in str(info.value)


def test_ppb_bad_knobs_with_a_real_source(source: Path) -> None:
    with pytest.raises(ValueError, match=r"sparsity=1\.0"):
        PPBFineTuning(net(), 10, source_checkpoint=str(source), sparsity=1.0)
    with pytest.raises(ValueError, match="lam=-4"):
        PPBFineTuning(net(), 10, source_checkpoint=str(source), lam=-4.0)
    with pytest.raises(ValueError, match="prune_method='random'"):
        PPBFineTuning(net(), 10, source_checkpoint=str(source), prune_method="random")
    with pytest.raises(ValueError, match="BatchNorm"):
        PPBFineTuning(net(), 10, source_checkpoint=str(source), prune_method="slimming")


def test_checkpoint_of_another_architecture_names_the_first_mismatch(source: Path) -> None:
    with pytest.raises(ValueError, match=r"'net\.0\.weight' has shape \(256, 64\) there but"):
        PPBFineTuning(NasrFC(64, 10), 10, source_checkpoint=str(source))
    with pytest.raises(ValueError, match="does not match the net"):
        ADMMPruning(ColumnFC(32, 10), 10, source_checkpoint=str(source))


def test_source_weights_are_loaded_then_pruned(source: Path) -> None:
    model = PPBFineTuning(net(), 10, source_checkpoint=str(source), sparsity=0.5)
    state = torch.load(source, weights_only=True)["state_dict"]
    w = model.net.net[0].weight
    kept = w != 0
    assert int((~kept).sum()) == w.numel() // 2
    torch.testing.assert_close(w[kept], state["net.net.0.weight"][kept])
    torch.testing.assert_close(model.net.net[0].bias, state["net.net.0.bias"])


def test_knobs_are_hyperparameters(source: Path) -> None:
    assert PGDTraining(net(), 10, eps=0.2).hparams["eps"] == 0.2
    assert DoReFaTraining(net(), 10, weight_bits=16).hparams["weight_bits"] == 16
    assert ADMMPruning(net(), 10, rho=0.5).hparams["rho"] == 0.5
    assert MinMaxTraining(net(), 10, lam=3.0).hparams["lam"] == 3.0
    h = PPBFineTuning(net(), 10, source_checkpoint=str(source), lam=2.0).hparams
    assert h["lam"] == 2.0 and h["source_checkpoint"] == str(source)
    assert "net" not in h and "optimizer" not in h


def test_ppb_penalty_matches_a_hand_computed_kl() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 5.0]])
    got = float(ppb_penalty(logits))
    srt = np.sort(logits.numpy(), axis=1)[:, ::-1]
    p = np.exp(srt) / np.exp(srt).sum(1, keepdims=True)
    first, second = p[:2], p[2:]
    expected = float((second * np.log(second / first)).sum() / 2)
    assert got == pytest.approx(expected, rel=1e-5)
    # Sorting removes the class identity: permuted classes give no penalty.
    same = torch.tensor([[3.0, 1.0, 0.0], [1.0, 0.0, 3.0], [0.0, 3.0, 1.0], [3.0, 0.0, 1.0]])
    assert float(ppb_penalty(same)) == pytest.approx(0.0, abs=1e-7)
    assert float(ppb_penalty(logits[:1])) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_threshold_accuracy_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s_in = rng.normal(0.5, 1.0, 50).round(1)  # ties on purpose
    s_out = rng.normal(0.0, 1.0, 70).round(1)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(50), np.zeros(70)], np.r_[s_in, s_out])
    expected = float(np.max((tpr + 1 - fpr) / 2))
    assert best_threshold_accuracy(torch.tensor(s_in), torch.tensor(s_out)) == pytest.approx(
        expected
    )


def test_pgd_loss_mixes_clean_and_adversarial() -> None:
    torch.manual_seed(0)
    model = PGDTraining(net(), 10, eps=0.0, alpha=0.0, steps=1, clean_weight=0.5)
    model.eval()  # no dropout: clean and eps=0 adversarial losses coincide
    x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    loss, _ = model.training_loss(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model.net(x), y))


def test_sorted_posterior_divergence_matches_a_hand_computed_kl() -> None:
    members = torch.tensor([[4.0, 0.0], [0.0, 2.0]])
    nonmembers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0]])

    def mean_sorted(z: torch.Tensor) -> np.ndarray:
        e = np.exp(z.numpy())
        return np.sort(e / e.sum(1, keepdims=True), axis=1)[:, ::-1].mean(0)

    p, q = mean_sorted(members), mean_sorted(nonmembers)
    expected = float((p * np.log(p / q)).sum())
    assert sorted_posterior_divergence(members, nonmembers) == pytest.approx(expected, rel=1e-5)
    assert sorted_posterior_divergence(members, members.flip(1)) == pytest.approx(0.0, abs=1e-7)


def test_pgd_validation_does_not_shift_training(tmp_path: Path) -> None:
    """val/pgd_acc draws its random starts from its own generator: how many validation batches
    are attacked does not change the trained weights."""
    import lightning.pytorch as pl

    from nvmpriv.data import Digits
    from nvmpriv.methods import PGDTraining

    weights = []
    for val_batches in (1, 3):
        pl.seed_everything(0)
        model = PGDTraining(net(), 10, eps=0.1, alpha=0.05, steps=2, val_batches=val_batches)
        trainer = pl.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=str(tmp_path),
            limit_train_batches=4,
        )
        trainer.fit(model, datamodule=Digits(batch_size=32, eval_batch_size=32))
        weights.append(torch.cat([p.detach().flatten() for p in model.net.parameters()]))
    assert torch.equal(weights[0], weights[1])


@pytest.mark.parametrize("attack_steps", [1, 3])
def test_minmax_resumes_exactly(tmp_path: Path, attack_steps: int) -> None:
    """Two epochs in one go equal one epoch, a checkpoint, and a resumed second epoch (the
    reference batches per epoch, 5, are not a multiple of the reference set's batches; with 3
    attack steps the extra member batches are drawn too)."""
    import lightning.pytorch as pl

    from nvmpriv.data import Digits
    from nvmpriv.methods import MinMaxTraining

    def run(epochs: int, root: Path, ckpt: Path | None = None) -> torch.Tensor:
        pl.seed_everything(0)
        model = MinMaxTraining(net(), 10, attack_steps=attack_steps)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=str(root),
            limit_train_batches=5,
            callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(root), save_last=True)],
        )
        trainer.fit(model, datamodule=Digits(batch_size=16), ckpt_path=ckpt)
        return torch.cat([p.detach().flatten() for p in model.net.parameters()])

    whole = run(2, tmp_path / "whole")
    run(1, tmp_path / "part")
    resumed = run(2, tmp_path / "resumed", ckpt=tmp_path / "part" / "last.ckpt")
    assert torch.equal(whole, resumed)


def test_corrupted_source_checkpoint_is_refused(source: Path) -> None:
    import zipfile

    with zipfile.ZipFile(source) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
        start = info.header_offset + len(info.FileHeader())
    raw = bytearray(source.read_bytes())
    raw[start + info.file_size // 2] ^= 0x40
    source.write_bytes(bytes(raw))
    torch.load(source, weights_only=True)  # torch itself loads the damaged weights
    with pytest.raises(ValueError, match=r"source_checkpoint .*src\.ckpt: corrupted .*CRC-32"):
        PPBFineTuning(net(), 10, source_checkpoint=str(source))


def test_fine_tuning_a_loaded_checkpoint_with_another_optimizer(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from nvmpriv.data import Digits
    from nvmpriv.methods import StandardTraining

    def trainer() -> pl.Trainer:
        return pl.Trainer(
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=str(tmp_path),
        )

    first = trainer()
    first.fit(StandardTraining(ColumnFC(64, 10), num_classes=10), datamodule=Digits())
    first.save_checkpoint(tmp_path / "adam.ckpt")
    assert torch.load(tmp_path / "adam.ckpt", weights_only=True)["nvmpriv_optimizers"] == ["Adam"]

    def sgd(params):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(params, lr=0.1)

    loaded = StandardTraining.load_from_checkpoint(
        tmp_path / "adam.ckpt", net=ColumnFC(64, 10), optimizer=sgd
    )
    trainer().fit(loaded, datamodule=Digits())  # a new run from loaded weights: allowed
    with pytest.raises(ValueError, match=r"adam\.ckpt was trained with optimizer Adam .* SGD"):
        trainer().fit(
            StandardTraining(ColumnFC(64, 10), num_classes=10, optimizer=sgd),
            datamodule=Digits(),
            ckpt_path=tmp_path / "adam.ckpt",
        )


def test_minmax_reference_batches_are_augmented_like_member_batches(tmp_path: Path) -> None:
    """On images, member batches come augmented (random crop + flip); reference batches must
    be too, or the inference model can separate the two sets by the augmentation alone."""
    import lightning.pytorch as pl
    from conftest import write_cifar10
    from torch import nn

    from nvmpriv.data import CIFAR10
    from nvmpriv.methods import MinMaxTraining

    write_cifar10(tmp_path, per_batch=20)
    dm = CIFAR10(root=str(tmp_path), batch_size=8, seed=0)
    model = MinMaxTraining(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), 10)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=1,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    plain = dm.dataset(model.reference_role)[0][0]
    served = model._loaders["reference"].dataset
    torch.manual_seed(0)
    draws = [served[0][0] for _ in range(8)]
    # Random-crop padding is zero; the fixture's pixels are uniform uint8, so zero borders and
    # differing draws of one sample come from the augmentation only.
    assert any(not torch.equal(d, plain) for d in draws)
    assert any(bool((d[:, 0, :] == 0).all() or (d[:, :, 0] == 0).all()) for d in draws)


def test_minmax_attack_steps_draw_fresh_member_batches(tmp_path: Path) -> None:
    """Nasr et al.'s Algorithm 1 samples members and reference data for every attack step: the
    first step uses the classifier's batch, later ones fresh batches of the members only."""
    import lightning.pytorch as pl
    from torch import nn

    from nvmpriv.data import Digits
    from nvmpriv.methods import MinMaxTraining

    dm = Digits(batch_size=16, seed=0, max_samples=200)
    model = MinMaxTraining(nn.Sequential(nn.Linear(64, 10)), 10, attack_steps=3)
    seen: list[tuple[str, torch.Tensor]] = []
    attack_step = model.attack_step
    training_step = model.training_step

    def record_attack(x: torch.Tensor, y: torch.Tensor, optimizer: object) -> object:
        seen.append(("attack", x.clone()))
        return attack_step(x, y, optimizer)

    def record_batch(batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        seen.append(("batch", batch[0].clone()))
        return training_step(batch, batch_idx)

    model.attack_step = record_attack  # type: ignore[method-assign]
    model.training_step = record_batch  # type: ignore[method-assign]
    pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=2,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    ).fit(model, datamodule=dm)
    assert [kind for kind, _ in seen] == ["batch", "attack", "attack", "attack"] * 2
    members = {tuple(row.tolist()) for row in dm.arrays("target_train")[0]}
    for i in (0, 4):
        batch, first, *fresh = (x for _, x in seen[i : i + 4])
        assert torch.equal(first, batch)
        for x in fresh:
            assert not torch.equal(x, batch)
            assert all(tuple(row.tolist()) in members for row in x)  # members, not references


def test_source_checkpoint_of_another_membership_split_is_refused(tmp_path: Path) -> None:
    """A PPB run on another split than its source's would count the source's training data as
    non-members; the same split is accepted."""
    import lightning.pytorch as pl

    from nvmpriv.data import Digits
    from nvmpriv.methods import StandardTraining

    def trainer(root: Path) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_train_batches=2,
            limit_val_batches=1,
            default_root_dir=str(root),
        )

    pl.seed_everything(0)
    t = trainer(tmp_path / "src")
    t.fit(StandardTraining(net(), 10), datamodule=Digits(batch_size=32, seed=0))
    ckpt = tmp_path / "src.ckpt"
    t.save_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"another membership split.*data\.init_args\.seed"):
        trainer(tmp_path / "b").fit(
            PPBFineTuning(net(), 10, source_checkpoint=str(ckpt)),
            datamodule=Digits(batch_size=32, seed=1),
        )
    trainer(tmp_path / "a").fit(
        PPBFineTuning(net(), 10, source_checkpoint=str(ckpt)),
        datamodule=Digits(batch_size=32, seed=0),
    )
