"""Per-sample membership scores from a model's outputs (numpy only).

Every score is oriented so that a HIGHER value means "more likely a member" (training sample);
attacks threshold them with ``member iff score >= t``. Probabilities are clipped at
:data:`EPS` before logarithms, as in Song & Mittal's evaluation code.
"""

from __future__ import annotations

import numpy as np

from nvmpriv.attacks._validate import check_labels, check_logits, check_probabilities

__all__ = [
    "EPS",
    "confidence_scores",
    "correctness_scores",
    "entropy_scores",
    "log_softmax",
    "logit_scaled_confidence",
    "loss_scores",
    "modified_entropy_scores",
    "softmax",
]

#: Floor applied to probabilities before taking logarithms (dimensionless).
EPS = 1e-30


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable log-softmax along the last axis.

    Args:
        logits: Array ``[..., C]`` of logits.
        temperature: Softmax temperature (dimensionless, > 0).

    Returns:
        ``log softmax(logits / temperature)`` with the same shape.

    Raises:
        ValueError: If ``temperature <= 0``.

    Examples:
        >>> np.round(np.exp(log_softmax(np.array([[0.0, 0.0]]))), 3)
        array([[0.5, 0.5]])
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax along the last axis.

    Args:
        logits: Array ``[..., C]`` of logits.
        temperature: Softmax temperature (dimensionless, > 0).

    Returns:
        Probabilities with the same shape, rows summing to 1.

    Examples:
        >>> softmax(np.array([[1000.0, 1000.0]]))
        array([[0.5, 0.5]])
    """
    return np.exp(log_softmax(logits, temperature))


def _prepare(probs: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    p = check_probabilities(probs, "probs")
    y = check_labels(labels, p.shape[0], p.shape[1], "labels")
    return p, y


def confidence_scores(probs: object, labels: object) -> np.ndarray:
    """Confidence in the true label, ``p_y``.

    Args:
        probs: Probabilities ``[n, C]``.
        labels: True labels ``[n]`` in ``[0, C)``.

    Returns:
        ``p_y`` per sample, shape ``[n]``.

    Examples:
        >>> confidence_scores([[0.9, 0.1], [0.3, 0.7]], [0, 0])
        array([0.9, 0.3])
    """
    p, y = _prepare(probs, labels)
    return p[np.arange(p.shape[0]), y]


def loss_scores(probs: object, labels: object) -> np.ndarray:
    """Negative cross-entropy loss, ``log p_y`` (higher = lower loss = more likely member).

    Args:
        probs: Probabilities ``[n, C]``.
        labels: True labels ``[n]``.

    Returns:
        ``-(-log max(p_y, EPS))`` per sample, shape ``[n]``.

    Examples:
        >>> np.round(loss_scores([[0.5, 0.5], [1.0, 0.0]], [0, 0]), 4)
        array([-0.6931,  0.    ])
    """
    p, y = _prepare(probs, labels)
    return np.log(np.maximum(p[np.arange(p.shape[0]), y], EPS))


def entropy_scores(probs: object, labels: object | None = None) -> np.ndarray:
    """Negative prediction entropy, ``sum_i p_i log p_i`` (label-free).

    Args:
        probs: Probabilities ``[n, C]``.
        labels: Ignored except for validation when given (entropy does not use the label).

    Returns:
        ``-H(p)`` per sample in nats, shape ``[n]``.

    Examples:
        >>> np.round(entropy_scores([[0.5, 0.5], [1.0, 0.0]]), 4)
        array([-0.6931,  0.    ])
    """
    p = check_probabilities(probs, "probs")
    if labels is not None:
        check_labels(labels, p.shape[0], p.shape[1], "labels")
    return np.sum(p * np.log(np.maximum(p, EPS)), axis=1)


def modified_entropy_scores(probs: object, labels: object) -> np.ndarray:
    r"""Negative modified entropy of Song & Mittal.

    .. math::
        \mathrm{Mentr}(p, y) = -(1 - p_y)\log p_y - \sum_{i \ne y} p_i \log(1 - p_i)

    Args:
        probs: Probabilities ``[n, C]``.
        labels: True labels ``[n]``.

    Returns:
        ``-Mentr`` per sample, shape ``[n]``.

    Examples:
        >>> np.round(modified_entropy_scores([[0.5, 0.5]], [0]), 4)
        array([-0.6931])
        >>> np.round(modified_entropy_scores([[1.0, 0.0]], [1]), 1)  # confidently wrong
        array([-138.2])
    """
    p, y = _prepare(probs, labels)
    rows = np.arange(p.shape[0])
    log_p = np.log(np.maximum(p, EPS))
    log_1mp = np.log(np.maximum(1.0 - p, EPS))
    terms = -p * log_1mp
    terms[rows, y] = -(1.0 - p[rows, y]) * log_p[rows, y]
    return -terms.sum(axis=1)


def logit_scaled_confidence(
    probs_or_logits: object, labels: object, *, from_logits: bool = False
) -> np.ndarray:
    """LiRA's logit-scaled confidence ``phi = log p_y - log sum_{i != y} p_i``.

    From logits it is computed as ``z_y - logsumexp_{i != y} z_i``, which stays exact when
    ``p_y`` rounds to 1 in floating point. From probabilities the sum over the other classes is
    taken directly (not as ``1 - p_y``) to keep precision near ``p_y = 1``.

    Args:
        probs_or_logits: Probabilities or logits ``[n, C]``.
        labels: True labels ``[n]``.
        from_logits: Whether the first argument holds logits.

    Returns:
        ``phi`` per sample, shape ``[n]`` (dimensionless log-odds).

    Examples:
        >>> np.round(logit_scaled_confidence([[0.8, 0.1, 0.1]], [0]), 4)
        array([1.3863])
        >>> logit_scaled_confidence([[50.0, 0.0, 0.0]], [0], from_logits=True).round(4)
        array([49.3069])
    """
    if from_logits:
        z = check_logits(probs_or_logits, "logits")
        y = check_labels(labels, z.shape[0], z.shape[1], "labels")
        rows = np.arange(z.shape[0])
        zy = z[rows, y]
        others = z.copy()
        others[rows, y] = -np.inf
        m = others.max(axis=1)
        lse = m + np.log(np.exp(others - m[:, None]).sum(axis=1))
        return zy - lse
    p, y = _prepare(probs_or_logits, labels)
    rows = np.arange(p.shape[0])
    py = p[rows, y]
    # Summing the other entries directly is more precise than 1 - p_y when p_y ~ 1.
    rest = np.where(np.arange(p.shape[1])[None, :] != y[:, None], p, 0.0).sum(axis=1)
    return np.log(np.maximum(py, EPS)) - np.log(np.maximum(rest, EPS))


def correctness_scores(probs: object, labels: object) -> np.ndarray:
    """Correctness indicator, 1 if ``argmax p == y`` else 0 (the gap attack's score).

    Args:
        probs: Probabilities ``[n, C]`` (only the argmax is used).
        labels: True labels ``[n]``.

    Returns:
        ``float64`` array of 0/1, shape ``[n]``.

    Examples:
        >>> correctness_scores([[0.9, 0.1], [0.9, 0.1]], [0, 1])
        array([1., 0.])
    """
    p, y = _prepare(probs, labels)
    return (np.argmax(p, axis=1) == y).astype(np.float64)
