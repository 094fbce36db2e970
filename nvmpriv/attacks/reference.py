"""Reference-model attacks on score arrays: LiRA (Carlini et al.) and RMIA (Zarifzadeh et al.).

The reference models are trained by the attacker (``nvmpriv.attack_models``); this module only
does the scoring maths on their outputs, so it stays numpy-only.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from nvmpriv.attacks._validate import AttackInputError
from nvmpriv.attacks.inputs import AttackInputs, ReferenceScores
from nvmpriv.attacks.metrics import best_threshold
from nvmpriv.attacks.result import AttackResult, result_from_scores
from nvmpriv.attacks.scores import EPS

__all__ = [
    "gaussian_fit",
    "lira_attack",
    "lira_scores",
    "rmia_attack",
    "rmia_scores",
]

#: Variance floor for LiRA's Gaussians (phi units squared).
MIN_VAR = 1e-8


def gaussian_fit(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-sample mean and variance of the masked entries of ``values`` (column-wise).

    Samples with no masked entry get the mean of all masked entries; samples with fewer than two
    get the pooled variance. The pooled (global) variance is the within-sample variance pooled
    over samples, ``sum_i sum_r (v_ri - mu_i)^2 / sum_i (k_i - 1)``, so that differences between
    per-sample means do not inflate it.

    Args:
        values: ``[R, N]`` observations (e.g. phi of ``R`` models on ``N`` samples).
        mask: ``[R, N]`` bool, which observations to use.

    Returns:
        ``(mean [N], var [N], pooled_var)``.

    Raises:
        AttackInputError: If the mask selects nothing.

    Examples:
        >>> v = np.array([[1.0, 10.0], [3.0, 14.0]])
        >>> mu, var, pooled = gaussian_fit(v, np.ones_like(v, dtype=bool))
        >>> mu.tolist(), var.tolist(), pooled
        ([2.0, 12.0], [2.0, 8.0], 5.0)
    """
    m = mask.astype(np.float64)
    k = m.sum(axis=0)
    if k.sum() == 0:
        raise AttackInputError(
            "no reference observation selected (in_mask has no entry of the needed kind)"
        )
    global_mean = float((values * m).sum() / k.sum())
    mean = np.where(k > 0, (values * m).sum(axis=0) / np.maximum(k, 1), global_mean)
    ss = (((values - mean) ** 2) * m).sum(axis=0)
    dof = np.maximum(k - 1, 0)
    if dof.sum() > 0:
        pooled = float(ss.sum() / dof.sum())
    else:
        pooled = float(np.var(values[mask])) if k.sum() > 1 else 1.0
    pooled = max(pooled, MIN_VAR)
    var = np.where(k >= 2, ss / np.maximum(dof, 1), pooled)
    return mean, np.maximum(var, MIN_VAR), pooled


def _auto_global(mask: np.ndarray, global_variance: bool | None) -> bool:
    if global_variance is not None:
        return global_variance
    # LiRA: per-example variances need many models; below ~32 observations per side use one.
    return float(np.median(mask.sum(axis=0))) < 32


def lira_scores(
    target_phi: np.ndarray,
    ref_phi: np.ndarray,
    in_mask: np.ndarray,
    *,
    online: bool = False,
    global_variance: bool | None = None,
) -> np.ndarray:
    """LiRA membership scores from logit-scaled confidences.

    Offline: the z-score ``(phi - mu_out) / sigma_out``, a monotone transform of the one-sided
    test ``Pr[Z <= phi]``, ``Z ~ N(mu_out, sigma_out^2)``. Online: the Gaussian log-likelihood
    ratio ``log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)``.

    Args:
        target_phi: Target model's phi on the candidates ``[N]``.
        ref_phi: Reference models' phi ``[R, N]``.
        in_mask: ``[R, N]`` bool, True where the candidate was in that model's training set.
        online: Use IN models as well (needs True entries in ``in_mask``).
        global_variance: One pooled variance per side instead of per-sample ones; ``None``
            chooses pooled when the median number of observations per sample is below 32.

    Returns:
        Scores ``[N]``, higher = member.

    Raises:
        AttackInputError: On shape mismatch or missing IN/OUT observations.

    Examples:
        >>> ref = np.array([[0.0, 0.0], [2.0, 2.0]])
        >>> lira_scores(np.array([3.0, 1.0]), ref, np.zeros((2, 2), bool), global_variance=True)
        array([1.41421356, 0.        ])
    """
    phi = np.asarray(target_phi, dtype=np.float64)
    ref = np.asarray(ref_phi, dtype=np.float64)
    mask = np.asarray(in_mask, dtype=bool)
    if ref.ndim != 2 or ref.shape != mask.shape or phi.shape != (ref.shape[1],):
        raise AttackInputError(
            f"target_phi {phi.shape}, ref_phi {ref.shape} and in_mask {mask.shape} must be "
            "[N], [R, N], [R, N]"
        )
    out = ~mask
    use_global = _auto_global(mask if online else out, global_variance)
    mu_out, var_out, pooled_out = gaussian_fit(ref, out)
    if use_global:
        var_out = np.full_like(var_out, pooled_out)
    if not online:
        return (phi - mu_out) / np.sqrt(var_out)
    if not mask.any():
        raise AttackInputError(
            "online LiRA needs reference models trained on the candidates (in_mask has no True); "
            "use online=False or train online reference models"
        )
    mu_in, var_in, pooled_in = gaussian_fit(ref, mask)
    if use_global:
        var_in = np.full_like(var_in, pooled_in)
    log_in = -0.5 * ((phi - mu_in) ** 2 / var_in + np.log(var_in))
    log_out = -0.5 * ((phi - mu_out) ** 2 / var_out + np.log(var_out))
    return log_in - log_out


def _marginal(p: np.ndarray, mask: np.ndarray, *, online: bool, a: float) -> np.ndarray:
    """RMIA's estimate of ``Pr(x)`` from reference models' true-label probabilities."""
    if online:
        return np.maximum(p.mean(axis=0), EPS)
    out = (~mask).astype(np.float64)
    k = out.sum(axis=0)
    fallback = float((p * out).sum() / k.sum()) if k.sum() else float(p.mean())
    p_out = np.where(k > 0, (p * out).sum(axis=0) / np.maximum(k, 1), fallback)
    # Offline linear correction: IN probabilities are approximated from OUT ones.
    return np.maximum(0.5 * ((1.0 + a) * p_out + (1.0 - a)), EPS)


def rmia_scores(
    target_p_x: np.ndarray,
    ref_p_x: np.ndarray,
    in_mask_x: np.ndarray,
    target_p_z: np.ndarray,
    ref_p_z: np.ndarray,
    in_mask_z: np.ndarray,
    *,
    gamma: float = 2.0,
    a: float = 0.3,
    online: bool = False,
) -> np.ndarray:
    """RMIA scores: the fraction of population samples ``z`` that ``x`` dominates.

    ``LR(x, z) = [P(x|theta) / P(x)] / [P(z|theta) / P(z)]`` and
    ``score(x) = mean_z 1[LR(x, z) >= gamma]``. ``P(.|theta)`` is the target's true-label
    probability; ``P(.)`` averages the reference models (offline: OUT models only, corrected by
    ``((1 + a) P_OUT + (1 - a)) / 2``). Computed with one sort of the ``z`` ratios.

    Args:
        target_p_x: Target's true-label probability on the candidates ``[N]``.
        ref_p_x: Reference models' true-label probabilities on the candidates ``[R, N]``.
        in_mask_x: ``[R, N]`` bool training membership of the candidates.
        target_p_z: Target's true-label probability on population samples ``[M]``.
        ref_p_z: Reference models' probabilities on the population ``[R, M]``.
        in_mask_z: ``[R, M]`` bool training membership of the population samples.
        gamma: Likelihood-ratio threshold (dimensionless, > 0; 1-2 in the paper).
        a: Offline correction coefficient in ``[0, 1)``.
        online: Average all reference models (IN and OUT) instead of the offline correction.

    Returns:
        Scores ``[N]`` in ``[0, 1]``, higher = member.

    Raises:
        AttackInputError: On bad shapes or parameters.

    Examples:
        >>> ref_x = np.array([[0.5, 0.5]]); ref_z = np.array([[0.5, 0.5]])
        >>> m = np.zeros((1, 2), bool)
        >>> rmia_scores(np.array([0.9, 0.2]), ref_x, m, np.array([0.4, 0.6]), ref_z, m, gamma=1.0)
        array([1., 0.])
    """
    if not gamma > 0:
        raise AttackInputError(f"gamma must be > 0, got {gamma}")
    if not 0.0 <= a < 1.0:
        raise AttackInputError(f"a must be in [0, 1), got {a}")
    px, rx, mx = (np.asarray(v) for v in (target_p_x, ref_p_x, in_mask_x))
    pz, rz, mz = (np.asarray(v) for v in (target_p_z, ref_p_z, in_mask_z))
    if rx.shape != mx.shape or px.shape != (rx.shape[1],):
        raise AttackInputError(f"candidate shapes {px.shape}, {rx.shape}, {mx.shape} disagree")
    if rz.shape != mz.shape or pz.shape != (rz.shape[1],) or rz.shape[0] != rx.shape[0]:
        raise AttackInputError(f"population shapes {pz.shape}, {rz.shape}, {mz.shape} disagree")
    if pz.size == 0:
        raise AttackInputError("RMIA needs at least one population sample z")
    ratio_x = px / _marginal(rx, mx.astype(bool), online=online, a=a)
    ratio_z = np.sort(pz / _marginal(rz, mz.astype(bool), online=online, a=a))
    return np.searchsorted(ratio_z, ratio_x / gamma, side="right") / ratio_z.size


def _loo_threshold(
    cal: ReferenceScores,
    score_fn: object,
    max_models: int,
) -> tuple[float | None, dict[str, object]]:
    """Leave-one-reference-model-out threshold: each held-out model plays the target."""
    js = [j for j in range(cal.n_ref) if cal.in_mask[j].any() and (~cal.in_mask[j]).any()]
    js = js[:max_models]
    if not js or cal.n_ref < 2:
        return None, {"calibration": "unavailable (need >= 2 models with IN and OUT samples)"}
    s_in, s_out = [], []
    for j in js:
        s = score_fn(j, cal.without(j))  # type: ignore[operator]
        s_in.append(s[cal.in_mask[j]])
        s_out.append(s[~cal.in_mask[j]])
    thr, acc = best_threshold(np.concatenate(s_in), np.concatenate(s_out))
    return thr, {"calibration_models": len(js), "calibration_accuracy": acc}


def _calibration_set(inputs: AttackInputs) -> ReferenceScores | None:
    if inputs.calibration is not None:
        return inputs.calibration
    ref = inputs.reference
    if ref is not None and ref.in_mask.any() and (~ref.in_mask).any():
        return ref
    return None


def lira_attack(
    inputs: AttackInputs,
    *,
    online: bool = False,
    global_variance: bool | None = None,
    calibration_models: int = 8,
) -> AttackResult:
    """LiRA on the target candidates using ``inputs.reference``.

    The decision threshold is calibrated attacker-side by leave-one-reference-model-out on
    ``inputs.calibration`` (or on ``inputs.reference`` when it has IN and OUT entries).

    Args:
        inputs: Target outputs plus ``reference`` scores.
        online: Online (IN and OUT models) or offline (OUT models only).
        global_variance: See :func:`lira_scores`.
        calibration_models: At most this many held-out models for the calibration.

    Returns:
        Result named ``lira_online`` or ``lira_offline``.

    Raises:
        AttackInputError: If ``inputs.reference`` is missing.
    """
    t0 = time.perf_counter()
    ref = inputs.reference
    if ref is None:
        raise AttackInputError("LiRA needs inputs.reference (reference models' scores)")
    n_in = inputs.split("member").labels.size
    scores = lira_scores(
        inputs.target_phi(), ref.phi, ref.in_mask, online=online, global_variance=global_variance
    )
    extra: dict[str, object] = {
        "n_ref": ref.n_ref,
        "global_variance": _auto_global(ref.in_mask if online else ~ref.in_mask, global_variance),
    }
    thr = None
    cal = _calibration_set(inputs)
    if cal is not None:

        def fn(j: int, rest: ReferenceScores) -> np.ndarray:
            return lira_scores(
                cal.phi[j], rest.phi, rest.in_mask, online=online, global_variance=global_variance
            )

        thr, info = _loo_threshold(cal, fn, calibration_models)
        extra.update(info)
    return result_from_scores(
        "lira_online" if online else "lira_offline",
        scores[:n_in],
        scores[n_in:],
        threshold=thr,
        threshold_source="reference calibration" if thr is not None else "none",
        queries=inputs.queries,
        seconds=time.perf_counter() - t0,
        extra=extra,
    )


def rmia_attack(
    inputs: AttackInputs,
    *,
    gamma: float = 2.0,
    a: float = 0.3,
    online: bool = False,
    temperature: float = 2.0,
    calibration_models: int = 8,
) -> AttackResult:
    """RMIA on the target candidates using ``reference``, ``population_*`` fields.

    ``P(.|theta)`` is the true-label probability of ``softmax(logits / temperature)`` for the
    target and every reference model alike (2 in the RMIA authors' code; 1 is the plain
    softmax). Outputs observed as probabilities give the same tempered values, since they fix
    the logits up to a per-row constant.

    Args:
        inputs: Target outputs, ``reference``, ``population_outputs``/``labels`` and
            ``population_reference``.
        gamma: Likelihood-ratio threshold (see :func:`rmia_scores`).
        a: Offline correction coefficient.
        online: Average IN and OUT reference models.
        temperature: Softmax temperature (dimensionless, > 0).
        calibration_models: At most this many held-out models for the calibration.

    Returns:
        Result named ``rmia_online`` or ``rmia_offline``.

    Raises:
        AttackInputError: If reference or population fields are missing, or ``temperature``
            is not 1 and a reference set kept only true-label probabilities.
    """
    t0 = time.perf_counter()
    ref, pref = inputs.reference, inputs.population_reference
    if ref is None or pref is None or not inputs.has_population:
        raise AttackInputError(
            "RMIA needs inputs.reference, population_outputs/labels and population_reference"
        )
    if not temperature > 0:
        raise AttackInputError(f"temperature must be > 0, got {temperature}")
    p_z = inputs.split("population").p_true_at(temperature)
    ref_p, pref_p = ref.p_true_at(temperature), pref.p_true_at(temperature)
    n_in = inputs.split("member").labels.size
    kw: dict[str, Any] = {"gamma": gamma, "a": a, "online": online}
    scores = rmia_scores(
        inputs.target_p_true(temperature), ref_p, ref.in_mask, p_z, pref_p, pref.in_mask, **kw
    )
    extra: dict[str, object] = {
        "n_ref": ref.n_ref,
        "n_population": int(p_z.size),
        "temperature": temperature,
        **kw,
    }
    thr = None
    cal = _calibration_set(inputs)
    if cal is not None and cal.n_ref == pref.n_ref:
        cal_p = cal.p_true_at(temperature)

        def fn(j: int, rest: ReferenceScores) -> np.ndarray:
            keep = np.arange(pref.n_ref) != j
            # The real target never trained on z, so the stand-in only uses z it did not see.
            z = ~pref.in_mask[j] if (~pref.in_mask[j]).any() else np.ones(pref.n_samples, bool)
            return rmia_scores(
                cal_p[j],
                np.delete(cal_p, j, axis=0),
                rest.in_mask,
                pref_p[j][z],
                pref_p[keep][:, z],
                pref.in_mask[keep][:, z],
                **kw,
            )

        thr, info = _loo_threshold(cal, fn, calibration_models)
        extra.update(info)
    return result_from_scores(
        "rmia_online" if online else "rmia_offline",
        scores[:n_in],
        scores[n_in:],
        threshold=thr,
        threshold_source="reference calibration" if thr is not None else "none",
        queries=inputs.queries,
        seconds=time.perf_counter() - t0,
        extra=extra,
    )
