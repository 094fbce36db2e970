"""Benchmarks of the numpy attack suite.

1. Threshold search on 100k scores (50k members + 50k non-members): one sort (``best_threshold``)
   versus the brute-force O(n^2) search that evaluates every observed value against every sample
   (vectorized in chunks, measured in full on the same data, results checked equal).
2. Every registered score attack on 20k members + 20k non-members (10 classes), with 20k + 20k
   shadow outputs; LiRA/RMIA with 16 reference models and a 20k population.

Run: ``.venv/bin/python benchmarks/bench_attacks.py [--n-threshold 100000] [--n-attack 20000]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from nvmpriv import attacks as A


def brute_force_threshold(
    s_in: np.ndarray, s_out: np.ndarray, chunk: int = 512
) -> tuple[float, float]:
    cand = np.unique(np.r_[s_in, s_out])
    best_obj, best_t = -1, None
    for i in range(0, cand.size, chunk):
        t = cand[i : i + chunk]
        obj = (s_in[None, :] >= t[:, None]).sum(1) * s_out.size
        obj += (s_out[None, :] < t[:, None]).sum(1) * s_in.size
        # ties -> largest threshold, as in best_threshold
        k = int(np.flatnonzero(obj == obj.max())[-1])
        if obj[k] >= best_obj:
            best_obj, best_t = int(obj[k]), float(t[k])
    return best_t, best_obj / (2 * s_in.size * s_out.size)  # type: ignore[return-value]


def bench_threshold(n: int) -> None:
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(0.3, 1, n // 2), rng.normal(0, 1, n // 2)
    t0 = time.perf_counter()
    fast = A.best_threshold(s_in, s_out)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = brute_force_threshold(s_in, s_out)
    t_slow = time.perf_counter() - t0
    assert fast[0] == slow[0] and abs(fast[1] - slow[1]) < 1e-12, (fast, slow)
    print(f"threshold search on {n} scores ({n // 2} + {n // 2}), same threshold {fast[0]:.6f}:")
    print(f"  sort-based   {t_fast * 1e3:10.2f} ms")
    print(f"  brute force  {t_slow * 1e3:10.2f} ms   (chunked numpy, every candidate x sample)")
    print(f"  ratio brute/sort = {t_slow / t_fast:.0f}x")


def _probs(rng: np.random.Generator, n: int, c: int, boost: float) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, c, n)
    z = rng.normal(0, 1.5, (n, c))
    z[np.arange(n), y] += 2.0 + boost
    return A.softmax(z), y


def bench_attacks(n: int, c: int = 10, n_ref: int = 16) -> None:
    rng = np.random.default_rng(1)
    m, ym = _probs(rng, n, c, 0.5)
    nm, ynm = _probs(rng, n, c, 0.0)
    sm, ysm = _probs(rng, n, c, 0.5)
    snm, ysnm = _probs(rng, n, c, 0.0)
    pop, ypop = _probs(rng, n, c, 0.0)
    in_mask = rng.random((n_ref, 2 * n)) < 0.5
    phi = rng.normal(0, 1, (n_ref, 2 * n)) + in_mask
    ref = A.ReferenceScores(phi, 1 / (1 + np.exp(-phi)), in_mask)
    pmask = rng.random((n_ref, n)) < 0.5
    pphi = rng.normal(0, 1, (n_ref, n)) + pmask
    pref = A.ReferenceScores(pphi, 1 / (1 + np.exp(-pphi)), pmask)
    t0 = time.perf_counter()
    inputs = A.AttackInputs(
        m,
        ym,
        nm,
        ynm,
        sm,
        ysm,
        snm,
        ysnm,
        reference=ref,
        population_outputs=pop,
        population_labels=ypop,
        population_reference=pref,
    )
    t_validate = time.perf_counter() - t0
    names = A.available_attacks(inputs)
    threshold_names = [k for k in names if not k.startswith(("lira", "rmia"))]
    t0 = time.perf_counter()
    res = A.run_attacks(threshold_names, inputs)
    t_thr = time.perf_counter() - t0
    t0 = time.perf_counter()
    res_ref = A.run_attacks([k for k in names if k.startswith(("lira", "rmia"))], inputs)
    t_ref = time.perf_counter() - t0
    print(f"\nscore attacks on {n} members + {n} non-members, {c} classes, shadow {n} + {n}:")
    print(f"  input validation          {t_validate * 1e3:8.1f} ms")
    print(f"  {len(res):2d} threshold attacks      {t_thr * 1e3:8.1f} ms  (target <= 2000 ms)")
    for k, r in res.items():
        print(f"      {k:42s} {r.seconds * 1e3:7.1f} ms  auc={r.auc:.3f}")
    print(
        f"  {len(res_ref)} LiRA/RMIA ({n_ref} refs, leave-one-out calibration on 8) {t_ref * 1e3:8.1f} ms"
    )
    for k, r in res_ref.items():
        print(f"      {k:42s} {r.seconds * 1e3:7.1f} ms  auc={r.auc:.3f}")
    print(f"  all {len(res) + len(res_ref)} attacks: {(t_thr + t_ref):.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-threshold", type=int, default=100_000)
    ap.add_argument("--n-attack", type=int, default=20_000)
    args = ap.parse_args()
    bench_threshold(args.n_threshold)
    bench_attacks(args.n_attack)


if __name__ == "__main__":
    main()
