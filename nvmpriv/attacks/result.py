"""The single result type returned by every membership-inference attack (numpy only)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nvmpriv.attacks._validate import check_nonempty_scores
from nvmpriv.attacks.metrics import (
    _counts,
    _tpr_at,
    decision_metrics,
    degenerate_reason,
    fpr_resolvable,
    nonmembers_needed,
)

__all__ = ["LOW_FPR_BUDGETS", "AttackResult", "result_from_scores"]

#: Result field -> its FPR budget (fraction). Each is reported only where it can be measured.
LOW_FPR_BUDGETS: dict[str, float] = {"tpr_at_1pct_fpr": 0.01, "tpr_at_01pct_fpr": 0.001}


def _json_value(v: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats to JSON-safe Python values."""
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, np.ndarray):
        return [_json_value(x) for x in v.tolist()]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    return v


@dataclass(frozen=True, eq=False)
class AttackResult:
    """Outcome of one membership-inference attack on a balanced or unbalanced target set.

    Decisions follow ``member iff score >= threshold``. ``accuracy``, ``precision``, ``recall``
    and ``f1`` use a decision rule fixed WITHOUT looking at the target's membership (threshold
    from shadow data, a reference-model calibration, or a fixed rule, see
    ``threshold_source``); they are ``None`` when no such rule was available.
    ``accuracy_upper_bound`` uses the best threshold on the target itself and is optimistic.

    Two honesty checks travel with the numbers (and into :meth:`to_dict` and :meth:`summary`):
    a TPR at an FPR budget below ``1 / n_nonmembers`` is not measured (:meth:`unmeasurable`),
    and an attack whose 0.5 comes by construction is flagged (:attr:`degenerate`).
    """

    name: str
    """Attack name (registry key)."""
    accuracy: float | None
    """Balanced accuracy ``(TPR + TNR) / 2`` at the attacker-side decision rule."""
    accuracy_upper_bound: float
    """Balanced accuracy at the best threshold(s) chosen on the target (upper bound)."""
    auc: float
    """ROC AUC of the membership scores (0.5 = chance)."""
    tpr_at_1pct_fpr: float
    """Highest TPR on the empirical ROC at FPR <= 1 %. With fewer than 100 non-members this is
    the TPR at zero false positives, not a measured TPR at 1 % FPR: :meth:`to_dict` then writes
    ``None`` (see :meth:`unmeasurable`)."""
    tpr_at_01pct_fpr: float
    """Highest TPR on the empirical ROC at FPR <= 0.1 %. With fewer than 1000 non-members this
    is the TPR at zero false positives, not a measured TPR at 0.1 % FPR: :meth:`to_dict` then
    writes ``None`` (see :meth:`unmeasurable`)."""
    precision: float | None
    """Precision of the attacker-side decision on the target sets."""
    recall: float | None
    """Recall (= TPR) of the attacker-side decision."""
    f1: float | None
    """F1 score of the attacker-side decision."""
    threshold: float | None
    """Attacker-side threshold in score units (``None`` if none, or per-class)."""
    threshold_source: str
    """Where the decision rule came from: ``shadow``, ``fixed rule``, ``reference calibration``,
    ``attack model (p >= 0.5)`` or ``none``."""
    threshold_upper_bound: float
    """Threshold of the upper-bound accuracy (score units)."""
    fpr: np.ndarray = field(repr=False)
    """ROC false-positive rates, non-decreasing, starting at 0."""
    tpr: np.ndarray = field(repr=False)
    """ROC true-positive rates matching ``fpr``."""
    n_members: int = 0
    """Number of target members scored."""
    n_nonmembers: int = 0
    """Number of target non-members scored."""
    queries: int | None = None
    """Queries made to the target model (``None`` if unknown, e.g. precomputed scores)."""
    seconds: float = 0.0
    """Wall-clock time of the attack in seconds (excluding the target's precomputed outputs)."""
    class_thresholds: tuple[float, ...] | None = None
    """Per-class thresholds (class-dependent attacks), index = class."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Attack-specific details (hyper-parameters, shadow accuracy, ...)."""
    degenerate_reason: str | None = None
    """Why the attack's 0.5 (AUC or accuracy) comes by construction, not from a measurement
    (constant scores, or a decision rule calling every sample a member or none); ``None`` when
    not degenerate. See :func:`nvmpriv.attacks.degenerate_reason`."""

    @property
    def degenerate(self) -> bool:
        """Whether the attack is degenerate (:attr:`degenerate_reason` is set)."""
        return self.degenerate_reason is not None

    @property
    def tpr_at_zero_fpr(self) -> float:
        """TPR with no false positive among the target's non-members (always measurable)."""
        return _tpr_at(self.fpr, self.tpr, 0.0)

    def unmeasurable(self) -> dict[str, str]:
        """The low-FPR fields this result cannot measure, each with the reason.

        Returns:
            ``{field: reason}`` for each field of :data:`LOW_FPR_BUDGETS` whose budget is below
            ``1 / n_nonmembers`` (:func:`nvmpriv.attacks.fpr_resolvable`); empty when all are
            measured.
        """
        n = self.n_nonmembers
        smallest = f"the smallest non-zero FPR is 1/{n} = {100 / n:.3g}%" if n else "none scored"
        out = {}
        for key, budget in LOW_FPR_BUDGETS.items():
            if not fpr_resolvable(budget, n):
                out[key] = (
                    f"FPR {budget * 100:g}% needs >= {nonmembers_needed(budget)} non-members, "
                    f"got {n} ({smallest}); tpr_at_zero_fpr is the TPR at zero false positives"
                )
        return out

    def to_dict(self, *, max_roc_points: int | None = 2000) -> dict[str, Any]:
        """Return a JSON-safe dict (non-finite floats become ``None``).

        Args:
            max_roc_points: Thin the ROC to about this many points, log-spaced in index so the
                low-FPR region used by log-log plots is kept; ``None`` keeps every point.

        Returns:
            Dict of plain Python values: every field but the ROC arrays (``roc_fpr``, ``roc_tpr``
            instead), ``None`` for each field of :meth:`unmeasurable`, plus ``tpr_at_zero_fpr``,
            ``unmeasurable`` (``{field: reason}``) and ``degenerate`` (bool, reason in
            ``degenerate_reason``).
        """
        fpr, tpr = self.fpr, self.tpr
        if max_roc_points is not None and fpr.size > max_roc_points:
            keep = np.unique(
                np.concatenate(
                    [
                        np.geomspace(1, fpr.size, max_roc_points).astype(np.int64) - 1,
                        [0, fpr.size - 1],
                    ]
                )
            )
            fpr, tpr = fpr[keep], tpr[keep]
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("fpr", "tpr")}
        # Below 1/n_nonmembers the ROC read-off is the TPR at zero false positives, and zero
        # false positives in fewer than 1/FPR trials does not bound the FPR by the budget. LiRA's
        # and ML Privacy Meter's code print it as "TPR at 0.1% FPR" anyway; a reader of the JSON
        # would take it for a measurement. So the budgeted field is null with the reason under
        # ``unmeasurable``, and the number itself is kept under its true name, tpr_at_zero_fpr.
        unmeasurable = self.unmeasurable()
        for key in unmeasurable:
            out[key] = None
        out["tpr_at_zero_fpr"] = self.tpr_at_zero_fpr
        out["unmeasurable"] = unmeasurable
        out["degenerate"] = self.degenerate
        out["roc_fpr"] = fpr
        out["roc_tpr"] = tpr
        return _json_value(out)

    def summary(self) -> str:
        """One-line human-readable summary.

        Returns:
            e.g. ``"loss: acc=0.612 (shadow) ub=0.630 auc=0.655 tpr@1%=0.041 tpr@0.1%=0.004"``;
            an unmeasurable TPR reads ``n/a (<1000 non-members)``, and a degenerate attack ends
            with ``[DEGENERATE: reason]``.
        """
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.3f}"
        unmeasurable = self.unmeasurable()
        tprs = {
            key: (
                f"n/a (<{nonmembers_needed(budget)} non-members)"
                if key in unmeasurable
                else f"{getattr(self, key):.3f}"
            )
            for key, budget in LOW_FPR_BUDGETS.items()
        }
        line = (
            f"{self.name}: acc={acc} ({self.threshold_source}) "
            f"ub={self.accuracy_upper_bound:.3f} auc={self.auc:.3f} "
            f"tpr@1%={tprs['tpr_at_1pct_fpr']} tpr@0.1%={tprs['tpr_at_01pct_fpr']}"
        )
        if self.degenerate_reason is not None:
            line += f" [DEGENERATE: {self.degenerate_reason}]"
        return line


def result_from_scores(
    name: str,
    scores_in: object,
    scores_out: object,
    *,
    threshold: float | None = None,
    threshold_source: str | None = None,
    upper_bound: tuple[float, float] | None = None,
    class_thresholds: tuple[float, ...] | None = None,
    queries: int | None = None,
    seconds: float = 0.0,
    extra: dict[str, Any] | None = None,
) -> AttackResult:
    """Build an :class:`AttackResult` from target member/non-member scores.

    Args:
        name: Attack name.
        scores_in: Target members' scores ``[n_in]`` (higher = member).
        scores_out: Target non-members' scores ``[n_out]``.
        threshold: Attacker-side threshold (score units), or ``None`` for no decision rule.
        threshold_source: Label of where ``threshold`` came from (default ``shadow`` when a
            threshold is given, else ``none``).
        upper_bound: ``(threshold, accuracy)`` to report as the upper bound instead of the best
            global threshold on the target (used by class-dependent attacks).
        class_thresholds: Per-class thresholds to record.
        queries: Number of target queries used.
        seconds: Wall-clock time in seconds.
        extra: Attack-specific details.

    Returns:
        The filled result, with ``degenerate_reason`` set when the scores are constant or the
        decision rule calls every target sample a member (or none).

    Raises:
        AttackInputError: If a score set is empty or holds NaN.
    """
    s_in = check_nonempty_scores(scores_in, "member scores")
    s_out = check_nonempty_scores(scores_out, "non-member scores")
    thr, tps, fps = _counts(s_in, s_out)
    n_in, n_out = s_in.size, s_out.size
    fpr = np.concatenate([[0.0], fps / n_out])
    tpr = np.concatenate([[0.0], tps / n_in])
    auc = float(np.trapezoid(tpr, fpr))
    if upper_bound is None:
        k = int(np.argmax(tps * n_out + (n_out - fps) * n_in))
        upper_bound = (float(thr[k]), float(0.5 * (tps[k] / n_in + (n_out - fps[k]) / n_out)))
    if threshold is not None:
        m: dict[str, float | None] = dict(decision_metrics(s_in >= threshold, s_out >= threshold))
        source = threshold_source or "shadow"
    else:
        m = {"accuracy": None, "precision": None, "recall": None, "f1": None}
        source = threshold_source or "none"
    return AttackResult(
        name=name,
        accuracy=m["accuracy"],
        accuracy_upper_bound=upper_bound[1],
        auc=auc,
        tpr_at_1pct_fpr=_tpr_at(fpr, tpr, 0.01),
        tpr_at_01pct_fpr=_tpr_at(fpr, tpr, 0.001),
        precision=m["precision"],
        recall=m["recall"],
        f1=m["f1"],
        threshold=None if threshold is None else float(threshold),
        threshold_source=source,
        threshold_upper_bound=upper_bound[0],
        fpr=fpr,
        tpr=tpr,
        n_members=n_in,
        n_nonmembers=n_out,
        queries=queries,
        seconds=seconds,
        class_thresholds=class_thresholds,
        extra=dict(extra or {}),
        degenerate_reason=degenerate_reason(s_in, s_out, threshold),
    )
