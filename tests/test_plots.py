"""Figures: headless rendering of the audit's per-layer figure, including exact layers."""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import numpy as np

from nvmpriv.plots import layer_metrics_figure


def test_layer_figure_shows_exact_layers_without_warnings() -> None:
    layers = {
        "fc1": {"snr_db": float("inf"), "ns": 0.0},  # an exact (ideal) layer
        "fc2": {"snr_db": 21.5, "ns": 0.08},
        "fc3": {"snr_db": float("nan"), "ns": float("nan")},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = layer_metrics_figure(layers, "ideal")
        fig.canvas.draw()
    snr_ax, ns_ax = fig.axes
    assert [round(b.get_height(), 2) for b in snr_ax.containers[0]] == [21.5]
    assert [round(b.get_height(), 2) for b in ns_ax.containers[0]] == [0.0, 0.08]
    assert [t.get_text() for t in snr_ax.texts] == ["exact", "n/a"]
    assert [t.get_text() for t in ns_ax.texts] == ["n/a"]
    assert np.isfinite(snr_ax.get_ylim()).all()
    plt.close(fig)
