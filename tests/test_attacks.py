"""Tests of the numpy-only attack suite against independent oracles (sklearn, brute force)."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import softmax as scipy_softmax
from scipy.stats import entropy as scipy_entropy
from scipy.stats import norm
from sklearn import metrics as skm

from nvmpriv import attacks as A
from nvmpriv.attacks import AttackInputError, AttackInputs, ReferenceScores, SplitOutputs

SUBMODULES = [
    "nvmpriv.attacks._validate",
    "nvmpriv.attacks.scores",
    "nvmpriv.attacks.metrics",
    "nvmpriv.attacks.result",
    "nvmpriv.attacks.inputs",
    "nvmpriv.attacks.threshold",
    "nvmpriv.attacks.reference",
    "nvmpriv.attacks.querying",
    "nvmpriv.attacks.registry",
]


def _random_probs(rng: np.random.Generator, n: int, c: int, scale: float = 2.0) -> np.ndarray:
    return A.softmax(rng.normal(0, scale, size=(n, c)))


def _score_pair(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "continuous":
        return rng.normal(0.5, 1, 300), rng.normal(0, 1, 200)
    if kind == "ties":
        return rng.integers(0, 6, 300).astype(float), rng.integers(0, 5, 250).astype(float)
    if kind == "constant":
        return np.ones(7), np.ones(5)
    if kind == "infinite":
        a = rng.normal(0, 1, 50)
        a[:5] = np.inf
        b = rng.normal(0, 1, 40)
        b[:3] = -np.inf
        b[3] = np.inf
        return a, b
    raise AssertionError(kind)


SCORE_KINDS = [pytest.param(k, id=k) for k in ("continuous", "ties", "constant", "infinite")]


# --------------------------------------------------------------------------- doctests, torch-free
@pytest.mark.parametrize("module", SUBMODULES)
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0


def test_import_is_torch_free() -> None:
    code = (
        "import sys, nvmpriv.attacks as a; "
        "bad = [m for m in ('torch', 'lightning', 'sklearn') if m in sys.modules]; "
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- metrics vs sklearn
@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_roc_curve_matches_sklearn(kind: str) -> None:
    s_in, s_out = _score_pair(np.random.default_rng(0), kind)
    if kind == "infinite":  # sklearn rejects inf scores; compare on a finite clip
        s_in, s_out = np.clip(s_in, -1e6, 1e6), np.clip(s_out, -1e6, 1e6)
    y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    fpr, tpr, thr = A.roc_curve(s_in, s_out)
    efpr, etpr, ethr = skm.roc_curve(y, np.r_[s_in, s_out], drop_intermediate=False)
    np.testing.assert_allclose(fpr, efpr)
    np.testing.assert_allclose(tpr, etpr)
    np.testing.assert_allclose(thr[1:], ethr[1:])
    assert A.roc_auc(s_in, s_out) == pytest.approx(skm.roc_auc_score(y, np.r_[s_in, s_out]))


def test_infinite_scores_are_one_value_each() -> None:
    s_in, s_out = _score_pair(np.random.default_rng(1), "infinite")
    _, _, thr = A.roc_curve(s_in, s_out)
    assert np.sum(thr == np.inf) == 2  # the leading +inf and one run of +inf scores
    # Mann-Whitney oracle: P(in > out) + P(in == out)/2, by brute force.
    gt = s_in[:, None] > s_out[None, :]
    eq = s_in[:, None] == s_out[None, :]
    mw = (np.sum(gt) + 0.5 * np.sum(eq)) / gt.size
    assert A.roc_auc(s_in, s_out) == pytest.approx(mw)


@pytest.mark.parametrize("max_fpr", [0.0, 0.001, 0.01, 0.1, 0.5])
def test_tpr_at_fpr_matches_sklearn_curve(max_fpr: float) -> None:
    s_in, s_out = _score_pair(np.random.default_rng(2), "continuous")
    y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    efpr, etpr, _ = skm.roc_curve(y, np.r_[s_in, s_out])
    assert A.tpr_at_fpr(s_in, s_out, max_fpr) == pytest.approx(etpr[efpr <= max_fpr].max())


@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_result_tpr_at_low_fpr_fields_match_sklearn(kind: str) -> None:
    # >= 1000 non-members, so 0.1 % FPR is a real operating point and differs from FPR 0.
    rng = np.random.default_rng(21)
    s_in, s_out = rng.normal(1.5, 1, 3000), rng.normal(0, 1, 4000)
    if kind == "ties":
        s_in, s_out = np.round(s_in, 1), np.round(s_out, 1)
    y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    efpr, etpr, _ = skm.roc_curve(y, np.r_[s_in, s_out])

    def oracle(max_fpr: float) -> float:  # README: the highest TPR with FPR <= the target
        return float(etpr[efpr <= max_fpr].max())

    # The operating points are far apart, so a wrong FPR budget cannot pass by accident.
    assert oracle(0.001) < oracle(0.01) - 0.02 < oracle(0.05) - 0.04 < oracle(0.1) - 0.06
    res = A.result_from_scores("x", s_in, s_out)
    assert res.tpr_at_1pct_fpr == pytest.approx(oracle(0.01), abs=1e-12)
    assert res.tpr_at_01pct_fpr == pytest.approx(oracle(0.001), abs=1e-12)
    # The same fields filled by an attack, against the attack's scores recomputed by hand.
    p_in, p_out = A.softmax(np.c_[s_in, -s_in]), A.softmax(np.c_[s_out, -s_out])
    zeros_in, zeros_out = np.zeros(s_in.size, int), np.zeros(s_out.size, int)
    conf = A.run_attack("confidence", AttackInputs(p_in, zeros_in, p_out, zeros_out))
    c_in, c_out = p_in[:, 0], p_out[:, 0]
    cfpr, ctpr, _ = skm.roc_curve(y, np.r_[c_in, c_out])
    assert conf.tpr_at_1pct_fpr == pytest.approx(ctpr[cfpr <= 0.01].max(), abs=1e-12)
    assert conf.tpr_at_01pct_fpr == pytest.approx(ctpr[cfpr <= 0.001].max(), abs=1e-12)
    assert conf.tpr_at_01pct_fpr > 0.0


def _brute_best_threshold(s_in: np.ndarray, s_out: np.ndarray) -> tuple[float, float]:
    """O(n^2) Song & Mittal search; ties go to the largest threshold."""
    best_t, best_obj = None, -1
    for t in np.unique(np.r_[s_in, s_out]):
        obj = np.sum(s_in >= t) * s_out.size + np.sum(s_out < t) * s_in.size
        if obj > best_obj or (obj == best_obj and t > best_t):
            best_t, best_obj = t, obj
    return float(best_t), best_obj / (2 * s_in.size * s_out.size)


@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_best_threshold_equals_brute_force(kind: str) -> None:
    s_in, s_out = _score_pair(np.random.default_rng(3), kind)
    t, acc = A.best_threshold(s_in, s_out)
    et, eacc = _brute_best_threshold(s_in, s_out)
    assert t == et
    assert acc == pytest.approx(eacc, abs=1e-15)
    assert A.balanced_accuracy_at(t, s_in, s_out) == pytest.approx(acc)


def test_decision_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(4)
    s_in, s_out = rng.normal(0.3, 1, 120), rng.normal(0, 1, 80)
    y = np.r_[np.ones(120), np.zeros(80)].astype(int)
    pred = (np.r_[s_in, s_out] >= 0.2).astype(int)
    p, r, f = A.precision_recall_f1(0.2, s_in, s_out)
    assert p == pytest.approx(skm.precision_score(y, pred))
    assert r == pytest.approx(skm.recall_score(y, pred))
    assert f == pytest.approx(skm.f1_score(y, pred))
    bal = skm.balanced_accuracy_score(y, pred)
    assert A.balanced_accuracy_at(0.2, s_in, s_out) == pytest.approx(bal)


def test_no_positive_predictions_gives_zero_precision() -> None:
    assert A.precision_recall_f1(10.0, [1.0, 2.0], [0.0]) == (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- score functions
def test_scores_match_textbook_formulas() -> None:
    rng = np.random.default_rng(5)
    p = _random_probs(rng, 50, 7)
    y = rng.integers(0, 7, 50)
    rows = np.arange(50)
    np.testing.assert_allclose(A.confidence_scores(p, y), p[rows, y])
    per_sample_ce = [skm.log_loss([y[i]], p[i : i + 1], labels=range(7)) for i in range(50)]
    np.testing.assert_allclose(A.loss_scores(p, y), -np.array(per_sample_ce), rtol=1e-9)
    np.testing.assert_allclose(A.entropy_scores(p), -scipy_entropy(p, axis=1), rtol=1e-9)
    mentr = []
    for i in range(50):
        v = -(1 - p[i, y[i]]) * np.log(p[i, y[i]])
        v -= sum(p[i, j] * np.log(1 - p[i, j]) for j in range(7) if j != y[i])
        mentr.append(v)
    np.testing.assert_allclose(A.modified_entropy_scores(p, y), -np.array(mentr), rtol=1e-9)
    phi = np.log(p[rows, y]) - np.log(1 - p[rows, y])
    np.testing.assert_allclose(A.logit_scaled_confidence(p, y), phi, rtol=1e-7)
    np.testing.assert_array_equal(A.correctness_scores(p, y), (p.argmax(1) == y).astype(float))


def test_logit_scaled_confidence_is_stable_from_logits() -> None:
    z = np.array([[800.0, 0.0, -5.0], [0.0, 1e-3, 0.0], [-300.0, 300.0, 0.0]])
    y = np.array([0, 1, 0])
    phi = A.logit_scaled_confidence(z, y, from_logits=True)
    expected = [800.0 - np.logaddexp(0.0, -5.0), 1e-3 - np.log(2.0), -300.0 - np.logaddexp(300, 0)]
    np.testing.assert_allclose(phi, expected, rtol=1e-12)
    assert np.all(np.isfinite(phi))
    # Moderate logits: probabilities and logits give the same phi.
    zz = np.random.default_rng(6).normal(0, 3, (20, 5))
    yy = np.arange(20) % 5
    np.testing.assert_allclose(
        A.logit_scaled_confidence(zz, yy, from_logits=True),
        A.logit_scaled_confidence(A.softmax(zz), yy),
        rtol=1e-8,
    )


# --------------------------------------------------------------------------- threshold attacks
def _brute_class_thresholds(s_in, y_in, s_out, y_out, c):  # type: ignore[no-untyped-def]
    g, _ = _brute_best_threshold(s_in, s_out)
    out = np.full(c, g)
    for k in range(c):
        if np.any(y_in == k) and np.any(y_out == k):
            out[k], _ = _brute_best_threshold(s_in[y_in == k], s_out[y_out == k])
    return out


def test_class_dependent_thresholds_equal_brute_force() -> None:
    rng = np.random.default_rng(7)
    c = 6
    y_in, y_out = rng.integers(0, 5, 400), rng.integers(1, 6, 300)  # class 0 / 5 half-missing
    s_in = rng.normal(0.4, 1, 400) + 0.1 * y_in
    s_out = np.round(rng.normal(0, 1, 300), 1)  # ties on the non-member side
    t, fitted = A.class_dependent_thresholds(s_in, y_in, s_out, y_out, c)
    np.testing.assert_array_equal(t, _brute_class_thresholds(s_in, y_in, s_out, y_out, c))
    assert fitted.tolist() == [False, True, True, True, True, False]


def _inputs_with_shadow(seed: int = 8, n: int = 400, c: int = 5, gap: float = 1.5) -> AttackInputs:
    rng = np.random.default_rng(seed)

    def probs(n_: int, member: bool) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, c, n_)
        z = rng.normal(0, 1, (n_, c))
        # Members get a larger true-class logit, with a class-dependent shift.
        z[np.arange(n_), y] += (gap if member else 0.0) + 0.5 * y
        return A.softmax(z), y

    m, ym = probs(n, True)
    nm, ynm = probs(n, False)
    sm, ysm = probs(n, True)
    snm, ysnm = probs(n, False)
    return AttackInputs(m, ym, nm, ynm, sm, ysm, snm, ysnm)


def test_class_threshold_attack_matches_brute_force_decisions() -> None:
    inputs = _inputs_with_shadow()
    res = A.run_attack("confidence_class_threshold", inputs)
    sm, sn = inputs.split("shadow_member"), inputs.split("shadow_nonmember")
    tm, tn = inputs.split("member"), inputs.split("nonmember")
    conf = lambda s: s.probs[np.arange(s.labels.size), s.labels]  # noqa: E731
    t = _brute_class_thresholds(conf(sm), sm.labels, conf(sn), sn.labels, 5)
    tpr = np.mean(conf(tm) >= t[tm.labels])
    tnr = np.mean(conf(tn) < t[tn.labels])
    assert res.accuracy == pytest.approx((tpr + tnr) / 2)
    assert res.class_thresholds == tuple(t)
    assert res.accuracy_upper_bound >= res.accuracy - 1e-12


def test_global_threshold_attack_uses_shadow_threshold() -> None:
    inputs = _inputs_with_shadow()
    res = A.run_attack("loss", inputs)
    sm, sn = inputs.split("shadow_member"), inputs.split("shadow_nonmember")
    t, _ = _brute_best_threshold(
        A.loss_scores(sm.probs, sm.labels), A.loss_scores(sn.probs, sn.labels)
    )
    assert res.threshold == t
    tm, tn = inputs.split("member"), inputs.split("nonmember")
    expected = A.balanced_accuracy_at(
        t, A.loss_scores(tm.probs, tm.labels), A.loss_scores(tn.probs, tn.labels)
    )
    assert res.accuracy == pytest.approx(expected)
    assert res.accuracy_upper_bound >= res.accuracy
    assert res.auc > 0.7


def test_gap_attack_accuracy_identity() -> None:
    inputs = _inputs_with_shadow(gap=0.8)
    res = A.run_attack("gap", inputs)
    tm, tn = inputs.split("member"), inputs.split("nonmember")
    train_acc = np.mean(tm.probs.argmax(1) == tm.labels)
    test_acc = np.mean(tn.probs.argmax(1) == tn.labels)
    assert res.accuracy == pytest.approx(0.5 + (train_acc - test_acc) / 2)


def test_run_attacks_all_available_and_json() -> None:
    inputs = _inputs_with_shadow()
    results = A.run_attacks(None, inputs)
    assert "confidence_class_threshold" in results and "lira_offline" not in results
    for r in results.values():
        assert r.accuracy is not None and 0.0 <= r.accuracy <= 1.0
        d = json.loads(json.dumps(r.to_dict(max_roc_points=50), allow_nan=False))
        assert d["name"] == r.name and len(d["roc_fpr"]) <= 52
    no_shadow = AttackInputs(
        *[getattr(inputs, f) for f in list(AttackInputs.__dataclass_fields__)[:4]]
    )
    r = A.run_attack("confidence", no_shadow)
    assert r.accuracy is None and r.threshold_source == "none"
    with pytest.raises(AttackInputError, match="needs"):
        A.run_attack("loss_class_threshold", no_shadow)


def test_logits_inputs_equal_probability_inputs() -> None:
    rng = np.random.default_rng(9)
    z_in, z_out = rng.normal(0, 3, (100, 4)), rng.normal(0, 2, (80, 4))
    y_in, y_out = rng.integers(0, 4, 100), rng.integers(0, 4, 80)
    a = AttackInputs(z_in, y_in, z_out, y_out, kind="logits")
    b = AttackInputs(A.softmax(z_in), y_in, A.softmax(z_out), y_out)
    for name in ("confidence", "modified_entropy", "logit_scaled_confidence"):
        assert A.run_attack(name, a).auc == pytest.approx(A.run_attack(name, b).auc)


# --------------------------------------------------------------------------- LiRA and RMIA
def _gaussian_lira_problem(seed: int, n: int, r: int, delta: float, sigma: float, online: bool):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    mu_out = rng.normal(0, 3, n)  # per-example difficulty that a global threshold cannot see
    in_mask = rng.random((r, n)) < 0.5 if online else np.zeros((r, n), bool)
    ref = rng.normal(mu_out + delta * in_mask, sigma)
    member = np.arange(n) < n // 2
    target = rng.normal(mu_out + delta * member, sigma)
    return target, ref, in_mask, member


@pytest.mark.parametrize(
    "online", [pytest.param(False, id="offline"), pytest.param(True, id="online")]
)
@pytest.mark.parametrize(
    "global_variance", [pytest.param(True, id="global"), pytest.param(False, id="per-example")]
)
def test_lira_approaches_optimal_auc_on_gaussians(online: bool, global_variance: bool) -> None:
    delta, sigma = 1.0, 1.0
    target, ref, in_mask, member = _gaussian_lira_problem(10, 6000, 128, delta, sigma, online)
    s = A.lira_scores(target, ref, in_mask, online=online, global_variance=global_variance)
    optimal = norm.cdf(delta / (sigma * np.sqrt(2)))  # 0.760
    auc = A.roc_auc(s[member], s[~member])
    assert abs(auc - optimal) < 0.025
    raw = A.roc_auc(target[member], target[~member])  # global threshold on phi: ~0.59
    assert auc > raw + 0.1


def test_lira_attack_through_inputs_and_calibration() -> None:
    target, ref, in_mask, member = _gaussian_lira_problem(11, 2000, 16, 1.5, 1.0, online=True)
    n = target.size
    # Encode phi as 2-class probabilities: phi = log p0 - log p1 with label 0.
    p0 = 1 / (1 + np.exp(-target))
    probs = np.c_[p0, 1 - p0]
    y = np.zeros(n, int)
    refs = ReferenceScores(ref, 1 / (1 + np.exp(-ref)), in_mask)
    order = np.r_[np.flatnonzero(member), np.flatnonzero(~member)]
    refs = ReferenceScores(refs.phi[:, order], refs.p_true[:, order], refs.in_mask[:, order])
    inputs = AttackInputs(probs[member], y[member], probs[~member], y[~member], reference=refs)
    res = A.run_attack("lira_online", inputs)
    direct = A.lira_scores(target[order], refs.phi, refs.in_mask, online=True)
    assert res.auc == pytest.approx(A.roc_auc(direct[: member.sum()], direct[member.sum() :]))
    assert res.threshold_source == "reference calibration"
    assert res.accuracy is not None and res.accuracy > 0.6
    # Leave-one-model-out calibration redone by hand: reference model j plays the target and is
    # scored against the other models only (never against itself).
    thr, cal_acc = _hand_lira_loo_threshold(refs.phi, refs.in_mask, max_models=8)
    assert res.threshold == pytest.approx(thr, rel=1e-9, abs=1e-12)
    assert res.extra["calibration_models"] == 8
    assert res.extra["calibration_accuracy"] == pytest.approx(cal_acc, abs=1e-12)
    s_in, s_out = direct[: member.sum()], direct[member.sum() :]
    assert res.accuracy == pytest.approx(((s_in >= thr).mean() + (s_out < thr).mean()) / 2)
    off = A.run_attack("lira_offline", inputs)
    assert off.auc > 0.6


def _hand_online_lira(phi: np.ndarray, ref: np.ndarray, in_mask: np.ndarray) -> np.ndarray:
    """Online LiRA with one pooled variance per side, written out with scipy's normal pdf."""

    def fit(mask: np.ndarray) -> tuple[np.ndarray, float]:
        k = mask.sum(axis=0)
        mu = np.array(
            [ref[mask[:, i], i].mean() if k[i] else ref[mask].mean() for i in range(ref.shape[1])]
        )
        ss = sum(((ref[mask[:, i], i] - mu[i]) ** 2).sum() for i in range(ref.shape[1]))
        return mu, ss / np.maximum(k - 1, 0).sum()

    (mu_in, var_in), (mu_out, var_out) = fit(in_mask), fit(~in_mask)
    return norm.logpdf(phi, mu_in, np.sqrt(var_in)) - norm.logpdf(phi, mu_out, np.sqrt(var_out))


def _hand_best_threshold(s_in: np.ndarray, s_out: np.ndarray) -> tuple[float, float]:
    """Song & Mittal search over the observed scores by binary search; ties -> largest t."""
    t = np.unique(np.r_[s_in, s_out])
    tp = s_in.size - np.searchsorted(np.sort(s_in), t, side="left")  # s_in >= t
    tn = np.searchsorted(np.sort(s_out), t, side="left")  # s_out < t
    obj = tp * s_out.size + tn * s_in.size
    k = np.flatnonzero(obj == obj.max())[-1]
    return float(t[k]), obj[k] / (2 * s_in.size * s_out.size)


def _hand_lira_loo_threshold(
    ref: np.ndarray, in_mask: np.ndarray, max_models: int
) -> tuple[float, float]:
    s_in, s_out = [], []
    for j in range(max_models):
        rest = np.arange(ref.shape[0]) != j
        s = _hand_online_lira(ref[j], ref[rest], in_mask[rest])
        s_in.append(s[in_mask[j]])
        s_out.append(s[~in_mask[j]])
    return _hand_best_threshold(np.concatenate(s_in), np.concatenate(s_out))


def test_rmia_scores_equal_pairwise_brute_force() -> None:
    rng = np.random.default_rng(12)
    r, n, m = 6, 80, 50
    px, pz = rng.random(n), rng.random(m)
    rx, rz = rng.random((r, n)), rng.random((r, m))
    mx, mz = rng.random((r, n)) < 0.5, rng.random((r, m)) < 0.5
    for online, a, gamma in [(False, 0.3, 2.0), (True, 0.0, 1.0), (False, 0.0, 1.5)]:
        s = A.rmia_scores(px, rx, mx, pz, rz, mz, gamma=gamma, a=a, online=online)

        def marg(p, mask, online=online, a=a):  # type: ignore[no-untyped-def]
            if online:
                return p.mean(0)
            out = np.array(
                [
                    p[~mask[:, i], i].mean() if (~mask[:, i]).any() else np.nan
                    for i in range(p.shape[1])
                ]
            )
            out = np.where(np.isnan(out), p[~mask].mean(), out)
            return ((1 + a) * out + (1 - a)) / 2

        lr = (px / marg(rx, mx))[:, None] / (pz / marg(rz, mz))[None, :]
        np.testing.assert_allclose(s, np.mean(lr >= gamma, axis=1))


def test_rmia_attack_detects_synthetic_members() -> None:
    rng = np.random.default_rng(13)
    r, n, m = 8, 600, 400
    difficulty = rng.beta(2, 2, n + m)  # per-sample true-label probability of an OUT model
    boost = 0.25

    def p_true(is_in: np.ndarray) -> np.ndarray:
        return np.clip(difficulty + boost * is_in + rng.normal(0, 0.05, is_in.shape), 0, 1)

    member = np.r_[np.ones(n // 2, bool), np.zeros(n - n // 2, bool), np.zeros(m, bool)]
    target_p = p_true(member.astype(float))
    ref_p = p_true(np.zeros((r, n + m)))
    probs = np.c_[target_p, 1 - target_p]
    y = np.zeros(n + m, int)
    zero = np.zeros((r, n), bool)
    inputs = AttackInputs(
        probs[: n // 2],
        y[: n // 2],
        probs[n // 2 : n],
        y[n // 2 : n],
        reference=ReferenceScores(np.zeros((r, n)), ref_p[:, :n], zero),
        population_outputs=probs[n:],
        population_labels=y[n:],
        population_reference=ReferenceScores(
            np.zeros((r, m)), ref_p[:, n:], np.zeros((r, m), bool)
        ),
    )
    res = A.run_attack("rmia_offline", inputs, gamma=1.0, temperature=1.0)
    conf = A.run_attack("confidence", inputs)
    assert res.auc > conf.auc + 0.05 and res.auc > 0.75


def test_tempered_true_label_probabilities_match_scipy_softmax() -> None:
    rng = np.random.default_rng(21)
    r, n, c = 3, 40, 5
    logits = rng.normal(0, 3, (r, n, c))
    y = rng.integers(0, c, n)
    mask = rng.random((r, n)) < 0.5
    for temperature in (0.5, 1.0, 2.0):
        want = scipy_softmax(logits / temperature, axis=2)[:, np.arange(n), y]
        from_logits = ReferenceScores.from_outputs(logits, y, mask, kind="logits")
        from_probs = ReferenceScores.from_outputs(scipy_softmax(logits, axis=2), y, mask)
        np.testing.assert_allclose(from_logits.p_true_at(temperature), want, rtol=1e-12)
        np.testing.assert_allclose(from_probs.p_true_at(temperature), want, rtol=1e-9)
        np.testing.assert_allclose(
            from_probs.without(1).p_true_at(temperature), want[[0, 2]], rtol=1e-9
        )
        split = SplitOutputs.from_outputs(scipy_softmax(logits[0], axis=1), y, "probs", "x")
        np.testing.assert_allclose(split.p_true_at(temperature), want[0], rtol=1e-9)


def test_rmia_temperature_equals_rmia_scores_on_tempered_softmax() -> None:
    rng = np.random.default_rng(22)
    r, n, m, c = 4, 60, 50, 4
    logits_x, logits_z = rng.normal(0, 2, (n, c)), rng.normal(0, 2, (m, c))
    ref_x, ref_z = rng.normal(0, 2, (r, n, c)), rng.normal(0, 2, (r, m, c))
    y_x, y_z = rng.integers(0, c, n), rng.integers(0, c, m)
    mask_z = rng.random((r, m)) < 0.5
    inputs = AttackInputs(
        logits_x[: n // 2],
        y_x[: n // 2],
        logits_x[n // 2 :],
        y_x[n // 2 :],
        kind="logits",
        reference=ReferenceScores.from_outputs(ref_x, y_x, np.zeros((r, n), bool), kind="logits"),
        population_outputs=logits_z,
        population_labels=y_z,
        population_reference=ReferenceScores.from_outputs(ref_z, y_z, mask_z, kind="logits"),
    )

    def p_t(logits: np.ndarray, y: np.ndarray, t: float) -> np.ndarray:
        return np.take_along_axis(scipy_softmax(logits / t, axis=-1), y[..., None], -1)[..., 0]

    for t in (1.0, 2.0):
        res = A.run_attack("rmia_offline", inputs, temperature=t, gamma=1.0)
        want = A.rmia_scores(
            p_t(logits_x, y_x, t),
            p_t(ref_x, np.broadcast_to(y_x, (r, n)), t),
            np.zeros((r, n), bool),
            p_t(logits_z, y_z, t),
            p_t(ref_z, np.broadcast_to(y_z, (r, m)), t),
            mask_z,
            gamma=1.0,
        )
        assert res.auc == pytest.approx(skm.roc_auc_score(np.arange(n) < n // 2, want))
        assert res.extra["temperature"] == t
    only_true = dataclasses.replace(
        inputs,
        reference=ReferenceScores(
            np.zeros((r, n)), p_t(ref_x, np.broadcast_to(y_x, (r, n)), 1.0), np.zeros((r, n), bool)
        ),
    )
    with pytest.raises(
        AttackInputError, match=r"temperature 2\.0 needs the reference models. full"
    ):
        A.run_attack("rmia_offline", only_true)
    assert A.run_attack("rmia_offline", only_true, temperature=1.0).auc >= 0.0


# --------------------------------------------------------------------------- query averaging
def test_query_averaging_improves_with_k_and_counts_queries() -> None:
    rng = np.random.default_rng(14)
    calls = {"n": 0}
    n, c = 300, 4
    x_in = rng.integers(0, c, n)
    x_out = rng.integers(0, c, n)
    clean = {True: 1.2, False: 0.0}

    def make_query(member: bool):  # type: ignore[no-untyped-def]
        def q(x: np.ndarray) -> np.ndarray:
            calls["n"] += len(x)
            z = rng.normal(0, 3.0, (len(x), c))  # read noise much larger than the member gap
            z[np.arange(len(x)), x] += clean[member]
            return A.softmax(z)

        return q

    def query(x: np.ndarray) -> np.ndarray:
        # Members are encoded as x >= c; the attacker only sees probabilities.
        is_member = x >= c
        out = np.empty((len(x), c))
        out[is_member] = make_query(True)(x[is_member] - c)
        out[~is_member] = make_query(False)(x[~is_member])
        return out

    results = A.query_averaging_curve(query, x_in + c, x_in, x_out, x_out, ks=(1, 4, 16))
    assert calls["n"] == 16 * 2 * n
    aucs = [r.auc for r in results]
    assert [r.extra["k"] for r in results] == [1, 4, 16]
    assert aucs[2] > aucs[0] + 0.1
    assert results[2].queries == 16 * 2 * n
    assert [row["k"] for row in A.averaging_report(results)] == [1, 4, 16]
    det = A.average_queries(lambda x: A.softmax(np.c_[x, -x]), np.arange(5.0), 3)
    np.testing.assert_allclose(det, A.softmax(np.c_[np.arange(5.0), -np.arange(5.0)]))


# --------------------------------------------------------------------------- bad input
GOOD = np.array([[0.7, 0.3], [0.2, 0.8]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"member_labels": [0, 1, 1]}, "member_labels has 3 entries", id="length"),
        pytest.param({"member_outputs": [[1.2, -0.2], [0.5, 0.5]]}, "outside", id="negative"),
        pytest.param({"member_outputs": [[np.nan, 1.0], [0.5, 0.5]]}, "NaN", id="nan"),
        pytest.param({"member_outputs": [[0.5, 0.4], [0.5, 0.5]]}, "sums to", id="row-sum"),
        pytest.param({"member_labels": [0, 2]}, r"allowed \[0, 1\]", id="label-range"),
        pytest.param({"member_labels": [0.5, 1]}, "integer", id="label-float"),
        pytest.param(
            {"member_outputs": np.zeros((0, 2)), "member_labels": []}, "empty", id="empty-in"
        ),
        pytest.param(
            {"nonmember_outputs": np.zeros((0, 2)), "nonmember_labels": []}, "empty", id="empty-out"
        ),
        pytest.param(
            {"shadow_member_outputs": GOOD, "shadow_member_labels": [0, 1]},
            "both",
            id="half-shadow",
        ),
        pytest.param({"kind": "scores"}, "kind", id="kind"),
        pytest.param(
            {"nonmember_outputs": np.ones((2, 3)) / 3}, "same number of classes", id="classes"
        ),
    ],
)
def test_bad_inputs_raise_one_clear_error(kwargs: dict, match: str) -> None:
    base = {
        "member_outputs": GOOD,
        "member_labels": [0, 1],
        "nonmember_outputs": GOOD,
        "nonmember_labels": [1, 0],
    }
    with pytest.raises(AttackInputError, match=match) as err:
        AttackInputs(**{**base, **kwargs})
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_metric_inputs() -> None:
    with pytest.raises(AttackInputError, match="empty"):
        A.roc_auc([], [1.0])
    with pytest.raises(AttackInputError, match="NaN"):
        A.best_threshold([np.nan], [1.0])
    with pytest.raises(ValueError, match="max_fpr"):
        A.tpr_at_fpr([1.0], [0.0], 5.0)
    with pytest.raises(AttackInputError, match="unknown attack"):
        A.run_attack("nope", _inputs_with_shadow())
    with pytest.raises(AttackInputError, match="must match"):
        ReferenceScores(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 3), bool))
    with pytest.raises(AttackInputError, match="reference covers"):
        AttackInputs(
            GOOD,
            [0, 1],
            GOOD,
            [1, 0],
            reference=ReferenceScores(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3), bool)),
        )


def test_cross_validated_accuracy_matches_a_brute_force_fold_loop() -> None:
    rng = np.random.default_rng(5)
    s_in, s_out = rng.normal(0.4, 1, 301), rng.normal(0, 1, 257)

    def brute(folds: int) -> float:
        accs = []
        for k in range(folds):
            fit_in = np.array([v for i, v in enumerate(s_in) if i % folds != k])
            fit_out = np.array([v for i, v in enumerate(s_out) if i % folds != k])
            cands = np.concatenate([fit_in, fit_out, [np.inf]])
            best = max(cands, key=lambda t: ((fit_in >= t).mean() + (fit_out < t).mean(), t))
            ev_in, ev_out = s_in[k::folds], s_out[k::folds]
            accs.append(((ev_in >= best).mean() + (ev_out < best).mean()) / 2)
        return float(np.mean(accs))

    for folds in (2, 3):
        assert A.cross_validated_accuracy(s_in, s_out, folds) == pytest.approx(
            brute(folds), abs=1e-12
        )
    with pytest.raises(A.AttackInputError, match="folds"):
        A.cross_validated_accuracy([0.1], [0.2, 0.3])
