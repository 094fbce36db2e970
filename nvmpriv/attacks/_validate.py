"""Input validators for the black-box attack suite (numpy only).

Every validator returns a clean ``float64``/``int64`` copy-free view where possible and raises
:class:`AttackInputError` (a ``ValueError``) with a one-line message naming the field, the allowed
range and the fix.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "AttackInputError",
    "check_labels",
    "check_logits",
    "check_nonempty_scores",
    "check_probabilities",
    "check_same_length",
]

#: Row sums of declared probabilities may deviate from 1 by this much (float32 softmax outputs).
PROB_SUM_ATOL = 1e-3


class AttackInputError(ValueError):
    """Raised when an attack input is malformed (shape, range, NaN, empty set)."""


def check_probabilities(probs: object, name: str, *, atol: float = PROB_SUM_ATOL) -> np.ndarray:
    """Validate a matrix of class probabilities.

    Args:
        probs: Array-like of shape ``[n, C]`` with ``C >= 2``.
        name: Field name used in the error message.
        atol: Allowed absolute deviation of each row sum from 1 and of entries from ``[0, 1]``.

    Returns:
        The probabilities as a ``float64`` array of shape ``[n, C]``.

    Raises:
        AttackInputError: If the array is not 2-D, has fewer than 2 classes, holds NaN/inf,
            negative entries, entries above 1, or rows that do not sum to 1.
    """
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise AttackInputError(
            f"{name} must have shape [n_samples, n_classes>=2], got {arr.shape}; "
            "pass one probability row per sample"
        )
    if not np.all(np.isfinite(arr)):
        raise AttackInputError(
            f"{name} contains NaN or inf; probabilities must be finite in [0, 1]"
        )
    lo = float(arr.min()) if arr.size else 0.0
    hi = float(arr.max()) if arr.size else 0.0
    if lo < -atol or hi > 1.0 + atol:
        raise AttackInputError(
            f"{name} has values in [{lo:.4g}, {hi:.4g}] outside [0, 1]; "
            "pass softmax probabilities, or declare logits (kind='logits')"
        )
    sums = arr.sum(axis=1)
    bad = np.abs(sums - 1.0) > atol
    if np.any(bad):
        i = int(np.argmax(bad))
        raise AttackInputError(
            f"{name} row {i} sums to {sums[i]:.6g}, not 1 (atol {atol}); "
            "pass softmax probabilities, or declare logits (kind='logits')"
        )
    return np.clip(arr, 0.0, 1.0)


def check_logits(logits: object, name: str) -> np.ndarray:
    """Validate a matrix of logits (any finite reals).

    Args:
        logits: Array-like of shape ``[n, C]`` with ``C >= 2``.
        name: Field name used in the error message.

    Returns:
        The logits as a ``float64`` array.

    Raises:
        AttackInputError: If the array is not 2-D with ``C >= 2`` or holds NaN/inf.
    """
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise AttackInputError(
            f"{name} must have shape [n_samples, n_classes>=2], got {arr.shape}; "
            "pass one logit row per sample"
        )
    if not np.all(np.isfinite(arr)):
        raise AttackInputError(f"{name} contains NaN or inf; logits must be finite")
    return arr


def check_labels(labels: object, n: int, n_classes: int, name: str) -> np.ndarray:
    """Validate integer class labels.

    Args:
        labels: Array-like of shape ``[n]`` holding integers in ``[0, n_classes)``.
        n: Required number of labels (rows of the matching probability matrix).
        n_classes: Number of classes ``C``.
        name: Field name used in the error message.

    Returns:
        The labels as an ``int64`` array.

    Raises:
        AttackInputError: On wrong shape/length, non-integer values, or labels outside the range.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise AttackInputError(f"{name} must be 1-D [n_samples], got shape {arr.shape}")
    if arr.shape[0] != n:
        raise AttackInputError(
            f"{name} has {arr.shape[0]} entries but the matching outputs have {n} rows; "
            "pass one label per sample"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        as_float = arr.astype(np.float64)
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            raise AttackInputError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    if out.size and (out.min() < 0 or out.max() >= n_classes):
        raise AttackInputError(
            f"{name} has labels in [{out.min()}, {out.max()}], allowed [0, {n_classes - 1}]; "
            "use 0-based class indices matching the probability columns"
        )
    return out


def check_nonempty_scores(scores: object, name: str) -> np.ndarray:
    """Validate a non-empty 1-D vector of finite membership scores.

    Args:
        scores: Array-like of shape ``[n]``, ``n >= 1``.
        name: Field name used in the error message.

    Returns:
        The scores as a ``float64`` array.

    Raises:
        AttackInputError: If empty, not 1-D, or holding NaN (``+-inf`` is allowed).
    """
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise AttackInputError(f"{name} must be 1-D [n_samples], got shape {arr.shape}")
    if arr.size == 0:
        raise AttackInputError(
            f"{name} is empty; both member and non-member sets need at least one sample"
        )
    if np.any(np.isnan(arr)):
        raise AttackInputError(f"{name} contains NaN; scores must be numbers (inf allowed)")
    return arr


def check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise if two arrays differ in their first dimension.

    Args:
        a: First array.
        b: Second array.
        name_a: Name of ``a`` for the message.
        name_b: Name of ``b`` for the message.

    Raises:
        AttackInputError: If ``len(a) != len(b)``.
    """
    if a.shape[0] != b.shape[0]:
        raise AttackInputError(
            f"{name_a} has {a.shape[0]} rows but {name_b} has {b.shape[0]}; "
            "they must describe the same samples"
        )
