"""Matplotlib figures for TensorBoard and reports (headless Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from nvmpriv.atomic import mkstemp_beside, sync_to_disk

__all__ = ["confidence_figure", "layer_metrics_figure", "roc_figure", "save_figure"]


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Write a figure atomically (temporary file in the same folder, then rename) and close it.

    Args:
        fig: The figure.
        path: Destination; the format follows its suffix.
        dpi: Resolution.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(path, suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        sync_to_disk(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path


def roc_figure(attacks: dict[str, Any], title: str) -> Figure:
    """Log-log ROC curves of several attacks (the chance line is the diagonal).

    Args:
        attacks: Attack name -> mapping with ``roc`` = ``(fpr, tpr)`` arrays and ``auc``.
        title: Figure title (the crossbar config).

    Returns:
        The figure.
    """
    fig, ax = plt.subplots(figsize=(4.5, 4.0))
    floor = 1e-4
    for name, values in attacks.items():
        fpr, tpr = values["roc"]
        ax.plot(
            np.maximum(fpr, floor),
            np.maximum(tpr, floor),
            label=f"{name} (AUC {values['auc']:.3f})",
        )
    ax.plot([floor, 1], [floor, 1], "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"MIA ROC: {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def confidence_figure(confidence: dict[str, np.ndarray], title: str) -> Figure:
    """Histograms of the true-label confidence of members and non-members.

    Args:
        confidence: ``members`` and ``nonmembers`` arrays of p_y.
        title: Figure title.

    Returns:
        The figure.
    """
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    bins = np.linspace(0, 1, 41).tolist()
    ax.hist(confidence["members"], bins=bins, alpha=0.6, label="members", density=True)
    ax.hist(confidence["nonmembers"], bins=bins, alpha=0.6, label="non-members", density=True)
    ax.set(xlabel="confidence p_y", ylabel="density")
    ax.set_title(f"confidence: {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def layer_metrics_figure(layers: dict[str, dict[str, float]], title: str) -> Figure:
    """Bars of per-layer SNR (dB) and noise sensitivity.

    Args:
        layers: Layer name -> ``{"snr_db": ..., "ns": ...}``.
        title: Figure title.

    Returns:
        The figure.
    """
    names = list(layers)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in ((a1, "snr_db", "SNR (dB)"), (a2, "ns", "noise sensitivity")):
        values = np.array([layers[n][key] for n in names], dtype=float)
        finite = np.isfinite(values)
        # an exact layer has an infinite SNR: a bar cannot show it (matplotlib warns on inf)
        ax.bar(np.flatnonzero(finite), values[finite])
        for i in np.flatnonzero(~finite):
            text = "exact" if values[i] == np.inf else "n/a"
            ax.annotate(text, (i, 0), ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set(ylabel=label)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=6, ha="right")
    fig.suptitle(f"layers: {title}")
    fig.tight_layout()
    return fig
