"""Resistive crossbar circuit: exact nodal solver (reference) and exact effective matrices.

Topology of one tile with R rows and C columns (both solvers use it):

* word line of row ``i`` is driven at column 0 from an ideal source ``V_i`` through
  ``r_source``; its nodes ``(i, 0) ... (i, C-1)`` are joined by ``r_wire``; the far end is open;
* bit line of column ``j`` is sensed at row ``R-1`` into virtual ground through ``r_sink``; its
  nodes ``(0, j) ... (R-1, j)`` are joined by ``r_wire``; the top end is open;
* cell ``(i, j)`` joins word-line node ``(i, j)`` to bit-line node ``(i, j)`` with conductance
  ``G[i, j]``.

A zero resistance is an ideal connection (the nodes it joins are merged). With all three
resistances zero the column currents are ``G^T V``.

:func:`column_currents` is the reference: a sparse nodal analysis (scipy ``splu``, float64).
:func:`effective_conductance` is the fast path: because the circuit is linear, each tile has an
exact matrix ``A`` with ``I = A^T V``; it is computed for many tiles at once by block Gaussian
elimination row by row (dense, float64, torch only): each word line is eliminated in closed form
(semi-separable inverse of a tridiagonal matrix), each bit-line Schur complement is inverted by a
GEMM-based SPD block inverse, and chunks of tiles run on separate threads. It agrees with the
reference to ~1e-12.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

__all__ = ["CircuitSolution", "column_currents", "effective_conductance", "solve"]


@dataclass(frozen=True)
class CircuitSolution:
    """Solution of one tile's nodal equations.

    Attributes:
        word_voltages: Word-line node voltages ``[R, C]`` or ``[R, C, B]`` (volts).
        bit_voltages: Bit-line node voltages ``[R, C]`` or ``[R, C, B]`` (volts).
        source_currents: Current delivered by each row's source ``[R]`` or ``[R, B]`` (amperes).
        sink_currents: Current into each column's sink ``[C]`` or ``[C, B]`` (amperes).
    """

    word_voltages: np.ndarray
    bit_voltages: np.ndarray
    source_currents: np.ndarray
    sink_currents: np.ndarray


def _check_resistances(r_wire: float, r_source: float, r_sink: float) -> None:
    for name, value in (("r_wire", r_wire), ("r_source", r_source), ("r_sink", r_sink)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r} ohm is invalid: allowed >= 0 (finite)")


def solve(
    G: np.ndarray | torch.Tensor,
    V: np.ndarray | torch.Tensor,
    *,
    r_wire: float,
    r_source: float,
    r_sink: float,
) -> CircuitSolution:
    """Solve the nodal equations of one tile exactly (sparse LU, float64).

    Args:
        G: Cell conductances ``[R, C]`` (siemens), non-negative.
        V: Source voltages ``[R]`` or ``[R, B]`` (volts).
        r_wire: Resistance between neighbouring nodes on every word and bit line (ohms).
        r_source: Source (driver) resistance of every word line (ohms).
        r_sink: Sink (sense) resistance of every bit line (ohms).

    Returns:
        Node voltages and terminal currents.

    Raises:
        ValueError: On a negative resistance or conductance, or mismatched shapes.
    """
    _check_resistances(r_wire, r_source, r_sink)
    g = np.asarray(G, dtype=np.float64)
    v = np.asarray(V, dtype=np.float64)
    if g.ndim != 2 or (g < 0).any():
        raise ValueError(f"G must be a non-negative [rows, cols] array, got shape {g.shape}")
    squeeze = v.ndim == 1
    if squeeze:
        v = v[:, None]
    rows, cols = g.shape
    if v.ndim != 2 or v.shape[0] != rows:
        raise ValueError(f"V must be [{rows}] or [{rows}, B], got shape {v.shape}")

    # Node numbering: sources 0..R-1 and sinks R..R+C-1 are fixed-potential terminals; the
    # line nodes follow. A zero resistance merges the nodes it joins (same id).
    src = np.arange(rows)
    gnd = rows + np.arange(cols)
    nxt = rows + cols
    if r_wire > 0:
        word = nxt + np.arange(rows * cols).reshape(rows, cols)
        nxt += rows * cols
        bit = nxt + np.arange(rows * cols).reshape(rows, cols)
        nxt += rows * cols
    else:
        word = np.repeat((nxt + np.arange(rows))[:, None], cols, axis=1)
        nxt += rows
        bit = np.repeat((nxt + np.arange(cols))[None, :], rows, axis=0)
        nxt += cols
    if r_source == 0:
        word[word == word[:, :1]] = np.repeat(src[:, None], cols, axis=1)[word == word[:, :1]]
    if r_sink == 0:
        last = bit[-1:, :]
        mask = bit == last
        bit[mask] = np.broadcast_to(gnd[None, :], bit.shape)[mask]

    a_list: list[np.ndarray] = []
    b_list: list[np.ndarray] = []
    c_list: list[np.ndarray] = []

    def edges(a: np.ndarray, b: np.ndarray, cond: np.ndarray | float) -> None:
        a = np.asarray(a).ravel()
        b = np.asarray(b).ravel()
        c = np.broadcast_to(np.asarray(cond, dtype=np.float64).ravel(), a.shape)
        keep = a != b
        a_list.append(a[keep])
        b_list.append(b[keep])
        c_list.append(c[keep])

    edges(word, bit, g)
    if r_wire > 0:
        gw = 1.0 / r_wire
        edges(word[:, :-1], word[:, 1:], gw)
        edges(bit[:-1, :], bit[1:, :], gw)
    if r_source > 0:
        edges(src, word[:, 0], 1.0 / r_source)
    if r_sink > 0:
        edges(bit[-1, :], gnd, 1.0 / r_sink)

    ea = np.concatenate(a_list)
    eb = np.concatenate(b_list)
    ec = np.concatenate(c_list)
    n_nodes = nxt
    lap = sp.coo_matrix(
        (
            np.concatenate([ec, ec, -ec, -ec]),
            (np.concatenate([ea, eb, ea, eb]), np.concatenate([ea, eb, eb, ea])),
        ),
        shape=(n_nodes, n_nodes),
    ).tocsr()

    fixed = np.zeros(n_nodes, dtype=bool)
    fixed[: rows + cols] = True
    used = np.zeros(n_nodes, dtype=bool)
    used[np.concatenate([ea, eb])] = True
    free = np.flatnonzero(~fixed & used)
    fixed_idx = np.arange(rows + cols)
    x_fixed = np.zeros((rows + cols, v.shape[1]))
    x_fixed[:rows] = v

    x = np.zeros((n_nodes, v.shape[1]))
    x[: rows + cols] = x_fixed
    if free.size:
        l_ff = lap[free][:, free].tocsc()
        rhs = -(lap[free][:, fixed_idx] @ x_fixed)
        x[free] = spla.splu(l_ff).solve(rhs)

    # (L x)[k] is the current leaving terminal k into the network.
    injected = lap @ x
    source_currents = injected[:rows]
    sink_currents = -injected[rows : rows + cols]
    word_v = x[word]
    bit_v = x[bit]
    if squeeze:
        return CircuitSolution(
            word_v[..., 0], bit_v[..., 0], source_currents[:, 0], sink_currents[:, 0]
        )
    return CircuitSolution(word_v, bit_v, source_currents, sink_currents)


def column_currents(
    G: np.ndarray | torch.Tensor,
    V: np.ndarray | torch.Tensor,
    *,
    r_wire: float,
    r_source: float,
    r_sink: float,
) -> np.ndarray:
    """Column currents of one tile by exact nodal analysis (the reference solver).

    Args:
        G: Cell conductances ``[N_rows, N_cols]`` (siemens).
        V: Source voltages ``[N_rows]`` or ``[N_rows, B]`` (volts).
        r_wire: Resistance between neighbouring nodes on word and bit lines (ohms).
        r_source: Source (driver) resistance per word line (ohms).
        r_sink: Sink (sense) resistance per bit line (ohms).

    Returns:
        Currents into the sinks, ``[N_cols]`` or ``[N_cols, B]`` (amperes, float64).

    Raises:
        ValueError: On a negative resistance or conductance, or mismatched shapes.
    """
    return solve(G, V, r_wire=r_wire, r_source=r_source, r_sink=r_sink).sink_currents


# ---------------------------------------------------------------------- fast path


def _lumped(G: torch.Tensor, r_source: float, r_sink: float) -> torch.Tensor:
    """Effective matrix with ideal wires (each line is one node)."""
    if r_source == 0 and r_sink == 0:
        return G.clone()
    row_sum = G.sum(-1)  # [T, R]
    col_sum = G.sum(-2)  # [T, C]
    if r_sink == 0:
        gs = 1.0 / r_source
        return G * (gs / (gs + row_sum)).unsqueeze(-1)
    gk = 1.0 / r_sink
    if r_source == 0:
        return G * (gk / (gk + col_sum)).unsqueeze(-2)
    gs = 1.0 / r_source
    # u = Dr^-1 (gs V + G w);  (Dc - G^T Dr^-1 G) w = G^T Dr^-1 gs V;  I = gk w.
    dr_inv = 1.0 / (gs + row_sum)  # [T, R]
    gt_dr = G.transpose(-1, -2) * dr_inv.unsqueeze(-2)  # [T, C, R]
    schur = torch.diag_embed(gk + col_sum) - gt_dr @ G  # [T, C, C], SPD
    # Cholesky, not torch.linalg.solve: batched LU in the MKL build returns invalid pivots (and
    # hung here: 3 tiles of 256x256, 2 threads) for batches of n >= 256
    at = gk * gs * (_spd_inverse(schur) @ gt_dr)  # [T, C, R] = A^T
    return at.transpose(-1, -2)


_INV_LEAF = 16  # matrices up to this size are inverted by batched Cholesky directly
_MIN_RATIO_PRODUCT = 1e-150  # below this the product form of the line inverse could underflow


def _spd_inverse(M: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of well-conditioned SPD matrices ``[T, n, n]`` (torch only).

    Only the lower triangle of ``M`` is read (the upper one may hold anything). Recursive 2x2
    block inversion through the Schur complement, so that almost all the work is batched GEMMs
    on torch's own thread pool: per-matrix LAPACK inverses are slow for many small matrices,
    and numpy's OpenBLAS threads oversubscribe the CPU next to torch's. The leaves use batched
    Cholesky. SPD matrices need no pivoting (every Schur complement of an SPD matrix is SPD),
    so torch's batched-LU pivot bug does not apply.

    Args:
        M: SPD matrices ``[T, n, n]`` (siemens), lower triangle significant.

    Returns:
        Their inverses ``[T, n, n]`` (ohms), full and symmetric.
    """
    n = M.shape[-1]
    if n <= _INV_LEAF:
        return torch.cholesky_inverse(torch.linalg.cholesky(M))
    h = n // 2
    a, bt, d = M[:, :h, :h], M[:, h:, :h], M[:, h:, h:]
    a_inv = _spd_inverse(a)
    x = torch.bmm(a_inv, bt.mT)  # [T, h, n-h]
    s_inv = _spd_inverse(torch.baddbmm(d, bt, x, alpha=-1.0))
    xs = torch.bmm(x, s_inv)
    out = torch.empty_like(M)
    torch.baddbmm(a_inv, xs, x.mT, out=out[:, :h, :h])
    torch.neg(xs, out=out[:, :h, h:])
    torch.neg(xs.mT, out=out[:, h:, :h])
    out[:, h:, h:] = s_inv
    return out


def _line_factors(diag: torch.Tensor, off: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generators of the inverse of symmetric tridiagonal matrices with off-diagonal ``-off``.

    For a diagonally dominant tridiagonal ``K`` the inverse is semi-separable:
    ``inv[j, k] = d_k * prod_{m=j}^{k-1} off / p_m = d_k P_k / P_j`` for ``j <= k``, with ``p``
    the forward pivots, ``P_k = prod_{m<k} off / p_m`` (each ratio <= 1) and the diagonal
    ``d_k = 1 / (p_k + q_k - diag_k)`` (``q`` the backward pivots).

    Args:
        diag: Diagonals ``[..., n]`` (siemens).
        off: Magnitude of the off-diagonal (siemens).

    Returns:
        ``(log P, d)``, both ``[..., n]`` (``log P`` unitless, ``d`` in ohms).
    """
    n = diag.shape[-1]
    d = diag.movedim(-1, 0).contiguous()  # pivots run along the line: make that axis leading
    p = torch.empty_like(d)
    q = torch.empty_like(d)
    p[0] = d[0]
    for m in range(1, n):
        p[m] = d[m] - off * off / p[m - 1]
    q[n - 1] = d[n - 1]
    for m in range(n - 2, -1, -1):
        q[m] = d[m] - off * off / q[m + 1]
    inv_diag = (1.0 / (p + q - d)).movedim(0, -1)
    logs = torch.log(off / p).movedim(0, -1)
    log_p = torch.cumsum(logs, -1) - logs
    return log_p, inv_diag


def _tridiag_inverse(diag: torch.Tensor, off: float) -> torch.Tensor:
    """Dense inverse of symmetric tridiagonal matrices with constant off-diagonal ``-off``.

    See :func:`_line_factors`; the products are formed as ``exp(log P_k - log P_j) <= 1`` so
    they cannot overflow (kept as the reference of the product form used by the fast path).

    Args:
        diag: Diagonals ``[..., n]`` (siemens).
        off: Magnitude of the off-diagonal (siemens).

    Returns:
        The inverses ``[..., n, n]`` (ohms).
    """
    log_p, inv_diag = _line_factors(diag, off)
    return _semiseparable(log_p, inv_diag, torch.ones_like(inv_diag), stable=True)


def _semiseparable(
    log_p: torch.Tensor, inv_diag: torch.Tensor, g: torch.Tensor, *, stable: bool
) -> torch.Tensor:
    """``g_j g_k inv[j, k]`` for the line inverse of :func:`_line_factors` (``[..., n, n]``).

    ``stable=True`` forms every product as ``exp(log P_k - log P_j) <= 1`` and returns the full
    symmetric matrix. ``stable=False`` returns only a valid LOWER triangle (the upper one is
    garbage), as the outer product ``(g_j d_j P_j) (g_k / P_k)``: one pass, valid while ``P``
    stays far from underflow.
    """
    if stable:
        n = log_p.shape[-1]
        j = torch.arange(n, device=log_p.device)
        upper = j.unsqueeze(-1) <= j.unsqueeze(0)  # [j, k]: j <= k
        out = (log_p.unsqueeze(-2) - log_p.unsqueeze(-1)).abs_().neg_().exp_()
        scale = torch.where(upper, inv_diag.unsqueeze(-2), inv_diag.unsqueeze(-1))
        return out.mul_(scale).mul_(g.unsqueeze(-1)).mul_(g.unsqueeze(-2))
    big_p = torch.exp(log_p)
    return (g * inv_diag * big_p).unsqueeze(-1) * (g / big_p).unsqueeze(-2)


def _distributed(G: torch.Tensor, r_wire: float, r_source: float, r_sink: float) -> torch.Tensor:
    """Effective matrix with wire resistance, by block elimination along the bit lines.

    Row by row (top to bottom), the word line of row ``i`` is eliminated in closed form (its
    tridiagonal inverse is semi-separable), leaving the dense ``C x C`` bit-line Schur
    complement ``S_i``; ``Z_i = S_i^-1`` feeds the next row. The responses to the inputs of
    the rows above are carried along as ``rhs`` (one row per input).
    """
    n_t, rows, cols = G.shape
    gw = 1.0 / r_wire
    dt = G.dtype
    # Word line of row i: K_i U_i = D_i W_i + s_i V_i with K_i = gw*path + diag(G_i) (+ gs e0).
    deg = torch.full((cols,), 2 * gw, dtype=dt)
    deg[0] = gw
    deg[-1] = gw
    if cols == 1:
        deg[0] = 0.0
    k_diag = G + deg  # [T, R, C]
    # With a source resistance the whole line is free; without, node 0 is the source itself and
    # the free part is columns 1.. (driven through the first wire segment).
    o = 0
    if r_source > 0:
        gs = 1.0 / r_source
        k_diag[..., 0] += gs
        drive = gs
    else:
        o = 1
        drive = gw
    h = torch.zeros(n_t, rows, cols, dtype=dt)  # U response to V_i with W = 0
    if o == 0 or cols > 1:
        log_p, inv_diag = _line_factors(k_diag[..., o:], gw)
        h[..., o:] = inv_diag * torch.exp(log_p) * drive
        stable = bool(log_p.min() < math.log(_MIN_RATIO_PRODUCT)) if log_p.numel() else True
    if o == 1:
        h[..., 0] = 1.0
    f = G * h  # [T, R, C]
    free_rows = rows if r_sink > 0 else rows - 1
    if free_rows == 0:  # a single row sensed directly into ground
        a = torch.zeros(n_t, rows, cols, dtype=dt)
        a[:, 0] = f[:, 0]
        return a
    rhs = torch.zeros(n_t, rows, cols, dtype=dt)  # rhs[:, m]: bit-line drive of input m
    z_prev: torch.Tensor | None = None
    for i in range(free_rows):
        # Bit-line equations of row i: S_i W_i - gw W_{i-1} - gw W_{i+1} = f_i V_i, with
        # S_cell = diag(G_i) - diag(G_i) K_i^-1 diag(G_i) after eliminating the word line.
        n_neigh = (i > 0) + (i < rows - 1)
        c_i = gw * n_neigh + (1.0 / r_sink if (r_sink > 0 and i == rows - 1) else 0.0)
        # Only the lower triangle of s_i is significant (all _spd_inverse reads).
        g_i = G[:, i]
        if o == 0:
            s_i = _semiseparable(log_p[:, i], inv_diag[:, i], g_i, stable=stable).neg_()
        else:
            s_i = torch.zeros(n_t, cols, cols, dtype=dt)
            if cols > 1:
                s_i[:, 1:, 1:] = _semiseparable(
                    log_p[:, i], inv_diag[:, i], g_i[:, 1:], stable=stable
                ).neg_()
        s_i.diagonal(dim1=-2, dim2=-1).add_(g_i + c_i)
        if z_prev is not None:
            s_i.sub_(z_prev, alpha=gw * gw)
            rhs[:, :i] = torch.matmul(rhs[:, :i], z_prev).mul_(gw)
        rhs[:, i] = f[:, i]
        z_prev = _spd_inverse(s_i)
    assert z_prev is not None
    w_last = torch.matmul(rhs, z_prev)  # [T, R, C]: last free row's bit voltages per input
    if r_sink > 0:
        return w_last.mul_(1.0 / r_sink)
    w_last.mul_(gw)
    w_last[:, rows - 1] += f[:, rows - 1]
    return w_last


def effective_conductance(
    G: torch.Tensor,
    *,
    r_wire: float,
    r_source: float,
    r_sink: float,
    chunk: int = 64,
) -> torch.Tensor:
    """Exact effective conductance matrices of many tiles (the IR-drop fast path).

    For each tile, ``A`` satisfies ``I = A^T V`` exactly for every input ``V``, where ``I`` are
    the column currents :func:`column_currents` returns. Computed once per programmed chip.

    Args:
        G: Cell conductances ``[..., R, C]`` (siemens); any leading batch shape.
        r_wire: Resistance between neighbouring nodes (ohms).
        r_source: Source resistance per word line (ohms).
        r_sink: Sink resistance per bit line (ohms).
        chunk: Tiles processed at once (memory about ``chunk * (6 R C + 8 C^2) * 8`` bytes).

    Returns:
        ``A`` with the shape of ``G`` (siemens, float64).

    Raises:
        ValueError: On a negative resistance or a G with fewer than 2 dimensions.
    """
    _check_resistances(r_wire, r_source, r_sink)
    if G.ndim < 2:
        raise ValueError(f"G must be [..., rows, cols], got shape {tuple(G.shape)}")
    lead = G.shape[:-2]
    rows, cols = G.shape[-2:]
    flat = G.detach().to(torch.float64).reshape(-1, rows, cols)
    if r_wire == 0:
        return _lumped(flat, r_source, r_sink).reshape(*lead, rows, cols)
    out = torch.empty_like(flat)
    starts = range(0, flat.shape[0], chunk)

    def work(start: int) -> None:
        # Each chunk is a long sequence of small batched ops: run them single-threaded (an
        # intra-op barrier per small op costs a scheduler wake-up on a busy machine) and spread
        # whole chunks over the threads instead; torch ops release the GIL.
        torch.set_num_threads(1)
        stop = min(start + chunk, flat.shape[0])
        out[start:stop] = _distributed(flat[start:stop], r_wire, r_source, r_sink)

    n_threads = torch.get_num_threads()
    try:
        if n_threads > 1 and len(starts) > 1:
            with ThreadPoolExecutor(min(n_threads, len(starts))) as pool:
                list(pool.map(work, starts))
        else:
            for start in starts:
                work(start)
    finally:
        torch.set_num_threads(n_threads)
    return out.reshape(*lead, rows, cols)
