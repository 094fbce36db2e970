"""Evaluate an exported nvmpriv ONNX file: numpy + onnx + onnxruntime, never torch.

Three engines (``Predictor.engine`` says which one runs a file):

* native (default where it applies): the deterministic crossbar nodes with a per-tile ADC (no
  read noise, no bit slicing) run on the fused GEMM + ADC kernel the torch simulator uses
  (:mod:`nvmpriv.native`, compiled on first use with the machine's C++ compiler), everything
  else on onnxruntime, the graph cut into standard-op segments at those nodes
  (:mod:`nvmpriv.runtime_native`). Same function as the bodies below to float32 precision.
* onnxruntime (``load(path, native=False)``, ``NVMPRIV_NATIVE=0``, no compiler, or no
  qualifying node): stock onnxruntime (CPU). The ``nvmpriv`` crossbar nodes carry their
  computation as ONNX functions in standard ops, which onnxruntime inlines, so the file needs
  no custom-op library anywhere.
* reference (``load(path, reference=True)``): ``onnx.reference.ReferenceEvaluator`` with the
  numpy implementations :class:`CrossbarGemm` and :class:`CrossbarConv` below, written from the
  forward equation in :class:`nvmpriv.crossbar.CrossbarLayer`'s docstring (im2col for
  convolutions, integer bit arithmetic for bit slicing) and independent of the function bodies;
  it exists to cross-check them.

Per-query read noise. Each crossbar node draws its noise from a generator seeded by the node's
``seed`` attribute (onnxruntime: the ``RandomNormalLike`` seed inside the function body). Both
runtimes draw *fresh* noise at every call while a session lives, and a new session replays the
same sequence. Measured with onnxruntime 1.32: with a ``seed`` attribute, two runs of one
session differ and run ``i`` of two sessions agree; without a seed onnxruntime behaves the
same way (its default seed is fixed too). Pass ``seed=`` to :func:`load` for another sequence.

Threads. The native engine threads inside its kernel (OpenMP) and its onnxruntime segments
(intra-op threads, not spinning between calls, so that they leave the cores to the kernel).
On the onnxruntime engine, a deterministic crossbar file (no read noise) runs one query batch
as several chunks concurrently, one onnxruntime thread each: its per-tile ADC passes
(``Round``, ``Clip``) are single-threaded elementwise kernels that intra-op threads do not
spread (measured on 2 cores:
1.03-1.36x faster, bit-identical output). A chunk is at least ~5 ms of work (a probe at load
time, on random inputs, times one row); the chunks run on a second, single-threaded session and
batches too small to split run in one piece with intra-op threads. Digital files and files with
per-query noise only use intra-op threads (noise must be drawn in call order to replay per
session).

Typical use::

    from nvmpriv.runtime import load
    model = load("exports/quickstart_version_0_64x64_100k_seed0.onnx")
    probs = model.predict_proba(x)          # [n, C] float64, rows sum to 1
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference.op_run import OpRun

__all__ = [
    "CONTENT_DIGEST_KEY",
    "DOMAIN_VERSION",
    "NOISE_SEED_LIMIT",
    "REQUIRED_METADATA",
    "CrossbarConv",
    "CrossbarGemm",
    "OnnxModelError",
    "Predictor",
    "activation_quantizer",
    "check_noise_seed",
    "content_digest",
    "load",
    "read_metadata",
]

#: metadata_props keys every nvmpriv export carries.
REQUIRED_METADATA = (
    "nvmpriv.version",
    "nvmpriv.crossbar",
    "nvmpriv.input_name",
    "nvmpriv.output_name",
    "nvmpriv.output",
    "nvmpriv.input_shape",
    "nvmpriv.num_classes",
)
#: Version of the ``nvmpriv`` crossbar-op domain this evaluator implements; files of a later
#: version (a newer nvmpriv's export) are refused rather than misread. v2 added the
#: ``act_signed`` attribute (signed DoReFa input quantizer of Tanh nets); v1 files lack it.
DOMAIN_VERSION = 2
#: metadata_props key of the SHA-256 digest over everything else in the file (see
#: :func:`content_digest`); files written before it existed load without the check.
CONTENT_DIGEST_KEY = "nvmpriv.content_sha256"
#: Noise seeds must stay below this: onnxruntime's ``RandomNormalLike`` takes its seed as a
#: float32 attribute, which holds every integer only up to 2**24 (larger seeds would round onto
#: each other, and the nodes ``seed + i`` would share one noise stream).
NOISE_SEED_LIMIT = 2**24
#: Least work (seconds, one thread) worth a concurrent chunk of a query batch.
_MIN_CHUNK_SECONDS = 5e-3
_FIX = "re-export it with `python -m nvmpriv export --config ... --ckpt_path ... --crossbar ...`"


class OnnxModelError(ValueError):
    """The file is not a usable nvmpriv ONNX export, or a query does not fit it."""


# ====================================================================== reference operators
def _quantize(x: np.ndarray, step: float, qmax: int) -> np.ndarray:
    """Symmetric uniform quantizer ``clip(round(x / step), -qmax, qmax) * step`` (float32)."""
    s = np.float32(step)
    return (np.clip(np.round(x / s), -qmax, qmax) * s).astype(np.float32)


def activation_quantizer(x: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """DoReFa input quantizer of a quantized layer, in the float32 operations torch uses.

    Args:
        x: Layer input.
        bits: Activation bits (``0``: no quantizer, ``x`` as float32).
        signed: The signed form of Tanh nets (inputs in ``[-1, 1]``) instead of ``[0, 1]``.

    Returns:
        The quantized input (float32).
    """
    if not bits:
        return x.astype(np.float32, copy=False)
    n = np.float32(2.0**bits - 1)
    if signed:
        clipped = np.clip(x.astype(np.float32), np.float32(-1), np.float32(1))
        r = (clipped + np.float32(1)) * np.float32(0.5) * n
        q = (r + (np.round(r) - r)) / n
        return (q * np.float32(2) - np.float32(1)).astype(np.float32)
    r = np.clip(x.astype(np.float32), np.float32(0), np.float32(1)) * n
    return ((r + (np.round(r) - r)) / n).astype(np.float32)


class _CrossbarOp(OpRun):
    """Shared numpy maths of the ``nvmpriv`` operators (attributes as in nvmpriv.export)."""

    op_domain = "nvmpriv"

    # Node attributes: OpRun sets them on the instance from the node (see nvmpriv.export).
    seed: int
    has_bias: int
    read_noise: int
    bit_slicing: int
    input_bits: int
    input_frac_bits: int
    weight_frac_bits: int
    stream_width: int
    slice_width: int
    n_streams: int
    n_slices: int
    act_bits: int
    act_signed: int
    dac_bits: int
    dac_step: float
    dac_qmax: float
    adc_bits: int
    adc_step: float
    adc_qmax: float
    groups: int
    n_row_tiles: int
    tile_size: int
    rows_per_group: int
    cols_per_group: int

    def _setup_rng(self) -> np.random.Generator:
        rng: np.random.Generator | None = getattr(self, "_rng", None)
        if rng is None:
            rng = np.random.default_rng(int(self.seed))
            self._rng = rng
        return rng

    def _unpack(self, rest: Sequence[np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
        rest = list(rest)
        bias = rest.pop(0) if self.has_bias else None
        noise = rest.pop(0) if self.read_noise else None
        return bias, noise

    def _inputs(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """DAC-quantized inputs, or bit-sliced stream digits stacked on axis 0 (count S)."""
        a = self
        bits = int(getattr(a, "act_bits", 0) or 0)
        x = activation_quantizer(x, bits, bool(int(getattr(a, "act_signed", 0) or 0)))
        if a.bit_slicing:
            qmax = 2 ** (a.input_bits - 1) - 1
            codes = np.clip(np.round(x.astype(np.float64) * 2.0**a.input_frac_bits), -qmax, qmax)
            ints = codes.astype(np.int64)
            sign, mag = np.sign(ints), np.abs(ints)
            w, n_s = int(a.stream_width), int(a.n_streams)
            digits = [sign * ((mag >> (w * (n_s - 1 - k))) & (2**w - 1)) for k in range(n_s)]
            return np.concatenate(digits).astype(np.float32), n_s
        if a.dac_bits:
            return _quantize(x, a.dac_step, int(a.dac_qmax)), 1
        return x.astype(np.float32), 1

    def _reduce(self, p: np.ndarray, var: np.ndarray | None) -> np.ndarray:
        """Read noise, per-tile ADC and the digital sum over the tile-row axis 0."""
        if var is not None:
            p = p + np.sqrt(np.maximum(var, 0)) * self._setup_rng().standard_normal(p.shape)
            p = p.astype(np.float32)
        if self.adc_bits:
            p = _quantize(p, self.adc_step, int(self.adc_qmax))
        return p.sum(0, dtype=np.float64).astype(np.float32)

    def _shift_add(self, y: np.ndarray, n_s: int) -> np.ndarray:
        """Combine streams (axis 0 blocks) and slices: ``y [S*B, ..., T*O]`` on the last axes."""
        a = self
        n_t, o = int(a.n_slices), int(a.cols_per_group)
        if not a.bit_slicing:
            return y
        y = y.reshape(n_s, -1, *y.shape[1:-1], n_t, o).astype(np.float64)
        out = np.zeros((*y.shape[1:-2], o))
        for s in range(n_s):
            for t in range(n_t):
                shift = a.stream_width * (n_s - 1 - s) + a.slice_width * (n_t - 1 - t)
                out += y[s, ..., t, :] * 2.0**shift
        scale = 2.0 ** -(a.input_frac_bits + a.weight_frac_bits)
        return (out * scale).astype(np.float32)


class CrossbarGemm(_CrossbarOp):
    """``nvmpriv.CrossbarGemm`` in numpy: ``Y = chip(X) + B`` for ``X [batch, K]``.

    Inputs: ``X``, ``W`` (``w_tiles [1, n_r, N, T*O]``), optional ``B`` (``[O]``), optional
    ``NZ`` (``noise_tiles``, same shape as ``W``). Every tile's partial sum is computed
    explicitly (also without ADC, where the sum is the same function as one GEMM).
    """

    def _run(
        self, x: np.ndarray, w: np.ndarray, *rest: np.ndarray, **attrs: Any
    ) -> tuple[np.ndarray]:
        bias, noise = self._unpack(rest)
        n_r, n, k = int(self.n_row_tiles), int(self.tile_size), int(self.rows_per_group)
        xin, n_s = self._inputs(x)
        xp = np.zeros((xin.shape[0], n_r * n), np.float32)
        xp[:, :k] = xin
        xt = xp.reshape(-1, n_r, n)
        wt = w.reshape(n_r, n, -1)
        p = np.einsum("brn,rnm->rbm", xt, wt, dtype=np.float32)
        var = None
        if noise is not None:
            var = np.einsum("brn,rnm->rbm", xt * xt, noise.reshape(n_r, n, -1), dtype=np.float32)
        y = self._shift_add(self._reduce(p, var), n_s)
        if bias is not None:
            y = y + bias
        return (y.astype(np.float32),)


def _im2col(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
) -> tuple[np.ndarray, int, int]:
    """Patches ``[B, C, kh*kw, Ho, Wo]`` in ``(c, kh, kw)`` order."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    taps = [
        xp[
            :,
            :,
            i * dh : i * dh + sh * (h_out - 1) + 1 : sh,
            j * dw : j * dw + sw * (w_out - 1) + 1 : sw,
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    return np.stack(taps, axis=2), h_out, w_out


class CrossbarConv(_CrossbarOp):
    """``nvmpriv.CrossbarConv`` in numpy (im2col): ``Y = chip(X) + B`` for ``X [B, C, H, W]``.

    Inputs as :class:`CrossbarGemm` with ``W`` ``[groups, n_r, N, T*O]``; attributes add
    ``kernel_shape``, ``strides``, ``pads`` (ONNX order) and ``dilations``.
    """

    kernel_shape: list[int]
    strides: list[int]
    pads: list[int]
    dilations: list[int]

    def _run(
        self, x: np.ndarray, w: np.ndarray, *rest: np.ndarray, **attrs: Any
    ) -> tuple[np.ndarray]:
        bias, noise = self._unpack(rest)
        g, n_r, n = int(self.groups), int(self.n_row_tiles), int(self.tile_size)
        k, o = int(self.rows_per_group), int(self.cols_per_group)
        xin, n_s = self._inputs(x)
        cols, h_out, w_out = _im2col(
            xin,
            self.kernel_shape,
            self.strides,
            self.pads,
            self.dilations,
        )
        b = cols.shape[0]
        cols = cols.reshape(b, g, k, h_out * w_out)  # channels of group g are contiguous
        xp = np.zeros((b, g, n_r * n, h_out * w_out), np.float32)
        xp[:, :, :k] = cols
        xt = xp.reshape(b, g, n_r, n, -1)
        wt = w.reshape(g, n_r, n, -1)
        p = np.einsum("bgrnl,grnm->rbgml", xt, wt, dtype=np.float32)
        var = None
        if noise is not None:
            nt = noise.reshape(g, n_r, n, -1)
            var = np.einsum("bgrnl,grnm->rbgml", xt * xt, nt, dtype=np.float32)
        y = self._reduce(p, var)  # [S*B, G, T*O, L]
        y = np.moveaxis(y, -1, -2)  # [S*B, G, L, T*O]
        y = self._shift_add(y, n_s)  # [B, G, L, O]
        y = np.moveaxis(y, -1, -2).reshape(-1, g * o, h_out, w_out)
        if bias is not None:
            y = y + bias.reshape(1, -1, 1, 1)
        return (y.astype(np.float32),)


# ====================================================================== loading and querying
def _fail(path: Path, what: str, fix: str = _FIX) -> OnnxModelError:
    return OnnxModelError(f"{path}: {what}; {fix}")


def _read_model(path: str | os.PathLike[str]) -> tuple[Path, onnx.ModelProto]:
    file = Path(path)
    if not file.exists():
        raise _fail(file, "file not found", "give the path of an exported .onnx file")
    if not file.is_file():
        raise _fail(file, "is not a file", "give the path of an exported .onnx file")
    data = file.read_bytes()
    if not data:
        raise _fail(file, "is empty (0 bytes)")
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError/RuntimeWarning-like errors
        raise _fail(
            file, f"is not an ONNX model or is truncated/corrupt ({type(exc).__name__})"
        ) from None
    if not model.graph.node or not model.opset_import:
        raise _fail(file, "is not an ONNX model (no graph nodes or opset)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(file.parent))
        except Exception as exc:  # missing/short data files raise OSError or ValueError
            raise _fail(
                file,
                f"its external weight files cannot be read ({type(exc).__name__}: {exc})",
                "keep the data files next to the .onnx file, or re-save it with its weights inside",
            ) from None
    return file, model


class _Digest:
    """SHA-256 over length-prefixed parts, tensors in a canonical form."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def part(self, data: bytes) -> None:
        self.h.update(len(data).to_bytes(8, "little"))
        self.h.update(data)

    def tensor(self, t: onnx.TensorProto) -> None:
        # raw_data vs typed fields, and external-data bookkeeping (data_location is set to
        # DEFAULT when onnx loads external data), must not change the digest: hash the values
        self.part(f"{t.name}|{t.data_type}|{list(t.dims)}".encode())
        self.part(np.ascontiguousarray(numpy_helper.to_array(t)).tobytes())

    def node(self, n: onnx.NodeProto) -> None:
        self.part(_without_attributes(n).SerializeToString())
        for a in n.attribute:
            self.part(f"{a.name}|{a.type}".encode())
            if a.type == onnx.AttributeProto.TENSOR:
                self.tensor(a.t)
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    self.tensor(t)
            elif a.type == onnx.AttributeProto.GRAPH:
                self.graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    self.graph(g)
            else:
                self.part(a.SerializeToString())

    def graph(self, g: onnx.GraphProto) -> None:
        self.part(g.name.encode())
        for t in g.initializer:
            self.tensor(t)
        for s in g.sparse_initializer:
            self.tensor(s.values)
            self.tensor(s.indices)
            self.part(str(list(s.dims)).encode())
        for info in (*g.input, *g.output, *g.value_info):
            self.part(info.SerializeToString())
        for n in g.node:
            self.node(n)


def _without_attributes(n: onnx.NodeProto) -> onnx.NodeProto:
    bare = onnx.NodeProto()
    bare.op_type, bare.domain, bare.name, bare.overload = n.op_type, n.domain, n.name, n.overload
    bare.input.extend(n.input)
    bare.output.extend(n.output)
    return bare


def content_digest(model: onnx.ModelProto) -> str:
    """SHA-256 over the model's content, excluding its ``nvmpriv.content_sha256`` entry.

    Covers the IR version, opset imports, graph (nodes, initializers, inputs/outputs), the
    ONNX functions of the crossbar nodes and every other ``metadata_props`` entry. ONNX files
    carry no checksum of their own, and a weight byte flipped on disk still parses and runs;
    :func:`export_model <nvmpriv.export.export_model>` stores this digest and :func:`load`
    recomputes it. Tensors are hashed by name, type, shape and values, so the digest survives
    re-saving the model with its weights in external data files (or back inline).

    Args:
        model: The parsed model (external data loaded).

    Returns:
        64 hex digits.
    """
    d = _Digest()
    d.part(str(model.ir_version).encode())
    for opset in model.opset_import:
        d.part(opset.SerializeToString())
    d.graph(model.graph)
    for fn in model.functions:
        head = onnx.FunctionProto()
        head.CopyFrom(fn)
        del head.node[:]
        d.part(head.SerializeToString())
        for n in fn.node:
            d.node(n)
    for key, value in sorted((p.key, p.value) for p in model.metadata_props):
        if key != CONTENT_DIGEST_KEY:
            d.part(key.encode())
            d.part(value.encode())
    return d.h.hexdigest()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (no validation beyond parsing).

    Args:
        path: ONNX file.

    Returns:
        Key -> value.

    Raises:
        OnnxModelError: If the file is missing or not ONNX.
    """
    _, model = _read_model(path)
    return {p.key: p.value for p in model.metadata_props}


def check_noise_seed(seed: int, n_nodes: int) -> int:
    """Validate the base seed of ``n_nodes`` per-query noise generators (``seed + i`` each).

    Args:
        seed: Base seed.
        n_nodes: Number of crossbar nodes.

    Returns:
        The seed as an int.

    Raises:
        ValueError: If a node's seed would reach :data:`NOISE_SEED_LIMIT` or ``seed < 0``.
    """
    top = NOISE_SEED_LIMIT - max(n_nodes, 1)
    if isinstance(seed, bool) or not 0 <= int(seed) <= top:
        raise ValueError(
            f"noise seed {seed!r} is out of range: use 0 <= seed <= {top} (onnxruntime stores "
            f"RandomNormalLike seeds as float32, exact below 2**24, and node i uses seed + i)"
        )
    return int(seed)


def _shape_of(value: Any) -> list[int | None] | None:
    """Dimensions of a graph value (``None`` for symbolic ones), or ``None`` without a shape."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type" or not value.type.tensor_type.HasField("shape"):
        return None
    return [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]


def _checked_metadata(
    file: Path, model: onnx.ModelProto, meta: dict[str, str]
) -> tuple[tuple[int, ...], int]:
    """Parse the shape metadata and check every metadata claim against the graph itself."""
    try:
        raw_shape = json.loads(meta["nvmpriv.input_shape"])
        num_classes = int(meta["nvmpriv.num_classes"])
        if meta["nvmpriv.crossbar"] != "digital" and not isinstance(
            json.loads(meta["nvmpriv.crossbar"]), dict
        ):
            raise ValueError("nvmpriv.crossbar is neither 'digital' nor a JSON object")
    except (ValueError, TypeError) as exc:
        raise _fail(file, f"malformed nvmpriv metadata ({exc})") from None
    if (
        not isinstance(raw_shape, list)
        or not raw_shape
        or not all(type(d) is int and d > 0 for d in raw_shape)
    ):
        raise _fail(file, f"malformed nvmpriv.input_shape {raw_shape!r} (positive integers)")
    if num_classes < 2:
        raise _fail(file, f"malformed nvmpriv.num_classes {num_classes} (at least 2)")
    input_shape = tuple(raw_shape)
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    outputs = {v.name: v for v in model.graph.output}
    name_in, name_out = meta["nvmpriv.input_name"], meta["nvmpriv.output_name"]
    if [v.name for v in inputs] != [name_in] or name_out not in outputs:
        raise _fail(
            file,
            f"its metadata names input {name_in!r} and output {name_out!r} but the graph has "
            f"inputs {[v.name for v in inputs]} and outputs {list(outputs)} (edited or corrupt)",
        )
    dims = _shape_of(inputs[0])
    if dims is not None and (
        len(dims) != len(input_shape) + 1
        or any(d not in (None, 0, w) for d, w in zip(dims[1:], input_shape, strict=False))
    ):
        raise _fail(
            file,
            f"its metadata input_shape {list(input_shape)} disagrees with the graph input "
            f"{['batch' if d is None else d for d in dims]} (edited or corrupt)",
        )
    out_dims = _shape_of(outputs[name_out])
    if out_dims and out_dims[-1] not in (None, 0, num_classes):
        raise _fail(
            file,
            f"its metadata num_classes {num_classes} disagrees with the graph output's "
            f"{out_dims[-1]} classes (edited or corrupt)",
        )
    bodies = {(f.domain, f.name, f.overload) for f in model.functions}
    unbound = [
        n.name or n.op_type
        for n in model.graph.node
        if n.domain == "nvmpriv" and (n.domain, n.op_type, n.overload) not in bodies
    ]
    if unbound:
        raise _fail(
            file,
            f"crossbar nodes {unbound[:3]} lack their ONNX function bodies (truncated or corrupt "
            "file)",
        )
    return input_shape, num_classes


def _reseed(model: onnx.ModelProto, seed: int) -> None:
    """Give every crossbar node's noise generator the seed ``seed + i``."""
    index = 0
    by_overload: dict[tuple[str, str], int] = {}
    for node in model.graph.node:
        if node.domain == "nvmpriv":
            for attr in node.attribute:
                if attr.name == "seed":
                    attr.i = seed + index
            by_overload[(node.op_type, node.overload)] = seed + index
            index += 1
    for fn in model.functions:
        new = by_overload.get((fn.name, fn.overload))
        if new is None:
            continue
        for n in fn.node:
            if n.op_type == "RandomNormalLike":
                for attr in n.attribute:
                    if attr.name == "seed":
                        attr.f = float(new)


@dataclass
class Predictor:
    """A loaded export: ``predict_proba(x)`` is the only access an attacker has.

    Attributes:
        path: The file.
        metadata: Its ``metadata_props``.
        input_shape: Shape of one input (no batch dimension).
        num_classes: Number of classes C.
        reference: Whether the numpy reference evaluator runs it.
        engine: What evaluates it: ``"onnxruntime"``, ``"onnxruntime + native crossbar
            kernel (N nodes)"`` or ``"reference"``.
        queries: Number of samples queried so far.
    """

    path: Path
    metadata: dict[str, str]
    input_shape: tuple[int, ...]
    num_classes: int
    reference: bool
    engine: str
    _runner: Any = field(repr=False)
    _input_name: str = "input"
    _output_name: str = "probabilities"
    _chunk_runner: Any = field(default=None, repr=False)
    _workers: int = 1
    _min_rows: int = 1
    queries: int = 0

    @property
    def crossbar(self) -> dict[str, Any] | str:
        """The crossbar config as a dict, or ``"digital"``."""
        raw = self.metadata.get("nvmpriv.crossbar", "digital")
        return raw if raw == "digital" else dict(json.loads(raw))

    def _check(self, x: Any) -> np.ndarray:
        try:
            raw = np.asarray(x)
        except ValueError as exc:  # ragged nested sequences
            raise OnnxModelError(
                f"{self.path.name}: input is not a rectangular array ({exc}); pass one "
                "[n, features] array"
            ) from None
        if raw.dtype.kind not in "biuf":
            raise OnnxModelError(
                f"{self.path.name}: input has dtype {raw.dtype}; query real numbers (float32)"
            )
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise OnnxModelError(f"{self.path.name}: input holds NaN/inf; query finite values")
        arr = raw.astype(np.float32)
        if not np.isfinite(arr).all():
            raise OnnxModelError(
                f"{self.path.name}: input values reach {np.abs(raw).max():.3g}, beyond float32 "
                "(3.4e38); scale the queries into the model's input range"
            )
        want = self.input_shape
        if arr.ndim == len(want) and tuple(arr.shape) == want:
            arr = arr[None]
        if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != want:
            raise OnnxModelError(
                f"{self.path.name}: input has shape {tuple(arr.shape)} but the model expects "
                f"(n, {', '.join(map(str, want))}); reshape the queries to that width"
            )
        return np.ascontiguousarray(arr)

    def _checked_output(self, probs: np.ndarray) -> np.ndarray:
        """Rows renormalised to sum to 1, after checking they are probabilities at all."""
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise OnnxModelError(
                f"{self.path.name}: output has shape {probs.shape}, not (n, {self.num_classes}) "
                f"as its metadata states; {_FIX}"
            )
        if not probs.size:
            return probs
        if not np.isfinite(probs).all():
            raise OnnxModelError(
                f"{self.path.name}: output holds NaN/inf for finite inputs (an overflow inside "
                "the model); query inputs in the range the model was trained on"
            )
        sums = probs.sum(axis=1)
        if probs.min() < -1e-6 or np.abs(sums - 1.0).max() > 1e-3:
            raise OnnxModelError(
                f"{self.path.name}: output is not probabilities (min {probs.min():.3g}, row sums "
                f"{sums.min():.4g} to {sums.max():.4g}) though its metadata says so; {_FIX}"
            )
        return probs / sums[:, None]

    def predict_proba(self, x: Any, *, batch_size: int = 1024) -> np.ndarray:
        """Class probabilities of the exported model.

        Args:
            x: Inputs ``[n, *input_shape]`` (one sample without batch axis is accepted).
            batch_size: Samples per runtime call.

        Returns:
            ``[n, C]`` float64 probabilities (rows renormalised to sum to 1).

        Raises:
            OnnxModelError: If the input is not a finite real array of the metadata's shape, or
                the output is not probabilities.
            ValueError: If ``batch_size < 1``.
        """
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        arr = self._check(x)
        size = int(batch_size)
        if self._chunk_runner is not None and len(arr) >= 2 * self._min_rows:
            # one chunk per worker, each worth a thread, each on one onnxruntime thread
            size = min(size, max(self._min_rows, -(-len(arr) // self._workers)))
            chunks = [arr[start : start + size] for start in range(0, len(arr), size)]
            with ThreadPoolExecutor(min(self._workers, len(chunks))) as pool:
                outs = list(pool.map(self._run_chunk, chunks))
        else:
            outs = [self._run(arr[start : start + size]) for start in range(0, len(arr), size)]
        self.queries += len(arr)
        probs = np.concatenate(outs) if outs else np.zeros((0, self.num_classes))
        return self._checked_output(probs)

    __call__ = predict_proba

    def _run(self, chunk: np.ndarray, runner: Any = None) -> np.ndarray:
        names = None if self.reference else [self._output_name]
        (p,) = (self._runner if runner is None else runner).run(names, {self._input_name: chunk})
        return np.asarray(p, dtype=np.float64)

    def _run_chunk(self, chunk: np.ndarray) -> np.ndarray:
        return self._run(chunk, self._chunk_runner)


def _chunk_parallel(model: onnx.ModelProto) -> bool:
    """Whether concurrent single-threaded chunks suit ``model``: crossbar nodes, no noise."""
    crossbar = any(n.domain == "nvmpriv" for n in model.graph.node)
    noisy = any(n.op_type.startswith("Random") for f in model.functions for n in f.node)
    return crossbar and not noisy


def _native_runner(
    model: onnx.ModelProto, session: Any, threads: int, input_shape: tuple[int, ...]
) -> Any:
    """The native-kernel runner of a file with qualifying crossbar nodes, else ``None``."""
    from nvmpriv import runtime_native

    if not runtime_native.native_nodes(model):
        return None
    lib = runtime_native.native_library()
    if lib is None:
        return None
    try:
        return runtime_native.NativeGraphRunner(model, lib, session, threads, input_shape)
    except Exception:
        # any failure leaves the whole file to onnxruntime, whose own session then accepts it
        # or names the problem
        return None


def _rows_per_chunk(run: Any, input_shape: tuple[int, ...]) -> int:
    """Rows of about :data:`_MIN_CHUNK_SECONDS` of work, from timed single-threaded probes."""
    rng = np.random.default_rng(0)
    rows = 4
    while True:
        # random rather than zero inputs: all-zero bit-sliced input streams are skipped
        probe = rng.random((rows, *input_shape), dtype=np.float32)
        run(probe)  # warm-up (first-run allocations)
        start = time.perf_counter()
        run(probe)
        seconds = time.perf_counter() - start
        if seconds >= 1e-3 or rows >= 256:  # long enough to time per-call overhead away
            return max(1, math.ceil(_MIN_CHUNK_SECONDS * rows / max(seconds, 1e-9)))
        rows *= 4


def load(
    path: str | os.PathLike[str],
    *,
    reference: bool = False,
    seed: int | None = None,
    threads: int | None = None,
    native: bool = True,
) -> Predictor:
    """Load an nvmpriv export for querying.

    Args:
        path: The ``.onnx`` file.
        reference: Use ``onnx.reference.ReferenceEvaluator`` with the numpy crossbar ops
            instead of onnxruntime (slow; for cross-checks).
        seed: Re-seed the per-query read-noise generators (node ``i`` gets ``seed + i``);
            ``None`` keeps the seeds stored in the file.
        threads: CPU threads to use (``None``: all available): onnxruntime intra-op threads,
            and for a deterministic crossbar file also the number of concurrent
            single-threaded chunks a large batch is split into (see the module docstring).
        native: Evaluate the deterministic per-tile-ADC crossbar nodes with the native fused
            kernel and the rest with onnxruntime (:mod:`nvmpriv.runtime_native`) where a C++
            compiler is available; ``False`` (or ``NVMPRIV_NATIVE=0``) runs the whole file on
            onnxruntime's function bodies.

    Returns:
        The predictor.

    Raises:
        OnnxModelError: Missing file, not ONNX, truncated/corrupt, missing nvmpriv metadata,
            or a graph onnxruntime rejects; the message names the file and the fix.
    """
    file, model = _read_model(path)
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise _fail(
            file,
            f"missing nvmpriv metadata {missing} (not written by nvmpriv export, or truncated)",
        )
    try:
        domain_version = int(meta.get("nvmpriv.domain_version") or DOMAIN_VERSION)
    except (ValueError, TypeError) as exc:
        raise _fail(file, f"malformed nvmpriv metadata ({exc})") from None
    if domain_version > DOMAIN_VERSION:
        raise _fail(
            file,
            f"written by a newer nvmpriv ({meta['nvmpriv.version']}, crossbar ops v"
            f"{domain_version}; this evaluator knows v{DOMAIN_VERSION})",
            "upgrade nvmpriv, or re-export with this version",
        )
    if meta["nvmpriv.output"] != "probabilities":
        raise _fail(
            file,
            f"its output is {meta['nvmpriv.output']!r}, not 'probabilities' (the attacks query "
            "class probabilities)",
        )
    stored = meta.get(CONTENT_DIGEST_KEY)
    if stored is not None and stored != content_digest(model):
        raise _fail(
            file,
            "content does not match its nvmpriv.content_sha256 (modified or corrupted after "
            "export)",
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(file, f"fails the ONNX checker ({first})") from None
    input_shape, num_classes = _checked_metadata(file, model, meta)
    if seed is not None:
        n_nodes = sum(n.domain == "nvmpriv" for n in model.graph.node)
        try:
            _reseed(model, check_noise_seed(seed, n_nodes))
        except ValueError as exc:
            raise _fail(file, str(exc), "pass a smaller seed") from None
    input_name, output_name = meta["nvmpriv.input_name"], meta["nvmpriv.output_name"]
    workers, chunk_runner = 1, None
    engine = "reference" if reference else "onnxruntime"
    if reference:
        from onnx.reference import ReferenceEvaluator

        runner: Any = ReferenceEvaluator(model, new_ops=[CrossbarGemm, CrossbarConv])
    else:
        import onnxruntime as ort

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n_threads = max(1, int(threads) if threads is not None else (cores or 1))
        data = model.SerializeToString()

        def session(intra: int, data: bytes = data, spin: bool = True) -> Any:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = intra
            opts.inter_op_num_threads = 1
            if not spin:
                # between segments the native kernel runs: spinning workers would take its cores
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                first = str(exc).strip().splitlines()[0][:300]
                raise _fail(file, f"onnxruntime cannot load it ({first})") from None

        runner = None
        if native:
            runner = _native_runner(
                model, lambda data, intra: session(intra, data, False), n_threads, input_shape
            )
        if runner is not None:
            engine = f"onnxruntime + native crossbar kernel ({runner.native_count} nodes)"
        else:
            runner = session(n_threads)
        if engine == "onnxruntime" and n_threads > 1 and _chunk_parallel(model):
            # a second, single-threaded session runs the concurrent chunks of large batches
            workers, chunk_runner = n_threads, session(1)
    predictor = Predictor(
        path=file,
        metadata=meta,
        input_shape=input_shape,
        num_classes=num_classes,
        reference=reference,
        engine=engine,
        _runner=runner,
        _input_name=input_name,
        _output_name=output_name,
        _chunk_runner=chunk_runner,
        _workers=workers,
    )
    if chunk_runner is not None:
        predictor._min_rows = _rows_per_chunk(predictor._run_chunk, input_shape)
    return predictor
