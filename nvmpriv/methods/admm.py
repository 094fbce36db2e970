r"""ADMM pruning (Zhang et al., 2018), MIA-Pruning's sparsity choice (Wang et al.), and ADMM + Min-Max.

Schedule of a run (epochs counted from 0):

* epochs ``[0, admm_epochs)`` -- **ADMM phase**: the task loss plus
  :func:`nvmpriv.pruning.admm_penalty` (:math:`\sum_i \rho/2\,\|W_i - Z_i + U_i\|_F^2`) is
  minimised; every ``update_every`` epochs :func:`nvmpriv.pruning.admm_update` sets
  :math:`Z_i = \Pi(W_i + U_i)` (largest entries) and :math:`U_i \mathrel{+}= W_i - Z_i`.
* at the start of epoch ``admm_epochs`` -- **hard pruning**: each weight keeps exactly its
  ``numel - floor(s_i numel)`` largest-magnitude entries.
* epochs ``[admm_epochs, admm_epochs + retrain_epochs)`` -- **masked retraining**: gradients are
  masked and the masks re-applied after each optimizer step, so pruned entries stay exactly 0;
  training stops after the last retraining epoch. The optimizer is kept (its state is harmless:
  masks are re-applied after every step).

If a run ends during the ADMM phase (``fast_dev_run``, early stopping, an interrupt), the net is
hard-pruned in ``on_train_end`` with a warning, so the final model is always exactly sparse.
Checkpoints store ``Z``, ``U``, the masks, the phase and the chosen sparsities under
``checkpoint["nvmpriv_admm"]``; resuming continues the schedule. Checkpoint *selection* by a
validation metric would prefer dense ADMM-phase models, so the shipped configs keep the last
checkpoint (``monitor: null``).

**MIA-Pruning sparsity choice** (a simplified, documented reading of Wang et al.): with
``candidates`` set, each targeted layer's sparsity is chosen once, at the start of fit, from the
trained net of ``source_checkpoint``: for every layer alone and every candidate ``s`` the layer
is magnitude-pruned at ``s`` (others dense), and the *attack gain* = best-threshold loss-attack
balanced accuracy - 1/2 on ``selection_samples`` members (``target_train``) vs the defender's
held-out ``target_val`` is measured, together with the accuracy on ``target_val``. Among the
candidates whose accuracy drop is at most ``max_acc_drop`` the one with the lowest gain wins
(ties: the larger sparsity); if none qualifies, the smallest candidate is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from nvmpriv.methods._common import (
    MaskKeeper,
    check_nonnegative,
    check_positive_int,
    collect_logits,
    load_net_weights,
    loss_threshold_attack_accuracy,
)
from nvmpriv.methods.base import MembershipModule, _adam
from nvmpriv.methods.minmax import MinMaxTraining
from nvmpriv.pruning import (
    AdmmState,
    admm_penalty,
    admm_update,
    check_sparsity,
    magnitude_mask,
    prunable_weights,
    sparsity_report,
)

__all__ = ["ADMMMinMax", "ADMMPruning", "LayerChoice", "select_sparsities"]

#: Per candidate of one layer: ``(sparsity, attack gain, held-out accuracy)``.
LayerChoice = list[tuple[float, float, float]]
_CKPT_KEY = "nvmpriv_admm"


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


def select_sparsities(
    net: nn.Module,
    candidates: Sequence[float],
    members: tuple[Tensor, Tensor],
    nonmembers: tuple[Tensor, Tensor],
    *,
    names: Iterable[str] | None = None,
    max_acc_drop: float = 0.02,
) -> tuple[dict[str, float], dict[str, LayerChoice]]:
    """Per layer, the candidate sparsity with the lowest membership-attack gain (MIA-Pruning).

    Each layer is pruned alone (magnitude, exact count) at each candidate; the net is restored
    afterwards. See the module docstring for the rule.

    Args:
        net: Trained net (evaluated in eval mode; weights restored bit-exactly).
        candidates: Sparsities in [0, 1) to choose from.
        members: ``(x, y)`` of training samples.
        nonmembers: ``(x, y)`` of held-out samples the defender owns (also used for accuracy).
        names: Prunable weight names to choose for (default: all of them).
        max_acc_drop: Largest allowed drop of held-out accuracy (fraction, >= 0).

    Returns:
        ``(chosen, table)``: ``{name: sparsity}`` and, per name, every candidate's
        ``(sparsity, gain, accuracy)``.

    Raises:
        ValueError: On an empty/invalid candidate list, a negative ``max_acc_drop`` or an
            unknown weight name.
    """
    cands = [check_sparsity(s, "candidates[]") for s in candidates]
    if not cands:
        raise ValueError("candidates is empty: give sparsities in [0, 1), e.g. [0.5, 0.7, 0.9]")
    check_nonnegative(max_acc_drop, "max_acc_drop", " (fraction of accuracy, e.g. 0.02)")
    weights = prunable_weights(net)
    targets = list(weights) if names is None else list(names)
    unknown = [n for n in targets if n not in weights]
    if unknown:
        raise ValueError(f"unknown prunable weights {unknown}: choose from {sorted(weights)}")

    def measure() -> tuple[float, float]:
        logit_in, y_in = collect_logits(net, [members])
        logit_out, y_out = collect_logits(net, [nonmembers])
        gain = loss_threshold_attack_accuracy(logit_in, y_in, logit_out, y_out) - 0.5
        return gain, _accuracy(logit_out, y_out)

    _, base_acc = measure()
    chosen: dict[str, float] = {}
    table: dict[str, LayerChoice] = {}
    for name in targets:
        w = weights[name]
        original = w.detach().clone()
        rows: LayerChoice = []
        for s in cands:
            with torch.no_grad():
                w.mul_(magnitude_mask(original, s).to(w.dtype))
            gain, acc = measure()
            rows.append((s, gain, acc))
            with torch.no_grad():
                w.copy_(original)
        # Gains and accuracies are count ratios reached by different float paths: compare
        # them rounded, so equal counts tie (and the larger sparsity wins) as documented.
        eligible = [r for r in rows if round(base_acc - r[2] - max_acc_drop, 9) <= 0]
        if eligible:
            chosen[name] = min(eligible, key=lambda r: (round(r[1], 9), -r[0]))[0]
        else:
            chosen[name] = min(cands)
        table[name] = rows
    return chosen, table


def _take(loader: Iterable[Any], n: int) -> tuple[Tensor, Tensor]:
    xs, ys, count = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        count += len(y)
        if count >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


class _AdmmSchedule(MembershipModule):
    """ADMM phase, hard pruning and masked retraining, as hooks shared by the ADMM methods."""

    admm_state: AdmmState

    def _init_admm(
        self,
        sparsity: float | Mapping[str, float],
        rho: float,
        admm_epochs: int,
        retrain_epochs: int,
        update_every: int,
        candidates: Sequence[float] | None,
        max_acc_drop: float,
        selection_samples: int,
        source_checkpoint: str | None,
    ) -> None:
        if isinstance(sparsity, Mapping):
            for key, value in sparsity.items():
                check_sparsity(value, f"sparsity[{key!r}]")
        else:
            check_sparsity(sparsity)
        self.rho = check_nonnegative(rho, "rho", " (Zhang et al.: rho = 2e-4)")
        self.admm_epochs = check_positive_int(admm_epochs, "admm_epochs")
        self.retrain_epochs = check_positive_int(retrain_epochs, "retrain_epochs", minimum=0)
        self.update_every = check_positive_int(update_every, "update_every")
        self.max_acc_drop = check_nonnegative(max_acc_drop, "max_acc_drop")
        self.selection_samples = check_positive_int(selection_samples, "selection_samples", 2)
        self.candidates = None if candidates is None else [float(c) for c in candidates]
        if self.candidates is not None:
            if not self.candidates:
                raise ValueError("candidates is empty: give sparsities, e.g. [0.5, 0.7, 0.9]")
            for c in self.candidates:
                check_sparsity(c, "candidates[]")
            if not source_checkpoint:
                raise ValueError(
                    "candidates needs a trained net to measure attack gains: set "
                    "source_checkpoint to a trained checkpoint of this net"
                )
        if source_checkpoint:
            self._source_split = load_net_weights(self.net, source_checkpoint)
        # Z = project(W), U = 0; also validates the layer names of a per-layer sparsity mapping.
        self.admm_state = AdmmState.from_model(self.net, sparsity)
        self.phase = "admm"
        self.mask_keeper = MaskKeeper()
        self.selected: dict[str, float] | None = None

    # ------------------------------------------------------------------ helpers
    def _classifier_optimizer(self) -> torch.optim.Optimizer:
        opt = self.optimizers()
        if isinstance(opt, list):
            opt = opt[0]
        return opt.optimizer

    def hard_prune(self) -> None:
        """Prune to the largest-magnitude entries and start masked retraining."""
        self.mask_keeper.load_state_dict(self.admm_state.masks(self.net))
        self.mask_keeper.attach(self.net, self._classifier_optimizer())
        self.phase = "retrain"

    def _select(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "dataloader"):
            raise ValueError("candidates needs an nvmpriv MembershipDataModule to measure gains")
        members = _take(dm.dataloader("target_train"), self.selection_samples)
        held_out = _take(dm.dataloader("target_val"), self.selection_samples)
        device = self.device
        chosen, table = select_sparsities(
            self.net,
            self.candidates or [],
            (members[0].to(device), members[1].to(device)),
            (held_out[0].to(device), held_out[1].to(device)),
            names=list(self.admm_state.sparsities),
            max_acc_drop=self.max_acc_drop,
        )
        self.selected = chosen
        self.admm_state = AdmmState.from_model(self.net, chosen)
        for name, rows in table.items():
            text = ", ".join(f"s={s:g}: gain={g:.4f} acc={a:.4f}" for s, g, a in rows)
            self.print(f"MIA-Pruning {name}: {text} -> {chosen[name]:g}")

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self) -> None:
        """Check the epoch budget; choose per-layer sparsities if ``candidates`` is set."""
        super().on_fit_start()
        trainer = self.trainer
        needed = self.admm_epochs + self.retrain_epochs
        max_epochs = trainer.max_epochs
        if (
            not getattr(trainer, "fast_dev_run", False)
            and max_epochs not in (None, -1)
            and max_epochs < needed
        ):
            raise ValueError(
                f"trainer.max_epochs={max_epochs} < admm_epochs + retrain_epochs = {needed}: "
                f"set trainer.max_epochs to {needed} or lower model.init_args.admm_epochs "
                "and model.init_args.retrain_epochs"
            )
        if self.candidates is not None and self.selected is None and self.phase == "admm":
            self._select()

    def on_train_start(self) -> None:
        """Re-attach the mask hooks when resuming in the retraining phase."""
        super().on_train_start()
        if self.phase == "retrain":
            self.mask_keeper.attach(self.net, self._classifier_optimizer())

    def on_train_epoch_start(self) -> None:
        """Switch from ADMM to masked retraining at epoch ``admm_epochs``."""
        super().on_train_epoch_start()
        if self.phase == "admm" and self.current_epoch >= self.admm_epochs:
            self.hard_prune()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Hard-prune after the last ADMM batch when there is no masked retraining.

        With ``retrain_epochs = 0`` the run ends with the ADMM phase. Pruning at its last batch
        (rather than at ``on_train_epoch_end``, which Lightning calls after the epoch's
        validation) makes that validation, and the checkpoints written with it, see the sparse
        net that the run returns.
        """
        super().on_train_batch_end(outputs, batch, batch_idx)
        if (
            self.phase == "admm"
            and self.retrain_epochs == 0
            and self.current_epoch + 1 >= self.admm_epochs
            and self.trainer.is_last_batch
        ):
            self.hard_prune()
            self.trainer.should_stop = True

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Task loss, plus the ADMM penalty during the ADMM phase."""
        loss, logits = super().training_loss(x, y)
        if self.phase == "admm" and self.rho > 0:
            penalty = admm_penalty(self.net, self.admm_state, self.rho)
            self.log("train/admm_penalty", penalty.detach())
            loss = loss + penalty
        return loss, logits

    def on_train_epoch_end(self) -> None:
        """ADMM ``Z``/``U`` update, sparsity logging, and the stop after retraining."""
        super().on_train_epoch_end()
        epoch = self.current_epoch
        if self.phase == "admm" and (epoch + 1) % self.update_every == 0:
            for name, r in admm_update(self.net, self.admm_state).items():
                self.log(f"prune/residual/{name}", r)
        for name, s in sparsity_report(self.net).items():
            self.log(f"prune/sparsity/{name}", s)
        self.log("prune/phase", float(self.phase == "retrain"))
        if self.phase == "retrain" and epoch + 1 >= self.admm_epochs + self.retrain_epochs:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        """Hard-prune a run that ended during the ADMM phase, so the result is always sparse."""
        super().on_train_end()
        if self.phase == "admm":
            warnings.warn(
                "training ended in the ADMM phase: hard-pruning now, without masked retraining "
                "(raise trainer.max_epochs to admm_epochs + retrain_epochs)",
                stacklevel=2,
            )
            self.hard_prune()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store ``Z``, ``U``, masks, phase and chosen sparsities."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[_CKPT_KEY] = {
            "phase": self.phase,
            "admm": self.admm_state.state_dict(),
            "masks": self.mask_keeper.state_dict(),
            "selected": None if self.selected is None else dict(self.selected),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` stored (hooks re-attach at train start)."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(_CKPT_KEY)
        if saved is None:
            return
        self.phase = saved["phase"]
        self.admm_state.load_state_dict(saved["admm"])
        self.mask_keeper.load_state_dict(saved["masks"])
        self.selected = saved["selected"]


class ADMMPruning(_AdmmSchedule):
    """ADMM pruning to per-layer sparsity targets, then masked retraining (exactly sparse).

    Args:
        net: The classifier (every ``nn.Linear``/``nn.Conv2d`` weight is prunable).
        num_classes: Number of classes (linked from the data module by the CLI).
        sparsity: Fraction of zeros in [0, 1) for every prunable weight, or
            ``{parameter name: fraction}`` for just those, names as in ``net.named_parameters()``
            (e.g. ``{"net.0.weight": 0.8}`` for :class:`~nvmpriv.nets.ColumnFC`).
        rho: ADMM penalty parameter >= 0 (Zhang et al.: rho / 2 = 1e-4 on summed squares).
        admm_epochs: Epochs of the ADMM phase, >= 1.
        retrain_epochs: Epochs of masked retraining, >= 0; ``trainer.max_epochs`` must be at
            least ``admm_epochs + retrain_epochs``.
        update_every: ADMM ``Z``/``U`` update every this many epochs (Zhang et al.: 5, with 30
            updates; the default 1 gives short runs an update per epoch).
        candidates: Optional sparsities to choose each targeted layer's target from by the
            lowest attack gain (MIA-Pruning; needs ``source_checkpoint``). See the module doc.
        max_acc_drop: Largest held-out accuracy drop (fraction) a candidate may cause.
        selection_samples: Members and held-out samples used to choose, each.
        source_checkpoint: Optional trained checkpoint of this net to start from.
        optimizer: Optimizer factory.
        lr_scheduler: Optional LR scheduler factory.

    Raises:
        ValueError: On a sparsity outside [0, 1), an unknown layer name, negative ``rho``, bad
            epoch counts, ``candidates`` without ``source_checkpoint`` or a mismatched checkpoint.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        sparsity: float | dict[str, float] = 0.7,
        rho: float = 2e-4,
        admm_epochs: int = 10,
        retrain_epochs: int = 10,
        update_every: int = 1,
        candidates: list[float] | None = None,
        max_acc_drop: float = 0.02,
        selection_samples: int = 1000,
        source_checkpoint: str | None = None,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(net, num_classes, optimizer, lr_scheduler)
        self._init_admm(
            sparsity,
            rho,
            admm_epochs,
            retrain_epochs,
            update_every,
            candidates,
            max_acc_drop,
            selection_samples,
            source_checkpoint,
        )
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])


class ADMMMinMax(_AdmmSchedule, MinMaxTraining):
    """ADMM pruning with Nasr et al.'s Min-Max term in the classifier loss (MIA-Pruning + Min-Max).

    The classifier step minimises ``CE + ADMM penalty (ADMM phase) + lam * privacy gain``; see
    :class:`ADMMPruning` and :class:`~nvmpriv.methods.minmax.MinMaxTraining` for the arguments.

    Args:
        net: The classifier.
        num_classes: Number of classes.
        sparsity: Target fraction(s) of zeros in [0, 1).
        rho: ADMM penalty parameter >= 0.
        admm_epochs: Epochs of the ADMM phase.
        retrain_epochs: Epochs of masked retraining.
        update_every: ADMM update period, in epochs.
        candidates: Optional candidate sparsities (MIA-Pruning choice).
        max_acc_drop: Largest accuracy drop of a candidate.
        selection_samples: Samples per side for the choice.
        source_checkpoint: Optional trained checkpoint to start from.
        lam: Privacy weight >= 0.
        attack_steps: Inference-model steps per classifier step.
        attack_lr: Inference-model learning rate.
        attack_width: Inference-model width scale.
        attack_features: ``"probs"`` or ``"logits"``.
        reference_role: Defender-owned reference role (see
            :data:`nvmpriv.methods.minmax.REFERENCE_ROLES`).
        warmup_epochs: Epochs before the Min-Max game starts.
        optimizer: Classifier optimizer factory.
        lr_scheduler: Optional scheduler factory.

    Raises:
        ValueError: As both parents.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        sparsity: float | dict[str, float] = 0.7,
        rho: float = 2e-4,
        admm_epochs: int = 10,
        retrain_epochs: int = 10,
        update_every: int = 1,
        candidates: list[float] | None = None,
        max_acc_drop: float = 0.02,
        selection_samples: int = 1000,
        source_checkpoint: str | None = None,
        lam: float = 1.0,
        attack_steps: int = 1,
        attack_lr: float = 1e-4,
        attack_width: float = 0.25,
        attack_features: str = "probs",
        reference_role: str = "target_val",
        warmup_epochs: int = 0,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            net,
            num_classes,
            lam=lam,
            attack_steps=attack_steps,
            attack_lr=attack_lr,
            attack_width=attack_width,
            attack_features=attack_features,
            reference_role=reference_role,
            warmup_epochs=warmup_epochs,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )
        self._init_admm(
            sparsity,
            rho,
            admm_epochs,
            retrain_epochs,
            update_every,
            candidates,
            max_acc_drop,
            selection_samples,
            source_checkpoint,
        )
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
