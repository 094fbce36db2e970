"""Run an export's deterministic per-tile-ADC crossbar nodes on the native kernel (torch-free).

onnxruntime evaluates an ``nvmpriv`` node through its standard-op function body, where the
per-tile ADC is separate ``Round`` / ``Clip`` / sum passes over every tile's partial sums; those
passes, not the products, dominate a crossbar file's time (benchmarks/RESULTS.md). This module
evaluates such nodes with the fused GEMM + ADC kernel of :mod:`nvmpriv.native` (the one the
torch simulator uses) and everything else with onnxruntime: the graph is cut at those nodes
into standard-op segments, each its own onnxruntime session, run in order.

A node qualifies when it has an ADC, no read noise and no bit slicing (read noise must come
from the file's ``RandomNormalLike`` streams; the others have no per-tile conversion to fuse).
What follows such a node is applied in the kernel's epilogue where each node is the only
reader of the previous output: a ``Relu``; for a convolution also an inference
``BatchNormalization`` (folded into per-channel factors and biases) and a residual ``Add``
before the ``Relu`` (a ResNet block's tail), so those passes over the largest tensors of a
ResNet go. In an OpenMP build, convolutions with stride 1 along the width and output rows of
at least 16 columns take the kernel's row-segment path (a micro-tile's inputs are loaded
straight from the padded input), others with few output channels its direct path (also those
rows whose segments would leave a fifth of their lanes idle); the rest gather panels.
It computes the same function as the body: the DAC and ADC steps folded into the weights
(``W * (dac_step / adc_step)`` in float32, as onnxruntime constant-folds it), integer DAC codes,
and per tile ``clamp(round(partial sum), -qmax, qmax)`` summed times the ADC step. Partial sums
are accumulated in another order than onnxruntime's GEMM, so a sum within float32 rounding of
a half step can land on the neighbouring code: outputs agree to ~1e-6 relative, not bit for bit.

The native path computes what a node's *attributes* say, onnxruntime what its *function
body* says; an exporter writes both from one layer, but a hand-edited file need not agree. So
at load every native node is run once against its own body on onnxruntime (two random inputs
through the graph); a node that disagrees, or whose attributes do not fit its tensors or its
input, stays on onnxruntime.

Only :mod:`nvmpriv.runtime` uses this; ``NVMPRIV_NATIVE=0`` or ``load(..., native=False)``
keeps the whole file on onnxruntime.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from nvmpriv.native.library import (
    MAX_QMAX,
    ROW_SEGMENT,
    AdcGemmLibrary,
    PackedGemm,
    conv_direct,
    conv_rows,
    load_checked,
    row_segments_apply,
)
from nvmpriv.runtime import activation_quantizer

__all__ = ["NativeGraphRunner", "native_library", "native_nodes"]

_STATE: dict[str, Any] = {}


def _self_check(lib: AdcGemmLibrary) -> None:
    """Compare the kernel with numpy on small problems (operand forms, epilogues, DAC codes)."""
    rng = np.random.default_rng(0)
    n_r, m, ts, n, rows = 3, 7, 8, lib.panel_width + 5, 21  # the last tile row: 5 real rows
    a = rng.integers(-3, 4, (n_r, m, ts)).astype(np.float32)
    b = (rng.standard_normal((n_r, ts, n)) * 2).astype(np.float32)
    a[-1, :, rows - (n_r - 1) * ts :] = 0
    codes = np.clip(np.round(np.matmul(a, b)), -9, 9).sum(0).astype(np.float32) * np.float32(0.5)
    bias = {
        0: rng.standard_normal(m).astype(np.float32),
        1: rng.standard_normal(n).astype(np.float32),
    }
    # packed with a per-column bias and ReLU (Gemm nodes), gathered with a per-row bias (Conv)
    for packed, axis, relu in ((True, 1, True), (False, 0, False)):
        ref = codes + (bias[0][:, None] if axis == 0 else bias[1][None, :])
        ref = np.maximum(ref, 0) if relu else ref
        out = np.empty((m, n), np.float32)
        rhs = np.empty(lib.packed_size(n_r, ts, n), np.float32) if packed else b
        if packed:
            lib.pack(b.ctypes.data, ts * n, n, n_r, ts, n, rhs.ctypes.data)
        lib.gemm(
            (a.ctypes.data, m * ts, ts),
            (rhs.ctypes.data, ts * n, n),
            (out.ctypes.data, n, n, 0),
            m=m,
            n=n,
            n_r=n_r,
            ts=ts,
            qmax=9,
            scale=0.5,
            packed=packed,
            conv=None,
            check=None,
            threads=1,
            rows=rows,
            bias=(bias[axis].ctypes.data, axis),
            relu=relu,
        )
        if not np.allclose(out, ref, rtol=1e-6, atol=1e-6):
            raise RuntimeError("the compiled kernel disagrees with numpy on a test problem")
    x = (rng.integers(-40, 41, (2, 3, 9)) * 0.25).astype(np.float32)  # ties and clipping
    dac = np.empty_like(x)
    lib.dac_codes(
        (x.ctypes.data, 27, 9), (dac.ctypes.data, 27, 9), (2, 3, 9), step=0.5, qmax=7, threads=1
    )
    if not np.array_equal(dac, np.clip(np.rint(x / np.float32(0.5)), -7, 7)):
        raise RuntimeError("the compiled DAC codes disagree with numpy on a test problem")


def native_library() -> AdcGemmLibrary | None:
    """The native kernel for the torch-free evaluator, built and checked on first call.

    Returns:
        The loaded library, or ``None`` when ``NVMPRIV_NATIVE=0``, no C++ compiler is found, or
        building, loading or the self-check failed (warned once per process).
    """
    return load_checked(
        _STATE,
        lambda lib: lib,
        lambda lib: _self_check(lib),  # looked up at call time (tests replace it)
        "the crossbar nodes run on onnxruntime's function bodies (same results, slower)",
    )


_INT_KEYS = (
    "groups", "n_row_tiles", "tile_size", "rows_per_group", "cols_per_group", "n_slices",
    "act_bits", "act_signed", "dac_bits", "adc_bits", "read_noise", "bit_slicing", "has_bias",
)  # fmt: skip
#: Operators worth onnxruntime's intra-op threads; other segments (ReLU, BatchNorm, pooling,
#: Add, Softmax...) run on one thread, so a file with many segments does not hold many pools.
_HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})
#: Panel width bound used in the 32-bit size checks (the kernel's is 64).
_PANEL_LIMIT = 256
#: Convolutions with at most this many output channels (per group) and at least this many rows
#: run on the kernel's direct path (see :func:`_direct`).
_DIRECT_MAX_CHANNELS = 32
_DIRECT_MIN_ROWS = 128
#: Least share of the row-segment path's vector lanes that are distinct output positions (an
#: output row of w columns takes ceil(w / 16) segments of 16) for it to be taken over the
#: direct path (see :meth:`_NativeNode.conv_path`).
_ROWS_MIN_LANE_USE = 0.8
#: Most rows (Gemm) or output positions (Conv) per kernel call: its counts are 32-bit.
_MAX_ROWS = 2**31 - 2**16


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's attributes, each only where its type is the expected scalar or list."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type == onnx.AttributeProto.INT:
            out[a.name] = int(a.i)
        elif a.type == onnx.AttributeProto.FLOAT:
            out[a.name] = float(a.f)
        elif a.type == onnx.AttributeProto.INTS:
            out[a.name] = [int(v) for v in a.ints]
    return out


@dataclass(frozen=True)
class _NodeSpec:
    """A qualifying node's attributes, checked (see :func:`_node_spec`)."""

    conv: bool
    groups: int
    n_r: int
    tile: int
    k: int
    m: int
    act_bits: int
    act_signed: bool
    dac_step: float  # 0: no DAC
    dac_qmax: int
    adc_step: float
    adc_qmax: int
    has_bias: bool
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # ONNX order: top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)


def _node_spec(node: onnx.NodeProto) -> _NodeSpec | None:
    """The node as the native kernel runs it, or ``None`` where it does not qualify.

    Qualifies: an ``nvmpriv`` crossbar node with a per-tile ADC, no read noise, no bit slicing,
    every attribute present with its type, positive finite steps, clip levels the kernel's
    rounding holds exactly (``<= 2**22``) and a consistent convolution geometry.
    """
    if node.domain != "nvmpriv" or node.op_type not in ("CrossbarGemm", "CrossbarConv"):
        return None
    a = _attrs(node)
    conv = node.op_type == "CrossbarConv"
    try:
        v = {key: a.get(key, 0) for key in _INT_KEYS}
        if not isinstance(v["n_slices"], int) or any(not isinstance(x, int) for x in v.values()):
            return None
        if not v["adc_bits"] or v["read_noise"] or v["bit_slicing"] or v["n_slices"] != 1:
            return None
        adc_step, adc_qmax = float(np.float32(a["adc_step"])), int(a["adc_qmax"])
        dac_step = float(np.float32(a["dac_step"])) if v["dac_bits"] else 0.0
        dac_qmax = int(a["dac_qmax"]) if v["dac_bits"] else 1
        spec = _NodeSpec(
            conv=conv,
            groups=v["groups"],
            n_r=v["n_row_tiles"],
            tile=v["tile_size"],
            k=v["rows_per_group"],
            m=v["cols_per_group"],
            act_bits=v["act_bits"],
            act_signed=bool(v["act_signed"]),
            dac_step=dac_step,
            dac_qmax=dac_qmax,
            adc_step=adc_step,
            adc_qmax=adc_qmax,
            has_bias=bool(v["has_bias"]),
        )
        if conv:
            kernel, strides = a["kernel_shape"], a["strides"]
            pads, dilations = a["pads"], a["dilations"]
            if (len(kernel), len(strides), len(pads), len(dilations)) != (2, 2, 4, 2):
                return None
            spec = replace(
                spec,
                kernel=(kernel[0], kernel[1]),
                strides=(strides[0], strides[1]),
                pads=(pads[0], pads[1], pads[2], pads[3]),
                dilations=(dilations[0], dilations[1]),
            )
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    ok = (
        min(spec.groups, spec.n_r, spec.tile, spec.k, spec.m) >= 1
        and (spec.n_r - 1) * spec.tile < spec.k <= spec.n_r * spec.tile  # no all-zero tile row
        and spec.n_r * spec.tile * _PANEL_LIMIT < 2**31  # the kernel's int panel offsets
        and 0 < spec.adc_step < np.inf
        and 1 <= spec.adc_qmax <= MAX_QMAX
        and (not v["dac_bits"] or (0 < spec.dac_step < np.inf and 1 <= dac_qmax <= MAX_QMAX))
        and spec.act_bits >= 0
        and (conv or spec.groups == 1)
    )
    if ok and conv:
        kh, kw = spec.kernel
        ok = (
            min(kh, kw, *spec.strides, *spec.dilations) >= 1
            and min(spec.pads) >= 0
            and spec.k % (kh * kw) == 0
        )
    return spec if ok else None


class _Arena:
    """One growing float32 buffer per thread, lent to one node call at a time.

    Shared by all of a runner's nodes (they run one after another in a thread), so the memory
    held is that of the largest node input, not the sum over nodes.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous ``shape`` view of this thread's buffer (contents undefined)."""
        size = math.prod(shape)
        buf: np.ndarray | None = getattr(self._local, "buf", None)
        if buf is None or buf.size < size:
            buf = np.empty(size, np.float32)
            self._local.buf = buf
        return buf[:size].reshape(shape)


@dataclass
class _NativeNode:
    """One qualifying crossbar node with its weights prepared for the kernel."""

    lib: AdcGemmLibrary
    spec: _NodeSpec
    index: int
    x_name: str
    y_name: str
    weights: np.ndarray  # packed [n_r, ts, M] panels (Gemm), [G, n_r, M, ts] (Conv)
    bias: np.ndarray | None
    threads: int
    ts: int  # rows per tile as run: the tile size, or K for a single tile row (no zero rows)
    arena: _Arena
    # Conv: [G, n_r, ts, M padded to 16] for the kernel's direct path (see _DIRECT_MAX_CHANNELS)
    direct_weights: np.ndarray | None = None
    packed: PackedGemm | None = None  # Gemm nodes: the kernel call, set up once
    # graph nodes applied in the kernel's epilogue, in order (BatchNormalization, Add, Relu)
    tail: tuple[int, ...] = ()
    relu: bool = False
    row_scale: np.ndarray | None = None  # per output channel instead of the ADC step (folded BN)
    residual: str | None = None  # the value a fused Add adds before the ReLU

    def __post_init__(self) -> None:
        sp = self.spec
        if not sp.conv:
            self.packed = PackedGemm(
                self.lib, self.weights.ctypes.data, (self.ts, sp.n_r * self.ts),
                n=sp.m, n_r=sp.n_r, ts=self.ts, rows=sp.k, qmax=sp.adc_qmax, scale=sp.adc_step,
                bias=None if self.bias is None else self.bias.ctypes.data,
                relu=self.relu, threads=self.threads, dac=(sp.dac_step, sp.dac_qmax),
            )  # fmt: skip

    def fuse_relu(self, index: int, output: str) -> _NativeNode:
        """This node followed by Relu node ``index`` (output ``output``), in the epilogue."""
        return replace(self, tail=(*self.tail, index), relu=True, y_name=output)

    def fuse_batchnorm(
        self, index: int, output: str, factor: np.ndarray, shift: np.ndarray
    ) -> _NativeNode:
        """This convolution followed by an inference BatchNormalization ``y * factor + shift``.

        Folded into the epilogue: ``codes * (adc_step * factor) + (bias * factor + shift)``
        per output channel (float64, rounded once to float32).
        """
        bias = np.zeros(factor.shape) if self.bias is None else self.bias.astype(np.float64)
        return replace(
            self,
            tail=(*self.tail, index),
            y_name=output,
            row_scale=(self.spec.adc_step * factor).astype(np.float32),
            bias=(bias * factor + shift).astype(np.float32),
        )

    def fuse_add(self, index: int, output: str, other: str) -> _NativeNode:
        """This convolution's output plus ``other``, added before any ReLU.

        In the kernel where ``other`` has the output's shape; one that broadcasts is added
        after it (see :meth:`_conv`).
        """
        return replace(self, tail=(*self.tail, index), y_name=output, residual=other)

    @property
    def code_value(self) -> float:
        """The largest output change one ADC code makes (the step, or a folded channel's)."""
        if self.row_scale is None:
            return self.spec.adc_step
        return float(np.abs(self.row_scale).max(initial=0.0))

    def _quantized(self, x: np.ndarray) -> np.ndarray:
        """The array's input as float32 C-contiguous, after the DoReFa quantizer if it has one."""
        sp = self.spec
        x0 = activation_quantizer(x, sp.act_bits, sp.act_signed) if sp.act_bits else x
        return np.ascontiguousarray(x0, np.float32)

    def _write_codes(self, x: np.ndarray, dst: np.ndarray, pad: tuple[int, int, int, int]) -> None:
        """A convolution's input (DoReFa quantizer, then integer DAC codes) written into ``dst``.

        ``x`` is ``[B, C, H, W]``; ``dst`` a view of the same shape with a unit last stride (the
        live part of a padded buffer, whose ``pad`` border (top, left, bottom, right) around each
        image plane is zeroed too: the buffer is shared with other nodes). Gemm nodes have the
        kernel write their codes (:class:`PackedGemm`).
        """
        sp = self.spec
        x0 = self._quantized(x)
        b, c, h, w = x0.shape
        self.lib.dac_codes(
            (x0.ctypes.data, h * w, w),
            (dst.ctypes.data, dst.strides[1] // 4, dst.strides[2] // 4),
            (b * c, h, w),
            step=sp.dac_step,
            qmax=sp.dac_qmax,
            threads=self.threads,
            pad=pad,
        )

    def run(self, x: np.ndarray, res: np.ndarray | None = None) -> np.ndarray:
        """The node's output for input ``X`` (and the fused Add's other operand ``res``).

        Raises:
            ValueError: If ``x`` does not have the shape the node's attributes describe, or
                ``res`` does not broadcast to the output.
        """
        if self.spec.conv:
            return self._conv(x, res)
        return self._gemm(x)

    def _gemm(self, x: np.ndarray) -> np.ndarray:
        sp, n = self.spec, self.ts
        k, m = sp.k, sp.m
        if x.ndim != 2 or x.shape[1] != k:
            raise ValueError(f"crossbar node {self.y_name!r}: input {x.shape}, expected (n, {k})")
        b = x.shape[0]
        out = np.empty((b, m), np.float32)
        assert self.packed is not None
        x0 = self._quantized(x)
        for r0 in range(0, b, _MAX_ROWS):  # the kernel counts rows in 32-bit integers
            r1 = min(b, r0 + _MAX_ROWS)
            rows = self.arena.take((r1 - r0, sp.n_r * n))
            # the kernel writes the DAC codes into rows[:, :K] first and skips the rows past K
            xq = x0[r0:r1]
            self.packed(rows.ctypes.data, out[r0:].ctypes.data, r1 - r0, (xq.ctypes.data, k))
        return out

    def conv_path(self, w_out: int) -> str:
        """The kernel path of this convolution for ``w_out`` output columns (see :func:`_conv_path`)."""
        rows = row_segments_apply(self.lib, self.spec.strides[1], w_out)
        return _conv_path(rows, w_out, self.direct_weights is not None)

    def _conv(self, x: np.ndarray, res: np.ndarray | None) -> np.ndarray:
        sp, n = self.spec, self.ts
        g, n_r, k, m = sp.groups, sp.n_r, sp.k, sp.m
        kh, kw = sp.kernel
        cin_g = k // (kh * kw)
        if x.ndim != 4 or x.shape[1] != g * cin_g:
            raise ValueError(
                f"crossbar node {self.y_name!r}: input {x.shape}, expected (n, {g * cin_g}, H, W)"
            )
        top, left, bottom, right = sp.pads
        (sh, sw), (dh, dw) = sp.strides, sp.dilations
        b, c, h, w = x.shape
        hp, wp = h + top + bottom, w + left + right
        h_out = (hp - dh * (kh - 1) - 1) // sh + 1
        w_out = (wp - dw * (kw - 1) - 1) // sw + 1
        if h_out < 1 or w_out < 1:
            raise ValueError(
                f"crossbar node {self.y_name!r}: input {x.shape} is smaller than its kernel"
            )
        big_l = h_out * w_out
        out = np.empty((b, g * m, h_out, w_out), np.float32)
        # a residual of another shape (broadcast by the Add) is added after the kernel
        in_kernel = res is not None and res.shape == out.shape and res.dtype == np.float32
        r = np.ascontiguousarray(res) if in_kernel and res is not None else None
        relu = self.relu and (self.residual is None or r is not None)
        path = self.conv_path(w_out)
        step = max(1, _MAX_ROWS // big_l)  # output positions per kernel call fit in 32 bits
        for b0 in range(0, b, step):
            b1 = min(b, b0 + step)
            xp = self.arena.take((b1 - b0, c, hp, wp))
            self._write_codes(x[b0:b1], xp[:, :, top : top + h, left : left + w], sp.pads)
            strides = [s // 4 for s in xp.strides]
            part = out[b0:b1]
            for grp in range(g):
                geo = np.array(
                    [*strides, grp * cin_g, kh, kw, sh, sw, dh, dw, h_out, w_out, k, xp.size],
                    np.int64,
                )
                at = 4 * grp * m * big_l
                out_at = (part.ctypes.data + at, big_l, big_l, g * m * big_l)
                bias = None if self.bias is None else self.bias.ctypes.data + 4 * grp * m
                rs = None if self.row_scale is None else self.row_scale.ctypes.data + 4 * grp * m
                rp = None if r is None else r[b0:b1].ctypes.data + at
                wt = self.weights[grp]
                if path == "direct":
                    assert self.direct_weights is not None
                    conv_direct(
                        self.lib, self.direct_weights[grp].ctypes.data, xp.ctypes.data, out_at,
                        conv=geo.ctypes.data, m=m, m_pad=self.direct_weights.shape[-1],
                        n=(b1 - b0) * big_l, n_r=n_r, ts=n, rows=k, qmax=sp.adc_qmax,
                        scale=sp.adc_step, bias=bias, relu=relu, threads=self.threads, row_scale=rs,
                        res=rp,
                    )  # fmt: skip
                    continue
                if path == "rows":
                    conv_rows(
                        self.lib, wt.ctypes.data, xp.ctypes.data, out_at, conv=geo.ctypes.data,
                        m=m, n=(b1 - b0) * big_l, n_r=n_r, ts=n, rows=k, qmax=sp.adc_qmax,
                        scale=sp.adc_step, bias=bias, relu=relu, threads=self.threads, row_scale=rs,
                        res=rp,
                    )  # fmt: skip
                    continue
                self.lib.gemm(
                    (wt.ctypes.data, m * n, n),
                    (xp.ctypes.data, 0, 0),
                    out_at,
                    m=m,
                    n=(b1 - b0) * big_l,
                    n_r=n_r,
                    ts=n,
                    qmax=sp.adc_qmax,
                    scale=sp.adc_step,
                    packed=False,
                    conv=geo.ctypes.data,
                    check=None,
                    threads=self.threads,
                    rows=k,
                    bias=None if bias is None else (bias, 0),
                    relu=relu,
                    row_scale=rs,
                    res=rp,
                )
        if self.residual is not None and r is None:
            if res is None:
                raise ValueError(f"crossbar node {self.y_name!r}: no value for its fused Add")
            out = out + res
            if self.relu:
                np.maximum(out, 0, out=out)
        return out


def _conv_path(rows: bool, w_out: int, direct: bool) -> str:
    """The kernel path of a convolution: ``"rows"``, ``"direct"`` or ``"gathered"``.

    ``"rows"`` (row segments read in place, where ``rows``: see
    :func:`nvmpriv.native.library.row_segments_apply`) unless its lanes are poorly used
    (``w_out`` output columns) and the direct path is available
    (``direct``: see :func:`_direct`), then ``"direct"``, else ``"gathered"`` panels. Measured
    (``benchmarks/bench_native_conv.py``, RESULTS.md session 13): the row segments beat the
    gathered panels wherever they apply; the direct path beats them at 20 columns (62 % of
    the lanes used).
    """
    lane_use = w_out / (ROW_SEGMENT * math.ceil(w_out / ROW_SEGMENT))
    if rows and (lane_use >= _ROWS_MIN_LANE_USE or not direct):
        return "rows"
    return "direct" if direct else "gathered"


def _direct(lib: AdcGemmLibrary, spec: _NodeSpec) -> bool:
    """Whether a convolution may take the kernel's direct path (see :meth:`_NativeNode.conv_path`).

    Measured (benchmarks/RESULTS.md, session 12): with few output channels the gathered panels
    are mostly copying (each gathered input serves only M products) and the direct path is
    1.3-1.8x faster; with few rows its per-position stores dominate and it is slower.
    """
    return (
        lib.openmp and spec.conv and spec.m <= _DIRECT_MAX_CHANNELS and spec.k >= _DIRECT_MIN_ROWS
    )


def _prepare(
    lib: AdcGemmLibrary,
    node: onnx.NodeProto,
    index: int,
    spec: _NodeSpec,
    init: dict[str, np.ndarray],
    threads: int,
    arena: _Arena,
) -> _NativeNode | None:
    """The node ready for the kernel, or ``None`` where its tensors do not match its spec."""
    names = list(node.input)
    if len(names) != (3 if spec.has_bias else 2) or names[1] not in init:
        return None
    if spec.has_bias and names[2] not in init:
        return None
    g, n_r, n, k, m = spec.groups, spec.n_r, spec.tile, spec.k, spec.m
    w = init[names[1]]
    bias = init[names[2]] if spec.has_bias else None
    if w.dtype != np.float32 or w.size != g * n_r * n * m:
        return None
    if bias is not None and (bias.dtype != np.float32 or bias.size != g * m):
        return None
    # the function body's folding: W * float32(dac_step / adc_step), one float32 product
    scale = np.float32((spec.dac_step if spec.dac_step else 1.0) / spec.adc_step)
    if not np.isfinite(scale):
        return None
    ts = k if n_r == 1 else n  # a lone tile row's zero rows past K would only cost time
    wt = w.reshape(g, n_r, n, m)[:, :, :ts] * scale
    weights: np.ndarray
    direct_weights = None
    if spec.conv:
        weights = np.ascontiguousarray(wt.transpose(0, 1, 3, 2))  # [G, n_r, M, ts]
        if _direct(lib, spec):
            m_pad = -(-m // 16) * 16
            direct_weights = np.zeros((g, n_r, ts, m_pad), np.float32)
            direct_weights[..., :m] = wt
    else:
        weights = np.empty(lib.packed_size(n_r, ts, m), np.float32)
        src = np.ascontiguousarray(wt[0])
        lib.pack(src.ctypes.data, ts * m, m, n_r, ts, m, weights.ctypes.data)
    try:
        return _NativeNode(
            lib=lib,
            spec=spec,
            index=index,
            x_name=names[0],
            y_name=node.output[0],
            weights=weights,
            bias=None if bias is None else np.ascontiguousarray(bias.reshape(-1)),
            threads=threads,
            ts=ts,
            arena=arena,
            direct_weights=direct_weights,
        )
    except ValueError:  # sizes past the kernel's 32-bit counts
        return None


def native_nodes(model: onnx.ModelProto) -> list[int]:
    """Indices of the graph nodes the native kernel can evaluate (see :func:`_node_spec`).

    Args:
        model: An nvmpriv export.

    Returns:
        Node indices in graph order (empty for digital files and noisy or bit-sliced chips).
    """
    return [i for i, nd in enumerate(model.graph.node) if _node_spec(nd) is not None]


@dataclass
class _Segment:
    session: Any
    inputs: list[str]
    outputs: list[str]

    def run(self, values: dict[str, np.ndarray]) -> None:
        """Evaluate the segment on ``values`` and add its outputs to them."""
        got = self.session.run(self.outputs, {x: values[x] for x in self.inputs})
        values.update(zip(self.outputs, got, strict=True))


@dataclass
class _ReshapeSegment:
    """A segment of ``Flatten`` and ``Identity`` nodes, run as numpy reshapes.

    Between a net's convolutions and its classifier there is often nothing else; an
    onnxruntime call for it costs ~10 us, a fifth of a small FC layer's time.
    """

    nodes: list[onnx.NodeProto]

    def run(self, values: dict[str, np.ndarray]) -> None:
        """Evaluate the segment on ``values`` and add its outputs to them.

        Raises:
            ValueError: If a Flatten axis is out of its input's range (as onnxruntime would).
        """
        for nd in self.nodes:
            v = values[nd.input[0]]
            if nd.op_type == "Flatten":
                axis = int(_attrs(nd).get("axis", 1))
                axis += v.ndim if axis < 0 else 0
                if not 0 <= axis <= v.ndim:
                    raise ValueError(f"Flatten {nd.name!r}: axis out of range for {v.shape}")
                v = v.reshape(math.prod(v.shape[:axis]), math.prod(v.shape[axis:]))
            values[nd.output[0]] = v

    @staticmethod
    def takes(nodes: list[onnx.NodeProto], init: dict[str, Any]) -> bool:
        """Whether ``nodes`` are all single-input ``Flatten`` / ``Identity`` of computed values."""
        return all(
            nd.op_type in ("Flatten", "Identity")
            and nd.domain in ("", "ai.onnx")
            and len(nd.input) == 1
            and len(nd.output) == 1
            and nd.input[0] not in init
            for nd in nodes
        )


def _agrees(
    native: np.ndarray, body: np.ndarray, n_r: int, code: float, offset: float = 0.0
) -> bool:
    """Whether a native output is the function body's up to summation order.

    A partial sum within float32 rounding of a half step may round to the neighbouring code in
    one of them: at most a code (``code``: its largest output change) per tile row (``n_r``)
    apart, and on a small share of the outputs. A folded BatchNormalization and a residual
    round in another order too, which is a few units of the largest term summed (the output's
    own scale, or ``offset``: the largest folded bias or residual), not of the value.
    """
    if native.shape != body.shape or not np.isfinite(native).all():
        return False
    diff = np.abs(native.astype(np.float64) - body)
    mag = np.abs(body.astype(np.float64))
    tol = 1e-6 * (mag + max(mag.max(initial=0.0), offset)) + 1e-30
    off = diff > tol
    return bool(diff.max(initial=0.0) <= n_r * code * 1.001 + tol.max(initial=0.0)) and (
        int(off.sum()) <= max(1, off.size // 100)
    )


class NativeGraphRunner:
    """The export as onnxruntime segments and native crossbar nodes, run in graph order.

    ``run(names, feeds)`` has the signature of ``onnxruntime.InferenceSession.run``. At
    construction every native node is checked against its own function body on onnxruntime
    (a random probe batch through the graph): a node whose attributes do not describe its
    body (a hand-edited file) stays on onnxruntime.

    Args:
        model: The export (already checked by :func:`nvmpriv.runtime.load`).
        lib: The native kernel.
        session: Makes an onnxruntime session from a serialized model and an intra-op thread
            count.
        threads: Threads for the kernel and the heavy segments.
        input_shape: Shape of one input (no batch axis), for the probe.

    Raises:
        ValueError: If no node qualifies, or the graph cannot be cut (subgraph attributes,
            inputs that are also initializers, outputs that are initializers).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        lib: AdcGemmLibrary,
        session: Callable[[bytes, int], Any],
        threads: int,
        input_shape: Sequence[int],
    ) -> None:
        graph = model.graph
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for nd in [*graph.node, *(x for f in model.functions for x in f.node)]
            for a in nd.attribute
        ):
            raise ValueError("graphs with subgraph attributes are not cut into segments")
        self._model, self._session, self._threads = model, session, threads
        init = {t.name: t for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in init]
        if len(inputs) != 1 or any(o.name in init for o in graph.output):
            raise ValueError("the graph needs one non-initializer input and computed outputs")
        overridable = {i.name for i in graph.input} & set(init)
        if overridable:
            raise ValueError(f"graph inputs that are also initializers: {sorted(overridable)}")
        self._init = init
        self._input = inputs[0]
        self._outputs = [o.name for o in graph.output]
        self._types = self._value_types(model)
        arrays: dict[str, np.ndarray] = {}
        arena = _Arena()
        natives: dict[int, _NativeNode] = {}
        for i, nd in enumerate(graph.node):
            spec = _node_spec(nd)
            if spec is None or not nd.input or nd.input[0] in init:
                continue
            for name in nd.input[1:]:
                if name in init and name not in arrays:
                    arrays[name] = numpy_helper.to_array(init[name])
            prepared = _prepare(lib, nd, i, spec, arrays, threads, arena)
            if prepared is not None:
                natives[i] = prepared
        if not natives:
            raise ValueError("no crossbar node qualifies for the native kernel")
        self._producers = {o: nd for nd in graph.node for o in nd.output if o}
        natives = self._fuse_epilogues(natives)
        probe = np.random.default_rng(0).random((2, *input_shape), dtype=np.float32)
        self._build(natives)
        wrong = self._check_against_bodies(probe)
        if wrong:
            natives = {i: nd for i, nd in natives.items() if i not in wrong}
            if not natives:
                raise ValueError("no crossbar node agrees with its function body")
            self._build(natives)
        self.native_count = len(natives)

    def _fuse_epilogues(self, natives: dict[int, _NativeNode]) -> dict[int, _NativeNode]:
        """Move the nodes that follow a native node into its epilogue, where they can go.

        A chain of nodes each the only reader of the previous output (not a graph output):
        for a convolution, an inference ``BatchNormalization`` with constant parameters, then
        an ``Add`` of another float32 value, then a ``Relu``; for a Gemm node, a ``Relu``.
        The native node then runs where the chain's last node stood (the Add's other operand
        is computed by then).
        """
        graph = self._model.graph
        readers: dict[str, list[int]] = {}
        for i, nd in enumerate(graph.node):
            for name in dict.fromkeys(nd.input):
                readers.setdefault(name, []).append(i)
        claimed: set[int] = set()
        fused = {}
        for i, native in sorted(natives.items()):
            while native.y_name not in self._outputs:
                after = readers.get(native.y_name, [])
                j = after[0] if len(after) == 1 else -1
                nxt = graph.node[j] if j >= 0 and j not in claimed else None
                if nxt is None or nxt.domain not in ("", "ai.onnx") or len(nxt.output) != 1:
                    break
                ins, out = list(nxt.input), nxt.output[0]
                if nxt.op_type == "Relu" and ins == [native.y_name]:
                    native = native.fuse_relu(j, out)
                elif not native.spec.conv or native.relu or native.residual is not None:
                    break
                elif (
                    nxt.op_type == "BatchNormalization"
                    and native.row_scale is None
                    and ins[:1] == [native.y_name]
                ):
                    folded = self._batchnorm(nxt, native)
                    if folded is None:
                        break
                    native = native.fuse_batchnorm(j, out, *folded)
                elif nxt.op_type == "Add" and len(ins) == 2 and ins.count(native.y_name) == 1:
                    other = ins[1] if ins[0] == native.y_name else ins[0]
                    # the operand comes from the values computed at run time (not a constant)
                    float32 = (
                        self._types.get(other, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
                    )
                    if not other or other in self._init or not float32:
                        break
                    native = native.fuse_add(j, out, other)
                else:
                    break
                claimed.add(j)
                if native.relu:
                    break
            fused[i] = native
        return fused

    def _constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer, a ``Constant`` or an ``Identity`` of one."""
        seen = 0
        while name not in self._init:
            nd = self._producers.get(name)
            if nd is None or nd.domain not in ("", "ai.onnx") or seen > len(self._producers):
                return None
            if nd.op_type == "Identity" and len(nd.input) == 1:
                name = nd.input[0]
            elif nd.op_type == "Constant" and [a.name for a in nd.attribute] == ["value"]:
                return numpy_helper.to_array(nd.attribute[0].t)
            else:
                return None
            seen += 1
        return numpy_helper.to_array(self._init[name])

    def _batchnorm(
        self, node: onnx.NodeProto, native: _NativeNode
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``(factor, shift)`` of an inference BatchNormalization on ``native``'s output.

        ``y = (x - mean) / sqrt(var + epsilon) * scale + B = x * factor + shift`` (float64), or
        ``None`` where the node is not that (training mode, non-constant or mis-sized
        parameters).
        """
        attrs = _attrs(node)
        if attrs.get("training_mode", 0) != 0 or len(node.input) != 5:
            return None
        channels = native.spec.groups * native.spec.m
        params = [self._constant(x) for x in node.input[1:]]
        if any(p is None or p.shape != (channels,) or p.dtype != np.float32 for p in params):
            return None
        scale, shift, mean, var = (np.asarray(p, np.float64) for p in params)
        eps = float(attrs.get("epsilon", 1e-5))
        with np.errstate(all="ignore"):
            factor = scale / np.sqrt(var + eps)
            out = factor, shift - mean * factor
        if not all(np.isfinite(v).all() for v in out):
            return None
        return out

    @staticmethod
    def _value_types(model: onnx.ModelProto) -> dict[str, int]:
        """Element type of every named value (float32 where inference cannot tell)."""
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # inference is an aid here; unknown values default to float32
            inferred = model
        g = inferred.graph
        return {
            v.name: v.type.tensor_type.elem_type
            for v in [*g.input, *g.value_info, *g.output]
            if v.type.tensor_type.elem_type
        }

    def _sub_model(self, nodes: list[onnx.NodeProto], ins: list[str], outs: list[str]) -> bytes:
        """``nodes`` as a model of their own (initializers and local functions included)."""
        graph, types = self._model.graph, self._types
        consumed = [x for nd in nodes for x in nd.input if x]
        sub = onnx.helper.make_graph(
            nodes,
            f"{graph.name}_part",
            [onnx.helper.make_tensor_value_info(x, types.get(x, 1), None) for x in ins],
            [onnx.helper.make_tensor_value_info(o, types.get(o, 1), None) for o in outs],
            initializer=[self._init[x] for x in dict.fromkeys(consumed) if x in self._init],
        )
        part = onnx.helper.make_model(
            sub, opset_imports=list(self._model.opset_import), ir_version=self._model.ir_version
        )
        if any(nd.domain not in ("", "ai.onnx") for nd in nodes):
            # all local functions: a function body may call another one
            part.functions.extend(self._model.functions)
        return bytes(part.SerializeToString())

    def _build(self, natives: dict[int, _NativeNode]) -> None:
        """Cut the graph at the native nodes into onnxruntime segments."""
        graph = self._model.graph
        absorbed = {j for nd in natives.values() for j in nd.tail}
        # a native node runs where its last fused node stood: a fused Add's other operand may
        # be computed after the crossbar node
        place = {max((i, *nd.tail)): nd for i, nd in natives.items()}
        groups: list[list[int] | _NativeNode] = []
        for i in range(len(graph.node)):
            if i in place:
                groups.append(place[i])
            elif i in absorbed or i in natives:
                continue
            elif groups and isinstance(groups[-1], list):
                groups[-1].append(i)
            else:
                groups.append([i])
        needed_after: list[set[str]] = [set() for _ in groups]
        later: set[str] = set(self._outputs)
        for pos in range(len(groups) - 1, -1, -1):
            needed_after[pos] = set(later)
            step = groups[pos]
            if isinstance(step, _NativeNode):
                later.add(step.x_name)
                if step.residual is not None:
                    later.add(step.residual)
            else:
                later.update(x for j in step for x in graph.node[j].input if x)
        self._steps: list[_Segment | _ReshapeSegment | _NativeNode] = []
        for pos, step in enumerate(groups):
            if isinstance(step, _NativeNode):
                self._steps.append(step)
                continue
            nodes = [graph.node[j] for j in step]
            produced = {o for nd in nodes for o in nd.output if o}
            consumed = [x for nd in nodes for x in nd.input if x]
            ins = [x for x in dict.fromkeys(consumed) if x not in produced and x not in self._init]
            outs = [o for nd in nodes for o in nd.output if o and o in needed_after[pos]]
            if not outs:
                continue
            if _ReshapeSegment.takes(nodes, self._init):
                self._steps.append(_ReshapeSegment(nodes))
                continue
            heavy = any(nd.op_type in _HEAVY_OPS or nd.domain == "nvmpriv" for nd in nodes)
            sess = self._session(self._sub_model(nodes, ins, outs), self._threads if heavy else 1)
            self._steps.append(_Segment(sess, ins, outs))

    def _check_against_bodies(self, probe: np.ndarray) -> set[int]:
        """Run ``probe`` through the graph; the native nodes that disagree with their bodies."""
        graph = self._model.graph
        values: dict[str, np.ndarray] = {self._input: probe}
        wrong: set[int] = set()
        for step in self._steps:
            if not isinstance(step, _NativeNode):
                step.run(values)
                continue
            nodes = [graph.node[j] for j in (step.index, *step.tail)]
            produced = {o for nd in nodes for o in nd.output}
            ins = [
                x
                for x in dict.fromkeys(x for nd in nodes for x in nd.input)
                if x and x not in self._init and x not in produced
            ]
            # fused parameters are not computed by the segments any more
            feeds = {x: values[x] if x in values else self._constant(x) for x in ins}
            body = self._session(self._sub_model(nodes, ins, [step.y_name]), 1)
            (expected,) = body.run([step.y_name], feeds)
            res = None if step.residual is None else values[step.residual]
            terms = [np.abs(t).max(initial=0.0) for t in (step.bias, res) if t is not None]
            try:
                got = step.run(values[step.x_name], res)
                if not _agrees(
                    got, expected, step.spec.n_r, step.code_value, max(terms, default=0)
                ):
                    wrong.add(step.index)
            except ValueError:  # its attributes describe another input shape
                wrong.add(step.index)
            values[step.y_name] = expected
        return wrong

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Evaluate the graph.

        Args:
            names: Outputs to return (``None``: all graph outputs).
            feeds: Graph inputs by name.

        Returns:
            The requested outputs.
        """
        values = dict(feeds)
        for step in self._steps:
            if isinstance(step, _NativeNode):
                res = None if step.residual is None else values[step.residual]
                values[step.y_name] = step.run(values[step.x_name], res)
            else:
                step.run(values)
        return [values[x] for x in (names or self._outputs)]
