"""Native fused crossbar GEMM: the per-tile ADC inside the GEMM's K loop (optional fast path).

A per-tile ADC forces every tile's partial sums through round and clamp before they are added.
In eager torch these are separate passes over ``[tile rows, batch, outputs]`` partial sums,
which cost more than the GEMM itself (see benchmarks/RESULTS.md); ``adc_gemm.cpp`` keeps each
partial sum in registers for exactly one tile, converts it there, and accumulates the codes,
so the partial sums never reach memory.

The kernel is compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) into ``$NVMPRIV_CACHE_DIR`` (default ``~/.cache/nvmpriv/native``),
keyed by the source, the compiler, the flags and the CPU, checked against torch on a small
problem, and loaded with :mod:`ctypes`. Without a compiler, with ``NVMPRIV_NATIVE=0``, or if
the build or the check fails (one warning), the simulator keeps its pure-torch path, which
computes the same ADC codes.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["NativeAdcGemm", "adc_gemm_kernel", "native_status"]

_SOURCE = Path(__file__).with_name("adc_gemm.cpp")
_ABI = 4
# The kernel rounds with the 1.5 * 2**23 trick, exact for |partial sum| <= 2**22 after clamping.
MAX_QMAX = 2**22
# Below this many multiply-adds per call the thread hand-off costs more than it saves.
_PARALLEL_MIN_MACS = 1 << 18

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}

_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _disabled() -> bool:
    return os.environ.get("NVMPRIV_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    env = os.environ.get("NVMPRIV_CACHE_DIR")
    if env:
        return Path(env) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nvmpriv" / "native"


def _compiler() -> str | None:
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env) or env
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where the OS lists them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _libgomp_loaded() -> bool:
    """Whether this process runs GNU OpenMP (torch's CPU threads on Linux wheels)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


def _flag_sets() -> list[list[str]]:
    # With -fopenmp the library binds to the libgomp torch already loaded (same SONAME), so
    # kernel and torch share one thread pool; with another OpenMP runtime in the process a
    # second pool would compete with torch's for the cores, so threads come from Python then.
    sets = [["-O3", "-march=native"], ["-O3"]]
    if _libgomp_loaded():
        sets = [[*flags, "-fopenmp"] for flags in sets] + sets
    return sets


def _build(cxx: str) -> Path:
    """Compile the kernel (or reuse a cached build); raises ``RuntimeError`` on failure."""
    source = _SOURCE.read_bytes()
    last_error = ""
    for flags in _flag_sets():
        key = hashlib.sha256(
            b"\0".join([source, cxx.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
        ).hexdigest()[:16]
        suffix = ".dll" if sys.platform == "win32" else ".so"
        for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "nvmpriv-native"):
            target = folder / f"adc_gemm-{key}{suffix}"
            if target.is_file():
                return target
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".adc_gemm-", suffix=suffix, dir=folder)
                os.close(fd)
            except OSError:
                continue
            cmd = [cxx, *flags, "-std=c++17", "-shared", "-fPIC", str(_SOURCE), "-o", tmp]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as err:
                Path(tmp).unlink(missing_ok=True)
                last_error = str(err)
                break
            if done.returncode != 0:
                Path(tmp).unlink(missing_ok=True)
                last_error = (done.stderr.strip().splitlines() or ["compiler failed"])[-1]
                break
            os.replace(tmp, target)  # atomic: concurrent processes never load a partial file
            return target
    raise RuntimeError(f"could not compile {_SOURCE.name} with {cxx}: {last_error}")


class NativeAdcGemm:
    """ctypes binding of ``adc_gemm.cpp`` (see the module docstring).

    Args:
        path: The compiled shared library.
    """

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.nvmpriv_adc_abi.restype = _I
        if lib.nvmpriv_adc_abi() != _ABI:
            raise RuntimeError(f"{path.name}: kernel interface {lib.nvmpriv_adc_abi()} != {_ABI}")
        lib.nvmpriv_adc_panel_width.restype = _I
        lib.nvmpriv_adc_openmp.restype = _I
        lib.nvmpriv_adc_pack.argtypes = [_P, _I64, _I64, _I, _I, _I, _P]
        lib.nvmpriv_adc_pack.restype = None
        lib.nvmpriv_adc_gemm.argtypes = [
            *(_P, _I64, _I64, _I, _P, _I64, _I64, _I, _P, _I, _I, _I, _I, _I, _P, _I64, _I64, _I64),
            *(_F, _F, _P, _F, _P, _I),
        ]
        lib.nvmpriv_adc_gemm.restype = _I
        self._lib = lib
        self.path = path
        self.panel_width: int = lib.nvmpriv_adc_panel_width()
        self.openmp = bool(lib.nvmpriv_adc_openmp())
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _ranges(n_panels: int, threads: int) -> list[tuple[int, int]]:
        bounds = [round(i * n_panels / threads) for i in range(threads + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(threads) if bounds[i] < bounds[i + 1]]

    def _run(self, fn: Callable[[int], None], n: int) -> None:
        """Run ``fn(0) .. fn(n - 1)``, in parallel on a thread pool when ``n > 1``."""
        if n == 1:
            fn(0)
            return
        if self._pool is None or self._pool_size < n - 1:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(n - 1, thread_name_prefix="nvmpriv-adc")
            self._pool_size = n - 1
        # ctypes releases the GIL for the call, so the ranges run in parallel
        futures = [self._pool.submit(fn, i) for i in range(1, n)]
        fn(0)
        for f in futures:
            f.result()

    # ------------------------------------------------------------------ API
    def pack(self, b: torch.Tensor) -> torch.Tensor:
        """Pack tiles ``b`` ``[n_r, ts, n_cols]`` (float32, CPU) into the kernel's panel layout.

        Args:
            b: The right-hand operand, one ``[ts, n_cols]`` block per tile row.

        Returns:
            A flat float32 tensor of ``ceil(n_cols / panel_width) * n_r * ts * panel_width``.
        """
        b = b.contiguous()
        n_r, ts, n_cols = b.shape
        n_p = math.ceil(n_cols / self.panel_width)
        out = torch.empty(n_p * n_r * ts * self.panel_width, dtype=torch.float32)
        self._lib.nvmpriv_adc_pack(
            b.data_ptr(), ts * n_cols, n_cols, n_r, ts, n_cols, out.data_ptr()
        )
        return out

    def matmul(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        out: torch.Tensor,
        *,
        qmax: int,
        scale: float,
        packed: bool,
        check: list[bool] | None = None,
        out_strides: tuple[int, int, int] | None = None,
        n_cols: int | None = None,
        conv: tuple[int, ...] | None = None,
    ) -> list[int]:
        """``out = scale * sum_t clamp(round(a[t] @ b[t]), -qmax, qmax)`` (float32, CPU).

        Args:
            a: ``[n_r, m, ts]`` left operand (any strides with a unit last stride); the kernel
                broadcasts its elements.
            b: ``[n_r, ts, n]`` right operand (unit last stride), or its :meth:`pack` result
                when ``packed`` (then ``n`` is ``out``'s second dimension).
            out: ``[m, n]`` destination (unit last stride), overwritten; with ``out_strides`` any
                tensor whose first element is element ``(0, 0)``.
            qmax: ADC clip level in steps (``1 <= qmax <= 2**22``).
            scale: Factor applied to the summed codes (the ADC step).
            packed: Whether ``b`` is packed.
            check: Per tile row, whether to report partial sums reaching ``qmax`` (before
                rounding, relative margin 1e-6).
            out_strides: ``(ldc, block, ld_block)``: element ``(i, j)`` of the result goes to
                ``out`` offset ``i*ldc + (j // block)*ld_block + j % block`` (a convolution's
                ``[channels, batch*positions]`` result written straight into NCHW).
            n_cols: Number of result columns ``n`` (default: ``b``'s last dimension, or
                ``out``'s second when ``packed``).
            conv: Gather the right operand from a convolution's padded NCHW input ``b``
                instead: ``(channel offset, kh, kw, stride h, stride w, dilation h,
                dilation w, output h, output w, rows k)``; rows ``k .. n_r*ts`` are zero and
                column ``j`` is output position ``j`` of ``(batch, h, w)`` (needs ``n_cols``).

        Returns:
            The checked tile rows whose partial sums reached the clip level.
        """
        n_r, m, ts = a.shape
        if out_strides is None:
            if out.dim() != 2 or out.stride(1) != 1:
                raise ValueError("adc matmul: out needs a unit last stride")
            out_strides = (out.stride(0), out.shape[1], 0)
        n = n_cols if n_cols is not None else out.shape[1] if packed else b.shape[2]
        geo = None
        if conv is not None:
            if b.dim() != 4 or packed or n_cols is None:
                raise ValueError("adc matmul: conv needs an NCHW input, unpacked, and n_cols")
            geo = torch.tensor([*b.stride(), *conv], dtype=torch.int64)
        ldc, block, ld_block = out_strides
        if m == 0 or n == 0:
            return []
        last = (m - 1) * ldc + ((n - 1) // block) * ld_block + (n - 1) % block
        room = out.untyped_storage().nbytes() // out.element_size() - out.storage_offset()
        if a.stride(2) != 1 or not (1 <= qmax <= MAX_QMAX) or block < 1 or not 0 <= last < room:
            raise ValueError(
                "adc matmul: a needs a unit last stride, 1 <= qmax <= 2**22, and the result "
                "must fit in out"
            )
        n_p = math.ceil(n / self.panel_width)
        if not packed and geo is None and b.stride(2) != 1:
            raise ValueError("adc matmul: b needs a unit last stride")
        check_t = None if check is None else torch.tensor(check, dtype=torch.uint8)
        check_ptr = None if check_t is None else check_t.data_ptr()
        thr = float(qmax) * (1 - 1e-6)
        threads = max(1, min(torch.get_num_threads(), n_p))
        if n_r * m * ts * n < _PARALLEL_MIN_MACS:
            threads = 1
        # OpenMP builds share panels inside one call; otherwise one call per range of panels
        ranges = [(0, n_p)] if self.openmp else self._ranges(n_p, threads)
        reach = torch.zeros(len(ranges), threads if self.openmp else 1, n_r, dtype=torch.uint8)
        sb_t, sb_k = (0, 0) if packed or geo is not None else (b.stride(0), b.stride(1))
        geo_ptr = None if geo is None else geo.data_ptr()
        lib = self._lib

        def part(i: int) -> None:
            p0, p1 = ranges[i]
            rc = lib.nvmpriv_adc_gemm(
                *(a.data_ptr(), a.stride(0), a.stride(1), m, b.data_ptr(), sb_t, sb_k),
                *(int(packed), geo_ptr, n_r, ts, n, p0, p1, out.data_ptr(), ldc, block, ld_block),
                *(float(qmax), scale, check_ptr, thr, reach[i].data_ptr()),
                threads if self.openmp else 1,
            )
            if rc != 0:
                raise MemoryError("adc matmul: out of memory for a packed panel")

        self._run(part, len(ranges))
        if check is None:
            return []
        return [int(t) for t in torch.nonzero(reach.amax((0, 1))).flatten()]


def _self_check(kernel: NativeAdcGemm) -> None:
    """Compare the kernel with the torch definition on a small problem (both operand forms)."""
    gen = torch.Generator().manual_seed(0)
    n_r, m, ts, n = 3, 7, 8, kernel.panel_width + 5
    a = torch.randint(-3, 4, (n_r, m, ts), generator=gen).float()
    b = torch.randn(n_r, ts, n, generator=gen) * 2
    ref = torch.bmm(a, b).round().clamp(-9, 9).sum(0) * 0.5
    for packed in (True, False):
        out = torch.empty(m, n)
        rhs = kernel.pack(b) if packed else b
        reach = kernel.matmul(a, rhs, out, qmax=9, scale=0.5, packed=packed, check=[True] * n_r)
        if not torch.equal(out, ref) or len(reach) != n_r:
            raise RuntimeError("the compiled kernel disagrees with torch on a test problem")


def adc_gemm_kernel() -> NativeAdcGemm | None:
    """The native kernel, built and checked on first call; ``None`` where it is unavailable.

    Returns:
        The loaded kernel, or ``None`` when ``NVMPRIV_NATIVE=0``, no C++ compiler is found, or
        building, loading or the self-check failed (warned once per process).
    """
    if _disabled():
        return None
    with _LOCK:
        if "kernel" in _STATE:
            kernel = _STATE["kernel"]
            return kernel if isinstance(kernel, NativeAdcGemm) else None
        kernel_or_none: NativeAdcGemm | None = None
        cxx = _compiler()
        if cxx is None:
            _STATE["reason"] = "no C++ compiler found (set CXX)"
        else:
            try:
                kernel_or_none = NativeAdcGemm(_build(cxx))
                _self_check(kernel_or_none)
                _STATE["reason"] = f"loaded {kernel_or_none.path}"
            except (OSError, RuntimeError) as err:
                kernel_or_none = None
                _STATE["reason"] = str(err)
                warnings.warn(
                    f"nvmpriv: native crossbar kernel unavailable ({err}); using the pure-torch "
                    "ADC path (same results, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _STATE["kernel"] = kernel_or_none
        return kernel_or_none


def native_status() -> str:
    """One line saying whether the native kernel is in use, and why not.

    Returns:
        ``"native: <path>"`` or ``"pure torch: <reason>"``.
    """
    kernel = adc_gemm_kernel()
    if kernel is not None:
        return f"native: {kernel.path}"
    if _disabled():
        return "pure torch: disabled by NVMPRIV_NATIVE"
    return f"pure torch: {_STATE.get('reason', 'unavailable')}"
