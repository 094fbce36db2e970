"""PPB (Yuan & Zhang) vs plain fine-tuning of a pruned net on sklearn digits, several seeds.

Measures, for the pruned ColumnFC fine-tuned with ``CE + lam * PPB`` (lam = 0 is plain
fine-tuning), the sorted-posterior divergence between members and non-members, the best-threshold
loss-attack accuracy and the test accuracy, under two protocols:

* ``fixed``: a fixed number of fine-tuning epochs, last weights (as tests/test_methods_evidence.py);
* ``paper``: Yuan & Zhang's protocol (mia_prune): Adam 1e-3 with weight decay 5e-4, early stopping
  on validation accuracy (patience 5), the best-validation weights are the released model.

With ``--attacks`` it also runs, on every fine-tuned model, the best-threshold confidence, entropy
and modified-entropy attacks and the learned black-box attacks of the paper's evaluation: SAMIA
(Yuan & Zhang) and the Shokri et al. shadow-model MLP, with 5 shadow ColumnFCs trained normally on
the attacker's half (the attacker does not know the defense). The shadows depend only on the
attacker's data and the seed, so they are trained once per seed and shared by every target and
both attacks. With ``--pruned-shadows`` the attacker knows the pruning (not the defense): its
shadows are pruned to the same sparsity and fine-tuned plainly, as in Yuan & Zhang's evaluation.

    .venv/bin/python scripts/ppb_digits_study.py [--seeds 0 1 2] [--lams 0 4 16] [--attacks]
        [--protocols fixed paper] [--pruned-shadows]

Prints one line per run and a mean per (protocol, lam), with the per-seed difference to lam 0
for each measure. Single-threaded; about 4 min (3 seeds, 3 values of lam, both protocols); with
``--attacks`` about 25 min for 6 seeds, lam 0 and 4, the paper protocol only (SAMIA's
Transformer dominates: ~65 s per attack on one thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping

from nvmpriv.attack_models import (
    MembershipSplit,
    TrainConfig,
    TrainedShadow,
    nn_shadow_attack,
    predict_proba_fn,
    samia_attack,
    train_shadow_models,
)
from nvmpriv.attacks import (
    best_threshold,
    confidence_scores,
    entropy_scores,
    modified_entropy_scores,
)
from nvmpriv.callbacks import RestoreBestWeights
from nvmpriv.data import Digits
from nvmpriv.methods import PPBFineTuning, StandardTraining
from nvmpriv.methods._common import collect_logits, loss_threshold_attack_accuracy
from nvmpriv.methods.ppb import sorted_posterior_divergence
from nvmpriv.nets import ColumnFC
from nvmpriv.pruning import apply_masks, magnitude_masks


def make_trainer(root: Path, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A quiet CPU trainer without logger or checkpoints."""
    return pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )


def measure(net: torch.nn.Module, dm: Digits) -> tuple[float, float, float]:
    """Sorted-posterior divergence (nats), best-threshold loss-attack accuracy, test accuracy."""
    li, yi = collect_logits(net, dm.dataloader("target_train"))
    lo, yo = collect_logits(net, dm.dataloader("target_test"))
    divergence = sorted_posterior_divergence(li, lo)
    test_acc = float((lo.argmax(1) == yo).float().mean())
    return divergence, loss_threshold_attack_accuracy(li, yi, lo, yo), test_acc


def shadow_net() -> torch.nn.Module:
    """The attacker's shadow architecture: the target's, trained normally."""
    return ColumnFC(64, 10, dropout=0.0)


def attacker_shadows(dm: Digits, seed: int, pruned: float = 0.0) -> list[TrainedShadow]:
    """The 5 shadow models of the learned attacks, on the attacker's half (Yuan & Zhang: 5).

    With ``pruned > 0`` the attacker knows the pruning but not the defense: each shadow is
    magnitude-pruned to that sparsity and fine-tuned plainly on its own members (Adam 1e-3,
    weight decay 5e-4, 15 epochs, masks kept).
    """
    px, py = dm.arrays("population")
    train = TrainConfig(epochs=60, lr=1e-3, batch_size=32)
    shadows = train_shadow_models(shadow_net, px, py, 5, train=train, seed=seed)
    if pruned <= 0:
        return shadows
    out = []
    for r, sh in enumerate(shadows):
        net = sh.model
        masks = magnitude_masks(net, pruned)
        apply_masks(net, masks)
        xs = torch.as_tensor(px[sh.member_idx], dtype=torch.float32)
        ys = torch.as_tensor(py[sh.member_idx], dtype=torch.long)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(seed + r)
        net.train()
        for _ in range(15):
            perm = torch.randperm(len(xs), generator=gen)
            for i in range(0, len(xs), 32):
                idx = perm[i : i + 32]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
                opt.step()
                apply_masks(net, masks)
        net.eval()
        out.append(dataclasses.replace(sh, query=predict_proba_fn(net)))
    return out


def attack_accuracies(
    net: torch.nn.Module, dm: Digits, seed: int, shadows: list[TrainedShadow]
) -> dict[str, float]:
    """Threshold and learned (SAMIA, shadow MLP) attack accuracies on the fine-tuned ``net``."""
    mx, my = dm.arrays("target_train")
    nx, ny = dm.arrays("target_test")
    px, py = dm.arrays("population")  # the attacker's half
    query = predict_proba_fn(net)
    p_in, p_out = query(mx), query(nx)
    out = {
        name: best_threshold(fn(p_in, my), fn(p_out, ny))[1]
        for name, fn in (
            ("confidence", confidence_scores),
            ("entropy", entropy_scores),
            ("modified_entropy", modified_entropy_scores),
        )
    }
    split = MembershipSplit(mx, my, nx, ny)
    for name, attack in (("samia", samia_attack), ("nn_shadow", nn_shadow_attack)):
        result = attack(query, split, px, py, shadow_net, n_shadow=5, seed=seed, shadows=shadows)
        assert result.accuracy is not None  # learned attacks decide at p >= 0.5
        out[name] = result.accuracy
        out[f"{name}_auc"] = result.auc
    return out


def main() -> None:
    """Run the study and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 4.0, 16.0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--attacks", action="store_true", help="add threshold and learned attacks")
    parser.add_argument(
        "--pruned-shadows",
        action="store_true",
        help="the attacker's shadows are pruned like the target (and fine-tuned without PPB)",
    )
    parser.add_argument(
        "--protocols", nargs="+", choices=("fixed", "paper"), default=["fixed", "paper"]
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed in args.seeds:
            pl.seed_everything(seed, verbose=False)
            # few members (about 180): the baseline overfits
            dm = Digits(batch_size=32, seed=0, train_fraction=0.2, val_fraction=0.3)
            source = StandardTraining(ColumnFC(64, 10, dropout=0.0), 10)
            t = make_trainer(root / f"src{seed}", 60, [])
            t.fit(source, datamodule=dm)
            ckpt = root / f"src{seed}.ckpt"
            t.save_checkpoint(ckpt)
            shadows = (
                attacker_shadows(dm, seed, args.sparsity if args.pruned_shadows else 0.0)
                if args.attacks
                else []
            )
            for protocol in args.protocols:
                for lam in args.lams:
                    pl.seed_everything(seed, verbose=False)
                    kwargs: dict[str, Any] = {}
                    callbacks: list[pl.Callback] = []
                    if protocol == "paper":
                        kwargs["optimizer"] = lambda p: torch.optim.Adam(
                            p, lr=1e-3, weight_decay=5e-4
                        )
                        callbacks = [
                            EarlyStopping(monitor="val/acc", mode="max", patience=5),
                            RestoreBestWeights(monitor="val/acc", mode="max"),
                        ]
                    model = PPBFineTuning(
                        ColumnFC(64, 10, dropout=0.0),
                        10,
                        source_checkpoint=str(ckpt),
                        sparsity=args.sparsity,
                        lam=lam,
                        **kwargs,
                    )
                    trainer = make_trainer(root / f"ft{seed}{protocol}{lam}", 30, callbacks)
                    trainer.fit(model, datamodule=dm)
                    div, mia, acc = measure(model.net, dm)
                    extra = attack_accuracies(model.net, dm, seed, shadows) if args.attacks else {}
                    rows.append(
                        dict(seed=seed, protocol=protocol, lam=lam, div=div, mia=mia, acc=acc)
                        | extra
                    )
                    print(
                        f"seed {seed} {protocol:5s} lam {lam:5.1f}: divergence {div:.4f} "
                        f"loss-attack acc {mia:.3f} test acc {acc:.3f}"
                        + "".join(f" {k} {v:.3f}" for k, v in extra.items()),
                        flush=True,
                    )
    keys = [k for k in rows[0] if k not in ("seed", "protocol", "lam")]
    groups: dict[tuple[str, float], list[list[float]]] = defaultdict(list)
    for r in rows:
        groups[(r["protocol"], r["lam"])].append([r[k] for k in keys])
    print(
        f"\nmean over seeds {args.seeds}, sparsity {args.sparsity} (div: divergence, mia: loss attack):"
    )
    for (protocol, lam), vals in sorted(groups.items()):
        means = np.mean(np.array(vals), axis=0)
        print(
            f"{protocol:5s} lam {lam:5.1f}: "
            + " ".join(f"{k} {v:.3f}" for k, v in zip(keys, means, strict=True))
        )
    print("\nchange against lam 0 of the same seed and protocol (mean; seeds lower / seeds):")
    for (protocol, lam), vals in sorted(groups.items()):
        base = groups.get((protocol, 0.0))
        if lam == 0.0 or base is None:
            continue
        delta = np.array(vals) - np.array(base)
        print(
            f"{protocol:5s} lam {lam:5.1f}: "
            + " ".join(
                f"{k} {d.mean():+.4f} ({int((d < 0).sum())}/{len(d)})"
                for k, d in zip(keys, delta.T, strict=True)
            )
        )


if __name__ == "__main__":
    main()
