"""The single result type returned by every membership-inference attack (numpy only)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nvmpriv.attacks._validate import check_nonempty_scores
from nvmpriv.attacks.metrics import _counts, _tpr_at, decision_metrics

__all__ = ["AttackResult", "result_from_scores"]


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
    """TPR at FPR <= 1 %."""
    tpr_at_01pct_fpr: float
    """TPR at FPR <= 0.1 % (equals TPR at FPR 0 when fewer than 1000 non-members)."""
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

    def to_dict(self, *, max_roc_points: int | None = 2000) -> dict[str, Any]:
        """Return a JSON-safe dict (non-finite floats become ``None``).

        Args:
            max_roc_points: Thin the ROC to about this many points, log-spaced in index so the
                low-FPR region used by log-log plots is kept; ``None`` keeps every point.

        Returns:
            Dict of plain Python values.
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
        out["roc_fpr"] = fpr
        out["roc_tpr"] = tpr
        return _json_value(out)

    def summary(self) -> str:
        """One-line human-readable summary.

        Returns:
            e.g. ``"loss: acc=0.612 (shadow) ub=0.630 auc=0.655 tpr@1%=0.041 tpr@0.1%=0.004"``.
        """
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.3f}"
        return (
            f"{self.name}: acc={acc} ({self.threshold_source}) "
            f"ub={self.accuracy_upper_bound:.3f} auc={self.auc:.3f} "
            f"tpr@1%={self.tpr_at_1pct_fpr:.3f} tpr@0.1%={self.tpr_at_01pct_fpr:.3f}"
        )


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
        The filled result.

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
    )
