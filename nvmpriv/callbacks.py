"""Callbacks: the crossbar privacy audit at validation, and guards for long runs.

:class:`CrossbarAudit` is what a user watches while training. At the end of validation (every
``every_n_epochs`` epochs and always at the last one) it runs the digital model and the same model
inside each configured crossbar (:func:`nvmpriv.crossbar.simulate`) on the saved member,
non-member and shadow sets, scores the outputs with :mod:`nvmpriv.attacks` and logs

* ``xbar/<config>/acc`` (non-member accuracy), ``xbar/<config>/train_acc`` and
  ``xbar/<config>/acc_drop`` (digital minus crossbar, in accuracy points of [0, 1]);
* ``mia/<config>/<attack>/{acc,auc,tpr@0.1%fpr,tpr@1%fpr,tpr@0fpr,acc_upper}`` (``digital`` is
  a config; a TPR at an FPR below 1 / non-members is not measured and not logged);
* ``xbar/<config>/snr_db/<layer>``, ``xbar/<config>/ns/<layer>`` and ``xbar/<config>/nf``;
* optional non-adaptive PGD accuracy ``adv/<config>/eps_<e>/acc``;
* histograms of member vs non-member confidence and figures (log-log ROC, SNR/NS bars,
  confidence histograms) to TensorBoard.

The model is left exactly as it was (weights, buffers, train/eval flags, RNG state), also when an
attack raises. At the end of ``fit``/``validate``/``test`` it writes ``results.json`` (atomically)
in the run folder and prints a table; at the end of ``fit`` it audits again when the weights
changed since its last audit (early stopping between audits, :class:`RestoreBestWeights`), so
``results.json`` always describes the model that ``fit`` leaves behind (and the ONNX export).

:class:`RestoreBestWeights` puts back the weights of the best validation epoch when training
ends (Yuan & Zhang release the best-validation model of PPB fine-tuning).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from nvmpriv import attacks as mia
from nvmpriv.atomic import atomic_save_npz, atomic_write_json, atomic_write_text
from nvmpriv.crossbar import CrossbarConfig, convert, get_preset
from nvmpriv.crossbar.metrics import layer_noise, nonideality_factor

__all__ = [
    "DIGITAL",
    "CrossbarAudit",
    "FiniteLossGuard",
    "LastEpochCheckpoint",
    "RestoreBestWeights",
    "WritePredictions",
    "atomic_write_text",
    "weights_fingerprint",
]

DIGITAL = "digital"
DEFAULT_ATTACKS = ("confidence", "loss", "entropy", "modified_entropy", "gap")


def weights_fingerprint(module: nn.Module) -> str:
    """A digest of every parameter and buffer (names and exact bytes).

    Args:
        module: The model.

    Returns:
        Hex digest; equal digests mean bit-identical weights.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore train/eval flags, gradient mode and every RNG the audit may touch.

    The crossbar's per-query read noise and the shadow model's training draw from the global
    RNGs; restoring them keeps training reproducible whether or not the audit runs.
    """
    modes = {m: m.training for m in module.modules()}
    cpu_rng = torch.get_rng_state()
    np_rng = np.random.get_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        torch.set_rng_state(cpu_rng)
        np.random.set_state(np_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _reset_parameters(net: nn.Module) -> nn.Module:
    for m in net.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return net


def _crossbar_config(name: str) -> CrossbarConfig:
    return get_preset(name)


def _shard(n: int, rank: int, world: int) -> np.ndarray:
    """Indices of the samples rank ``rank`` evaluates: every ``world``-th, padded to equal length."""
    per = math.ceil(n / world)
    idx = np.arange(rank, per * world, world)
    return np.minimum(idx, n - 1)


class CrossbarAudit(Callback):
    """Swap crossbars in at validation and log accuracy, membership inference and layer metrics.

    Args:
        crossbars: Crossbar presets to audit (names from ``nvmpriv.crossbar.PRESETS``); the
            digital model is always audited as config ``digital``.
        attacks: Attack names from ``nvmpriv.attacks.SCORE_ATTACKS`` (threshold attacks).
        every_n_epochs: Audit every n-th validation epoch (the last epoch is always audited).
        max_samples: Cap on members, non-members and each shadow set (a random subset of each
            role fixed by the split, :meth:`nvmpriv.data.Splits.subset`).
        chip_seed: Seed of the simulated chip (one config + seed = one chip).
        calibration_samples: Training samples used to calibrate DAC/ADC ranges (the split's
            fixed subset of ``target_train``, as the ONNX export calibrates).
        layer_samples: Samples for per-layer SNR / noise sensitivity (0 disables them).
        shadow_epochs: Train one shadow model (same net, Adam, on ``shadow_train``) for this many
            epochs at the first audit and choose thresholds on its outputs; ``None`` chooses the
            threshold by 2-fold cross-validation on the target's own scores instead (recorded as
            ``threshold_source`` in results.json).
        shadow_lr: Adam learning rate of the shadow model.
        shadow_seed: Seed of the shadow model's initialization and shuffling; ``None`` takes the
            run's ``seed_everything`` seed (0 without one). Independent of ``chip_seed``, so
            another chip changes only the simulated entries.
        adversarial_eps: If non-empty, non-adaptive L-inf PGD (gradients of the digital model)
            at these eps values, evaluated digitally and on each crossbar.
        adversarial_steps: PGD steps.
        adversarial_samples: Non-members attacked by PGD.
        figures: Log matplotlib figures (ROC, SNR/NS bars, confidence histograms).
        print_table: Print the results table at the end of a run.
    """

    def __init__(
        self,
        crossbars: Sequence[str] = ("ideal", "32x32_100k", "64x64_100k", "128x128_100k"),
        attacks: Sequence[str] = DEFAULT_ATTACKS,
        every_n_epochs: int = 1,
        max_samples: int = 1000,
        chip_seed: int = 0,
        calibration_samples: int = 256,
        layer_samples: int = 256,
        shadow_epochs: int | None = None,
        shadow_lr: float = 1e-3,
        shadow_seed: int | None = None,
        adversarial_eps: Sequence[float] = (),
        adversarial_steps: int = 10,
        adversarial_samples: int = 256,
        figures: bool = True,
        print_table: bool = True,
    ) -> None:
        super().__init__()
        unknown = [a for a in attacks if a not in mia.SCORE_ATTACKS]
        if unknown:
            raise ValueError(
                f"CrossbarAudit: unknown attacks {unknown}; choose from "
                f"{', '.join(sorted(mia.SCORE_ATTACKS))}"
            )
        if every_n_epochs < 1:
            raise ValueError(f"CrossbarAudit: every_n_epochs={every_n_epochs} must be >= 1")
        if max_samples < 2 or calibration_samples < 1 or layer_samples < 0:
            raise ValueError(
                "CrossbarAudit: needs max_samples >= 2, calibration_samples >= 1, "
                f"layer_samples >= 0 (got {max_samples}, {calibration_samples}, {layer_samples})"
            )
        if shadow_epochs is not None and shadow_epochs < 1:
            raise ValueError(f"CrossbarAudit: shadow_epochs={shadow_epochs} must be >= 1 or null")
        if any(e < 0 for e in adversarial_eps):
            raise ValueError(
                f"CrossbarAudit: adversarial_eps={list(adversarial_eps)} must all be >= 0"
            )
        if adversarial_samples < 1 or adversarial_steps < 1:
            raise ValueError(
                f"CrossbarAudit: adversarial_samples={adversarial_samples}, adversarial_steps="
                f"{adversarial_steps}: both must be >= 1 (adversarial_eps: [] turns PGD off)"
            )
        if not shadow_lr > 0:
            raise ValueError(f"CrossbarAudit: shadow_lr={shadow_lr} must be > 0")
        self.configs = {name: _crossbar_config(name) for name in crossbars}
        self.attacks = tuple(attacks)
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.chip_seed = chip_seed
        self.calibration_samples = calibration_samples
        self.layer_samples = layer_samples
        self.shadow_epochs = shadow_epochs
        self.shadow_lr = shadow_lr
        self.shadow_seed = shadow_seed
        self.adversarial_eps = tuple(float(e) for e in adversarial_eps)
        self.adversarial_steps = adversarial_steps
        self.adversarial_samples = adversarial_samples
        self.figures = figures
        self.print_table = print_table
        self.results: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._shadow_state: dict[str, torch.Tensor] | None = None
        self._audited_weights: str | None = None
        self._checkpoint_epoch: int | None = None
        self._nf_cache: dict[str, float] = {}
        self._limits = self._budget(quick=False)

    # ------------------------------------------------------------------ lightning hooks
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Audit after validation when this epoch is due."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        epoch = trainer.current_epoch
        last = epoch + 1 >= (trainer.max_epochs or 0) or bool(
            getattr(trainer, "fast_dev_run", False)
        )
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        self.audit(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stand-alone ``validate``: audit once and write results."""
        if trainer.state.fn == "validate":
            self.audit(trainer, pl_module)
            self._finish(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stand-alone ``test``: audit once and write results."""
        self.audit(trainer, pl_module)
        self._finish(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Audit the final weights if not done yet, write ``results.json``, print the table."""
        net: nn.Module = pl_module.net  # type: ignore[assignment]
        if not self.results or weights_fingerprint(net) != self._audited_weights:
            self.audit(trainer, pl_module)
        self._finish(trainer)

    def state_dict(self) -> dict[str, Any]:
        """Last results, history and the shadow model, so a resumed run continues the record."""
        # JSON-safe contents only: Lightning resumes with torch.load(weights_only=True).
        return {
            "results": self.results_json(),
            "history": self.history,
            "shadow_state": self._shadow_state,
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Remember which epoch the checkpoint's weights come from (for validate/test)."""
        self._checkpoint_epoch = _checkpoint_epoch(checkpoint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.results = state_dict.get("results", {})
        self.history = state_dict.get("history", [])
        self._shadow_state = state_dict.get("shadow_state")

    # ------------------------------------------------------------------ the audit
    def audit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Run the audit now and log it; returns the results of this audit."""
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "arrays"):
            raise ValueError(
                "CrossbarAudit needs an nvmpriv MembershipDataModule (data.class_path nvmpriv.data.*)"
            )
        net: nn.Module = pl_module.net  # type: ignore[assignment]
        start = time.perf_counter()
        self._limits = self._budget(bool(getattr(trainer, "fast_dev_run", False)))
        # Lightning validates under inference_mode; the audit leaves it so that PGD and the
        # shadow model can use autograd on ordinary tensors (it runs under no_grad otherwise).
        with preserved_state(pl_module), torch.inference_mode(False), torch.no_grad():
            pl_module.eval()
            sets = self._sample_sets(dm)
            shadow_net = self._shadow(pl_module, dm, sets) if self.shadow_epochs else None
            results = self._audit_configs(trainer, pl_module, net, shadow_net, sets)
        results["seconds"] = time.perf_counter() - start
        results["epoch"] = _trained_epoch(trainer, self._checkpoint_epoch)
        results["global_step"] = trainer.global_step
        restored = _restored_epoch(trainer)
        if restored is not None:
            results["restored_best_epoch"] = restored
        self.results = results
        self._audited_weights = weights_fingerprint(net)
        self.history.append(
            {k: v for k, v in results.items() if k != "configs"}
            | {"summary": self._flat_metrics(results)}
        )
        self._log(trainer, pl_module, results)
        return results

    def _budget(self, quick: bool) -> dict[str, int]:
        """Sample and epoch budgets of one audit; ``fast_dev_run`` only checks that it runs."""
        limits = {
            "samples": self.max_samples,
            "calibration": self.calibration_samples,
            "layers": self.layer_samples,
            "shadow_epochs": self.shadow_epochs or 0,
            "adversarial": self.adversarial_samples,
        }
        if quick:
            limits = {k: min(v, 1 if k == "shadow_epochs" else 32) for k, v in limits.items()}
        return limits

    def _sample_sets(self, dm: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        sets = {}
        for key, role in (
            ("members", "target_train"),
            ("nonmembers", "target_test"),
            ("shadow_members", "shadow_train"),
            ("shadow_nonmembers", "shadow_test"),
        ):
            sets[key] = dm.arrays(role, limit=self._limits["samples"])
        sets["calibration"] = dm.arrays("target_train", limit=self._limits["calibration"])
        return sets

    def _shadow(self, pl_module: pl.LightningModule, dm: Any, sets: dict[str, Any]) -> nn.Module:
        """The attacker's shadow model: same architecture, trained on ``shadow_train``."""
        from nvmpriv.attack_models import train_classifier

        net: nn.Module = pl_module.net  # type: ignore[assignment]
        template = copy.deepcopy(net).cpu()
        if self._shadow_state is None:
            x, y = dm.arrays("shadow_train")
            with torch.enable_grad():
                shadow = train_classifier(
                    lambda: _reset_parameters(copy.deepcopy(template)),
                    x,
                    y,
                    epochs=self._limits["shadow_epochs"],
                    lr=self.shadow_lr,
                    batch_size=int(getattr(dm, "batch_size", 64)),
                    seed=self._shadow_seed(),
                )
            self._shadow_state = {
                k: v.detach().cpu().clone() for k, v in shadow.state_dict().items()
            }
        template.load_state_dict(self._shadow_state)
        return template.to(pl_module.device).eval()

    def _shadow_seed(self) -> int:
        if self.shadow_seed is not None:
            return int(self.shadow_seed)
        # Lightning's seed_everything records the run's seed here (also in DDP workers).
        return int(os.environ.get("PL_GLOBAL_SEED", "0"))

    def _outputs(self, pl_module: pl.LightningModule, net: nn.Module, x: np.ndarray) -> np.ndarray:
        """Logits of ``net`` on ``x``, sharded over DDP ranks and gathered in sample order."""
        trainer = pl_module.trainer
        world, rank = trainer.world_size, trainer.global_rank
        idx = _shard(len(x), rank, world) if world > 1 else np.arange(len(x))
        device = pl_module.device
        chunks = []
        for start in range(0, len(idx), 512):
            batch = torch.as_tensor(x[idx[start : start + 512]], device=device)
            chunks.append(net(batch).float())
        logits = torch.cat(chunks)
        if world > 1:
            gathered: torch.Tensor = pl_module.all_gather(logits)  # type: ignore[assignment]
            logits = gathered.permute(1, 0, 2).reshape(-1, logits.shape[-1])[: len(x)]
        return logits.detach().cpu().double().numpy()

    def _audit_configs(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        net: nn.Module,
        shadow_net: nn.Module | None,
        sets: dict[str, tuple[np.ndarray, np.ndarray]],
    ) -> dict[str, Any]:
        device = pl_module.device
        calib = torch.as_tensor(sets["calibration"][0], device=device)
        configs: dict[str, Any] = {}
        names = [DIGITAL, *self.configs]
        adv = self._adversarial_inputs(pl_module, net, sets) if self.adversarial_eps else {}
        for name in names:
            cfg = self.configs.get(name)
            if cfg is None:
                entry = self._audit_one(pl_module, net, shadow_net, sets, adv)
            else:
                # convert() programs a copy, so the trained net itself is never touched.
                chip = convert(net, cfg, seed=self.chip_seed, calibration=calib)
                shadow_chip = None
                if shadow_net is not None:
                    # The attacker runs its shadow on its own chip of the same design.
                    shadow_chip = convert(
                        shadow_net, cfg, seed=self.chip_seed + 7919, calibration=calib
                    )
                entry = self._audit_one(pl_module, chip, shadow_chip, sets, adv)
                if self._limits["layers"]:
                    x = torch.as_tensor(
                        sets["nonmembers"][0][: self._limits["layers"]], device=device
                    )
                    noise = layer_noise(net, chip, x)
                    entry["layers"] = {
                        layer: {"snr_db": v.snr_db, "ns": v.noise_sensitivity}
                        for layer, v in noise.items()
                    }
                    # results.json sorts its keys; this keeps the network's order for plots
                    entry["layer_order"] = list(noise)
                entry["nf"] = self._nf(name, cfg)
            configs[name] = entry
        digital_acc = configs[DIGITAL]["acc"]
        for entry in configs.values():
            entry["acc_drop"] = digital_acc - entry["acc"]
        return {
            "configs": configs,
            "attacks": list(self.attacks),
            "chip_seed": self.chip_seed,
            "threshold_source": "shadow" if shadow_net is not None else "cv",
            "n_members": len(sets["members"][1]),
            "n_nonmembers": len(sets["nonmembers"][1]),
        }

    def _nf(self, name: str, cfg: CrossbarConfig) -> float:
        if name not in self._nf_cache:
            self._nf_cache[name] = float(nonideality_factor(cfg, seed=self.chip_seed))
        return self._nf_cache[name]

    def _adversarial_inputs(
        self, pl_module: pl.LightningModule, net: nn.Module, sets: dict[str, Any]
    ) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
        """Non-adaptive PGD examples: gradients from the digital model, reused on every chip."""
        from nvmpriv.adversarial import pgd_attack

        x_np, y_np = sets["nonmembers"]
        n = self._limits["adversarial"]
        x = torch.as_tensor(x_np[:n], device=pl_module.device)
        y = torch.as_tensor(y_np[:n], device=pl_module.device)
        lo, hi = float(x.min()), float(x.max())
        clamp = (min(lo, 0.0), max(hi, 1.0))
        gen = torch.Generator(device=x.device).manual_seed(self.chip_seed)
        out = {}
        for eps in self.adversarial_eps:
            if eps == 0:
                out[eps] = (x, y)
                continue
            with torch.enable_grad():
                x_adv = pgd_attack(
                    net,
                    x.clone(),
                    y.clone(),
                    eps=eps,
                    alpha=2.5 * eps / self.adversarial_steps,
                    steps=self.adversarial_steps,
                    clamp=clamp,
                    generator=gen,
                )
            out[eps] = (x_adv.detach(), y)
        return out

    def _audit_one(
        self,
        pl_module: pl.LightningModule,
        net: nn.Module,
        shadow_net: nn.Module | None,
        sets: dict[str, tuple[np.ndarray, np.ndarray]],
        adv: dict[float, tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[str, Any]:
        (xm, ym), (xn, yn) = sets["members"], sets["nonmembers"]
        logits_m = self._outputs(pl_module, net, xm)
        logits_n = self._outputs(pl_module, net, xn)
        entry: dict[str, Any] = {
            "acc": float((logits_n.argmax(1) == yn).mean()),
            "train_acc": float((logits_m.argmax(1) == ym).mean()),
        }
        shadow_kwargs: dict[str, Any] = {}
        if shadow_net is not None:
            (xsm, ysm), (xsn, ysn) = sets["shadow_members"], sets["shadow_nonmembers"]
            shadow_kwargs = {
                "shadow_member_outputs": self._outputs(pl_module, shadow_net, xsm),
                "shadow_member_labels": ysm,
                "shadow_nonmember_outputs": self._outputs(pl_module, shadow_net, xsn),
                "shadow_nonmember_labels": ysn,
            }
        inputs = mia.AttackInputs(logits_m, ym, logits_n, yn, kind="logits", **shadow_kwargs)
        attacks: dict[str, Any] = {}
        for name in self.attacks:
            result = mia.run_attack(name, inputs)
            accuracy = result.accuracy
            if accuracy is None:
                accuracy = _cv_accuracy(result, inputs, name)
            # A TPR at an FPR below 1/n_nonmembers is not measured (see AttackResult.to_dict):
            # None here, so neither results.json nor TensorBoard shows it as one.
            unmeasurable = result.unmeasurable()
            attacks[name] = {
                "acc": float(accuracy),
                "acc_upper": float(result.accuracy_upper_bound),
                "auc": float(result.auc),
                "tpr@0.1%fpr": None
                if "tpr_at_01pct_fpr" in unmeasurable
                else float(result.tpr_at_01pct_fpr),
                "tpr@1%fpr": None
                if "tpr_at_1pct_fpr" in unmeasurable
                else float(result.tpr_at_1pct_fpr),
                "tpr@0fpr": float(result.tpr_at_zero_fpr),
                "degenerate": result.degenerate,
                "degenerate_reason": result.degenerate_reason,
                "threshold_source": result.threshold_source
                if result.accuracy is not None
                else "cv",
                "roc": (result.fpr, result.tpr),
            }
        entry["attacks"] = attacks
        entry["confidence"] = {
            "members": mia.softmax(logits_m)[np.arange(len(ym)), ym],
            "nonmembers": mia.softmax(logits_n)[np.arange(len(yn)), yn],
        }
        if adv:
            entry["adversarial"] = {}
            for eps, (x_adv, y_adv) in adv.items():
                logits = net(x_adv).argmax(1)
                entry["adversarial"][f"{eps:g}"] = float((logits == y_adv).float().mean())
        return entry

    # ------------------------------------------------------------------ logging and output
    @staticmethod
    def _flat_metrics(results: dict[str, Any]) -> dict[str, float]:
        flat: dict[str, float] = {}
        for cfg, entry in results["configs"].items():
            flat[f"xbar/{cfg}/acc"] = entry["acc"]
            flat[f"xbar/{cfg}/train_acc"] = entry["train_acc"]
            flat[f"xbar/{cfg}/acc_drop"] = entry["acc_drop"]
            if "nf" in entry:
                flat[f"xbar/{cfg}/nf"] = entry["nf"]
            for layer, values in entry.get("layers", {}).items():
                flat[f"xbar/{cfg}/snr_db/{layer}"] = values["snr_db"]
                flat[f"xbar/{cfg}/ns/{layer}"] = values["ns"]
            for attack, values in entry["attacks"].items():
                for key in ("acc", "auc", "tpr@0.1%fpr", "tpr@1%fpr", "tpr@0fpr", "acc_upper"):
                    if values.get(key) is not None:  # unmeasured TPRs are left out, not logged
                        flat[f"mia/{cfg}/{attack}/{key}"] = values[key]
            for eps, acc in entry.get("adversarial", {}).items():
                flat[f"adv/{cfg}/eps_{eps}/acc"] = acc
        return flat

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, results: dict[str, Any]
    ) -> None:
        if not trainer.is_global_zero:
            return
        metrics = self._flat_metrics(results)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        experiment = self._tensorboard(trainer)
        if experiment is None:
            return
        step = trainer.global_step
        for cfg, entry in results["configs"].items():
            conf = entry["confidence"]
            experiment.add_histogram(f"mia/{cfg}/confidence/members", conf["members"], step)
            experiment.add_histogram(f"mia/{cfg}/confidence/nonmembers", conf["nonmembers"], step)
        if self.figures:
            from nvmpriv.plots import confidence_figure, layer_metrics_figure, roc_figure

            for cfg, entry in results["configs"].items():
                experiment.add_figure(f"figures/{cfg}/roc", roc_figure(entry["attacks"], cfg), step)
                experiment.add_figure(
                    f"figures/{cfg}/confidence", confidence_figure(entry["confidence"], cfg), step
                )
                if entry.get("layers"):
                    experiment.add_figure(
                        f"figures/{cfg}/layers", layer_metrics_figure(entry["layers"], cfg), step
                    )

    @staticmethod
    def _tensorboard(trainer: pl.Trainer) -> Any:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def results_json(self) -> dict[str, Any]:
        """The last audit in JSON-safe form (no ROC arrays or per-sample confidences)."""
        if not self.results:
            return {}
        configs = {}
        for cfg, entry in self.results["configs"].items():
            configs[cfg] = {
                key: value for key, value in entry.items() if key not in ("attacks", "confidence")
            }
            configs[cfg]["attacks"] = {
                name: {k: v for k, v in values.items() if k != "roc"}
                | ({"roc": _thin_roc(values["roc"])} if "roc" in values else {})
                for name, values in entry["attacks"].items()
            }
        out = {k: v for k, v in self.results.items() if k != "configs"}
        out["configs"] = configs
        return out

    def _finish(self, trainer: pl.Trainer) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must take part
        if not trainer.is_global_zero or not self.results:
            return
        payload = self.results_json()
        folder = Path(log_dir or trainer.default_root_dir)
        splits = getattr(getattr(trainer, "datamodule", None), "splits", None)
        payload["split_hash"] = splits.split_hash if splits is not None else None
        payload["crossbars"] = {n: c.to_dict() for n, c in self.configs.items()}
        # strict JSON: an exact crossbar's infinite SNR is written as null
        atomic_write_json(folder / "results.json", payload)
        if self.print_table:
            print(format_table(payload))


def _thin_roc(roc: Any, points: int = 200) -> dict[str, list[float]]:
    """At most ``points`` ROC points, log-spaced in index so the low-FPR end stays resolved.

    Accepts ``(fpr, tpr)`` arrays or an already thinned ``{"fpr": ..., "tpr": ...}`` (a resumed
    run's state).
    """
    if isinstance(roc, dict):
        return roc
    fpr, tpr = np.asarray(roc[0], dtype=float), np.asarray(roc[1], dtype=float)
    if len(fpr) > points:
        idx = np.unique(np.geomspace(1, len(fpr), points).astype(int) - 1)
        fpr, tpr = fpr[idx], tpr[idx]
    return {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}


def _cv_accuracy(result: mia.AttackResult, inputs: mia.AttackInputs, name: str) -> float:
    """Held-out accuracy of a threshold attack without a shadow model (2-fold cross-validation).

    Attacks with no single score (none of the audit's defaults) fall back to the labelled upper
    bound.
    """
    from nvmpriv.attacks.threshold import SCORE_FUNCTIONS

    score = name if name in SCORE_FUNCTIONS else "correctness" if name == "gap" else None
    if score is None:
        return float(result.accuracy_upper_bound)
    fn = SCORE_FUNCTIONS[score]
    return mia.cross_validated_accuracy(fn(inputs.split("member")), fn(inputs.split("nonmember")))


def format_table(payload: dict[str, Any]) -> str:
    """A plain-text table of accuracy and MIA figures per crossbar config.

    Args:
        payload: The ``results.json`` contents.

    Returns:
        The table.
    """
    attacks = payload.get("attacks", [])
    head = f"{'config':16s} {'acc':>6s} {'drop':>6s} {'nf':>6s} " + " ".join(
        f"{a[:14] + ' acc/auc':>22s}" for a in attacks
    )
    lines = [head, "-" * len(head)]
    degenerate = False
    for cfg, entry in payload["configs"].items():
        nf = entry.get("nf")
        row = f"{cfg:16s} {entry['acc']:6.3f} {entry['acc_drop']:6.3f} "
        row += f"{nf:6.3f} " if nf is not None else f"{'-':>6s} "
        cells = []
        for a in attacks:
            values = entry["attacks"][a]
            # the mark sits on the accuracy: a one-sided rule makes it 0.5 whatever the AUC
            mark = "!" if values.get("degenerate") else " "
            degenerate = degenerate or mark == "!"
            cells.append(f"{values['acc']:9.3f}{mark}/{values['auc']:<11.3f}")
        lines.append(row + " ".join(cells))
    source = payload.get("threshold_source", "")
    lines.append(f"(MIA acc: threshold from {source}; acc = non-member accuracy; drop vs digital)")
    if degenerate:
        lines.append(
            "(! degenerate attack: constant scores, or a rule calling every sample a member or "
            "none; its accuracy 0.5 is by construction, see degenerate_reason in results.json)"
        )
    return "\n".join(lines)


class FiniteLossGuard(Callback):
    """Stop training at the first non-finite training loss, naming the step and last checkpoint.

    The check runs before the backward pass, so the weights of the last good step are kept.
    """

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        """Check the step's loss before it can reach the weights."""
        if not torch.isfinite(loss.detach()).all():
            ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none yet"
            raise FloatingPointError(
                f"non-finite training loss at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}; lower the learning rate and resume from the last good "
                f"checkpoint ({ckpt})"
            )


def _checkpoint_epoch(checkpoint: dict[str, Any]) -> int | None:
    """0-based index of the last epoch a Lightning checkpoint's weights were trained in."""
    try:
        return max(
            int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["ready"]) - 1, 0
        )
    except (KeyError, TypeError, ValueError):
        epoch = checkpoint.get("epoch")
        return int(epoch) if isinstance(epoch, int) else None


def _trained_epoch(trainer: pl.Trainer, checkpoint_epoch: int | None) -> int | None:
    """0-based index of the last epoch the audited weights were trained in.

    ``trainer.current_epoch`` is that index during validation but the count of finished epochs
    once ``fit`` ends (and 0 in ``validate``/``test``, which restore no loop state), so ``fit``
    reads the fit loop's epoch counter, and the other commands the checkpoint's
    (``checkpoint_epoch``; ``None`` without a checkpoint).
    """
    if trainer.state.fn == "fit":
        return max(trainer.fit_loop.epoch_progress.current.ready - 1, 0)
    return checkpoint_epoch


def _restored_epoch(trainer: pl.Trainer) -> int | None:
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, RestoreBestWeights) and cb.restored:
            return cb.best_epoch
    return None


class RestoreBestWeights(Callback):
    """When training ends, load the weights of the epoch with the best monitored metric.

    Like Keras' ``EarlyStopping(restore_best_weights=True)``; pair it with Lightning's
    ``EarlyStopping``. It acts in ``on_train_end``, before the ``on_fit_end`` of the audit and the
    ONNX export, so both see the restored model. ``last.ckpt`` still holds the last epoch's
    weights; ``ModelCheckpoint(monitor=...)`` saves the best ones to disk.

    Args:
        monitor: Logged validation metric (``val/acc``, ``val/loss``, ...).
        mode: ``"max"`` or ``"min"``.

    Raises:
        ValueError: On another ``mode``.
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max") -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} is invalid: choose 'max' or 'min'")
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.restored = False
        self._state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep a copy of the weights when the monitored metric improves (strictly)."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise ValueError(
                f"RestoreBestWeights: monitor {self.monitor!r} is not logged (logged: {logged}); "
                "set monitor to one of them"
            )
        v = float(value)
        better = self.best is None or (v > self.best if self.mode == "max" else v < self.best)
        if better and math.isfinite(v):
            self.best, self.best_epoch = v, trainer.current_epoch
            self._state = {k: t.detach().cpu().clone() for k, t in pl_module.state_dict().items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load the best weights back into the model."""
        if self._state is None:
            return
        pl_module.load_state_dict(self._state)
        self.restored = True
        rank_zero_info(
            f"RestoreBestWeights: restored the weights of epoch {self.best_epoch} "
            f"({self.monitor} {self.best:.4f})"
        )

    def state_dict(self) -> dict[str, Any]:
        """Best value, epoch and weights, so a resumed run keeps its best so far."""
        return {"best": self.best, "best_epoch": self.best_epoch, "weights": self._state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.best = state_dict.get("best")
        self.best_epoch = state_dict.get("best_epoch")
        self._state = state_dict.get("weights")


class LastEpochCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is always the latest training state.

    In Lightning 2.6.6 (the version installed here) ``ModelCheckpoint(monitor=...,
    save_last=True)`` writes ``last.ckpt`` only in the epochs where a top-k checkpoint is saved,
    i.e. when the monitored metric improves: ``last.ckpt`` then holds the best epoch, ``fit
    --ckpt_path last`` resumes from there (retraining the later epochs), and an export of
    ``last.ckpt`` is not the model that ``fit`` left. This subclass writes ``last.ckpt``
    wherever the parent checks for a save (every validation, or every training epoch end) even
    when no top-k file was written, and once more when training ends after steps that no
    validation followed (``check_val_every_n_epoch`` > 1). Its state key is the parent's, so
    checkpoints written with Lightning's class resume with this one and back. All arguments are
    Lightning's, except ``save_last: link`` (a link to the best file is what this class
    avoids).

    Raises:
        ValueError: On ``save_last="link"``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.save_last == "link":
            raise ValueError(
                "LastEpochCheckpoint: save_last='link' would point last.ckpt at the best "
                "checkpoint; use save_last: true"
            )

    @property
    def state_key(self) -> str:
        """The key Lightning's own ``ModelCheckpoint`` with these arguments uses."""
        own = type(self).__qualname__
        return super().state_key.replace(own, _LightningModelCheckpoint.__qualname__, 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's save, then ``last.ckpt`` if it was skipped."""
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_missed_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's save, then ``last.ckpt`` if it was skipped."""
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_missed_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``last.ckpt`` of the final step when no save followed it."""
        super().on_train_end(trainer, pl_module)
        # checkpoint callbacks run last: restored best weights are not the final step's
        if not any(isinstance(cb, RestoreBestWeights) and cb.restored for cb in trainer.callbacks):  # type: ignore[attr-defined]
            self._save_missed_last(trainer)

    def _save_missed_last(self, trainer: pl.Trainer) -> None:
        # _should_skip_saving_checkpoint is also true when a file was written at this step
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class WritePredictions(BasePredictionWriter):
    """Save what ``predict`` computes: ``<run folder>/predictions.npz``.

    LightningCLI's ``predict`` keeps the predictions in memory only. This writer stores
    ``probabilities`` ``[N, C]`` (float32, the softmax of the net, in the order of the data
    module's predict loader: ``target_test``, not shuffled), ``labels`` ``[N]`` when the data
    module can give them and ``role``, atomically. ``python -m nvmpriv predict`` adds it when a
    config lists none.

    Args:
        filename: File name inside the run's log folder.
    """

    def __init__(self, filename: str = "predictions.npz") -> None:
        super().__init__(write_interval="epoch")
        if not filename.endswith(".npz") or Path(filename).name != filename:
            raise ValueError(f"filename={filename!r}: give a bare file name ending in .npz")
        self.filename = filename
        self.path: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse several processes: each would hold an interleaved, padded shard of the rows."""
        if stage == "predict" and trainer.world_size > 1:
            raise ValueError(
                f"WritePredictions: predict on one device (--trainer.devices=1), not "
                f"{trainer.world_size}; the rows would be split between processes"
            )

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Concatenate the batches and write the file (one process: see :meth:`setup`)."""
        batches: Sequence[Any] = predictions
        if predictions and isinstance(predictions[0], list):  # one list per dataloader
            if len(predictions) > 1:
                raise ValueError(
                    f"WritePredictions: {len(predictions)} predict dataloaders; it writes one"
                )
            batches = predictions[0]
        probs = torch.cat([torch.as_tensor(b) for b in batches]).float().cpu().numpy()
        arrays: dict[str, np.ndarray] = {"probabilities": probs, "role": np.array("target_test")}
        dm: Any = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "indices") and hasattr(dm, "raw"):
            labels = dm.raw.labels[dm.indices("target_test")]  # labels only, no features
            if len(labels) == len(probs):
                arrays["labels"] = np.asarray(labels)
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        self.path = atomic_save_npz(folder / self.filename, **arrays)
        rank_zero_info(f"WritePredictions: wrote {self.path} ({len(probs)} rows)")
