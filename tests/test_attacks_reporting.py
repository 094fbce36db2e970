"""Honest reporting of attack results: unmeasurable low-FPR TPRs and degenerate attacks.

Oracles: ``sklearn.metrics`` (ROC, AUC, balanced accuracy, recall) and hand-computed counts.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

from nvmpriv import attacks as A
from nvmpriv.atomic import json_safe
from nvmpriv.attacks import AttackInputs


def _labels(s_in: np.ndarray, s_out: np.ndarray) -> np.ndarray:
    return np.r_[np.ones(s_in.size), np.zeros(s_out.size)]


def _sk_tpr_at(s_in: np.ndarray, s_out: np.ndarray, max_fpr: float) -> float:
    """Highest TPR with FPR <= max_fpr on sklearn's ROC (the read-off LiRA prints)."""
    efpr, etpr, _ = skm.roc_curve(_labels(s_in, s_out), np.r_[s_in, s_out])
    return float(etpr[efpr <= max_fpr].max())


def _sk_resolvable(s_in: np.ndarray, s_out: np.ndarray, max_fpr: float) -> bool:
    """Whether sklearn's full ROC has an operating point with 0 < FPR <= max_fpr."""
    efpr, _, _ = skm.roc_curve(_labels(s_in, s_out), np.r_[s_in, s_out], drop_intermediate=False)
    return bool(np.any((efpr > 0) & (efpr <= max_fpr + 1e-15)))


def _strict_json(value: Any) -> Any:
    """Round-trip through strict JSON: NaN/inf anywhere raises."""
    return json.loads(json.dumps(value, allow_nan=False))


# --------------------------------------------------------------------------- TPR at low FPR
@pytest.mark.parametrize(
    ("max_fpr", "n_out"),
    [
        pytest.param(0.001, 999, id="0.1%-999"),
        pytest.param(0.001, 1000, id="0.1%-1000"),
        pytest.param(0.001, 1001, id="0.1%-1001"),
        pytest.param(0.01, 99, id="1%-99"),
        pytest.param(0.01, 100, id="1%-100"),
        pytest.param(0.01, 30, id="1%-30"),
    ],
)
def test_fpr_resolvable_matches_sklearn_operating_points(max_fpr: float, n_out: int) -> None:
    rng = np.random.default_rng(n_out)
    s_in, s_out = rng.normal(1, 1, 50), rng.normal(0, 1, n_out)  # distinct: FPR steps of 1/n
    assert A.fpr_resolvable(max_fpr, n_out) is _sk_resolvable(s_in, s_out, max_fpr)
    assert A.fpr_resolvable(max_fpr, n_out) is (n_out >= round(1 / max_fpr))


@pytest.mark.parametrize(
    ("max_fpr", "needed"),
    [
        pytest.param(0.001, 1000, id="0.1%"),
        pytest.param(0.01, 100, id="1%"),
        pytest.param(0.3, 4, id="30%"),
        pytest.param(1.0, 1, id="100%"),
    ],
)
def test_nonmembers_needed_is_the_resolvability_boundary(max_fpr: float, needed: int) -> None:
    assert A.nonmembers_needed(max_fpr) == needed
    assert A.fpr_resolvable(max_fpr, needed) and not A.fpr_resolvable(max_fpr, needed - 1)
    with pytest.raises(ValueError, match="max_fpr"):
        A.nonmembers_needed(0.0)


@pytest.mark.parametrize(
    ("n_out", "null_keys"),
    [
        pytest.param(50, {"tpr_at_1pct_fpr", "tpr_at_01pct_fpr"}, id="50-nonmembers"),
        pytest.param(200, {"tpr_at_01pct_fpr"}, id="200-nonmembers"),
        pytest.param(999, {"tpr_at_01pct_fpr"}, id="999-nonmembers"),
        pytest.param(1000, set(), id="1000-nonmembers"),
    ],
)
def test_to_dict_reports_null_below_one_over_n_nonmembers(n_out: int, null_keys: set[str]) -> None:
    rng = np.random.default_rng(7)
    s_in, s_out = rng.normal(2, 1, 400), rng.normal(0, 1, n_out)
    res = A.result_from_scores("x", s_in, s_out)
    d = _strict_json(res.to_dict())
    budgets = {"tpr_at_1pct_fpr": 0.01, "tpr_at_01pct_fpr": 0.001}
    for key, budget in budgets.items():
        if key in null_keys:
            assert d[key] is None, key
            assert f"got {n_out}" in d["unmeasurable"][key]
            assert f"1/{n_out}" in d["unmeasurable"][key]
        else:
            assert d[key] == pytest.approx(_sk_tpr_at(s_in, s_out, budget), abs=1e-12), key
        # The attribute keeps sklearn's read-off either way (the callbacks log it).
        assert getattr(res, key) == pytest.approx(_sk_tpr_at(s_in, s_out, budget), abs=1e-12)
    assert set(d["unmeasurable"]) == null_keys
    assert d["n_nonmembers"] == n_out
    # The value that used to pass for TPR@0.1% is kept under its true name.
    assert d["tpr_at_zero_fpr"] == pytest.approx(_sk_tpr_at(s_in, s_out, 0.0), abs=1e-12)
    assert d["tpr_at_zero_fpr"] > 0.0  # the null is not hiding a zero


def test_unmeasurable_tpr_is_the_tpr_at_zero_false_positives() -> None:
    # Hand-computed: 10 non-members, so FPR moves in steps of 10 %; 3 of 4 members score above
    # every non-member, so TPR@0.1% and TPR@1% on the ROC are both 3/4, at zero false positives.
    s_in, s_out = np.array([9.0, 8.0, 7.0, 0.5]), np.arange(10) / 10.0
    res = A.result_from_scores("x", s_in, s_out)
    assert res.tpr_at_01pct_fpr == res.tpr_at_1pct_fpr == res.tpr_at_zero_fpr == 0.75
    d = res.to_dict()
    assert d["tpr_at_01pct_fpr"] is None and d["tpr_at_1pct_fpr"] is None
    assert d["tpr_at_zero_fpr"] == 0.75
    summary = res.summary()
    assert "tpr@0.1%=n/a (<1000 non-members)" in summary
    assert "tpr@1%=n/a (<100 non-members)" in summary


def test_averaging_report_nulls_unmeasurable_tpr() -> None:
    rng = np.random.default_rng(3)
    small = A.result_from_scores("c", rng.normal(1, 1, 60), rng.normal(0, 1, 60), extra={"k": 1})
    big_in, big_out = rng.normal(1, 1, 300), rng.normal(0, 1, 300)
    big = A.result_from_scores("c", big_in, big_out, extra={"k": 2})
    rows = _strict_json(A.averaging_report([small, big]))
    assert rows[0]["tpr_at_1pct_fpr"] is None
    assert rows[1]["tpr_at_1pct_fpr"] == pytest.approx(_sk_tpr_at(big_in, big_out, 0.01))
    assert rows[0]["degenerate"] is False and rows[1]["degenerate"] is False


def test_report_entries_are_strict_json_with_infinite_scores() -> None:
    s_in = np.r_[np.inf, np.inf, np.linspace(0, 1, 20)]
    s_out = np.r_[-np.inf, np.linspace(-1, 0.5, 30)]
    d = A.result_from_scores("x", s_in, s_out, threshold=np.inf).to_dict()
    assert _strict_json(d) == _strict_json(json_safe(d))
    assert d["threshold"] is None and d["tpr_at_01pct_fpr"] is None


# --------------------------------------------------------------------------- degenerate attacks
def _balanced_accuracy(s_in: np.ndarray, s_out: np.ndarray, threshold: float) -> float:
    pred = np.r_[s_in, s_out] >= threshold
    return float(skm.balanced_accuracy_score(_labels(s_in, s_out), pred))


@pytest.mark.parametrize(
    ("s_in", "s_out"),
    [
        pytest.param(np.ones(30), np.ones(40), id="ones"),
        pytest.param(np.zeros(5), np.zeros(3), id="zeros"),
        pytest.param(np.full(4, np.inf), np.full(6, np.inf), id="all-inf"),
    ],
)
@pytest.mark.parametrize("threshold", [None, 0.5, 2.0], ids=["no-rule", "t=0.5", "t=2"])
def test_constant_scores_are_flagged_degenerate(
    s_in: np.ndarray, s_out: np.ndarray, threshold: float | None
) -> None:
    res = A.result_from_scores("const", s_in, s_out, threshold=threshold)
    finite = np.clip(np.r_[s_in, s_out], -1e300, 1e300)
    # The oracle agrees these numbers are exactly chance ...
    assert res.auc == skm.roc_auc_score(_labels(s_in, s_out), finite) == 0.5
    assert res.accuracy_upper_bound == 0.5
    if threshold is not None:
        assert res.accuracy == _balanced_accuracy(s_in, s_out, threshold) == 0.5
    # ... and the result says they come by construction.
    assert res.degenerate
    assert res.degenerate_reason is not None and "constant scores" in res.degenerate_reason
    d = _strict_json(res.to_dict())
    assert d["degenerate"] is True and "constant scores" in d["degenerate_reason"]
    assert "DEGENERATE: constant scores" in res.summary()


@pytest.mark.parametrize(
    ("threshold", "phrase", "recall"),
    [
        pytest.param(-5.0, "every target sample a member", 1.0, id="all-member"),
        pytest.param(float("-inf"), "every target sample a member", 1.0, id="all-member-inf"),
        pytest.param(5.0, "no target sample a member", 0.0, id="all-nonmember"),
        pytest.param(float("nan"), "no target sample a member", 0.0, id="nan-threshold"),
    ],
)
def test_one_sided_decision_rule_is_flagged_degenerate(
    threshold: float, phrase: str, recall: float
) -> None:
    rng = np.random.default_rng(5)
    s_in, s_out = rng.normal(1, 0.5, 80), rng.normal(0, 0.5, 70)  # informative scores
    res = A.result_from_scores("one_sided", s_in, s_out, threshold=threshold)
    y, pred = _labels(s_in, s_out), np.r_[s_in, s_out] >= threshold
    assert res.accuracy == skm.balanced_accuracy_score(y, pred) == 0.5
    assert res.recall == skm.recall_score(y, pred) == recall
    assert res.auc == pytest.approx(skm.roc_auc_score(y, np.r_[s_in, s_out]))
    assert res.auc > 0.8  # the scores leak; only the decision rule is degenerate
    assert res.degenerate and phrase in str(res.degenerate_reason)
    assert _strict_json(res.to_dict())["degenerate"] is True


@pytest.mark.parametrize(
    ("s_in", "s_out", "threshold"),
    [
        # Same distribution: AUC and accuracy near 0.5, but measured, not by construction.
        pytest.param(
            np.random.default_rng(11).normal(0, 1, 300),
            np.random.default_rng(12).normal(0, 1, 300),
            0.0,
            id="measured-chance",
        ),
        # One sample called a member: the rule is one-sided on all but one sample.
        pytest.param(np.array([3.0, 1.0, 1.0]), np.array([1.0, 1.0]), 2.0, id="one-member-call"),
        # Scores vary only between the sets: perfect separation.
        pytest.param(np.ones(4), np.zeros(4), 0.5, id="two-values"),
        pytest.param(np.ones(4), np.zeros(4), None, id="two-values-no-rule"),
    ],
)
def test_informative_or_measured_results_are_not_degenerate(
    s_in: np.ndarray, s_out: np.ndarray, threshold: float | None
) -> None:
    res = A.result_from_scores("x", s_in, s_out, threshold=threshold)
    if threshold is not None:
        assert res.accuracy == pytest.approx(_balanced_accuracy(s_in, s_out, threshold))
    assert not res.degenerate and res.degenerate_reason is None
    d = _strict_json(res.to_dict())
    assert d["degenerate"] is False and d["degenerate_reason"] is None
    assert "DEGENERATE" not in res.summary()


def test_degenerate_reason_function_hand_computed() -> None:
    assert A.degenerate_reason([0.3, 0.3], [0.3]) == (
        "constant scores: all 3 target samples score 0.3, so AUC and accuracy are 0.5 by "
        "construction, not a measured chance result"
    )
    assert "lowest score 0.1" in str(A.degenerate_reason([0.9, 0.4], [0.1], threshold=0.1))
    assert "highest score 0.9" in str(A.degenerate_reason([0.9, 0.4], [0.1], threshold=0.95))
    assert A.degenerate_reason([0.9, 0.4], [0.1], threshold=0.9) is None
    assert A.degenerate_reason([0.9, 0.4], [0.1]) is None


def test_shadow_threshold_above_every_target_score_is_degenerate() -> None:
    # Shadow members are near-certain, so the shadow threshold lands above every target score:
    # the confidence attack calls no target sample a member.
    rng = np.random.default_rng(2)

    def probs(p_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.c_[p_true, 1 - p_true], np.zeros(p_true.size, dtype=np.int64)

    inputs = AttackInputs(
        *probs(rng.uniform(0.5, 0.8, 50)),
        *probs(rng.uniform(0.5, 0.7, 50)),
        *probs(rng.uniform(0.99, 1.0, 50)),
        *probs(rng.uniform(0.5, 0.8, 50)),
    )
    res = A.run_attack("confidence", inputs)
    assert res.threshold is not None and res.threshold > 0.8
    s_in, s_out = inputs.split("member").probs[:, 0], inputs.split("nonmember").probs[:, 0]
    assert res.accuracy == _balanced_accuracy(s_in, s_out, res.threshold) == 0.5
    assert res.degenerate and "no target sample a member" in str(res.degenerate_reason)
    # The flag survives the copies that set queries/k (blackbox._with, query averaging).
    assert A.AttackResult(**{**res.__dict__, "queries": 7}).degenerate


def test_gap_attack_on_a_model_right_everywhere_is_degenerate() -> None:
    # train and test accuracy both 1: correctness is constant, gap accuracy 1/2 + (1 - 1)/2.
    p = np.tile([0.9, 0.1], (20, 1))
    y = np.zeros(20, dtype=np.int64)
    res = A.run_attack("gap", AttackInputs(p, y, p[:15], y[:15]))
    assert res.accuracy == 0.5 and res.degenerate
    assert "constant scores" in str(res.degenerate_reason)
