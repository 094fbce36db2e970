"""Exact nodal solver vs closed forms, KCL, and the fast effective-matrix path."""

import numpy as np
import pytest
import torch

from nvmpriv.crossbar import PRESETS, column_error
from nvmpriv.crossbar.circuit import column_currents, effective_conductance, solve

G_MIN, G_MAX = 1e-5 / 6, 1e-5


def _rand(rng, rows, cols, batch=3):
    return rng.uniform(G_MIN, G_MAX, (rows, cols)), rng.uniform(-0.25, 0.25, (rows, batch))


def test_zero_parasitics_is_gt_v():
    rng = np.random.default_rng(0)
    g, v = _rand(rng, 7, 5)
    i = column_currents(g, v, r_wire=0, r_source=0, r_sink=0)
    np.testing.assert_allclose(i, g.T @ v, rtol=1e-12)
    i1 = column_currents(g, v[:, 0], r_wire=0, r_source=0, r_sink=0)
    assert i1.shape == (5,)


def test_single_cell_series_resistances():
    # one cell: V -> r_source -> 1/G -> r_sink -> ground: I = V / (r_source + 1/G + r_sink)
    g = np.array([[2e-5]])
    i = column_currents(g, np.array([0.2]), r_wire=7.0, r_source=300.0, r_sink=100.0)
    np.testing.assert_allclose(i, [0.2 / (300.0 + 1 / 2e-5 + 100.0)], rtol=1e-12)


def test_lumped_lines_closed_form():
    # r_wire = 0, r_sink = 0: each word line is one node, u_i = gs V_i / (gs + sum_j G_ij)
    rng = np.random.default_rng(1)
    g, v = _rand(rng, 6, 4)
    gs = 1 / 250.0
    u = gs * v / (gs + g.sum(1, keepdims=True))
    i = column_currents(g, v, r_wire=0, r_source=250.0, r_sink=0)
    np.testing.assert_allclose(i, g.T @ u, rtol=1e-12)


@pytest.mark.parametrize(
    ("r_source", "r_sink"), [(250.0, 0.0), (0.0, 150.0)], ids=["source-only", "sink-only"]
)
def test_one_sided_lumped_lines_closed_form_and_fast_path(r_source, r_sink):
    """Oracle: hand-solved KCL with ideal wires (each line one node), vs solver and fast path.

    Source only: word node u_i = gs V_i / (gs + sum_j G_ij), I = G^T u. Sink only: bit node
    w_j = (G^T V)_j / (gk + sum_i G_ij), I_j = gk w_j.
    """
    rng = np.random.default_rng(6)
    g, v = _rand(rng, 12, 9)
    if r_sink == 0:
        gs = 1 / r_source
        expect = g.T @ (gs * v / (gs + g.sum(1, keepdims=True)))
    else:
        gk = 1 / r_sink
        expect = gk * (g.T @ v) / (gk + g.sum(0)[:, None])
    kw = dict(r_wire=0.0, r_source=r_source, r_sink=r_sink)
    np.testing.assert_allclose(column_currents(g, v, **kw), expect, rtol=1e-12)
    a = effective_conductance(torch.from_numpy(np.stack([g, g[::-1].copy()])), **kw).numpy()
    np.testing.assert_allclose(a[0].T @ v, expect, rtol=1e-12)
    np.testing.assert_allclose(a[1].T @ v, column_currents(g[::-1], v, **kw), rtol=1e-12)
    # the attenuation is visible: ideal G^T V differs by far more than the tolerance
    assert np.abs(expect - g.T @ v).max() > 1e-3 * np.abs(expect).max()


@pytest.mark.parametrize(
    "params", [(3.4, 400, 400), (28.0, 4.0, 4.0), (1.0, 0, 300), (1.0, 300, 0)]
)
def test_kirchhoff_current_law(params):
    rng = np.random.default_rng(2)
    g, v = _rand(rng, 9, 11)
    sol = solve(g, v, r_wire=params[0], r_source=params[1], r_sink=params[2])
    np.testing.assert_allclose(
        sol.source_currents.sum(0), sol.sink_currents.sum(0), rtol=1e-10, atol=1e-18
    )
    # word-line voltages never exceed the driving voltage for non-negative V
    sol_pos = solve(g, np.abs(v), r_wire=params[0], r_source=params[1], r_sink=params[2])
    assert (sol_pos.word_voltages <= np.abs(v)[:, None, :] + 1e-12).all()


@pytest.mark.parametrize("n", [8, 16, 32])
@pytest.mark.parametrize(
    "params",
    [
        (3.4, 400.0, 400.0),
        (28.0, 4.0, 4.0),
        (2.0, 0.0, 0.0),
        (2.0, 0.0, 500.0),
        (2.0, 500.0, 0.0),
        (0.0, 400.0, 300.0),
        (0.0, 400.0, 0.0),
        (0.0, 0.0, 300.0),
        (0.0, 0.0, 0.0),
    ],
)
def test_fast_path_equals_nodal_solution(n, params):
    rng = np.random.default_rng(n)
    tiles = rng.uniform(G_MIN, G_MAX, (2, n, n))
    a = effective_conductance(
        torch.from_numpy(tiles), r_wire=params[0], r_source=params[1], r_sink=params[2]
    ).numpy()
    for t in range(2):
        v = rng.uniform(-0.25, 0.25, (n, 4))
        ref = column_currents(tiles[t], v, r_wire=params[0], r_source=params[1], r_sink=params[2])
        err = np.abs(a[t].T @ v - ref).max() / np.abs(ref).max()
        assert err <= 1e-6


def test_fast_path_rectangular_and_degenerate():
    rng = np.random.default_rng(5)
    for rows, cols in [(1, 1), (1, 6), (6, 1), (5, 9)]:
        g, v = _rand(rng, rows, cols)
        for params in [(3.0, 200.0, 100.0), (3.0, 0.0, 0.0)]:
            a = effective_conductance(
                torch.from_numpy(g), r_wire=params[0], r_source=params[1], r_sink=params[2]
            ).numpy()
            ref = column_currents(g, v, r_wire=params[0], r_source=params[1], r_sink=params[2])
            np.testing.assert_allclose(a.T @ v, ref, rtol=1e-8, atol=1e-20)


def test_column_error_grows_with_size_and_wire():
    cfg = PRESETS["32x32_100k"]
    by_n = [column_error(cfg, tile_size=n, n_tiles=4).mean_abs_rel for n in (8, 16, 32)]
    assert by_n[0] < by_n[1] < by_n[2]
    by_r = [column_error(cfg.replace(r_wire=r), n_tiles=4).mean_abs_rel for r in (0.0, 3.4, 20.0)]
    assert by_r[0] < by_r[1] < by_r[2]
    assert column_error(PRESETS["ideal"]).mean_abs_rel == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="r_wire"):
        column_currents(np.ones((2, 2)), np.ones(2), r_wire=-1, r_source=0, r_sink=0)
    with pytest.raises(ValueError, match="V must be"):
        column_currents(np.ones((2, 2)), np.ones(3), r_wire=0, r_source=0, r_sink=0)


def test_ideal_wires_with_source_and_sink_on_large_tile_batches():
    # Batched LU (torch.linalg.solve) in torch's MKL build hit "DLASWP parameter 6" and hung
    # for this case at 2 threads; run in a subprocess so a regression fails instead of hanging.
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from nvmpriv.crossbar.circuit import column_currents, effective_conductance\n"
        "torch.set_num_threads(2)\n"
        "g = torch.rand(3, 256, 256, dtype=torch.float64) * 1e-5 + 1e-6\n"
        "a = effective_conductance(g, r_wire=0.0, r_source=400.0, r_sink=400.0)\n"
        "v = torch.rand(256, dtype=torch.float64)\n"
        "ref = torch.as_tensor(column_currents(g[2], v, r_wire=0.0, r_source=400.0, r_sink=400.0))\n"
        "err = float(((a[2].T @ v) - ref).abs().max() / ref.abs().max())\n"
        "print(err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MKL ERROR" not in out.stdout + out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-10
