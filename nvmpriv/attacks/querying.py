"""Query averaging against a target whose outputs are noisy per query (e.g. an analog chip)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nvmpriv.attacks._validate import AttackInputError, check_probabilities
from nvmpriv.attacks.inputs import AttackInputs
from nvmpriv.attacks.result import AttackResult

__all__ = ["QueryFn", "average_queries", "averaging_report", "query_averaging_curve"]

#: Black-box access to a model: inputs ``[n, ...]`` -> probabilities ``[n, C]``.
QueryFn = Callable[[np.ndarray], np.ndarray]


def _query(query_fn: QueryFn, x: np.ndarray, name: str) -> np.ndarray:
    p = check_probabilities(query_fn(x), f"{name} (query output)")
    if p.shape[0] != len(x):
        raise AttackInputError(f"query returned {p.shape[0]} rows for {len(x)} inputs ({name})")
    return p


def average_queries(query_fn: QueryFn, x: np.ndarray, k: int) -> np.ndarray:
    """Average ``k`` independent queries of the same inputs.

    Args:
        query_fn: Black-box model, ``x -> probabilities [n, C]``.
        x: Inputs ``[n, ...]``.
        k: Number of queries per input (>= 1).

    Returns:
        Mean probabilities ``[n, C]``.

    Raises:
        AttackInputError: If ``k < 1`` or a query returns invalid probabilities.

    Examples:
        >>> average_queries(lambda x: np.tile([[0.25, 0.75]], (len(x), 1)), np.zeros((2, 1)), 3)
        array([[0.25, 0.75],
               [0.25, 0.75]])
    """
    if int(k) < 1:
        raise AttackInputError(f"k (queries per input) must be >= 1, got {k}")
    acc = _query(query_fn, x, "x")
    for _ in range(int(k) - 1):
        acc = acc + _query(query_fn, x, "x")
    return acc / int(k)


def _cumulative_means(
    query_fn: QueryFn, x: np.ndarray, ks: Sequence[int], name: str
) -> dict[int, np.ndarray]:
    total = None
    out: dict[int, np.ndarray] = {}
    for i in range(1, max(ks) + 1):
        p = _query(query_fn, x, name)
        total = p if total is None else total + p
        if i in ks:
            out[i] = total / i
    return out


def query_averaging_curve(
    query_fn: QueryFn,
    member_x: np.ndarray,
    member_y: np.ndarray,
    nonmember_x: np.ndarray,
    nonmember_y: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    *,
    attack: str = "confidence",
    shadow: tuple[QueryFn, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    **attack_kwargs: Any,
) -> list[AttackResult]:
    """Attack accuracy versus the number ``k`` of averaged queries per sample.

    Queries are reused: the average over ``k`` uses the first ``k`` of ``max(ks)`` queries, so
    the whole curve costs ``max(ks)`` queries per sample.

    Args:
        query_fn: Noisy black-box target, ``x -> probabilities``.
        member_x: Member inputs ``[n_in, ...]``.
        member_y: Member labels ``[n_in]``.
        nonmember_x: Non-member inputs ``[n_out, ...]``.
        nonmember_y: Non-member labels ``[n_out]``.
        ks: Numbers of queries to average (each >= 1).
        attack: Registry name of a score attack (see ``nvmpriv.attacks.SCORE_ATTACKS``).
        shadow: Optional ``(shadow_query_fn, member_x, member_y, nonmember_x, nonmember_y)``;
            the shadow outputs are averaged with the same ``k`` to choose the threshold.
        **attack_kwargs: Passed to the attack.

    Returns:
        One result per ``k`` (ascending), with ``extra["k"]`` and ``queries`` set.

    Raises:
        AttackInputError: If ``ks`` is empty or holds a value < 1.
    """
    from nvmpriv.attacks.registry import run_attack

    ks_sorted = sorted({int(k) for k in ks})
    if not ks_sorted or ks_sorted[0] < 1:
        raise AttackInputError(f"ks must be non-empty integers >= 1, got {list(ks)}")
    t_in = _cumulative_means(query_fn, member_x, ks_sorted, "member_x")
    t_out = _cumulative_means(query_fn, nonmember_x, ks_sorted, "nonmember_x")
    if shadow is not None:
        sq, sxi, _, sxo, _ = shadow
        s_in = _cumulative_means(sq, sxi, ks_sorted, "shadow member_x")
        s_out = _cumulative_means(sq, sxo, ks_sorted, "shadow nonmember_x")
    results = []
    for k in ks_sorted:
        kw: dict[str, Any] = {}
        if shadow is not None:
            kw = {
                "shadow_member_outputs": s_in[k],
                "shadow_member_labels": shadow[2],
                "shadow_nonmember_outputs": s_out[k],
                "shadow_nonmember_labels": shadow[4],
            }
        inputs = AttackInputs(
            t_in[k],
            member_y,
            t_out[k],
            nonmember_y,
            queries=k * (len(member_x) + len(nonmember_x)),
            **kw,
        )
        r = run_attack(attack, inputs, **attack_kwargs)
        results.append(
            AttackResult(**{**r.__dict__, "name": f"{r.name}@k={k}", "extra": {**r.extra, "k": k}})
        )
    return results


def averaging_report(results: Sequence[AttackResult]) -> list[dict[str, float | int | None]]:
    """Tabulate accuracy versus ``k`` from :func:`query_averaging_curve`.

    Args:
        results: Results carrying ``extra["k"]``.

    Returns:
        Rows ``{"k", "accuracy", "accuracy_upper_bound", "auc", "tpr_at_1pct_fpr",
        "degenerate"}``; ``tpr_at_1pct_fpr`` is ``None`` with fewer than 100 non-members (as in
        :meth:`AttackResult.to_dict`), ``degenerate`` is :attr:`AttackResult.degenerate`.
    """
    return [
        {
            "k": int(r.extra["k"]),
            "accuracy": r.accuracy,
            "accuracy_upper_bound": r.accuracy_upper_bound,
            "auc": r.auc,
            "tpr_at_1pct_fpr": None if "tpr_at_1pct_fpr" in r.unmeasurable() else r.tpr_at_1pct_fpr,
            "degenerate": r.degenerate,
        }
        for r in results
    ]
