"""Native fused crossbar GEMM: the per-tile ADC inside the GEMM's K loop (optional fast path).

A per-tile ADC forces every tile's partial sums through round and clamp before they are added.
As separate passes over ``[tile rows, batch, outputs]`` partial sums (eager torch, or one
onnxruntime operator each) these cost more than the GEMM itself (see benchmarks/RESULTS.md);
``adc_gemm.cpp`` keeps each partial sum in registers for exactly one tile, converts it there,
and accumulates the codes, so the partial sums never reach memory.

This package imports neither torch nor onnx (numpy, ctypes and the standard library only), so
both the crossbar simulator (:mod:`nvmpriv.crossbar.native`) and the torch-free ONNX evaluator
(:mod:`nvmpriv.runtime_native`) run the same compiled code:

* :mod:`nvmpriv.native.build` compiles the kernel on first use with the machine's C++ compiler
  and caches it;
* :mod:`nvmpriv.native.library` binds it with :mod:`ctypes` on raw pointers.
"""
