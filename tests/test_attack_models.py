"""Tests of the attacker's learned models (torch, sklearn) on tiny data, against oracles."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from nvmpriv import attack_models as M
from nvmpriv import attacks as A
from nvmpriv.attacks import AttackInputError, AttackResult

CFG = M.TrainConfig(epochs=40, lr=3e-3, batch_size=50)


def _fc() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.fixture(scope="module")
def digits() -> dict:
    """Overfit FC target on 200 digits (members) vs 600 non-members; ~1000 attacker samples."""
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    tm, tn, pool = perm[:200], perm[200:800], perm[800:]
    target = M.train_classifier(_fc, x[tm], y[tm], epochs=40, lr=3e-3, batch_size=50, seed=1)
    return {
        "query": M.predict_proba_fn(target),
        "model": target,
        "split": M.MembershipSplit(x[tm], y[tm], x[tn], y[tn]),
        "pool_x": x[pool],
        "pool_y": y[pool],
        "x": x,
        "y": y,
        "candidates": perm[:800],
    }


@pytest.fixture(scope="module")
def overfit_digits() -> dict:
    """A strongly overfit target (50 members, 100 epochs; 750 non-members) and 8 shadow models
    trained like it (50 samples each, from a 100-sample attacker pool)."""
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    tm, tn, pool = perm[:50], perm[50:800], perm[800:900]
    cfg = M.TrainConfig(epochs=100, lr=3e-3, batch_size=50)
    target = M.train_classifier(_fc, x[tm], y[tm], epochs=100, lr=3e-3, batch_size=50, seed=1)
    query = M.predict_proba_fn(target)
    split = M.MembershipSplit(x[tm], y[tm], x[tn], y[tn])
    shadows = M.train_shadow_models(_fc, x[pool], y[pool], 8, train=cfg, seed=0)
    return {"args": (query, split, x[pool], y[pool], _fc), "shadows": shadows}


def _spy_attack_features(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Record what a learned attack feeds its attack model.

    ``train``: the shadow training features; ``scored``: every feature set scored afterwards
    (the shadow training set, then the target's members, then its non-members).
    """
    seen: dict = {"scored": []}
    fit = M._fit_binary

    def spy(
        model: nn.Module, feats: list[np.ndarray], labels: np.ndarray, **kw: Any
    ) -> Callable[[list[np.ndarray]], np.ndarray]:
        seen["train"], seen["labels"] = feats, labels
        score = fit(model, feats, labels, **kw)

        def recorded(f: list[np.ndarray]) -> np.ndarray:
            seen["scored"].append(f)
            return score(f)

        return recorded

    monkeypatch.setattr(M, "_fit_binary", spy)
    return seen


def _shuffled_split(digits: dict, seed: int = 5) -> M.MembershipSplit:
    """Members/non-members assigned at random among the target's candidates: no signal."""
    idx = np.random.default_rng(seed).permutation(digits["candidates"])
    x, y = digits["x"], digits["y"]
    return M.MembershipSplit(x[idx[:200]], y[idx[:200]], x[idx[200:]], y[idx[200:]])


# --------------------------------------------------------------------------- training utilities
def test_import_has_no_lightning() -> None:
    code = "import sys, nvmpriv.attack_models; assert 'lightning' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_batched_training_equals_separate_training_full_batch() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = rng.integers(0, 3, 60)

    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

    masks = np.ones((3, 60), bool)
    cfg = M.TrainConfig(epochs=15, lr=1e-2, batch_size=60)  # full batch: order-free
    batched = M.train_classifiers(factory, x, y, masks, train=cfg, seed=7, batched=True)
    single = M.train_classifier(factory, x, y, epochs=15, lr=1e-2, batch_size=60, seed=7)
    xt = torch.as_tensor(x)
    with torch.no_grad():
        torch.testing.assert_close(batched[0](xt), single(xt), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(batched[0](xt), batched[1](xt))  # different inits


def test_batched_training_respects_masks() -> None:
    d = load_digits()
    x, y = (d.data[:600] / 16.0).astype(np.float32), d.target[:600]
    masks = np.zeros((2, 600), bool)
    masks[0, :300], masks[1, 300:] = True, True
    nets = M.train_classifiers(_fc, x, y, masks, train=M.TrainConfig(epochs=40, lr=3e-3), seed=0)
    for net, m in zip(nets, masks, strict=True):
        q = M.predict_proba_fn(net)
        loss_in = -np.mean(A.loss_scores(q(x[m]), y[m]))
        loss_out = -np.mean(A.loss_scores(q(x[~m]), y[~m]))
        assert loss_in < 0.5 * loss_out  # fitted its own half far better than the other


def test_predict_proba_fn_is_softmax() -> None:
    net = _fc()
    x = np.random.default_rng(1).random((7, 64)).astype(np.float32)
    p = M.predict_proba_fn(net, batch_size=3)(x)
    with torch.no_grad():
        expected = torch.softmax(net(torch.as_tensor(x)).double(), 1).numpy()
    np.testing.assert_allclose(p, expected, rtol=1e-5)  # float32 kernels differ by batch
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)


def _finite_difference_sensitivity(
    net: nn.Module, x: np.ndarray, m: int, eps: float, seed: int
) -> np.ndarray:
    """SAMIA's ``mean_k |p(x + eps u_k) - p(x)| / eps``, in float64 on the module itself.

    ``u_k`` are the documented directions: ``default_rng(seed)``'s standard normals ``[m, *x]``.
    """
    u = np.random.default_rng(seed).standard_normal((m, *x.shape)).astype(np.float32)
    net64 = copy.deepcopy(net).double()

    def probs(v: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(net64(torch.as_tensor(v, dtype=torch.float64)), 1).numpy()

    x64 = x.astype(np.float64)
    p0 = probs(x64)
    return np.mean([np.abs(probs(x64 + eps * uk) - p0) for uk in u], axis=0) / eps


def test_samia_feeds_the_sensitivity_to_its_attack_model(
    digits: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    split, q = digits["split"], digits["query"]
    small = M.MembershipSplit(
        split.member_x[:20], split.member_y[:20], split.nonmember_x[:20], split.nonmember_y[:20]
    )
    pool_x, pool_y = digits["pool_x"][:60], digits["pool_y"][:60]
    cfg = M.TrainConfig(epochs=2)
    m, eps, seed = 3, 1e-3, 4
    shadows = M.train_shadow_models(_fc, pool_x, pool_y, 1, train=cfg, seed=seed)
    seen = _spy_attack_features(monkeypatch)
    res = M.samia_attack(
        q,
        small,
        pool_x,
        pool_y,
        _fc,
        n_shadow=1,
        m=m,
        eps=eps,
        attack_epochs=1,
        seed=seed,
        shadows=shadows,
    )
    assert res.queries == (m + 1) * 40
    # Target members and non-members: (p, s, onehot), s against finite differences by hand.
    for (p, s, onehot), x, y in zip(
        seen["scored"][1:],
        (small.member_x, small.nonmember_x),
        (small.member_y, small.nonmember_y),
        strict=True,
    ):
        expected = _finite_difference_sensitivity(digits["model"], x, m, eps, seed)
        assert (expected > 1e-3).sum() > 50  # most entries are far from zero
        np.testing.assert_allclose(s, expected, rtol=1e-2, atol=1e-5)
        np.testing.assert_allclose(p, q(x), rtol=1e-12)
        np.testing.assert_array_equal(onehot, np.eye(10)[y])
    # The attack model's training set: the shadow model's own members first.
    sh = shadows[0]
    n_in = len(sh.member_idx)
    expected = _finite_difference_sensitivity(sh.model, pool_x[sh.member_idx], m, eps, seed)
    assert (expected > 1e-3).sum() > 50
    np.testing.assert_allclose(seen["train"][1][:n_in], expected, rtol=1e-2, atol=1e-5)
    assert seen["labels"][:n_in].tolist() == [1.0] * n_in


def test_sensitivity_matches_jacobian_closed_form() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 6))
    x = rng.normal(size=(1, 6))

    def query(v: np.ndarray) -> np.ndarray:
        return A.softmax(v @ w.T)

    p, s = M.sensitivity_scores(query, x.astype(np.float32), m=4000, eps=1e-3, seed=0)
    p0 = query(x)[0]
    jac = (np.diag(p0) - np.outer(p0, p0)) @ w  # d softmax / d x
    # E|J_i . u| for u ~ N(0, I) is ||J_i|| sqrt(2 / pi).
    expected = np.linalg.norm(jac, axis=1) * np.sqrt(2 / np.pi)
    np.testing.assert_allclose(s[0], expected, rtol=0.06)
    np.testing.assert_allclose(p[0], p0, atol=1e-6)


# --------------------------------------------------------------------------- digits evidence
def test_score_attacks_detect_overfit_members(digits: dict) -> None:
    inputs = M.shadow_attack_inputs(
        digits["query"], digits["split"], digits["pool_x"], digits["pool_y"], _fc, train=CFG
    )
    assert inputs.queries == 800
    res = A.run_attack("loss", inputs)
    assert res.auc > 0.55 and res.accuracy is not None and res.accuracy > 0.55
    # Membership labels shuffled: the same scores carry no signal.
    s = np.r_[
        A.loss_scores(inputs.member_outputs, inputs.member_labels),
        A.loss_scores(inputs.nonmember_outputs, inputs.nonmember_labels),
    ]
    fake = np.random.default_rng(3).permutation(s.size) < 200
    assert abs(A.roc_auc(s[fake], s[~fake]) - 0.5) < 0.06


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        pytest.param("nn_shadow", {"n_shadow": 2, "attack_epochs": 20}, id="nn_shadow"),
        pytest.param("ml_leaks", {"attack_epochs": 20}, id="ml_leaks"),
        pytest.param("samia", {"n_shadow": 2, "attack_epochs": 8, "m": 5}, id="samia"),
    ],
)
def test_learned_attacks_detect_members(digits: dict, name: str, kwargs: dict) -> None:
    args = (digits["query"], digits["split"], digits["pool_x"], digits["pool_y"], _fc)
    res = M.run_learned_attack(name, *args, train=CFG, **kwargs)
    assert isinstance(res, AttackResult) and res.name == name
    assert res.auc > 0.55
    per_sample = kwargs.get("m", 0) + 1 if name == "samia" else 1
    assert res.queries == per_sample * 800


def test_learned_attack_on_shuffled_membership_is_chance(digits: dict) -> None:
    res = M.nn_shadow_attack(
        digits["query"],
        _shuffled_split(digits),
        digits["pool_x"],
        digits["pool_y"],
        _fc,
        n_shadow=2,
        attack_epochs=20,
        train=CFG,
    )
    assert abs(res.auc - 0.5) < 0.06


def test_nasr_and_sklearn_variants_run(digits: dict) -> None:
    args = (digits["query"], digits["split"], digits["pool_x"], digits["pool_y"], _fc)
    # On this target Nasr's logits-input model stays near chance (its shadow models, trained on
    # 500 samples, hardly overfit): detection is tested on the overfit target below.
    nasr = M.nasr_attack(*args, train=CFG, attack_epochs=5)
    sk = M.nn_shadow_attack(*args, n_shadow=1, classifier="sklearn", train=CFG)
    for r in (nasr, sk):
        assert 0.0 <= r.auc <= 1.0 and r.threshold_source.startswith("attack model")
        assert r.queries == 800
    assert sk.auc > 0.55


def test_nasr_detects_members_of_an_overfit_target(
    overfit_digits: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    args, shadows = overfit_digits["args"], overfit_digits["shadows"]
    query, split = args[0], args[1]
    seen = _spy_attack_features(monkeypatch)
    nasr = M.nasr_attack(*args, n_shadow=8, attack_epochs=20, shadows=shadows)
    # The inputs: the logits (= centered log-probabilities) and the one-hot label.
    logits, onehot = seen["scored"][1]
    logp = np.log(np.maximum(query(split.member_x), 1e-30))
    np.testing.assert_allclose(logits, logp - logp.mean(axis=1, keepdims=True), rtol=1e-9)
    np.testing.assert_array_equal(onehot, np.eye(10)[split.member_y])
    assert len(seen["labels"]) == 8 * 100 and seen["labels"].mean() == 0.5
    # Label only (logits zeroed): AUC 0.53; measured: Nasr 0.72, nn_shadow 0.75.
    nn_shadow = M.nn_shadow_attack(*args, n_shadow=8, attack_epochs=20, shadows=shadows)
    assert nasr.auc > 0.65 and nasr.auc > nn_shadow.auc - 0.1


def _dropout_fc() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


@pytest.mark.parametrize(("factory", "sizes"), [(_fc, (1, 3)), (_dropout_fc, (2, 4))])
def test_a_shadow_does_not_depend_on_the_set_size(
    digits: dict, factory: M.NetFactory, sizes: tuple
) -> None:
    x, y = digits["pool_x"][:200], digits["pool_y"][:200]
    cfg = M.TrainConfig(epochs=3, lr=3e-3, batch_size=50)
    small, large = (M.train_shadow_models(factory, x, y, n, train=cfg, seed=7) for n in sizes)
    for a, b in zip(small, large, strict=False):
        np.testing.assert_array_equal(a.member_idx, b.member_idx)
        for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_attacker_training_leaves_the_global_rng_alone(digits: dict) -> None:
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    M.train_classifier(_fc, digits["pool_x"][:50], digits["pool_y"][:50], epochs=1, seed=9)
    M.train_shadow_models(_fc, digits["pool_x"][:50], digits["pool_y"][:50], 2, seed=9)
    assert torch.equal(torch.rand(4), expected)


def test_shared_shadows_give_the_same_attack_without_retraining(
    digits: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = (digits["query"], digits["split"], digits["pool_x"], digits["pool_y"], _fc)
    own = M.nn_shadow_attack(*args, n_shadow=2, attack_epochs=5, train=CFG, seed=3)
    shared = M.train_shadow_models(_fc, digits["pool_x"], digits["pool_y"], 3, train=CFG, seed=3)

    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("shadow models were retrained")

    monkeypatch.setattr(M, "train_shadow_models", no_training)
    # the first two of a batched set of three are the two a 2-shadow attack trains itself
    again = M.nn_shadow_attack(*args, n_shadow=2, attack_epochs=5, seed=3, shadows=shared)
    assert (again.auc, again.accuracy) == (own.auc, own.accuracy)
    assert again.extra["n_shadow"] == 2 and again.queries == own.queries
    inputs = M.shadow_attack_inputs(*args, shadow=shared[0])
    np.testing.assert_array_equal(
        inputs.shadow_member_outputs, shared[0].query(digits["pool_x"][shared[0].member_idx])
    )
    with pytest.raises(AttackInputError, match="3 shadow models given but the attack uses"):
        M.samia_attack(*args, shadows=shared, n_shadow=5)
    with pytest.raises(AttackInputError, match="pass the shadow_x/shadow_y"):
        M.ml_leaks_attack(
            digits["query"],
            digits["split"],
            digits["pool_x"][:10],
            digits["pool_y"][:10],
            _fc,
            shadows=shared,
        )


@pytest.mark.parametrize(
    "online", [pytest.param(False, id="offline"), pytest.param(True, id="online")]
)
def test_reference_attacks_on_digits(digits: dict, online: bool) -> None:
    inputs = M.reference_attack_inputs(
        digits["query"],
        digits["split"],
        digits["pool_x"],
        digits["pool_y"],
        _fc,
        n_ref=4,
        online=online,
        train=CFG,
    )
    assert inputs.reference is not None and inputs.reference.n_ref == 4
    cand_in = inputs.reference.in_mask.mean()
    assert (0.3 < cand_in < 0.7) if online else cand_in == 0.0
    # Per-candidate alignment, recomputed by hand: retrain the reference models on the training
    # masks the inputs report (pool part: calibration; candidate part: reference) and score a few
    # candidates from their logits.
    split, cal, ref = digits["split"], inputs.calibration, inputs.reference
    assert cal is not None and inputs.population_reference is cal
    masks, x_all, y_all = cal.in_mask, digits["pool_x"], digits["pool_y"]
    if online:
        masks = np.concatenate([cal.in_mask, ref.in_mask], axis=1)
        x_all, y_all = np.concatenate([x_all, split.x]), np.concatenate([y_all, split.y])
    nets = M.train_classifiers(_fc, x_all, y_all, masks, train=CFG, seed=0)
    picks = np.array([0, 1, 57, 199, 200, 201, 444, 799])  # members (< 200) and non-members

    def by_hand(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            z = torch.stack([net(torch.as_tensor(x)) for net in nets]).double().numpy()
        rows = np.arange(len(y))
        z_y = z[:, rows, y]
        z[:, rows, y] = -np.inf
        lse_rest = np.logaddexp.reduce(z, axis=2)  # log sum_{j != y} exp z_j
        return z_y - lse_rest, np.exp(z_y - np.logaddexp(lse_rest, z_y))  # phi, p_y [R, n]

    phi, p_true = by_hand(digits["pool_x"][:40], digits["pool_y"][:40])
    np.testing.assert_allclose(cal.phi[:, :40], phi, rtol=1e-6, atol=1e-8)  # the same models
    np.testing.assert_allclose(cal.p_true[:, :40], p_true, rtol=1e-6, atol=1e-12)
    phi, p_true = by_hand(split.x[picks], split.y[picks])
    np.testing.assert_allclose(ref.phi[:, picks], phi, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ref.p_true[:, picks], p_true, rtol=1e-6, atol=1e-12)
    suffix = "online" if online else "offline"
    lira, rmia = A.run_attack(f"lira_{suffix}", inputs), A.run_attack(f"rmia_{suffix}", inputs)
    assert lira.threshold_source == "reference calibration"
    assert rmia.auc > 0.55
    if online:
        assert lira.auc > 0.55


# --------------------------------------------------------------------------- bad input
def test_bad_inputs() -> None:
    x = np.zeros((3, 64), np.float32)
    with pytest.raises(AttackInputError, match="member_y has 2"):
        M.MembershipSplit(x, np.zeros(2), x, np.zeros(3))
    with pytest.raises(AttackInputError, match="nonmember_x is empty"):
        M.MembershipSplit(x, np.zeros(3), x[:0], np.zeros(0))
    with pytest.raises(ValueError, match="TrainConfig"):
        M.TrainConfig(epochs=0)
    with pytest.raises(AttackInputError, match="unknown learned attack"):
        M.run_learned_attack("nope", lambda v: v, None, x, None, _fc)  # type: ignore[arg-type]
    with pytest.raises(AttackInputError, match="m >= 1"):
        M.sensitivity_scores(lambda v: v, x, m=0)
    split = M.MembershipSplit(x, np.zeros(3, int), x, np.zeros(3, int))
    rng = np.random.default_rng(0)
    pool_x, pool_y = rng.random((40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    with pytest.raises(AttackInputError, match="sums to"):
        M.shadow_attack_inputs(
            lambda v: np.full((len(v), 10), 0.5),
            split,
            pool_x,
            pool_y,
            _fc,
            train=M.TrainConfig(epochs=1),
        )
