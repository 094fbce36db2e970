"""Run an export's deterministic per-tile-ADC crossbar nodes on the native kernel (torch-free).

onnxruntime evaluates an ``nvmpriv`` node through its standard-op function body, where the
per-tile ADC is separate ``Round`` / ``Clip`` / sum passes over every tile's partial sums; those
passes, not the products, dominate a crossbar file's time (benchmarks/RESULTS.md). This module
evaluates such nodes with the fused GEMM + ADC kernel of :mod:`nvmpriv.native` (the one the
torch simulator uses) and everything else with onnxruntime: the graph is cut at those nodes
into standard-op segments, each its own onnxruntime session, run in order.

A node qualifies when it has an ADC, no read noise and no bit slicing (read noise must come
from the file's ``RandomNormalLike`` streams; the others have no per-tile conversion to fuse).
It computes the same function as the body: the DAC and ADC steps folded into the weights
(``W * (dac_step / adc_step)`` in float32, as onnxruntime constant-folds it), integer DAC codes,
and per tile ``clamp(round(partial sum), -qmax, qmax)`` summed times the ADC step. Partial sums
are accumulated in another order than onnxruntime's GEMM, so a sum within float32 rounding of
a half step can land on the neighbouring code: outputs agree to ~1e-6 relative, not bit for bit.

Only :mod:`nvmpriv.runtime` uses this; ``NVMPRIV_NATIVE=0`` or ``load(..., native=False)``
keeps the whole file on onnxruntime.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from nvmpriv.native.build import build_library, find_compiler, native_disabled
from nvmpriv.native.library import MAX_QMAX, AdcGemmLibrary
from nvmpriv.runtime import activation_quantizer

__all__ = ["NativeGraphRunner", "native_library", "native_nodes"]

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}


def _self_check(lib: AdcGemmLibrary) -> None:
    """Compare the kernel with the numpy definition on a small problem (both operand forms)."""
    rng = np.random.default_rng(0)
    n_r, m, ts, n = 3, 7, 8, lib.panel_width + 5
    a = rng.integers(-3, 4, (n_r, m, ts)).astype(np.float32)
    b = (rng.standard_normal((n_r, ts, n)) * 2).astype(np.float32)
    ref = np.clip(np.round(np.matmul(a, b)), -9, 9).sum(0).astype(np.float32) * np.float32(0.5)
    for packed in (True, False):
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
        )
        if not np.array_equal(out, ref):
            raise RuntimeError("the compiled kernel disagrees with numpy on a test problem")


def native_library() -> AdcGemmLibrary | None:
    """The native kernel for the torch-free evaluator, built and checked on first call.

    Returns:
        The loaded library, or ``None`` when ``NVMPRIV_NATIVE=0``, no C++ compiler is found, or
        building, loading or the self-check failed (warned once per process).
    """
    if native_disabled():
        return None
    with _LOCK:
        if "library" in _STATE:
            lib = _STATE["library"]
            return lib if isinstance(lib, AdcGemmLibrary) else None
        found: AdcGemmLibrary | None = None
        cxx = find_compiler()
        if cxx is None:
            _STATE["reason"] = "no C++ compiler found (set CXX)"
        else:
            try:
                found = AdcGemmLibrary(build_library(cxx))
                _self_check(found)
                _STATE["reason"] = f"loaded {found.path}"
            except (OSError, RuntimeError) as err:
                found = None
                _STATE["reason"] = str(err)
                warnings.warn(
                    f"nvmpriv: native crossbar kernel unavailable ({err}); the crossbar nodes "
                    "run on onnxruntime's function bodies (same results, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _STATE["library"] = found
        return found


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class _NativeNode:
    """One qualifying crossbar node with its weights prepared for the kernel."""

    lib: AdcGemmLibrary
    conv: bool
    x_name: str
    y_name: str
    weights: np.ndarray  # packed [n_r, N, M] panels (Gemm) or [G, n_r, M, N] (Conv)
    bias: np.ndarray | None
    attrs: dict[str, Any]
    threads: int
    ts: int  # rows per tile as run: the tile size, or K for a single tile row (no zero rows)
    _scratch: threading.local = field(default_factory=threading.local, repr=False)

    def _zero_padded(self, shape: tuple[int, ...]) -> np.ndarray:
        """A zero-initialised input buffer kept per thread and shape.

        Every call overwrites the same live region with fresh codes, so the padding (tile rows
        past K, image borders) stays zero and is written once, not at every query.
        """
        buf: np.ndarray | None = getattr(self._scratch, "buf", None)
        if buf is None or buf.shape != shape:
            buf = np.zeros(shape, np.float32)
            self._scratch.buf = buf
        return buf

    def _write_codes(self, x: np.ndarray, dst: np.ndarray) -> None:
        """The array's input (DoReFa quantizer, then integer DAC codes) written into ``dst``.

        ``x`` is ``[B, K]`` or ``[B, C, H, W]``; ``dst`` a view of the same shape with a unit
        last stride (the live part of a zero-padded buffer).
        """
        a = self.attrs
        x0 = activation_quantizer(x, int(a.get("act_bits", 0)), bool(a.get("act_signed", 0)))
        x0 = np.ascontiguousarray(x0, dtype=np.float32)
        if x0.ndim == 2:
            shape, xs, ds = (1, *x0.shape), (0, x0.shape[1]), (0, dst.strides[0] // 4)
        else:
            b, c, h, w = x0.shape
            shape, xs, ds = (b * c, h, w), (h * w, w), (dst.strides[1] // 4, dst.strides[2] // 4)
        dac = bool(a["dac_bits"])
        self.lib.dac_codes(
            (x0.ctypes.data, *xs),
            (dst.ctypes.data, *ds),
            shape,
            step=float(np.float32(a["dac_step"])) if dac else 0.0,
            qmax=int(a["dac_qmax"]) if dac else 1,
            threads=self.threads,
        )

    def run(self, x: np.ndarray) -> np.ndarray:
        """The node's output ``Y`` for input ``X``."""
        return self._conv(x) if self.conv else self._gemm(x)

    def _gemm(self, x: np.ndarray) -> np.ndarray:
        a = self.attrs
        n_r, n, k, m = a["n_row_tiles"], self.ts, a["rows_per_group"], a["cols_per_group"]
        if x.ndim != 2 or x.shape[1] != k:
            raise ValueError(f"crossbar node {self.y_name!r}: input {x.shape}, expected (n, {k})")
        b = x.shape[0]
        rows = self._zero_padded((b, n_r * n))
        self._write_codes(x, rows[:, :k])
        out = np.empty((b, m), np.float32)
        if b:
            self.lib.gemm(
                (rows.ctypes.data, n, n_r * n),
                (self.weights.ctypes.data, 0, 0),
                (out.ctypes.data, m, m, 0),
                m=b,
                n=m,
                n_r=n_r,
                ts=n,
                qmax=int(a["adc_qmax"]),
                scale=float(np.float32(a["adc_step"])),
                packed=True,
                conv=None,
                check=None,
                threads=self.threads,
            )
        if self.bias is not None:
            out += self.bias
        return out

    def _conv(self, x: np.ndarray) -> np.ndarray:
        a = self.attrs
        g, n_r, n = a["groups"], a["n_row_tiles"], self.ts
        k, m = a["rows_per_group"], a["cols_per_group"]
        kh, kw = a["kernel_shape"]
        cin_g = k // (kh * kw)
        if x.ndim != 4 or x.shape[1] != g * cin_g:
            raise ValueError(
                f"crossbar node {self.y_name!r}: input {x.shape}, expected (n, {g * cin_g}, H, W)"
            )
        top, left, bottom, right = a["pads"]
        b, c, h, w = x.shape
        xp = self._zero_padded((b, c, h + top + bottom, w + left + right))
        self._write_codes(x, xp[:, :, top : top + h, left : left + w])
        (sh, sw), (dh, dw) = a["strides"], a["dilations"]
        h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        if h_out < 1 or w_out < 1:
            raise ValueError(
                f"crossbar node {self.y_name!r}: input {x.shape} is smaller than its kernel"
            )
        big_l = h_out * w_out
        out = np.empty((b, g * m, h_out, w_out), np.float32)
        strides = [s // 4 for s in xp.strides]
        for grp in range(g):
            if not b:
                break
            geo = np.array(
                [*strides, grp * cin_g, kh, kw, sh, sw, dh, dw, h_out, w_out, k], np.int64
            )
            wt = self.weights[grp]
            self.lib.gemm(
                (wt.ctypes.data, m * n, n),
                (xp.ctypes.data, 0, 0),
                (out.ctypes.data + 4 * grp * m * big_l, big_l, big_l, g * m * big_l),
                m=m,
                n=b * big_l,
                n_r=n_r,
                ts=n,
                qmax=int(a["adc_qmax"]),
                scale=float(np.float32(a["adc_step"])),
                packed=False,
                conv=geo.ctypes.data,
                check=None,
                threads=self.threads,
            )
        if self.bias is not None:
            out += self.bias.reshape(1, -1, 1, 1)
        return out


def _qualifies(node: onnx.NodeProto, attrs: dict[str, Any]) -> bool:
    return (
        node.domain == "nvmpriv"
        and node.op_type in ("CrossbarGemm", "CrossbarConv")
        and bool(attrs.get("adc_bits"))
        and not attrs.get("read_noise")
        and not attrs.get("bit_slicing")
        and 1 <= int(attrs.get("adc_qmax", 0)) <= MAX_QMAX
        and (not attrs.get("dac_bits") or 1 <= int(attrs.get("dac_qmax", 0)) <= MAX_QMAX)
    )


def _prepare(
    lib: AdcGemmLibrary,
    node: onnx.NodeProto,
    attrs: dict[str, Any],
    init: dict[str, np.ndarray],
    threads: int,
) -> _NativeNode | None:
    """The node ready for the kernel, or ``None`` where its tensors do not match its attributes."""
    try:
        g, n_r, n = (int(attrs[key]) for key in ("groups", "n_row_tiles", "tile_size"))
        k, m = int(attrs["rows_per_group"]), int(attrs["cols_per_group"])
        n_t = int(attrs.get("n_slices", 1))
        w = init[node.input[1]].astype(np.float32)
        has_bias = bool(attrs.get("has_bias"))
        bias = init[node.input[2]].astype(np.float32) if has_bias else None
    except (KeyError, IndexError, ValueError, TypeError):
        return None
    conv = node.op_type == "CrossbarConv"
    if min(g, n_r, n, k, m) < 1 or n_t != 1 or k > n_r * n or w.size != g * n_r * n * m:
        return None
    if bias is not None and bias.size != g * m:
        return None
    dac_step, adc_step = float(np.float32(attrs.get("dac_step", 0.0))), float(attrs["adc_step"])
    if not adc_step > 0 or (attrs.get("dac_bits") and not dac_step > 0):
        return None
    # the function body's folding: W * float32(dac_step / adc_step), one float32 product
    scale = np.float32((dac_step if attrs.get("dac_bits") else 1.0) / float(np.float32(adc_step)))
    ts = k if n_r == 1 else n  # a lone tile row's zero rows past K would only cost time
    w = w.reshape(g, n_r, n, m)[:, :, :ts] * scale
    if conv:
        geometry = [attrs.get(key) for key in ("kernel_shape", "strides", "pads", "dilations")]
        if any(v is None for v in geometry):
            return None
        (kh, kw), (sh, sw), pads, (dh, dw) = (list(map(int, v)) for v in geometry)  # type: ignore[arg-type]
        if min(kh, kw, sh, sw, dh, dw) < 1 or len(pads) != 4 or min(pads) < 0:
            return None
        if k % (kh * kw):
            return None
        attrs = {**attrs, "kernel_shape": [kh, kw], "strides": [sh, sw], "pads": pads}
        attrs["dilations"] = [dh, dw]
        weights = np.ascontiguousarray(w.transpose(0, 1, 3, 2))  # [G, n_r, M, N]
    else:
        if g != 1:
            return None
        weights = np.empty(lib.packed_size(n_r, ts, m), np.float32)
        src = np.ascontiguousarray(w[0])
        lib.pack(src.ctypes.data, ts * m, m, n_r, ts, m, weights.ctypes.data)
    return _NativeNode(
        lib=lib,
        conv=conv,
        x_name=node.input[0],
        y_name=node.output[0],
        weights=weights,
        bias=None if bias is None else bias.reshape(-1),
        attrs=attrs,
        threads=threads,
        ts=ts,
    )


def native_nodes(model: onnx.ModelProto) -> list[int]:
    """Indices of the graph nodes the native kernel can evaluate (see the module docstring).

    Args:
        model: An nvmpriv export.

    Returns:
        Node indices in graph order (empty for digital files and noisy or bit-sliced chips).
    """
    return [i for i, nd in enumerate(model.graph.node) if _qualifies(nd, _attrs(nd))]


@dataclass
class _Segment:
    session: Any
    inputs: list[str]
    outputs: list[str]


class NativeGraphRunner:
    """The export as onnxruntime segments and native crossbar nodes, run in graph order.

    ``run(names, feeds)`` has the signature of ``onnxruntime.InferenceSession.run``.

    Args:
        model: The export (already checked by :func:`nvmpriv.runtime.load`).
        lib: The native kernel.
        session: Makes an onnxruntime session from a serialized model.
        threads: Threads for the kernel.

    Raises:
        ValueError: If no node qualifies or the graph cannot be cut (subgraph attributes).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        lib: AdcGemmLibrary,
        session: Callable[[bytes], Any],
        threads: int,
    ) -> None:
        graph = model.graph
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for nd in graph.node
            for a in nd.attribute
        ):
            raise ValueError("graphs with subgraph attributes are not cut into segments")
        init = {t.name: t for t in graph.initializer}
        arrays: dict[str, np.ndarray] = {}
        natives: dict[int, _NativeNode] = {}
        for i in native_nodes(model):
            nd = graph.node[i]
            for name in nd.input[1:]:
                if name in init and name not in arrays:
                    arrays[name] = numpy_helper.to_array(init[name])
            prepared = _prepare(lib, nd, _attrs(nd), arrays, threads)
            if prepared is not None:
                natives[i] = prepared
        if not natives:
            raise ValueError("no crossbar node qualifies for the native kernel")
        types = self._value_types(model)
        outputs = [o.name for o in graph.output]
        # runs of standard nodes between native ones become the onnxruntime segments
        groups: list[list[int] | _NativeNode] = []
        for i in range(len(graph.node)):
            if i in natives:
                groups.append(natives[i])
            elif groups and isinstance(groups[-1], list):
                groups[-1].append(i)
            else:
                groups.append([i])
        needed_after: list[set[str]] = [set() for _ in groups]
        later: set[str] = set(outputs)
        for pos in range(len(groups) - 1, -1, -1):
            needed_after[pos] = set(later)
            step = groups[pos]
            if isinstance(step, _NativeNode):
                later.add(step.x_name)
            else:
                later.update(x for j in step for x in graph.node[j].input if x)
        self._steps: list[_Segment | _NativeNode] = []
        for pos, step in enumerate(groups):
            if isinstance(step, _NativeNode):
                self._steps.append(step)
                continue
            nodes = [graph.node[j] for j in step]
            produced = {o for nd in nodes for o in nd.output if o}
            consumed = [x for nd in nodes for x in nd.input if x]
            ins = list(dict.fromkeys(x for x in consumed if x not in produced and x not in init))
            outs = [o for nd in nodes for o in nd.output if o and o in needed_after[pos]]
            if not outs:
                continue
            sub = onnx.helper.make_graph(
                nodes,
                f"{graph.name}_part{pos}",
                [onnx.helper.make_tensor_value_info(x, types.get(x, 1), None) for x in ins],
                [onnx.helper.make_tensor_value_info(o, types.get(o, 1), None) for o in outs],
                initializer=[init[x] for x in dict.fromkeys(consumed) if x in init],
            )
            part = onnx.helper.make_model(
                sub, opset_imports=list(model.opset_import), ir_version=model.ir_version
            )
            used = {(nd.domain, nd.op_type, nd.overload) for nd in nodes}
            part.functions.extend(
                f for f in model.functions if (f.domain, f.name, f.overload) in used
            )
            self._steps.append(_Segment(session(part.SerializeToString()), ins, outs))
        self._outputs = outputs
        self.native_count = len(natives)

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
                values[step.y_name] = step.run(values[step.x_name])
            else:
                got = step.session.run(step.outputs, {x: values[x] for x in step.inputs})
                values.update(zip(step.outputs, got, strict=True))
        return [values[x] for x in (names or self._outputs)]
