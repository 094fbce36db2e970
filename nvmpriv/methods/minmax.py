r"""Min-Max adversarial regularization (Nasr et al., 2018): train against a live inference model.

Two players alternate on every training batch:

1. **Attack steps** (``attack_steps`` of them, Adam ``attack_lr``): the inference model
   :math:`h(f(x), \mathrm{onehot}(y)) \in \mathbb R` (a logit; Nasr et al.'s two-branch net,
   :class:`nvmpriv.attack_models.NasrAttackModel`) learns to output "member" on the current
   training batch and "non-member" on a fresh batch of the reference set, with the classifier
   frozen and in eval mode. The first step's members are the current training batch; with
   ``attack_steps`` > 1 every further step draws a fresh member batch from a second shuffled,
   augmented pass over ``target_train``, as Nasr et al.'s Algorithm 1 samples both sets per step:
   :math:`\mathcal L_h = \tfrac12\,\mathrm{BCE}(h_{in}, 1) + \tfrac12\,\mathrm{BCE}(h_{ref}, 0)`.
2. **Classifier step** (the injected optimizer, Adam 1e-3 by default):

   .. math::

       \mathcal L_f = \mathrm{CE}(f(x), y)
           + \lambda\,\Bigl(\tfrac1B \sum_{b} \sigma\bigl(h(f(x_b), y_b)\bigr) - \tfrac12\Bigr)

   i.e. the classifier lowers the inference model's mean membership probability on its own
   training batch (the common "gain minus 1/2" variant; the constant does not change the
   gradient and makes the logged ``train/privacy_gain`` read 0 when the attacker is blind).

**Reference set.** Nasr et al.'s defender owns a reference set drawn from the same distribution
and disjoint from the training set. Here it is the data module role ``reference_role``,
``target_val`` by default: the defender's own held-out data, disjoint from the members
(``target_train``) *and* from the non-members used to evaluate attacks (``target_test``), and not
the attacker's shadow/population data, so every other role is refused. The validation
metrics are still computed on ``target_val``, which the classifier never trains on.

The inference model sees the classifier's softmax posteriors (``attack_features="probs"``, the
default: the paper's prediction vector :math:`f(x)`) or its raw logits (``"logits"``, what the
public ports of the code and the project's reference notes feed it). On digits, logits gave the
classifier an easy way out (rescaling logits) that cost accuracy without lowering a loss-threshold
attack, so posteriors are the default. Optimization is manual
(two optimizers); a scheduler of the classifier's optimizer is stepped once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from nvmpriv.attack_models import NasrAttackModel
from nvmpriv.data import ROLES
from nvmpriv.methods._common import check_nonnegative, check_positive_int
from nvmpriv.methods.base import MembershipModule, _adam

__all__ = ["ATTACK_FEATURES", "REFERENCE_ROLES", "MinMaxTraining"]

#: Allowed values of ``attack_features``.
ATTACK_FEATURES: tuple[str, ...] = ("logits", "probs")
#: Roles the defender owns besides its members: the target half's held-out data. The target's
#: test set is the attacks' non-members, and the shadow roles and the population are the
#: attacker's half of the data.
REFERENCE_ROLES: tuple[str, ...] = ("target_val",)


class MinMaxTraining(MembershipModule):
    """Nasr et al.'s adversarial regularization against a jointly trained inference model.

    Args:
        net: The classifier.
        num_classes: Number of classes (linked from the data module by the CLI).
        lam: Privacy weight lambda >= 0 (Nasr et al.: Purchase 3, Texas 1; 0 = standard
            training with a passive attacker).
        attack_steps: Inference-model steps per classifier step, >= 1.
        attack_lr: Adam learning rate of the inference model, > 0 (1e-4 in the reference).
        attack_width: Width scale of :class:`~nvmpriv.attack_models.NasrAttackModel`, > 0:
            1.0 is the paper's Purchase model (1024/512/64 and 128/64); the default 0.25 is a
            quarter-width model that keeps the game cheap on a CPU (the Texas configs use 0.5).
        attack_features: ``"probs"`` (softmax) or ``"logits"`` fed to the inference model.
        reference_role: Data module role used as the defender's non-member reference set, one of
            :data:`REFERENCE_ROLES` (``target_val``).
        warmup_epochs: Epochs of plain cross-entropy before the game starts, >= 0.
        optimizer: Classifier optimizer factory.
        lr_scheduler: Optional scheduler factory for the classifier optimizer.

    Raises:
        ValueError: On ``lam`` < 0, a bad step count, learning rate, width, feature kind or role.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
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
        super().__init__(net, num_classes, optimizer, lr_scheduler)
        self.lam = check_nonnegative(lam, "lam", " (privacy weight; Nasr et al. use 1 to 3)")
        self.attack_steps = check_positive_int(attack_steps, "attack_steps")
        if not check_nonnegative(attack_lr, "attack_lr") > 0:
            raise ValueError(f"attack_lr={attack_lr!r} is invalid: expected > 0, e.g. 1e-4")
        if not check_nonnegative(attack_width, "attack_width") > 0:
            raise ValueError(f"attack_width={attack_width!r} is invalid: expected > 0, e.g. 0.25")
        if attack_features not in ATTACK_FEATURES:
            raise ValueError(
                f"attack_features={attack_features!r} is invalid: choose one of {ATTACK_FEATURES}"
            )
        if reference_role not in REFERENCE_ROLES:
            why = {
                "target_train": "the members",
                "target_test": "the attacks' evaluation non-members",
            }.get(reference_role, "the attacker's data" if reference_role in ROLES else "no role")
            raise ValueError(
                f"reference_role={reference_role!r} is invalid ({why}): choose a defender-owned "
                f"non-member role from {list(REFERENCE_ROLES)}"
            )
        self.attack_lr = float(attack_lr)
        self.attack_features = attack_features
        self.reference_role = reference_role
        self.warmup_epochs = check_positive_int(warmup_epochs, "warmup_epochs", minimum=0)
        self.attack_model = NasrAttackModel(num_classes, widths=float(attack_width))
        self.automatic_optimization = False
        self._loaders: dict[str, Any] = {}
        self._iters: dict[str, Iterator[Any]] = {}
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])

    # ------------------------------------------------------------------ data
    def on_fit_start(self) -> None:
        """Build the reference loader from the data module's ``reference_role``.

        Reference batches get the same training augmentations as the member batches.
        """
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "dataloader"):
            raise ValueError(
                "MinMaxTraining needs an nvmpriv MembershipDataModule (for its reference set "
                f"{self.reference_role!r}); pass datamodule=... to fit"
            )
        # Augmented like the member batches (train_dataloader): otherwise, on images, the
        # inference model can tell members from reference samples by the augmentation alone.
        self._loaders = {
            "reference": dm.dataloader(self.reference_role, shuffle=True, augment=True)
        }
        if self.attack_steps > 1:
            self._loaders["members"] = dm.dataloader("target_train", shuffle=True, augment=True)
        self._iters.clear()

    def on_train_epoch_start(self) -> None:
        """Start fresh passes over the reference set (and the extra member batches).

        Every epoch draws its reference order at the same point of the RNG stream, so a run
        resumed from an epoch-end checkpoint sees the same reference batches as an uninterrupted
        one (an iterator carried across epochs cannot be checkpointed).
        """
        super().on_train_epoch_start()
        self._iters.clear()

    def _next_batch(self, kind: str) -> tuple[Tensor, Tensor]:
        """Next batch of ``kind`` (``"reference"`` or ``"members"``), restarting the pass at the end."""
        loader = self._loaders.get(kind)
        if loader is None:
            raise RuntimeError(f"the {kind} loader is built in on_fit_start; call trainer.fit")
        it = self._iters.get(kind)
        if it is None:
            it = self._iters[kind] = iter(loader)
        try:
            x, y = next(it)
        except StopIteration:
            it = self._iters[kind] = iter(loader)
            x, y = next(it)
        return x.to(self.device), y.to(self.device)

    # ------------------------------------------------------------------ players
    def attack_logit(self, logits: Tensor, y: Tensor) -> Tensor:
        """Inference-model membership logit ``h(f(x), onehot(y))`` of each sample ``[B]``.

        Args:
            logits: Classifier logits ``[B, C]``.
            y: Labels ``[B]``.

        Returns:
            Membership logits (sigmoid = membership probability).
        """
        feats = logits if self.attack_features == "logits" else torch.softmax(logits, dim=1)
        onehot = F.one_hot(y, self.num_classes).to(logits.dtype)
        out: Tensor = self.attack_model(feats, onehot)
        return out.squeeze(1)

    def _frozen_logits(self, x: Tensor) -> Tensor:
        flags = [(m, m.training) for m in self.net.modules()]
        self.net.eval()
        try:
            with torch.no_grad():
                return self._logits(x)
        finally:
            for m, flag in flags:
                m.training = flag

    def attack_step(self, x: Tensor, y: Tensor, optimizer: Any) -> tuple[Tensor, Tensor]:
        """One inference-model step: members = ``(x, y)``, non-members = a reference batch.

        Args:
            x: Training batch (members).
            y: Its labels.
            optimizer: The inference model's (Lightning) optimizer.

        Returns:
            ``(loss, accuracy)`` of the inference model on this member/reference pair.
        """
        xr, yr = self._next_batch("reference")
        h_in = self.attack_logit(self._frozen_logits(x), y)
        h_out = self.attack_logit(self._frozen_logits(xr), yr)
        loss = 0.5 * F.binary_cross_entropy_with_logits(h_in, torch.ones_like(h_in))
        loss = loss + 0.5 * F.binary_cross_entropy_with_logits(h_out, torch.zeros_like(h_out))
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        acc = 0.5 * ((h_in > 0).float().mean() + (h_out <= 0).float().mean())
        return loss.detach(), acc.detach()

    def privacy_gain(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean inference-model membership probability on a training batch, minus 1/2."""
        return torch.sigmoid(self.attack_logit(logits, y)).mean() - 0.5

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """``attack_steps`` inference-model steps, then one classifier step."""
        x, y = batch
        clf_opt, att_opt = self.optimizers()  # type: ignore[attr-defined]
        game_on = self.current_epoch >= self.warmup_epochs
        if game_on:
            for step in range(self.attack_steps):
                xm, ym = (x, y) if step == 0 else self._next_batch("members")
                att_loss, att_acc = self.attack_step(xm, ym, att_opt)
            self.log("train/attack_loss", att_loss)
            self.log("train/attack_acc", att_acc, prog_bar=True)
        loss, logits = self.training_loss(x, y)
        if game_on:
            gain = self.privacy_gain(logits, y)
            loss = loss + self.lam * gain
            self.log("train/privacy_gain", gain.detach())
        clf_opt.zero_grad()
        self.manual_backward(loss)
        clf_opt.step()
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        """Step the classifier's LR scheduler once per epoch (manual optimization)."""
        super().on_train_epoch_end()
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        if isinstance(scheduler, list):
            scheduler = scheduler[0]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            metric = self.trainer.callback_metrics.get("val/loss")
            if metric is not None:
                scheduler.step(metric)
        else:
            scheduler.step()

    def configure_optimizers(self) -> Any:
        """The injected optimizer for the classifier and Adam(``attack_lr``) for the attacker."""
        clf_opt = self.optimizer_factory(self.net.parameters())
        att_opt = torch.optim.Adam(self.attack_model.parameters(), lr=self.attack_lr)
        self.check_resumed_optimizers([clf_opt, att_opt])
        if self.scheduler_factory is None:
            return [clf_opt, att_opt]
        scheduler = self.scheduler_factory(clf_opt)
        return [clf_opt, att_opt], [{"scheduler": scheduler, "monitor": "val/loss"}]
