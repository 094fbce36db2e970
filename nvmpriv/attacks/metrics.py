"""Attack metrics on membership scores (numpy only).

Members are the positive class. A decision rule is ``member iff score >= threshold``. All
threshold searches sort once (``O(n log n)``) and read every candidate off cumulative counts.
"""

from __future__ import annotations

import math

import numpy as np

from nvmpriv.attacks._validate import AttackInputError, check_nonempty_scores

__all__ = [
    "balanced_accuracy_at",
    "best_threshold",
    "cross_validated_accuracy",
    "decision_metrics",
    "degenerate_reason",
    "fpr_resolvable",
    "nonmembers_needed",
    "precision_recall_f1",
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
]


def _pair(scores_in: object, scores_out: object) -> tuple[np.ndarray, np.ndarray]:
    return (
        check_nonempty_scores(scores_in, "scores_in (members)"),
        check_nonempty_scores(scores_out, "scores_out (non-members)"),
    )


def _counts(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) with member/non-member counts at ``score >= t``."""
    s = np.concatenate([s_in, s_out])
    is_in = np.concatenate([np.ones(s_in.size, np.int64), np.zeros(s_out.size, np.int64)])
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    # ``!=`` (not np.diff) so that repeated +-inf count as one value.
    last_of_run = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    idx = np.concatenate([last_of_run, [s.size - 1]])
    tps = np.cumsum(is_in[order])[idx]
    fps = idx + 1 - tps
    return s_sorted[idx], tps, fps


def roc_curve(scores_in: object, scores_out: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve over every distinct score (no point dropped).

    Equal to ``sklearn.metrics.roc_curve(y, s, drop_intermediate=False)`` with members as the
    positive class: the first point is ``(0, 0)`` at threshold ``+inf``.

    Args:
        scores_in: Member scores ``[n_in]``.
        scores_out: Non-member scores ``[n_out]``.

    Returns:
        ``(fpr, tpr, thresholds)``, each of length ``n_distinct + 1``; ``fpr`` and ``tpr`` are
        non-decreasing, thresholds decreasing.

    Raises:
        AttackInputError: If a set is empty or holds NaN.

    Examples:
        >>> fpr, tpr, thr = roc_curve([3.0, 2.0], [2.0, 1.0])
        >>> fpr, tpr, thr
        (array([0. , 0. , 0.5, 1. ]), array([0. , 0.5, 1. , 1. ]), array([inf,  3.,  2.,  1.]))
    """
    s_in, s_out = _pair(scores_in, scores_out)
    thr, tps, fps = _counts(s_in, s_out)
    fpr = np.concatenate([[0.0], fps / s_out.size])
    tpr = np.concatenate([[0.0], tps / s_in.size])
    return fpr, tpr, np.concatenate([[np.inf], thr])


def roc_auc(scores_in: object, scores_out: object) -> float:
    """Area under the ROC curve (ties count 1/2, i.e. the Mann-Whitney statistic).

    Args:
        scores_in: Member scores ``[n_in]``.
        scores_out: Non-member scores ``[n_out]``.

    Returns:
        AUC in ``[0, 1]``; 0.5 is chance.

    Examples:
        >>> roc_auc([3.0, 2.0], [2.0, 1.0])
        0.875
    """
    fpr, tpr, _ = roc_curve(scores_in, scores_out)
    return float(np.trapezoid(tpr, fpr))


#: Slack on FPR comparisons, so that ``1 / n`` counts as within a budget of exactly ``1 / n``.
_FPR_ATOL = 1e-12


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    return float(tpr[fpr <= max_fpr + _FPR_ATOL].max())


def fpr_resolvable(max_fpr: float, n_nonmembers: int) -> bool:
    """Whether ``n_nonmembers`` non-members can measure a TPR at FPR ``<= max_fpr``.

    The empirical FPR moves in steps of ``1 / n_nonmembers``. Below that step the only operating
    point within the budget is FPR 0, so a "TPR at ``max_fpr``" read off the ROC
    (:func:`tpr_at_fpr`, LiRA's and ML Privacy Meter's read-off) is the TPR at zero false
    positives, and zero false positives in fewer than ``1 / max_fpr`` trials does not show that
    the attack's FPR is ``<= max_fpr`` (the 95 % upper bound is about ``3 / n_nonmembers``).
    ``True`` is the minimum, not a guarantee of precision: at ``n_nonmembers = 1 / max_fpr`` the
    value rests on a single false positive.

    Args:
        max_fpr: FPR budget in ``[0, 1]`` (fraction, not percent).
        n_nonmembers: Number of non-members scored.

    Returns:
        ``True`` iff ``n_nonmembers >= 1`` and ``1 / n_nonmembers <= max_fpr``.

    Examples:
        >>> fpr_resolvable(0.001, 1000), fpr_resolvable(0.001, 999), fpr_resolvable(0.01, 100)
        (True, False, True)
    """
    return n_nonmembers >= 1 and 1.0 / n_nonmembers <= max_fpr + _FPR_ATOL


def nonmembers_needed(max_fpr: float) -> int:
    """Fewest non-members for which :func:`fpr_resolvable` holds at ``max_fpr``.

    Args:
        max_fpr: FPR budget in ``(0, 1]`` (fraction, not percent).

    Returns:
        ``ceil(1 / max_fpr)``, within the tolerance of :func:`fpr_resolvable`.

    Raises:
        ValueError: If ``max_fpr`` is outside ``(0, 1]``.

    Examples:
        >>> nonmembers_needed(0.001), nonmembers_needed(0.01), nonmembers_needed(0.3)
        (1000, 100, 4)
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1] (a fraction), got {max_fpr}")
    n = max(1, math.floor(1.0 / max_fpr))
    return n if fpr_resolvable(max_fpr, n) else n + 1


def tpr_at_fpr(scores_in: object, scores_out: object, max_fpr: float = 0.01) -> float:
    """Highest true-positive rate reachable with a false-positive rate ``<= max_fpr``.

    With ``n_out`` non-members the smallest non-zero FPR is ``1 / n_out``; below it the value is
    the TPR at FPR 0, not a measured TPR at ``max_fpr``: check :func:`fpr_resolvable` before
    reporting it as one (:class:`~nvmpriv.attacks.AttackResult` does).

    Args:
        scores_in: Member scores ``[n_in]``.
        scores_out: Non-member scores ``[n_out]``.
        max_fpr: FPR budget in ``[0, 1]`` (fraction, not percent).

    Returns:
        TPR in ``[0, 1]``.

    Raises:
        ValueError: If ``max_fpr`` is outside ``[0, 1]``.

    Examples:
        >>> tpr_at_fpr([3.0, 2.0], [2.0, 1.0], max_fpr=0.0)
        0.5
    """
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1] (a fraction), got {max_fpr}")
    fpr, tpr, _ = roc_curve(scores_in, scores_out)
    return _tpr_at(fpr, tpr, max_fpr)


def best_threshold(scores_in: object, scores_out: object) -> tuple[float, float]:
    """Threshold maximizing balanced accuracy ``(TPR + TNR) / 2``, found by one sort.

    Candidates are the observed scores (Song & Mittal); ties in accuracy go to the largest
    threshold (fewest false positives).

    Args:
        scores_in: Member scores ``[n_in]``.
        scores_out: Non-member scores ``[n_out]``.

    Returns:
        ``(threshold, balanced_accuracy)``; the rule is ``member iff score >= threshold``.

    Examples:
        >>> best_threshold([0.9, 0.8, 0.4], [0.5, 0.3, 0.2])
        (0.8, 0.8333333333333333)
    """
    s_in, s_out = _pair(scores_in, scores_out)
    thr, tps, fps = _counts(s_in, s_out)
    n_in, n_out = s_in.size, s_out.size
    # Integer objective avoids float ties: n_in*n_out*2*acc = tps*n_out + tns*n_in.
    objective = tps * n_out + (n_out - fps) * n_in
    k = int(np.argmax(objective))
    acc = 0.5 * (tps[k] / n_in + (n_out - fps[k]) / n_out)
    return float(thr[k]), float(acc)


def balanced_accuracy_at(threshold: float, scores_in: object, scores_out: object) -> float:
    """Balanced accuracy of ``member iff score >= threshold``.

    Args:
        threshold: Decision threshold (score units).
        scores_in: Member scores ``[n_in]``.
        scores_out: Non-member scores ``[n_out]``.

    Returns:
        ``(TPR + TNR) / 2``.

    Examples:
        >>> balanced_accuracy_at(0.5, [0.9, 0.4], [0.1, 0.2])
        0.75
    """
    s_in, s_out = _pair(scores_in, scores_out)
    return float(0.5 * (np.mean(s_in >= threshold) + np.mean(s_out < threshold)))


def degenerate_reason(
    scores_in: object, scores_out: object, threshold: float | None = None
) -> str | None:
    """Why an attack's numbers are 0.5 by construction rather than a measured chance result.

    Constant scores give the diagonal ROC (AUC exactly 0.5) and balanced accuracy exactly 0.5 at
    every threshold; a decision rule that calls every target sample a member (or none) has
    balanced accuracy exactly 0.5 whatever the scores. Both look like an attack "at chance" but
    measure nothing: the attack never separated a member from a non-member.

    Args:
        scores_in: Member scores ``[n_in]``.
        scores_out: Non-member scores ``[n_out]``.
        threshold: Attacker-side threshold of ``member iff score >= threshold`` (``None``: no
            decision rule, only the scores are checked).

    Returns:
        A one-line reason, or ``None`` when the attack is not degenerate.

    Raises:
        AttackInputError: If a set is empty or holds NaN.

    Examples:
        >>> degenerate_reason([0.3, 0.3], [0.3]) is not None
        True
        >>> degenerate_reason([0.9, 0.4], [0.1], threshold=0.0) is not None
        True
        >>> degenerate_reason([0.9, 0.4], [0.1], threshold=0.5) is None
        True
    """
    s_in, s_out = _pair(scores_in, scores_out)
    n = s_in.size + s_out.size
    lo = float(min(s_in.min(), s_out.min()))
    hi = float(max(s_in.max(), s_out.max()))
    if lo == hi:
        return (
            f"constant scores: all {n} target samples score {lo:.6g}, so AUC and accuracy are "
            "0.5 by construction, not a measured chance result"
        )
    if threshold is None:
        return None
    # The decisions themselves (not lo/hi comparisons), so a NaN threshold counts as "none".
    n_member = int(np.sum(s_in >= threshold) + np.sum(s_out >= threshold))
    if n_member == n:
        return (
            f"decision rule calls every target sample a member (threshold {threshold:.6g} <= "
            f"lowest score {lo:.6g}), so accuracy is 0.5 by construction"
        )
    if n_member == 0:
        return (
            f"decision rule calls no target sample a member (threshold {threshold:.6g} > "
            f"highest score {hi:.6g}), so accuracy is 0.5 by construction"
        )
    return None


def decision_metrics(pred_in: np.ndarray, pred_out: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, precision, recall and F1 of boolean membership decisions.

    Args:
        pred_in: Decisions on the members (``True`` = predicted member), ``[n_in]``.
        pred_out: Decisions on the non-members, ``[n_out]``.

    Returns:
        Dict with ``accuracy`` (balanced), ``precision``, ``recall``, ``f1``; precision and F1 are
        0 when nothing is predicted a member.

    Examples:
        >>> decision_metrics(np.array([True, False]), np.array([True, False, False, False]))
        {'accuracy': 0.625, 'precision': 0.5, 'recall': 0.5, 'f1': 0.5}
    """
    pin = np.asarray(pred_in, dtype=bool)
    pout = np.asarray(pred_out, dtype=bool)
    tp = int(pin.sum())
    fp = int(pout.sum())
    recall = tp / pin.size
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = 0.5 * (recall + 1.0 - fp / pout.size)
    return {"accuracy": acc, "precision": precision, "recall": recall, "f1": f1}


def precision_recall_f1(
    threshold: float, scores_in: object, scores_out: object
) -> tuple[float, float, float]:
    """Precision, recall and F1 of ``member iff score >= threshold`` on the given sets.

    Args:
        threshold: Decision threshold (score units).
        scores_in: Member scores ``[n_in]``.
        scores_out: Non-member scores ``[n_out]``.

    Returns:
        ``(precision, recall, f1)``.

    Examples:
        >>> precision_recall_f1(0.5, [0.9, 0.4], [0.6, 0.2])
        (0.5, 0.5, 0.5)
    """
    s_in, s_out = _pair(scores_in, scores_out)
    m = decision_metrics(s_in >= threshold, s_out >= threshold)
    return m["precision"], m["recall"], m["f1"]


def cross_validated_accuracy(scores_in: object, scores_out: object, folds: int = 2) -> float:
    """Balanced accuracy of a threshold chosen on other folds of the target's own scores.

    Samples are dealt into ``folds`` interleaved folds; each fold is scored with the best
    threshold (:func:`best_threshold`) of the remaining folds, and the fold accuracies are
    averaged. Unlike the best threshold on all samples, this is not an optimistic estimate; it
    needs no shadow model (an attacker who knows some members and non-members).

    Args:
        scores_in: Members' scores (higher = member).
        scores_out: Non-members' scores.
        folds: Number of folds (>= 2).

    Returns:
        Mean held-out balanced accuracy.

    Raises:
        AttackInputError: Fewer samples than folds on either side, or ``folds`` < 2.

    Example:
        Fold 0 (0.9, 0.7 | 0.1, 0.3) is scored at t = 0.6, chosen on fold 1: accuracy 1.0; fold 1
        (0.8, 0.6 | 0.2, 0.4) at t = 0.7 (ties go to the largest threshold): 0.6 is missed, 0.75.

        >>> cross_validated_accuracy([0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4])
        0.875
    """
    s_in, s_out = _pair(scores_in, scores_out)
    if folds < 2 or min(len(s_in), len(s_out)) < folds:
        raise AttackInputError(
            f"cross-validation needs folds >= 2 and at least {folds} members and non-members; "
            f"got folds={folds}, {len(s_in)} members, {len(s_out)} non-members"
        )
    accs = []
    for k in range(folds):
        fit_in = np.concatenate([s_in[j::folds] for j in range(folds) if j != k])
        fit_out = np.concatenate([s_out[j::folds] for j in range(folds) if j != k])
        threshold, _ = best_threshold(fit_in, fit_out)
        accs.append(balanced_accuracy_at(threshold, s_in[k::folds], s_out[k::folds]))
    return float(np.mean(accs))
