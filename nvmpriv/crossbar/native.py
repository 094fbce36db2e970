"""The native fused GEMM + ADC kernel (:mod:`nvmpriv.native`) on torch tensors.

The kernel is compiled on first use (:mod:`nvmpriv.native.build`), checked against torch on a
small problem, and loaded with :mod:`ctypes`. Without a compiler, with ``NVMPRIV_NATIVE=0``, or
if the build or the check fails (one warning), the simulator keeps its pure-torch path, which
computes the same ADC codes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nvmpriv.native.build import native_disabled
from nvmpriv.native.library import (
    MAX_QMAX,
    AdcGemmLibrary,
    conv_rows,
    load_checked,
    row_segments_apply,
)

__all__ = ["MAX_QMAX", "NativeAdcGemm", "adc_gemm_kernel", "native_status"]

_STATE: dict[str, object] = {}


class NativeAdcGemm:
    """Torch front end of :class:`nvmpriv.native.library.AdcGemmLibrary`.

    Args:
        library: The loaded library, or the path of the compiled one.
    """

    def __init__(self, library: AdcGemmLibrary | Path) -> None:
        self.library = library if isinstance(library, AdcGemmLibrary) else AdcGemmLibrary(library)
        self.path = self.library.path
        self.panel_width = self.library.panel_width
        self.openmp = self.library.openmp

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
        out = torch.empty(self.library.packed_size(n_r, ts, n_cols), dtype=torch.float32)
        self.library.pack(b.data_ptr(), ts * n_cols, n_cols, n_r, ts, n_cols, out.data_ptr())
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
        rows: int | None = None,
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
                Without ``check``, stride 1 along the width and at least 16 output columns,
                the inputs are read in place by row segments (``nvmpriv_adc_conv_rows``)
                instead of gathered into panels.
            rows: Rows ``k`` of the operands that are not zero padding (default ``n_r * ts``;
                with ``conv``, its ``k``): the kernel skips the last tile row's rows past it.

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
            readable = b.untyped_storage().nbytes() // b.element_size() - b.storage_offset()
            geo = torch.tensor([*b.stride(), *conv, readable], dtype=torch.int64)
            rows = conv[-1]
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
        if not packed and geo is None and b.stride(2) != 1:
            raise ValueError("adc matmul: b needs a unit last stride")
        if (
            geo is not None
            and conv is not None
            and check is None
            and row_segments_apply(self.library, conv[4], conv[8])  # width stride, columns
            and b.stride(3) == 1
            and block % conv[8] == 0
        ):
            # row segments read in place (benchmarks/bench_native_conv.py: faster than the
            # gathered panels wherever they apply; no clip report on that path)
            conv_rows(
                self.library, a.data_ptr(), b.data_ptr(), (out.data_ptr(), ldc, block, ld_block),
                conv=geo.data_ptr(), m=m, n=n, n_r=n_r, ts=ts, rows=conv[-1], qmax=qmax,
                scale=scale, bias=None, relu=False, threads=torch.get_num_threads(),
                a_strides=(a.stride(0), a.stride(1)),
            )  # fmt: skip
            return []
        sb_t, sb_k = (0, 0) if packed or geo is not None else (b.stride(0), b.stride(1))
        return self.library.gemm(
            (a.data_ptr(), a.stride(0), a.stride(1)),
            (b.data_ptr(), sb_t, sb_k),
            (out.data_ptr(), ldc, block, ld_block),
            m=m,
            n=n,
            n_r=n_r,
            ts=ts,
            qmax=qmax,
            scale=scale,
            packed=packed,
            conv=None if geo is None else geo.data_ptr(),
            check=check,
            threads=torch.get_num_threads(),
            rows=rows,
        )


def _self_check(kernel: NativeAdcGemm) -> None:
    """Compare the kernel with the torch definition on a small problem (both operand forms)."""
    gen = torch.Generator().manual_seed(0)
    n_r, m, ts, n = 3, 7, 8, kernel.panel_width + 5
    a = torch.randint(-3, 4, (n_r, m, ts), generator=gen).float()
    b = torch.randn(n_r, ts, n, generator=gen) * 2
    a[-1, :, 5:] = 0  # 2 * ts + 5 real rows: the kernel skips the rest
    ref = torch.bmm(a, b).round().clamp(-9, 9).sum(0) * 0.5
    for packed in (True, False):
        out = torch.empty(m, n)
        rhs = kernel.pack(b) if packed else b
        reach = kernel.matmul(
            a, rhs, out, qmax=9, scale=0.5, packed=packed, check=[True] * n_r, rows=2 * ts + 5
        )
        if not torch.equal(out, ref) or len(reach) != n_r:
            raise RuntimeError("the compiled kernel disagrees with torch on a test problem")


def adc_gemm_kernel() -> NativeAdcGemm | None:
    """The native kernel, built and checked on first call; ``None`` where it is unavailable.

    Returns:
        The loaded kernel, or ``None`` when ``NVMPRIV_NATIVE=0``, no C++ compiler is found, or
        building, loading or the self-check failed (warned once per process).
    """
    return load_checked(
        _STATE,
        NativeAdcGemm,
        lambda kernel: _self_check(kernel),  # looked up at call time (tests replace it)
        "using the pure-torch ADC path (same results, slower)",
    )


def native_status() -> str:
    """One line saying whether the native kernel is in use, and why not.

    Returns:
        ``"native: <path>"`` or ``"pure torch: <reason>"``.
    """
    kernel = adc_gemm_kernel()
    if kernel is not None:
        return f"native: {kernel.path}"
    if native_disabled():
        return "pure torch: disabled by NVMPRIV_NATIVE"
    return f"pure torch: {_STATE.get('reason', 'unavailable')}"
