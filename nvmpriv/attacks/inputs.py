"""Containers for what an attacker observed: target outputs, shadow outputs, reference models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from nvmpriv.attacks._validate import (
    AttackInputError,
    check_labels,
    check_logits,
    check_probabilities,
)
from nvmpriv.attacks.scores import EPS, log_softmax, logit_scaled_confidence, softmax

__all__ = ["AttackInputs", "ReferenceScores", "SplitOutputs"]

OutputKind = Literal["probs", "logits"]


@dataclass(frozen=True)
class SplitOutputs:
    """Validated outputs of one model on one sample set.

    Attributes:
        probs: Probabilities ``[n, C]`` (softmax of the logits when logits were given).
        labels: True labels ``[n]``.
        logits: Logits ``[n, C]`` or ``None`` when only probabilities were observed.
    """

    probs: np.ndarray
    labels: np.ndarray
    logits: np.ndarray | None

    @property
    def phi(self) -> np.ndarray:
        """Logit-scaled confidence ``[n]``, from logits when available (exact near ``p_y = 1``)."""
        if self.logits is not None:
            return logit_scaled_confidence(self.logits, self.labels, from_logits=True)
        return logit_scaled_confidence(self.probs, self.labels)

    def log_probs(self) -> np.ndarray:
        """Log-probabilities ``[n, C]``: exact from logits, else ``log max(p, EPS)``."""
        if self.logits is not None:
            return log_softmax(self.logits)
        return np.log(np.maximum(self.probs, EPS))

    def p_true_at(self, temperature: float = 1.0) -> np.ndarray:
        """True-label probability of ``softmax(logits / temperature)``, shape ``[n]``.

        Probabilities determine the logits up to a per-row constant, so this is exact for
        outputs observed as probabilities too (up to the ``EPS`` floor).

        Args:
            temperature: Softmax temperature (dimensionless, > 0).

        Returns:
            ``p_T(y | x)`` per sample.
        """
        idx = np.arange(self.labels.size)
        if temperature == 1.0:
            return self.probs[idx, self.labels]
        return softmax(self.log_probs(), temperature)[idx, self.labels]

    @classmethod
    def from_outputs(
        cls, outputs: object, labels: object, kind: OutputKind, name: str
    ) -> SplitOutputs:
        """Validate raw outputs.

        Args:
            outputs: Probabilities or logits ``[n, C]``.
            labels: True labels ``[n]``.
            kind: ``"probs"`` or ``"logits"``.
            name: Field name for error messages.

        Returns:
            The validated split.

        Raises:
            AttackInputError: On malformed outputs or labels, or an empty set.
        """
        if kind == "probs":
            probs = check_probabilities(outputs, f"{name}_outputs")
            logits = None
        elif kind == "logits":
            logits = check_logits(outputs, f"{name}_outputs")
            probs = softmax(logits)
        else:
            raise AttackInputError(f"kind must be 'probs' or 'logits', got {kind!r}")
        if probs.shape[0] == 0:
            raise AttackInputError(
                f"{name}_outputs is empty; every given sample set needs at least one sample"
            )
        y = check_labels(labels, probs.shape[0], probs.shape[1], f"{name}_labels")
        return cls(probs=probs, labels=y, logits=logits)


@dataclass(frozen=True)
class ReferenceScores:
    """Outputs of ``R`` reference (shadow) models on ``N`` samples, for LiRA and RMIA.

    Attributes:
        phi: Logit-scaled confidence ``[R, N]`` of each reference model on each sample.
        p_true: Probability of the true label ``[R, N]``, in ``[0, 1]``.
        in_mask: ``[R, N]`` bool, True where the sample was in that model's training set.
        log_probs: Log-probabilities of every class ``[R, N, C]``, or ``None`` when only the
            true-label probabilities were kept; needed for tempered probabilities
            (:meth:`p_true_at`).
    """

    phi: np.ndarray
    p_true: np.ndarray
    in_mask: np.ndarray
    log_probs: np.ndarray | None = None

    def __post_init__(self) -> None:
        phi = np.asarray(self.phi, dtype=np.float64)
        p = np.asarray(self.p_true, dtype=np.float64)
        mask = np.asarray(self.in_mask)
        if phi.ndim != 2 or phi.shape[0] < 1 or phi.shape[1] < 1:
            raise AttackInputError(
                f"reference phi must have shape [n_ref>=1, n_samples>=1], got {phi.shape}"
            )
        if p.shape != phi.shape or mask.shape != phi.shape:
            raise AttackInputError(
                f"reference p_true {p.shape} and in_mask {mask.shape} must match phi {phi.shape}"
            )
        if not (np.all(np.isfinite(phi)) and np.all(np.isfinite(p))):
            raise AttackInputError("reference phi/p_true contain NaN or inf; they must be finite")
        if p.min() < -1e-6 or p.max() > 1 + 1e-6:
            raise AttackInputError(
                f"reference p_true has values in [{p.min():.4g}, {p.max():.4g}], allowed [0, 1]"
            )
        if mask.dtype != bool:
            raise AttackInputError(f"reference in_mask must be boolean, got dtype {mask.dtype}")
        if self.log_probs is not None:
            lp = np.asarray(self.log_probs, dtype=np.float64)
            if lp.ndim != 3 or lp.shape[:2] != phi.shape or lp.shape[2] < 2:
                raise AttackInputError(
                    f"reference log_probs must have shape {(*phi.shape, 'C>=2')}, got {lp.shape}"
                )
            if not np.all(np.isfinite(lp)) or lp.max() > 1e-6:
                raise AttackInputError("reference log_probs must be finite and <= 0")
            object.__setattr__(self, "log_probs", lp)
        object.__setattr__(self, "phi", phi)
        object.__setattr__(self, "p_true", np.clip(p, 0.0, 1.0))
        object.__setattr__(self, "in_mask", mask)

    @property
    def n_ref(self) -> int:
        """Number of reference models ``R``."""
        return int(self.phi.shape[0])

    @property
    def n_samples(self) -> int:
        """Number of samples ``N``."""
        return int(self.phi.shape[1])

    @classmethod
    def from_outputs(
        cls, outputs: object, labels: object, in_mask: object, *, kind: OutputKind = "probs"
    ) -> ReferenceScores:
        """Build from full model outputs.

        Args:
            outputs: Probabilities or logits ``[R, N, C]``.
            labels: True labels ``[N]``.
            in_mask: ``[R, N]`` bool membership of each sample in each model's training set.
            kind: ``"probs"`` or ``"logits"``.

        Returns:
            The reference scores.

        Raises:
            AttackInputError: On malformed outputs, labels or mask.
        """
        out = np.asarray(outputs, dtype=np.float64)
        if out.ndim != 3:
            raise AttackInputError(
                f"reference outputs must have shape [n_ref, n_samples, n_classes], got {out.shape}"
            )
        phis, ps, lps = [], [], []
        for r in range(out.shape[0]):
            split = SplitOutputs.from_outputs(out[r], labels, kind, f"reference[{r}]")
            phis.append(split.phi)
            ps.append(split.p_true_at(1.0))
            lps.append(split.log_probs())
        return cls(
            phi=np.stack(phis),
            p_true=np.stack(ps),
            in_mask=np.asarray(in_mask),
            log_probs=np.stack(lps),
        )

    def p_true_at(self, temperature: float = 1.0) -> np.ndarray:
        """True-label probabilities ``[R, N]`` of ``softmax(logits / temperature)``.

        Args:
            temperature: Softmax temperature (dimensionless, > 0).

        Returns:
            ``p_true`` itself at temperature 1, else the tempered probabilities.

        Raises:
            AttackInputError: If ``temperature != 1`` and the full outputs were not kept.
        """
        if temperature == 1.0:
            return self.p_true
        if not temperature > 0:
            raise AttackInputError(f"temperature must be > 0, got {temperature}")
        if self.log_probs is None:
            raise AttackInputError(
                f"temperature {temperature} needs the reference models' full outputs: build "
                "ReferenceScores with from_outputs (or pass log_probs), or use temperature 1"
            )
        scaled = self.log_probs / temperature
        top = scaled.max(axis=2)
        log_norm = top + np.log(np.exp(scaled - top[..., None]).sum(axis=2))
        log_true = np.log(np.maximum(self.p_true, EPS)) / temperature
        return np.exp(np.minimum(log_true - log_norm, 0.0))

    def without(self, j: int) -> ReferenceScores:
        """Return the scores of all reference models except model ``j``.

        Args:
            j: Index of the model to drop.

        Returns:
            Scores of ``R - 1`` models.
        """
        keep = np.arange(self.n_ref) != j
        lp = None if self.log_probs is None else self.log_probs[keep]
        return ReferenceScores(self.phi[keep], self.p_true[keep], self.in_mask[keep], lp)


@dataclass(frozen=True)
class AttackInputs:
    """Everything a score-based attack may use, validated once at construction.

    The target is represented only by its outputs (probabilities, or logits with
    ``kind="logits"``) on known members and non-members. Shadow outputs (the attacker's own
    shadow model on its own member/non-member data) calibrate thresholds. ``reference`` holds the
    attacker's reference models' scores on the target candidates, ordered members first then
    non-members; ``calibration`` optionally holds the reference models' scores on their own
    training pool (leave-one-model-out threshold calibration for LiRA/RMIA); the population
    fields hold the target's and the reference models' outputs on population samples ``z``
    (RMIA).

    Raises:
        AttackInputError: On any malformed field (see ``nvmpriv.attacks._validate``).
    """

    member_outputs: np.ndarray
    member_labels: np.ndarray
    nonmember_outputs: np.ndarray
    nonmember_labels: np.ndarray
    shadow_member_outputs: np.ndarray | None = None
    shadow_member_labels: np.ndarray | None = None
    shadow_nonmember_outputs: np.ndarray | None = None
    shadow_nonmember_labels: np.ndarray | None = None
    reference: ReferenceScores | None = None
    calibration: ReferenceScores | None = None
    population_outputs: np.ndarray | None = None
    population_labels: np.ndarray | None = None
    population_reference: ReferenceScores | None = None
    kind: OutputKind = "probs"
    queries: int | None = None

    def __post_init__(self) -> None:
        splits: dict[str, SplitOutputs] = {
            "member": SplitOutputs.from_outputs(
                self.member_outputs, self.member_labels, self.kind, "member"
            ),
            "nonmember": SplitOutputs.from_outputs(
                self.nonmember_outputs, self.nonmember_labels, self.kind, "nonmember"
            ),
        }
        for name in ("shadow_member", "shadow_nonmember", "population"):
            out, lab = getattr(self, f"{name}_outputs"), getattr(self, f"{name}_labels")
            if (out is None) != (lab is None):
                raise AttackInputError(
                    f"{name}_outputs and {name}_labels must be given together (one is None)"
                )
            if out is not None:
                splits[name] = SplitOutputs.from_outputs(out, lab, self.kind, name)
        if ("shadow_member" in splits) != ("shadow_nonmember" in splits):
            raise AttackInputError(
                "shadow data needs both members and non-members; give all four shadow_* fields"
            )
        n_classes = {s.probs.shape[1] for s in splits.values()}
        if len(n_classes) != 1:
            raise AttackInputError(
                f"all outputs must have the same number of classes, got {sorted(n_classes)}"
            )
        n_target = splits["member"].labels.size + splits["nonmember"].labels.size
        if self.reference is not None and self.reference.n_samples != n_target:
            raise AttackInputError(
                f"reference covers {self.reference.n_samples} samples but the target has "
                f"{n_target} (members then non-members); score exactly those samples"
            )
        if self.population_reference is not None:
            if "population" not in splits:
                raise AttackInputError(
                    "population_reference needs population_outputs/population_labels "
                    "(the target's outputs on the same samples)"
                )
            if self.population_reference.n_samples != splits["population"].labels.size:
                raise AttackInputError(
                    f"population_reference covers {self.population_reference.n_samples} samples "
                    f"but population_outputs has {splits['population'].labels.size}"
                )
            n_pref = self.population_reference.n_ref
            if self.reference is not None and n_pref != self.reference.n_ref:
                raise AttackInputError(
                    f"population_reference has {n_pref} models but "
                    f"reference has {self.reference.n_ref}; use the same reference models"
                )
        object.__setattr__(self, "_splits", splits)

    def split(self, name: str) -> SplitOutputs:
        """Validated outputs of one set.

        Args:
            name: ``member``, ``nonmember``, ``shadow_member``, ``shadow_nonmember`` or
                ``population``.

        Returns:
            The split.

        Raises:
            AttackInputError: If that set was not given.
        """
        splits: dict[str, SplitOutputs] = self._splits  # type: ignore[attr-defined]
        if name not in splits:
            raise AttackInputError(f"this attack needs {name} outputs, which were not given")
        return splits[name]

    @property
    def has_shadow(self) -> bool:
        """Whether shadow member and non-member outputs were given."""
        return "shadow_member" in self._splits  # type: ignore[attr-defined]

    @property
    def has_population(self) -> bool:
        """Whether the target's outputs on population samples were given."""
        return "population" in self._splits  # type: ignore[attr-defined]

    @property
    def n_classes(self) -> int:
        """Number of classes ``C``."""
        return int(self.split("member").probs.shape[1])

    def target_p_true(self, temperature: float = 1.0) -> np.ndarray:
        """Target's true-label probability on members then non-members ``[n_in + n_out]``.

        Args:
            temperature: Softmax temperature (see :meth:`SplitOutputs.p_true_at`).

        Returns:
            The probabilities, members first.
        """
        parts = [self.split(s) for s in ("member", "nonmember")]
        return np.concatenate([s.p_true_at(temperature) for s in parts])

    def target_phi(self) -> np.ndarray:
        """Target's logit-scaled confidence on members then non-members ``[n_in + n_out]``."""
        return np.concatenate([self.split("member").phi, self.split("nonmember").phi])
