"""Threshold attacks on per-sample scores: global, class-dependent (Song & Mittal), gap."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from nvmpriv.attacks._validate import AttackInputError, check_nonempty_scores
from nvmpriv.attacks.inputs import AttackInputs, SplitOutputs
from nvmpriv.attacks.metrics import best_threshold, decision_metrics
from nvmpriv.attacks.result import AttackResult, result_from_scores
from nvmpriv.attacks.scores import (
    confidence_scores,
    correctness_scores,
    entropy_scores,
    loss_scores,
    modified_entropy_scores,
)

__all__ = [
    "SCORE_FUNCTIONS",
    "class_dependent_thresholds",
    "class_threshold_attack",
    "gap_attack",
    "global_threshold_attack",
]

SplitScore = Callable[[SplitOutputs], np.ndarray]

#: Score name -> function of one validated split (higher = member).
SCORE_FUNCTIONS: dict[str, SplitScore] = {
    "confidence": lambda s: confidence_scores(s.probs, s.labels),
    "loss": lambda s: loss_scores(s.probs, s.labels),
    "entropy": lambda s: entropy_scores(s.probs),
    "modified_entropy": lambda s: modified_entropy_scores(s.probs, s.labels),
    "logit_scaled_confidence": lambda s: s.phi,
    "correctness": lambda s: correctness_scores(s.probs, s.labels),
}


def _score(score: str) -> SplitScore:
    if score not in SCORE_FUNCTIONS:
        raise AttackInputError(f"unknown score {score!r}; choose one of {sorted(SCORE_FUNCTIONS)}")
    return SCORE_FUNCTIONS[score]


def global_threshold_attack(inputs: AttackInputs, score: str = "confidence") -> AttackResult:
    """One threshold for all samples, chosen on shadow outputs when given.

    Args:
        inputs: Target (and optionally shadow) outputs.
        score: Key of :data:`SCORE_FUNCTIONS`.

    Returns:
        Result named ``score``; ``accuracy`` is ``None`` without shadow data.

    Raises:
        AttackInputError: On an unknown score name.
    """
    t0 = time.perf_counter()
    fn = _score(score)
    s_in, s_out = fn(inputs.split("member")), fn(inputs.split("nonmember"))
    thr = None
    extra: dict[str, object] = {}
    if inputs.has_shadow:
        thr, shadow_acc = best_threshold(
            fn(inputs.split("shadow_member")), fn(inputs.split("shadow_nonmember"))
        )
        extra["shadow_accuracy"] = shadow_acc
    return result_from_scores(
        score,
        s_in,
        s_out,
        threshold=thr,
        queries=inputs.queries,
        seconds=time.perf_counter() - t0,
        extra=extra,
    )


def class_dependent_thresholds(
    scores_in: object,
    labels_in: object,
    scores_out: object,
    labels_out: object,
    n_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class thresholds maximizing each class's balanced accuracy (Song & Mittal).

    A class without both members and non-members falls back to the global best threshold.

    Args:
        scores_in: Member scores ``[n_in]``.
        labels_in: Member labels ``[n_in]``.
        scores_out: Non-member scores ``[n_out]``.
        labels_out: Non-member labels ``[n_out]``.
        n_classes: Number of classes ``C``.

    Returns:
        ``(thresholds [C], fitted [C] bool)``; ``fitted[c]`` is False where the global threshold
        was used.

    Raises:
        AttackInputError: If a set is empty or lengths mismatch.

    Examples:
        >>> t, ok = class_dependent_thresholds([0.9, 0.4], [0, 1], [0.5, 0.1], [0, 1], 3)
        >>> t.tolist(), ok.tolist()
        ([0.9, 0.4, 0.9], [True, True, False])
    """
    s_in = check_nonempty_scores(scores_in, "scores_in")
    s_out = check_nonempty_scores(scores_out, "scores_out")
    y_in = np.asarray(labels_in, dtype=np.int64)
    y_out = np.asarray(labels_out, dtype=np.int64)
    if y_in.shape != s_in.shape or y_out.shape != s_out.shape:
        raise AttackInputError(
            f"labels {y_in.shape}/{y_out.shape} must match scores {s_in.shape}/{s_out.shape}"
        )
    global_t, _ = best_threshold(s_in, s_out)
    thresholds = np.full(n_classes, global_t)
    fitted = np.zeros(n_classes, dtype=bool)
    # Group by class with one stable sort instead of C boolean masks over all samples.
    oi, oo = np.argsort(y_in, kind="stable"), np.argsort(y_out, kind="stable")
    bi = np.searchsorted(y_in[oi], np.arange(n_classes + 1))
    bo = np.searchsorted(y_out[oo], np.arange(n_classes + 1))
    for c in range(n_classes):
        ci, co = s_in[oi[bi[c] : bi[c + 1]]], s_out[oo[bo[c] : bo[c + 1]]]
        if ci.size and co.size:
            thresholds[c], _ = best_threshold(ci, co)
            fitted[c] = True
    return thresholds, fitted


def class_threshold_attack(inputs: AttackInputs, score: str = "confidence") -> AttackResult:
    """Class-dependent thresholds fitted on shadow outputs (Song & Mittal).

    Decision: ``member iff score >= t[y]``. The ROC and AUC use the shifted score
    ``score - t[y]``. The upper bound refits the per-class thresholds on the target itself.

    Args:
        inputs: Target and shadow outputs (shadow required).
        score: Key of :data:`SCORE_FUNCTIONS`.

    Returns:
        Result named ``<score>_class_threshold``.

    Raises:
        AttackInputError: Without shadow data or on an unknown score.
    """
    t0 = time.perf_counter()
    if not inputs.has_shadow:
        raise AttackInputError(
            "class-dependent thresholds need shadow_member_* and shadow_nonmember_* outputs"
        )
    fn = _score(score)
    c = inputs.n_classes
    sm, sn = inputs.split("shadow_member"), inputs.split("shadow_nonmember")
    tm, tn = inputs.split("member"), inputs.split("nonmember")
    thr, fitted = class_dependent_thresholds(fn(sm), sm.labels, fn(sn), sn.labels, c)
    s_in, s_out = fn(tm), fn(tn)
    ub_thr, _ = class_dependent_thresholds(s_in, tm.labels, s_out, tn.labels, c)
    ub = decision_metrics(s_in >= ub_thr[tm.labels], s_out >= ub_thr[tn.labels])["accuracy"]
    return result_from_scores(
        f"{score}_class_threshold",
        s_in - thr[tm.labels],
        s_out - thr[tn.labels],
        threshold=0.0,
        threshold_source="shadow (per class)",
        upper_bound=(float("nan"), ub),
        class_thresholds=tuple(float(t) for t in thr),
        queries=inputs.queries,
        seconds=time.perf_counter() - t0,
        extra={
            "classes_without_shadow_fit": np.flatnonzero(~fitted).tolist(),
            "upper_bound_class_thresholds": ub_thr.tolist(),
        },
    )


def gap_attack(inputs: AttackInputs) -> AttackResult:
    """Gap attack: member iff the target classifies the sample correctly.

    Balanced accuracy equals ``1/2 + (train_acc - test_acc) / 2`` on the target sets.

    Args:
        inputs: Target outputs.

    Returns:
        Result named ``gap`` with the fixed rule ``correctness >= 1``.
    """
    t0 = time.perf_counter()
    s_in = correctness_scores(inputs.split("member").probs, inputs.split("member").labels)
    s_out = correctness_scores(inputs.split("nonmember").probs, inputs.split("nonmember").labels)
    return result_from_scores(
        "gap",
        s_in,
        s_out,
        threshold=1.0,
        threshold_source="fixed rule",
        queries=inputs.queries,
        seconds=time.perf_counter() - t0,
        extra={"train_accuracy": float(s_in.mean()), "test_accuracy": float(s_out.mean())},
    )
