"""The printed ``python -m nvmpriv attack`` table: unmeasurable TPRs and degenerate attacks.

Built from synthetic results (no model, no training); values checked against sklearn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

from nvmpriv import attacks as A
from nvmpriv.atomic import json_safe
from nvmpriv.blackbox import format_report


def _entry(result: A.AttackResult) -> dict[str, Any]:
    """A report entry as :func:`nvmpriv.blackbox.attack_model` writes it."""
    entry = result.to_dict(max_roc_points=500)
    entry.pop("roc_fpr")
    entry.pop("roc_tpr")
    entry["seconds"] = 0.1
    return entry


def _report(**results: A.AttackResult) -> dict[str, Any]:
    return {
        "model": "m.onnx",
        "crossbar": "64x64_100k",
        "attacks": {name: _entry(r) for name, r in results.items()},
    }


def _row(table: str, name: str) -> list[str]:
    return next(line for line in table.splitlines() if line.startswith(f"{name} ")).split()


def _sk_tpr_at(s_in: np.ndarray, s_out: np.ndarray, max_fpr: float) -> float:
    y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    efpr, etpr, _ = skm.roc_curve(y, np.r_[s_in, s_out])
    return float(etpr[efpr <= max_fpr].max())


@pytest.mark.parametrize(
    ("n_out", "na_columns"),
    [
        pytest.param(60, (4, 5), id="60-nonmembers"),
        pytest.param(250, (5,), id="250-nonmembers"),
        pytest.param(1200, (), id="1200-nonmembers"),
    ],
)
def test_table_prints_na_below_one_over_n_nonmembers(
    n_out: int, na_columns: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(n_out)
    s_in, s_out = rng.normal(2, 1, 300), rng.normal(0, 1, n_out)
    res = A.result_from_scores("loss", s_in, s_out, threshold=1.0)
    table = format_report(_report(loss=res))
    row = _row(table, "loss")
    # columns: name acc acc_ub auc tpr@1% tpr@.1% queries sec
    for col, budget in ((4, 0.01), (5, 0.001)):
        if col in na_columns:
            assert row[col] == "n/a"
        else:
            assert row[col] == f"{_sk_tpr_at(s_in, s_out, budget):.3f}"
    if 5 in na_columns:
        assert "tpr@.1% n/a (<1000 non-members)" in table and f"got {n_out}" in table
    if 4 in na_columns:
        assert "tpr@1% n/a (<100 non-members)" in table
    if not na_columns:
        assert "n/a" not in table and "notes:" not in table


def test_table_prints_na_for_an_older_report_with_a_zero_fp_value() -> None:
    # A report written before the null rule holds the zero-false-positive read-off as a number.
    rng = np.random.default_rng(1)
    entry = _entry(A.result_from_scores("loss", rng.normal(2, 1, 50), rng.normal(0, 1, 200)))
    entry["tpr_at_01pct_fpr"] = entry["tpr_at_zero_fpr"]
    entry.pop("unmeasurable")
    table = format_report({"model": "m", "crossbar": "c", "attacks": {"loss": entry}})
    assert _row(table, "loss")[5] == "n/a"
    assert "needs >= 1000 non-members, got 200" in table


def test_table_marks_degenerate_attacks_with_their_reason() -> None:
    rng = np.random.default_rng(4)
    s_in, s_out = rng.normal(1, 1, 200), rng.normal(0, 1, 200)
    report = _report(
        confidence=A.result_from_scores("confidence", s_in, s_out, threshold=0.5),
        gap=A.result_from_scores("gap", np.ones(200), np.ones(200), threshold=1.0),
        entropy=A.result_from_scores("entropy", s_in, s_out, threshold=99.0),
    )
    table = format_report(json_safe(report))
    assert _row(table, "gap")[-1] == "DEGENERATE"
    assert _row(table, "entropy")[-1] == "DEGENERATE"
    assert "DEGENERATE" not in " ".join(_row(table, "confidence"))
    assert "gap DEGENERATE: constant scores: all 400 target samples score 1" in table
    assert "entropy DEGENERATE: decision rule calls no target sample a member" in table
    # gap: chance by construction, exactly as sklearn computes it for constant scores
    y = np.r_[np.ones(200), np.zeros(200)]
    assert float(_row(table, "gap")[3]) == skm.roc_auc_score(y, np.ones(400)) == 0.5


def test_query_averaging_rows_mark_degenerate() -> None:
    report = _report()
    report["query_averaging"] = [
        {"k": 1, "accuracy": 0.5, "accuracy_upper_bound": 0.5, "degenerate": True},
        {"k": 2, "accuracy": 0.61, "accuracy_upper_bound": 0.63, "degenerate": False},
    ]
    lines = format_report(report).splitlines()
    assert lines[-2].strip().startswith("k=1") and lines[-2].endswith("DEGENERATE")
    assert lines[-1].strip().startswith("k=2") and "DEGENERATE" not in lines[-1]
