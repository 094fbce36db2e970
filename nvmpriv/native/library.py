"""ctypes binding of the compiled ``adc_gemm.cpp`` on raw pointers.

No tensors in the interface: the torch and numpy front ends pass addresses and element strides.
"""

from __future__ import annotations

import ctypes
import math
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from nvmpriv.native.build import build_library, find_compiler, native_disabled

__all__ = [
    "ABI",
    "MAX_QMAX",
    "MICRO_ROWS",
    "PARALLEL_MIN_MACS",
    "ROW_SEGMENT",
    "AdcGemmLibrary",
    "PackedGemm",
    "conv_direct",
    "conv_rows",
    "load_checked",
    "row_segments_apply",
]

_T = TypeVar("_T")
_LOAD_LOCK = threading.Lock()

ABI = 8
# The kernel rounds with the 1.5 * 2**23 trick, exact for |partial sum| <= 2**22 after clamping.
MAX_QMAX = 2**22
# Below this many multiply-adds per call the thread hand-off costs more than it saves.
PARALLEL_MIN_MACS = 1 << 18
# Rows of C per micro-tile (MR in adc_gemm.cpp): the least a thread gets when rows are shared.
MICRO_ROWS = 6
# Output positions per row segment of nvmpriv_adc_conv_rows (kLanes in adc_gemm.cpp).
ROW_SEGMENT = 16

_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _k_last(n_r: int, ts: int, rows: int) -> int:
    """Real rows of the last tile row, after checking that ``rows`` ends in it."""
    if not (n_r - 1) * ts < rows <= n_r * ts:
        raise ValueError(
            f"adc gemm: {rows} real rows do not fit {n_r} tile rows of {ts} (the last must hold "
            "some)"
        )
    return rows - (n_r - 1) * ts


class _GemmArgs(ctypes.Structure):
    """``GemmArgs`` of adc_gemm.cpp (same fields, order and types)."""

    _fields_ = [
        *((name, _P) for name in ("a", "b", "conv", "c", "bias", "check", "reach", "x")),
        *((name, _P) for name in ("row_scale", "res")),
        *(
            (name, _I64)
            for name in ("sa_t", "sa_i", "sb_t", "sb_k", "ldc", "block", "ld_block", "sx")
        ),
        *(
            (name, ctypes.c_int32)
            for name in ("m_rows", "packed", "n_r", "ts", "k_last", "n_cols", "p0", "p1")
        ),
        *((name, ctypes.c_int32) for name in ("bias_axis", "relu", "n_threads")),
        *((name, _F) for name in ("qmax", "scale", "thr", "dac_step", "dac_qmax")),
    ]


class AdcGemmLibrary:
    """The loaded kernel: panel packing and the fused GEMM + per-tile ADC, threaded.

    Args:
        path: The compiled shared library (:func:`nvmpriv.native.build.build_library`).

    Raises:
        OSError: If the library cannot be loaded.
        RuntimeError: If its interface version is not :data:`ABI`.
    """

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.nvmpriv_adc_abi.restype = _I
        if lib.nvmpriv_adc_abi() != ABI:
            raise RuntimeError(f"{path.name}: kernel interface {lib.nvmpriv_adc_abi()} != {ABI}")
        lib.nvmpriv_adc_panel_width.restype = _I
        lib.nvmpriv_adc_openmp.restype = _I
        lib.nvmpriv_adc_pack.argtypes = [_P, _I64, _I64, _I, _I, _I, _P]
        lib.nvmpriv_adc_pack.restype = None
        lib.nvmpriv_adc_gemm.argtypes = [ctypes.POINTER(_GemmArgs)]
        lib.nvmpriv_adc_gemm.restype = _I
        lib.nvmpriv_adc_conv_direct.argtypes = [ctypes.POINTER(_GemmArgs)]
        lib.nvmpriv_adc_conv_direct.restype = _I
        lib.nvmpriv_adc_conv_rows.argtypes = [ctypes.POINTER(_GemmArgs)]
        lib.nvmpriv_adc_conv_rows.restype = _I
        lib.nvmpriv_dac_codes.argtypes = [_P, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64]
        lib.nvmpriv_dac_codes.argtypes += [_F, _F, _P, _I]
        lib.nvmpriv_dac_codes.restype = None
        self._lib = lib
        self.path = path
        self.panel_width: int = lib.nvmpriv_adc_panel_width()
        self.openmp = bool(lib.nvmpriv_adc_openmp())
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._pool_lock = threading.Lock()

    @staticmethod
    def _ranges(n_panels: int, threads: int) -> list[tuple[int, int]]:
        bounds = [round(i * n_panels / threads) for i in range(threads + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(threads) if bounds[i] < bounds[i + 1]]

    def _run(self, fn: Callable[[int], None], n: int) -> None:
        """Run ``fn(0) .. fn(n - 1)``, in parallel on a thread pool when ``n > 1``."""
        if n == 1:
            fn(0)
            return
        with self._pool_lock:  # a pool is only replaced, never shut down, while others submit
            if self._pool is None or self._pool_size < n - 1:
                self._pool = ThreadPoolExecutor(n - 1, thread_name_prefix="nvmpriv-adc")
                self._pool_size = n - 1
            # ctypes releases the GIL for the call, so the ranges run in parallel
            futures = [self._pool.submit(fn, i) for i in range(1, n)]
        fn(0)
        for f in futures:
            f.result()

    def packed_size(self, n_r: int, ts: int, n_cols: int) -> int:
        """Float count of :meth:`pack`'s result for ``n_r`` blocks of ``[ts, n_cols]``.

        Args:
            n_r: Tile rows.
            ts: Rows per tile.
            n_cols: Columns.

        Returns:
            ``ceil(n_cols / panel_width) * n_r * ts * panel_width``.
        """
        return math.ceil(n_cols / self.panel_width) * n_r * ts * self.panel_width

    def pack(
        self, src: int, ld_t: int, ld_k: int, n_r: int, ts: int, n_cols: int, dst: int
    ) -> None:
        """Pack ``n_r`` float32 blocks ``[ts, n_cols]`` into the kernel's column panels.

        Args:
            src: Address of element ``[0, 0, 0]``; element ``[t, k, j]`` at
                ``src[t*ld_t + k*ld_k + j]``.
            ld_t: Element stride between blocks.
            ld_k: Element stride between rows.
            n_r: Blocks (tile rows).
            ts: Rows per block.
            n_cols: Columns.
            dst: Address of :meth:`packed_size` writable floats.
        """
        self._lib.nvmpriv_adc_pack(src, ld_t, ld_k, n_r, ts, n_cols, dst)

    def dac_codes(
        self,
        x: tuple[int, int, int],
        dst: tuple[int, int, int],
        shape: tuple[int, int, int],
        *,
        step: float,
        qmax: int,
        threads: int,
        pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    ) -> None:
        """``dst = clamp(round(x / step), -qmax, qmax)`` (or a copy when ``step <= 0``).

        Args:
            x: ``(address, stride 0, stride 1)`` of a float32 ``[n0, n1, n2]`` block with a
                unit last stride.
            dst: The same for the destination.
            shape: ``(n0, n1, n2)``.
            step: DAC step (``<= 0``: copy without quantizing).
            qmax: Clip level in steps (``1 <= qmax <= 2**22`` when quantizing).
            threads: Threads (OpenMP builds only).
            pad: ``(top, left, bottom, right)``: also zero that border around every destination
                ``[n1, n2]`` plane (rows before and after it, columns beside it; the caller's
                buffer must hold them).
        """
        n0, n1, n2 = shape
        if min(pad) < 0:
            raise ValueError(f"dac codes: negative padding {pad}")
        self._lib.nvmpriv_dac_codes(
            x[0], n0, n1, n2, x[1], x[2], dst[0], dst[1], dst[2], step, float(qmax),
            (ctypes.c_int64 * 4)(*pad), threads,
        )  # fmt: skip

    def gemm(
        self,
        a: tuple[int, int, int],
        b: tuple[int, int, int],
        out: tuple[int, int, int, int],
        *,
        m: int,
        n: int,
        n_r: int,
        ts: int,
        qmax: int,
        scale: float,
        packed: bool,
        conv: int | None,
        check: list[bool] | None,
        threads: int,
        rows: int | None = None,
        bias: tuple[int, int] | None = None,
        relu: bool = False,
        row_scale: int | None = None,
        res: int | None = None,
    ) -> list[int]:
        """``C = scale * sum_t clamp(round(A_t @ B_t), -qmax, qmax) (+ bias) (+ res)``, raw memory.

        With ``relu`` the result is then ``max(C, 0)``.

        Operands are validated by the callers (torch and numpy front ends).

        Args:
            a: ``(address, stride between tile rows, stride between rows)`` of ``A [n_r, m, ts]``
                (unit last stride).
            b: ``(address, tile-row stride, row stride)`` of ``B [n_r, ts, n]`` (unit last
                stride); the strides are ignored when packed or gathered (``conv``).
            out: ``(address, ldc, block, ld_block)``: ``C[i, j]`` at
                ``i*ldc + (j // block)*ld_block + j % block``.
            m: Rows of ``C``.
            n: Columns of ``C``.
            n_r: Tile rows.
            ts: Rows per tile.
            qmax: ADC clip level in steps.
            scale: Factor applied to the summed codes.
            packed: Whether ``b`` was packed by :meth:`pack`.
            conv: Address of the int64 convolution geometry (input strides then the gather
                parameters, see ``adc_gemm.cpp``), or ``None``.
            check: Per tile row, whether to report partial sums reaching ``qmax``.
            threads: Threads to use (OpenMP inside one call, else Python threads over panels).
            rows: Rows of ``A``/``B`` that are not zero padding (default ``n_r * ts``); the
                kernel skips the last tile row's rows past it. For ``conv``, the geometry's ``k``.
            bias: ``(address, axis)`` of a float32 bias added after the scaling, one value per
                row of ``C`` (axis 0, ``m`` values) or per column (axis 1, ``n`` values).
            relu: Apply ``max(., 0)`` last.
            row_scale: Address of ``m`` float32 factors, one per row of ``C``, used instead of
                ``scale`` (a BatchNormalization folded into the scale and the bias), or ``None``.
            res: Address of a float32 array addressed as ``out`` (same ``ldc``, ``block``,
                ``ld_block``), added after the bias and before the ReLU, or ``None``.

        Returns:
            The checked tile rows whose partial sums reached the clip level.

        Raises:
            MemoryError: If the kernel could not allocate a panel buffer.
        """
        ints = (m, n, n_r, ts, n_r * ts * self.panel_width, math.ceil(n / self.panel_width) + 1)
        if max(ints) >= 2**31 or min(m, n, n_r, ts) < 0:
            raise ValueError(f"adc gemm: sizes {ints} do not fit the kernel's 32-bit counts")
        k_last = _k_last(n_r, ts, n_r * ts if rows is None else rows)
        if check is not None and len(check) != n_r:
            raise ValueError(f"adc gemm: {len(check)} clip-check flags for {n_r} tile rows")
        n_p = math.ceil(n / self.panel_width)
        # a packed operand is shared by rows too (see adc_gemm.cpp), a gathered one by panels
        shares = n_p * (math.ceil(m / MICRO_ROWS) if packed and self.openmp else 1)
        threads = max(1, min(threads, shares))
        if n_r * m * ts * n < PARALLEL_MIN_MACS:
            threads = 1
        # OpenMP builds share panels inside one call; otherwise one call per range of panels
        ranges = [(0, n_p)] if self.openmp else self._ranges(n_p, threads)
        per_call = threads if self.openmp else 1
        reach = None if check is None else np.zeros((len(ranges), per_call, n_r), np.uint8)
        flags = None if check is None else np.asarray(check, dtype=np.uint8)
        check_ptr = None if flags is None else flags.ctypes.data
        fn = self._lib.nvmpriv_adc_gemm
        args = []
        for i, (p0, p1) in enumerate(ranges):
            g = _GemmArgs(
                a=a[0], b=b[0], conv=conv, c=out[0], check=check_ptr,
                bias=None if bias is None else bias[0],
                reach=None if reach is None else reach[i].ctypes.data,
                sa_t=a[1], sa_i=a[2], sb_t=b[1], sb_k=b[2], ldc=out[1], block=out[2],
                ld_block=out[3], m_rows=m, packed=int(packed), n_r=n_r, ts=ts,
                k_last=k_last, n_cols=n, p0=p0, p1=p1,
                bias_axis=0 if bias is None else int(bias[1]), relu=int(relu),
                row_scale=row_scale, res=res, n_threads=per_call, qmax=float(qmax), scale=scale, thr=float(qmax) * (1 - 1e-6),
            )  # fmt: skip
            args.append(g)

        def part(i: int) -> None:
            if fn(args[i]) != 0:
                raise MemoryError("adc matmul: out of memory for a packed panel")

        self._run(part, len(ranges))
        if reach is None:
            return []
        return [int(t) for t in np.flatnonzero(reach.max(axis=(0, 1)))]


def conv_direct(
    lib: AdcGemmLibrary,
    weights: int,
    x: int,
    out: tuple[int, int, int, int],
    *,
    conv: int,
    m: int,
    m_pad: int,
    n: int,
    n_r: int,
    ts: int,
    rows: int,
    qmax: int,
    scale: float,
    bias: int | None,
    relu: bool,
    threads: int,
    row_scale: int | None = None,
    res: int | None = None,
) -> None:
    """A convolution on the kernel's direct path (no gathered panels; OpenMP builds).

    ``out[c, j] = scale * sum_t clamp(round(partial sums), -qmax, qmax) (+ bias[c])
    (+ res[c, j])`` (then ``max(., 0)`` with ``relu``) for output channel ``c < m`` and output
    position ``j < n``.

    Args:
        lib: The loaded kernel.
        weights: Address of the float32 weights packed ``[n_r, ts, m_pad]`` (channels
            innermost, zero past ``m``; ``m_pad`` a multiple of 16).
        x: Address of the padded NCHW input.
        out: ``(address, ldc, block, ld_block)`` as for :meth:`AdcGemmLibrary.gemm`.
        conv: Address of the int64 geometry (as for :meth:`AdcGemmLibrary.gemm`).
        m: Output channels.
        m_pad: Packed channel count.
        n: Output positions (batch times output pixels).
        n_r: Tile rows.
        ts: Rows per tile.
        rows: Real rows ``k`` (the geometry's).
        qmax: ADC clip level in steps.
        scale: Factor applied to the summed codes.
        bias: Address of ``m`` float32 values, or ``None``.
        relu: Apply ``max(., 0)`` last.
        threads: OpenMP threads.
        row_scale: Address of ``m`` float32 factors used instead of ``scale``, or ``None``.
        res: Address of a float32 array addressed as ``out``, added before the ReLU, or ``None``.

    Raises:
        ValueError: If the sizes do not fit the kernel's 32-bit counts or ``m_pad`` is not a
            multiple of 16 covering ``m``.
        MemoryError: If the kernel could not allocate its buffers.
    """
    if max(m, n, n_r, ts) >= 2**31:
        raise ValueError(f"adc conv: {m} x {n} outputs do not fit the kernel's 32-bit counts")
    if m_pad % 16 or not m <= m_pad:
        raise ValueError(f"adc conv: {m_pad} packed channels for {m} (a multiple of 16)")
    g = _GemmArgs(
        a=weights, b=x, conv=conv, c=out[0], bias=bias, sa_i=m_pad, ldc=out[1], block=out[2],
        ld_block=out[3], m_rows=m, n_r=n_r, ts=ts, k_last=_k_last(n_r, ts, rows), n_cols=n,
        relu=int(relu), n_threads=max(1, threads), qmax=float(qmax), scale=scale,
        row_scale=row_scale, res=res,
    )  # fmt: skip
    rc = lib._lib.nvmpriv_adc_conv_direct(g)
    if rc == -1:
        raise MemoryError("adc conv: out of memory")
    if rc != 0:
        raise ValueError("adc conv: unsupported operands")


def row_segments_apply(lib: AdcGemmLibrary, width_stride: int, w_out: int) -> bool:
    """Whether a convolution can take :func:`conv_rows` (the kernel's row-segment path).

    Args:
        lib: The loaded kernel (the path shares its work over OpenMP threads).
        width_stride: The convolution's stride along the width.
        w_out: Output columns (a row takes ``ceil(w_out / ROW_SEGMENT)`` segments).

    Returns:
        ``True`` for an OpenMP build, width stride 1 and at least :data:`ROW_SEGMENT` columns.
    """
    return lib.openmp and width_stride == 1 and w_out >= ROW_SEGMENT


def conv_rows(
    lib: AdcGemmLibrary,
    weights: int,
    x: int,
    out: tuple[int, int, int, int],
    *,
    conv: int,
    m: int,
    n: int,
    n_r: int,
    ts: int,
    rows: int,
    qmax: int,
    scale: float,
    bias: int | None,
    relu: bool,
    threads: int,
    row_scale: int | None = None,
    res: int | None = None,
    a_strides: tuple[int, int] | None = None,
) -> None:
    """A stride-1 convolution on the kernel's row-segment path (no gathered panels).

    The same result as :meth:`AdcGemmLibrary.gemm` with ``conv``: each micro-tile loads the
    inputs of 16 adjacent output positions of an output row straight from the padded input
    (a row's last 16 positions overlap the previous ones where the width is not a multiple).

    Args:
        lib: The loaded kernel.
        weights: Address of the float32 weights ``[n_r, m, ts]`` (as the gathered path's ``A``).
        x: Address of the padded NCHW input (unit width stride).
        out: ``(address, ldc, block, ld_block)`` as for :meth:`AdcGemmLibrary.gemm`.
        conv: Address of the int64 geometry (as for :meth:`AdcGemmLibrary.gemm`; stride 1
            along the width, at least 16 output columns).
        m: Output channels.
        n: Output positions (batch times output pixels).
        n_r: Tile rows.
        ts: Rows per tile.
        rows: Real rows ``k`` (the geometry's).
        qmax: ADC clip level in steps.
        scale: Factor applied to the summed codes.
        bias: Address of ``m`` float32 values, or ``None``.
        relu: Apply ``max(., 0)`` last.
        threads: OpenMP threads.
        row_scale: Address of ``m`` float32 factors used instead of ``scale``, or ``None``.
        res: Address of a float32 array addressed as ``out`` (not the output itself), added
            before the ReLU, or ``None``.
        a_strides: ``(tile-row stride, row stride)`` of the weights (default ``(m * ts, ts)``;
            unit last stride).

    Raises:
        ValueError: If the sizes do not fit the kernel's 32-bit counts, the width stride is
            not 1, the output has fewer than 16 columns or ``out``'s blocks are not whole
            output rows.
        MemoryError: If the kernel could not allocate its buffers.
    """
    if max(m, n, n_r, ts) >= 2**31:
        raise ValueError(f"adc conv: {m} x {n} outputs do not fit the kernel's 32-bit counts")
    if n_r * m * ts * n < PARALLEL_MIN_MACS:
        threads = 1
    sa_t, sa_i = (m * ts, ts) if a_strides is None else a_strides
    g = _GemmArgs(
        a=weights, b=x, conv=conv, c=out[0], bias=bias, sa_t=sa_t, sa_i=sa_i, ldc=out[1],
        block=out[2], ld_block=out[3], m_rows=m, n_r=n_r, ts=ts, k_last=_k_last(n_r, ts, rows),
        n_cols=n, relu=int(relu), n_threads=max(1, threads), qmax=float(qmax), scale=scale,
        row_scale=row_scale, res=res,
    )  # fmt: skip
    rc = lib._lib.nvmpriv_adc_conv_rows(g)
    if rc == -1:
        raise MemoryError("adc conv: out of memory")
    if rc != 0:
        raise ValueError(
            "adc conv rows: unsupported operands (needs width stride 1, at least 16 output "
            "columns, whole images, output blocks of whole rows, a per-channel bias)"
        )


class PackedGemm:
    """A kernel GEMM against one packed right operand, set up once and run per batch of rows.

    Everything but the left operand, the output and the number of rows is fixed, so a call
    costs a few field writes instead of :meth:`AdcGemmLibrary.gemm`'s argument handling (on the
    small layers of small nets that handling is a fifth of the time). No clip check.

    Args:
        lib: The loaded kernel.
        packed: Address of ``B`` packed by :meth:`AdcGemmLibrary.pack` (kept alive by the
            caller).
        a_strides: ``(tile-row stride, row stride)`` of every ``A`` (unit last stride).
        n: Columns of ``C`` (written with row stride ``n``).
        n_r: Tile rows.
        ts: Rows per tile.
        rows: Real rows (the kernel skips the last tile row's rows past it).
        qmax: ADC clip level in steps.
        scale: Factor applied to the summed codes.
        bias: Address of ``n`` float32 values added per column, or ``None``.
        relu: Apply ``max(., 0)`` last.
        threads: Most threads per call.
        dac: ``(step, qmax)`` of the DAC codes a call with ``x`` writes into ``A`` first
            (``step <= 0``: a copy); needs ``a_strides[0] == ts``.

    Raises:
        ValueError: If the sizes do not fit the kernel's 32-bit counts.
    """

    def __init__(
        self,
        lib: AdcGemmLibrary,
        packed: int,
        a_strides: tuple[int, int],
        *,
        n: int,
        n_r: int,
        ts: int,
        rows: int,
        qmax: int,
        scale: float,
        bias: int | None,
        relu: bool,
        threads: int,
        dac: tuple[float, int] = (0.0, 1),
    ) -> None:
        if max(n, n_r * ts * lib.panel_width) >= 2**31:
            raise ValueError(f"adc gemm: {n} columns, {n_r} tiles of {ts} do not fit")
        self._lib, self._threads = lib, max(1, threads)
        self._macs_per_row = n_r * ts * n
        self._n_p = math.ceil(n / lib.panel_width)
        self._fn = lib._lib.nvmpriv_adc_gemm
        self._args = _GemmArgs(
            b=packed, bias=bias, sa_t=a_strides[0], sa_i=a_strides[1], ldc=n, block=n,
            packed=1, n_r=n_r, ts=ts, k_last=_k_last(n_r, ts, rows), n_cols=n, p0=0,
            p1=self._n_p, bias_axis=1, relu=int(relu), qmax=float(qmax), scale=scale,
            thr=float(qmax), dac_step=dac[0], dac_qmax=float(dac[1]),
        )  # fmt: skip
        self._local = threading.local()

    def __call__(self, a: int, out: int, m: int, x: tuple[int, int] | None = None) -> None:
        """``out[:m] = C`` for the ``m`` rows of ``A`` at address ``a``.

        With ``x = (address, row stride)`` of float32 inputs, ``A``'s real rows are first
        written as their DAC codes (in the same kernel call; ``a`` is a writable buffer).

        Raises:
            ValueError: If ``m`` does not fit the kernel's 32-bit counts.
            MemoryError: If the kernel could not allocate its buffers.
        """
        if not 0 <= m < 2**31:
            raise ValueError(f"adc gemm: {m} rows do not fit the kernel's 32-bit counts")
        threads = self._threads
        if m * self._macs_per_row < PARALLEL_MIN_MACS:
            threads = 1
        if not self._lib.openmp:  # no OpenMP in the kernel: blocks of rows on Python threads
            self._rows_on_threads(a, out, m, x, threads)
            return
        args = getattr(self._local, "args", None)
        if args is None:  # each thread fills its own copy: queries may run concurrently
            args = self._local.args = _GemmArgs.from_buffer_copy(self._args)
        args.a, args.c, args.m_rows = a, out, m
        args.x, args.sx = (None, 0) if x is None else x
        args.n_threads = max(1, min(threads, self._n_p * math.ceil(m / MICRO_ROWS)))
        if self._fn(args) != 0:
            raise MemoryError("adc matmul: out of memory for a packed panel")

    def _rows_on_threads(
        self, a: int, out: int, m: int, x: tuple[int, int] | None, threads: int
    ) -> None:
        ranges = AdcGemmLibrary._ranges(math.ceil(m / MICRO_ROWS), max(1, threads))
        parts = []
        for lo, hi in ranges:
            r0, r1 = lo * MICRO_ROWS, min(m, hi * MICRO_ROWS)
            g = _GemmArgs.from_buffer_copy(self._args)
            g.a, g.c, g.m_rows, g.n_threads = a + 4 * r0 * g.sa_i, out + 4 * r0 * g.ldc, r1 - r0, 1
            g.x, g.sx = (None, 0) if x is None else (x[0] + 4 * r0 * x[1], x[1])
            parts.append(g)

        def part(i: int) -> None:
            if self._fn(parts[i]) != 0:
                raise MemoryError("adc matmul: out of memory for a packed panel")

        if parts:
            self._lib._run(part, len(parts))


def load_checked(
    state: dict[str, Any],
    make: Callable[[AdcGemmLibrary], _T],
    check: Callable[[_T], None],
    fallback: str,
) -> _T | None:
    """Build, load and self-check the kernel once per ``state``; ``None`` where unavailable.

    Args:
        state: The caller's memo: ``"kernel"`` (the result, also ``None``) and ``"reason"``
            (``"loaded <path>"`` or why not) are stored here.
        make: Wraps the loaded library in the caller's front end.
        check: Raises ``RuntimeError`` if the front end disagrees with its own definition on a
            test problem.
        fallback: What runs instead, for the one warning.

    Returns:
        The front end, or ``None`` when ``NVMPRIV_NATIVE=0``, no C++ compiler is found, or
        building, loading or the check failed (warned once per ``state``).
    """
    if native_disabled():
        return None
    with _LOAD_LOCK:
        if "kernel" in state:
            return state["kernel"]
        found: _T | None = None
        cxx = find_compiler()
        if cxx is None:
            state["reason"] = "no C++ compiler found (set CXX)"
        else:
            try:
                library = AdcGemmLibrary(build_library(cxx))
                found = make(library)
                check(found)
                state["reason"] = f"loaded {library.path}"
            except (OSError, RuntimeError) as err:
                found = None
                state["reason"] = str(err)
                warnings.warn(
                    f"nvmpriv: native crossbar kernel unavailable ({err}); {fallback}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        state["kernel"] = found
        return found
