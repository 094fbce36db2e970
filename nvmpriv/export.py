r"""Export a trained model, digital or programmed onto a simulated crossbar chip, to ONNX.

Every crossbar layer (:class:`nvmpriv.crossbar.CrossbarLinear` / ``CrossbarConv2d``) becomes one
node of the custom domain ``nvmpriv`` (version :data:`DOMAIN_VERSION`): ``CrossbarGemm`` or ``CrossbarConv``. Its
inputs are the input activations and the programmed chip as initializers (``w_tiles``: per-tile
effective weights, or weight slices in counts with bit slicing; ``bias``; ``noise_tiles``: read
noise variance per unit squared input), its attributes the scalars (DAC/ADC bits and steps,
tiling, bit-slicing widths, read-noise seed). The forward equation is the one stated in the
docstring of :class:`nvmpriv.crossbar.CrossbarLayer`.

Each node also carries its computation as an ONNX *function* in standard ops (opset
:data:`OPSET`), so stock onnxruntime runs the file with no custom library: the node's
``overload`` field names its layer and selects a function body specialised to that layer's
shapes (ONNX IR version 10 function overloads). Lowering used by the bodies:

* no ADC: one ``MatMul`` / ``Conv`` with the assembled effective weight (the per-tile sum is
  linear, so this is exactly the same function);
* with ADC (per-tile partial sums): Linear pads the input to ``n_row_tiles * N``, reshapes it to
  ``[n_r, B, N]`` and runs one batched ``MatMul`` against ``w_tiles`` ``[n_r, N, T*O]``; Conv
  gathers, for every tile row, the input channels it touches and convolves them with the
  tile's kernel rows (taps outside the tile masked to 0) as one grouped ``Conv`` with
  ``group = groups * n_row_tiles``, the same construction as the torch simulator;
* read noise: ``sqrt(x^2 @ noise) * RandomNormalLike(seed=...)`` on the partial sums.

The file's ``metadata_props`` hold ``nvmpriv.version``, ``nvmpriv.crossbar`` (JSON of
:meth:`CrossbarConfig.to_dict` or ``"digital"``), ``nvmpriv.crossbar_name``, ``nvmpriv.chip_seed``, ``nvmpriv.noise_seed``,
``nvmpriv.split_hash``, ``nvmpriv.input_name``, ``nvmpriv.output_name``, ``nvmpriv.output``
(``"probabilities"``), ``nvmpriv.input_shape`` (JSON, without the batch dimension),
``nvmpriv.num_classes``, ``nvmpriv.opset``, ``nvmpriv.calibration`` and
``nvmpriv.content_sha256`` (:func:`nvmpriv.runtime.content_digest`, checked at load). The
graph's input is ``input`` with a dynamic batch dimension, its output ``probabilities`` (softmax
appended).

CLI::

    python -m nvmpriv export --config CONFIG.yaml --ckpt_path RUN/checkpoints/last.ckpt \\
        --crossbar 64x64_100k --seed 0 [--output exports/NAME.onnx] [--overwrite]
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper as oh
from onnx import numpy_helper
from torch import nn

from nvmpriv import __version__
from nvmpriv.atomic import mkstemp_beside
from nvmpriv.ckptfile import check_checkpoint_file
from nvmpriv.classpath import instantiate
from nvmpriv.cliargs import CommandParser, nonnegative_int, positive_int
from nvmpriv.crossbar import (
    CrossbarConfig,
    CrossbarConv2d,
    CrossbarLayer,
    convert,
    crossbar_layers,
    get_preset,
)
from nvmpriv.runtime import CONTENT_DIGEST_KEY, DOMAIN_VERSION, check_noise_seed, content_digest

__all__ = [
    "DIGITAL",
    "DOMAIN",
    "DOMAIN_VERSION",
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "ExportError",
    "cli_main",
    "crossbar_functions",
    "export_model",
    "load_crossbar",
    "resolve_output",
]

#: Standard ONNX opset of the exported graphs and of the ``nvmpriv`` function bodies.
OPSET = 18
#: Custom domain of the crossbar nodes (its version, DOMAIN_VERSION, is the evaluator's).
DOMAIN = "nvmpriv"
#: IR version 10 is the first with function overloads (one specialised body per layer).
IR_VERSION = 10
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
DIGITAL = "digital"
DEFAULT_FOLDER = Path("exports")


class ExportError(ValueError):
    """Invalid export request (names the offending option and the fix)."""


# ====================================================================== crossbar config
def load_crossbar(spec: str) -> CrossbarConfig | None:
    """Resolve ``--crossbar``: ``digital``, a preset name or a YAML/JSON file of fields.

    Args:
        spec: ``"digital"``, a key of ``nvmpriv.crossbar.PRESETS`` or a path to a YAML/JSON
            mapping accepted by :meth:`CrossbarConfig.from_dict` (``preset:`` plus overrides).

    Returns:
        The configuration, or ``None`` for the digital model.

    Raises:
        ExportError: If a file cannot be read or holds no mapping.
        CrossbarConfigError: On an unknown preset or invalid field.
    """
    if spec == DIGITAL:
        return None
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise ExportError(f"--crossbar file {path} not found; give a preset name or a file")
        from nvmpriv.yamlfile import read_yaml

        data = read_yaml(path, "--crossbar")
        if isinstance(data, dict) and "crossbar" in data and isinstance(data["crossbar"], dict):
            data = data["crossbar"]
        if not isinstance(data, dict):
            raise ExportError(
                f"--crossbar file {path} must hold a mapping of CrossbarConfig fields"
            )
        cfg = CrossbarConfig.from_dict(data)
        if "name" not in data and set(data) - {"preset"}:
            # A preset with overrides is another chip: it must not take the preset's file name.
            cfg = cfg.replace(name=path.stem)
        return cfg
    return get_preset(spec)


# ====================================================================== torch side: stubs
@dataclass
class _LayerSpec:
    """What the post-processing needs about one crossbar layer."""

    key: str
    layer: CrossbarLayer
    state: dict[str, Any]
    noise_seed: int
    out_shape: tuple[int, ...] = ()
    """The layer's output shape in the trace (set by the traced forward)."""


_ACTIVE: dict[str, _LayerSpec] = {}


class _CrossbarOp(torch.autograd.Function):
    """Traced as one ``nvmpriv`` node; the forward runs the real layer for shapes."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w_tiles: torch.Tensor,
        bias: torch.Tensor | None,
        noise: torch.Tensor | None,
        key: str,
    ) -> torch.Tensor:
        spec = _ACTIVE[key]
        y = spec.layer(x)
        spec.out_shape = tuple(y.shape)
        return y

    @staticmethod
    def symbolic(
        g: Any,
        x: Any,
        w_tiles: Any,
        bias: Any,
        noise: Any,
        key: str,
    ) -> Any:
        inputs = [x, w_tiles]
        if bias is not None and not _is_none(bias):
            inputs.append(bias)
        if noise is not None and not _is_none(noise):
            inputs.append(noise)
        out = g.op(f"{DOMAIN}::CrossbarPending", *inputs, layer_s=key)
        # the traced output shape, so the exporter's shape inference need not guess (and warn)
        out.setType(x.type().with_sizes([None, *_ACTIVE[key].out_shape[1:]]))  # batch dynamic
        return out


def _is_none(value: Any) -> bool:
    node = getattr(value, "node", None)
    return node is not None and value.node().mustBeNone()


class _ExportStub(nn.Module):
    """Stands in for a crossbar layer during tracing; its buffers become the initializers."""

    def __init__(self, key: str, layer: CrossbarLayer) -> None:
        super().__init__()
        self.key = key
        self.register_buffer("w_tiles", layer.w_tiles.detach().float().clone())
        self.register_buffer(
            "bias", None if layer.bias is None else layer.bias.detach().float().clone()
        )
        noisy = layer.config.has_read_noise and layer.noise_tiles.numel() > 0
        self.register_buffer(
            "noise_tiles", layer.noise_tiles.detach().float().clone() if noisy else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CrossbarOp.apply(x, self.w_tiles, self.bias, self.noise_tiles, self.key)


class _WithSoftmax(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


# ====================================================================== function bodies
class _Body:
    """Accumulates the nodes of one function body with unique value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0
        self.streams: str | None = None  # bool mask of the input streams kept (bit slicing)

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        name = out or f"t{self._n}"
        self._n += 1
        self.nodes.append(oh.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", [], value=numpy_helper.from_array(arr))

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64)


def _f32(value: float) -> np.float32:
    return np.float32(value)


def _act(b: _Body, x: str, st: dict[str, Any]) -> str:
    """DoReFa input quantizer of a quantized layer (``act_bits``), as the simulator evaluates it."""
    bits = int(st.get("act_bits", 0) or 0)
    if not bits:
        return x
    n = b.const(_f32(2.0**bits - 1))
    if st.get("act_signed"):
        # torch: (clamp(x, -1, 1) + 1) * 0.5 * n, then 2 * q - 1 -- same operations, same order
        one = b.const(_f32(1.0))
        clipped = b.op("Clip", [x, b.const(_f32(-1.0)), one])
        r = b.op("Mul", [b.op("Mul", [b.op("Add", [clipped, one]), b.const(_f32(0.5))]), n])
    else:
        r = b.op("Mul", [b.op("Clip", [x, b.const(_f32(0.0)), b.const(_f32(1.0))]), n])
    # torch: (r + (round(r) - r).detach()) / n -- the same float operations in the same order
    q = b.op("Div", [b.op("Add", [r, b.op("Sub", [b.op("Round", [r]), r])]), n])
    if st.get("act_signed"):
        return b.op("Sub", [b.op("Mul", [q, b.const(_f32(2.0))]), b.const(_f32(1.0))])
    return q


def _dac(b: _Body, x: str, st: dict[str, Any]) -> str:
    """DAC exactly as the torch simulator's clipped straight-through quantizer evaluates it."""
    if not st["dac_bits"]:
        return x
    step = st["dac_step32"]
    lim = b.const(_f32(np.float32(st["dac_qmax"]) * step))
    clipped = b.op("Max", [b.op("Min", [x, lim]), b.op("Neg", [lim])])
    q = b.op("Mul", [b.op("Round", [b.op("Div", [clipped, b.const(step)])]), b.const(step)])
    # torch returns clipped + (q - clipped) (straight-through form); same float rounding here
    return b.op("Add", [clipped, b.op("Sub", [q, clipped])])


def _digits(b: _Body, x: str, st: dict[str, Any], skip_zero: bool = False) -> str:
    """Fixed-point input codes split into signed stream digits, concatenated on axis 0.

    With ``skip_zero``, streams whose digits are all zero are left out (``Compress``), as the
    simulator's no-noise path does: they contribute exactly zero. The last stream is always
    kept so that the shapes stay non-empty.

    Returns:
        Digits ``[S' * B, ...]``, stream-major; the kept streams' mask (``[S]`` bool, all true
        without ``skip_zero``) is left in ``b.streams`` for the shift-and-add.
    """
    qmax = 2 ** (st["input_bits"] - 1) - 1
    codes = b.op("Round", [b.op("Mul", [x, b.const(2.0 ** st["input_frac_bits"])])])
    codes = b.op("Clip", [codes, b.const(-qmax), b.const(qmax)])
    sign, mag = b.op("Sign", [codes]), b.op("Abs", [codes])
    a, n_s = st["stream_width"], st["n_streams"]
    parts = []
    radix = b.const(2.0**a)
    for k in range(n_s):
        shifted = b.op("Floor", [b.op("Div", [mag, b.const(2.0 ** (a * (n_s - 1 - k)))])])
        # shifted mod 2^a, exact for these small integers (onnxruntime's fmod Mod is ~10x slower)
        high = b.op("Mul", [b.op("Floor", [b.op("Div", [shifted, radix])]), radix])
        digit = b.op("Sub", [shifted, high])
        parts.append(b.op("Mul", [sign, digit]))
    if not skip_zero:
        b.streams = b.const(np.ones(n_s, dtype=bool), dtype=bool)
        return b.op("Concat", parts, axis=0)  # [S*B, ...], stream-major like the simulator
    stacked = b.op("Concat", [b.op("Unsqueeze", [d, b.ints([0])]) for d in parts], axis=0)
    flat = b.op("Reshape", [b.op("Abs", [stacked]), b.ints([n_s, -1])])
    nonzero = b.op("Greater", [b.op("ReduceMax", [flat, b.ints([1])], keepdims=0), b.const(0.0)])
    last = np.zeros(n_s, dtype=bool)
    last[-1] = True
    b.streams = b.op("Or", [nonzero, b.const(last, dtype=bool)])
    kept = b.op("Compress", [stacked, b.streams], axis=0)  # [S', B, ...]
    rest = b.op("Slice", [b.op("Shape", [x]), b.ints([1]), b.ints([1 << 30]), b.ints([0])])
    return b.op("Reshape", [kept, b.op("Concat", [b.ints([-1]), rest], axis=0)])


def _stream_coeff(b: _Body, st: dict[str, Any], shape: Sequence[int]) -> str:
    """Shift-and-add coefficients of the kept streams, ``[S', T]`` reshaped to ``shape``."""
    assert b.streams is not None
    full = b.const(_shift_coeff(st))  # [S, T]
    kept = b.op("Compress", [full, b.streams], axis=0)
    return b.op("Reshape", [kept, b.ints(list(shape))])


def _shift_coeff(st: dict[str, Any]) -> np.ndarray:
    a, b_w = st["stream_width"], st["slice_width"]
    n_s, n_t = st["n_streams"], st["n_slices"]
    coeff = np.array(
        [[2.0 ** (a * (n_s - 1 - s) + b_w * (n_t - 1 - t)) for t in range(n_t)] for s in range(n_s)]
    )
    return (coeff * 2.0 ** -(st["input_frac_bits"] + st["weight_frac_bits"])).astype(np.float32)


def _code_sum(b: _Body, q: str, axis: int, n_r: int, m: int) -> str:
    """Sum of integer ADC codes over the tile-row axis, as a MatMul with ones.

    onnxruntime's ReduceSum over a leading axis is ~3x slower than this GEMM; the codes are
    small integers, so every summation order gives the same exact result.

    Args:
        b: Body under construction.
        q: Codes ``[n_r, B', m]`` (axis 0) or ``[B', G, n_r, m, HW]`` (axis 2).
        axis: 0 or 2.
        n_r: Tile rows.
        m: Columns per tile row (``T*O``).
    """
    ones = b.const(np.ones((1, n_r), dtype=np.float32))
    if axis == 0:
        s = b.op("MatMul", [ones, b.op("Reshape", [q, b.ints([n_r, -1])])])  # [1, B'*m]
        return b.op("Reshape", [s, b.ints([-1, m])])
    s = b.op("MatMul", [ones, b.op("Reshape", [q, b.ints([0, 0, n_r, -1])])])  # [B', G, 1, m*HW]
    return b.op("Reshape", [s, b.ints([0, 0, m, -1])])


def _adc(
    b: _Body, p: str, st: dict[str, Any], axis: int, m: int, scale: np.float32 | None = None
) -> str:
    """Per-tile ADC codes, digital sum over the tile-row axis, times the step.

    ``p`` are partial sums in weight units, or (``scale`` given) already in ADC steps from
    weights folded by ``scale`` (see :func:`_folded_input`); then the Clip is left out where
    :func:`_adc_can_clip` shows it cannot act.
    """
    if not st["adc_bits"]:
        return b.op("ReduceSum", [p, b.ints([axis])], keepdims=0)
    step, qmax = st["adc_step32"], st["adc_qmax"]
    q = b.op("Round", [p if scale is not None else b.op("Div", [p, b.const(step)])])
    if scale is None or _adc_can_clip(st, scale):
        q = b.op("Clip", [q, b.const(_f32(-qmax)), b.const(_f32(qmax))])
    return b.op("Mul", [_code_sum(b, q, axis, st["n_row_tiles"], m), b.const(step)])


def _noise(b: _Body, var: str, like: str, seed: int) -> str:
    std = b.op("Sqrt", [b.op("Max", [var, b.const(0.0)])])
    return b.op("Mul", [std, b.op("RandomNormalLike", [like], seed=float(seed))])


def _dense_weight(b: _Body, w: str, st: dict[str, Any]) -> str:
    """``w_tiles`` -> assembled effective matrix ``[G, K, O]`` (slices shifted and summed)."""
    g, n_r, n = st["groups"], st["n_row_tiles"], st["tile_size"]
    k, o, n_t = st["rows_per_group"], st["cols_per_group"], st["n_slices"]
    full = b.op("Reshape", [w, b.ints([g, n_r * n, n_t, o])])
    full = b.op("Slice", [full, b.ints([0]), b.ints([k]), b.ints([1])])
    if st["bit_slicing"]:
        coeff = np.array([2.0 ** (st["slice_width"] * (n_t - 1 - t)) for t in range(n_t)])
        coeff = (coeff * 2.0 ** -st["weight_frac_bits"]).astype(np.float32).reshape(1, 1, -1, 1)
        return b.op("ReduceSum", [b.op("Mul", [full, b.const(coeff)]), b.ints([2])], keepdims=0)
    return b.op("Reshape", [full, b.ints([g, k, o])])


def _converted_input(b: _Body, st: dict[str, Any], tiled: bool) -> str:
    """The layer input as the array sees it: DoReFa quantizer, then DAC, fixed point or digits.

    Bit-sliced layers that need no per-tile work collapse their streams back into one
    fixed-point input (the same function); tiled ones keep the stream digits on axis 0.
    """
    x0 = _act(b, "X", st)
    if st["bit_slicing"] and not tiled:
        qmax = 2 ** (st["input_bits"] - 1) - 1
        codes = b.op("Round", [b.op("Mul", [x0, b.const(2.0 ** st["input_frac_bits"])])])
        codes = b.op("Clip", [codes, b.const(-qmax), b.const(qmax)])
        return b.op("Mul", [codes, b.const(2.0 ** -st["input_frac_bits"])])
    if st["bit_slicing"]:
        return _digits(b, x0, st)
    return _dac(b, x0, st)


def _folded_input(b: _Body, st: dict[str, Any]) -> tuple[str, np.float32]:
    """Noise-free ADC layers: the input as integer DAC codes (or digits) and the weight scale.

    As the simulator's no-grad path does, the DAC step and the ADC step are folded into the
    weights (``W * dac_step / adc_step``, constant-folded by onnxruntime), so the partial sums
    come out in ADC steps and need only Round, Clip and the sum: two fewer passes over the
    largest tensors of the graph.
    """
    x0 = _act(b, "X", st)
    adc = float(st["adc_step32"])
    if st["bit_slicing"]:
        return _digits(b, x0, st, skip_zero=True), np.float32(1.0 / adc)
    if not st["dac_bits"]:
        return x0, np.float32(1.0 / adc)
    step, qmax = st["dac_step32"], st["dac_qmax"]
    codes = b.op("Round", [b.op("Div", [x0, b.const(step)])])
    codes = b.op("Clip", [codes, b.const(_f32(-qmax)), b.const(_f32(qmax))])
    return codes, np.float32(float(step) / adc)


def _adc_can_clip(st: dict[str, Any], scale: np.float32) -> bool:
    """Whether any folded partial sum can reach the ADC clip level (else Clip is a no-op).

    Bound: largest column L1 norm of a scaled tile times the largest input magnitude (DAC
    code or stream digit); without a DAC the input is unbounded.
    """
    if st["bit_slicing"]:
        x_max = float(2 ** st["stream_width"] - 1)
    elif st["dac_bits"]:
        x_max = float(st["dac_qmax"])
    else:
        return True
    w = st["w_tiles"].double() * float(scale)
    l1 = float(w.abs().sum(-2).max()) if w.numel() else 0.0
    return l1 * x_max * (1 + 1e-5) > st["adc_qmax"] + 0.25


def _scaled(b: _Body, w: str, scale: np.float32) -> str:
    return w if scale == 1.0 else b.op("Mul", [w, b.const(scale)])


def _gemm_body(st: dict[str, Any], has_bias: bool, noisy: bool, seed: int) -> _Body:
    b = _Body()
    n_r, n, k = st["n_row_tiles"], st["tile_size"], st["rows_per_group"]
    o, n_t = st["cols_per_group"], st["n_slices"]
    tiled = bool(st["adc_bits"]) or (st["bit_slicing"] and noisy)
    folded = bool(st["adc_bits"]) and not noisy
    if folded:
        xin, scale = _folded_input(b, st)
    else:
        xin, scale = _converted_input(b, st, tiled), np.float32(1.0)
    if not tiled:
        wd = b.op("Reshape", [_dense_weight(b, "W", st), b.ints([k, o])])
        y = b.op("MatMul", [xin, wd])
        if noisy:
            nd = b.op("Reshape", ["NZ", b.ints([n_r * n, o])])
            nd = b.op("Slice", [nd, b.ints([0]), b.ints([k]), b.ints([0])])
            var = b.op("MatMul", [b.op("Mul", [xin, xin]), nd])
            y = b.op("Add", [y, _noise(b, var, y, seed)])
    else:
        xp = xin
        if n_r * n > k:
            xp = b.op("Pad", [xin, b.ints([0, 0, 0, n_r * n - k])])
        xt = b.op("Transpose", [b.op("Reshape", [xp, b.ints([-1, n_r, n])])], perm=[1, 0, 2])
        wt = b.op("Reshape", [_scaled(b, "W", scale), b.ints([n_r, n, n_t * o])])
        p = b.op("MatMul", [xt, wt])  # [n_r, B', T*O]
        if noisy:
            nt = b.op("Reshape", ["NZ", b.ints([n_r, n, n_t * o])])
            var = b.op("MatMul", [b.op("Mul", [xt, xt]), nt])
            p = b.op("Add", [p, _noise(b, var, p, seed)])
        # [B', T*O]
        y = _adc(b, p, st, 0, n_t * o, scale if folded else None)
        if st["bit_slicing"]:
            coeff = _stream_coeff(b, st, [-1, 1, n_t, 1])  # [S', 1, T, 1]
            s_kept = b.op("Slice", [b.op("Shape", [coeff]), b.ints([0]), b.ints([1]), b.ints([0])])
            shape = b.op("Concat", [s_kept, b.ints([-1, n_t, o])], axis=0)
            y = b.op("Reshape", [y, shape])  # [S', B, T, O]
            y = b.op("ReduceSum", [b.op("Mul", [y, coeff]), b.ints([0, 2])], keepdims=0)
    if has_bias:
        y = b.op("Add", [y, "B"])
    b.op("Identity", [y], out="Y")
    return b


def _conv_tiling(layer: CrossbarConv2d) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Channel gather index, kernel-row index and validity mask of the per-tile grouped conv."""
    n = layer.config.tile_size
    kh, kw = layer.kernel_size
    taps = kh * kw
    k, n_r, n_g = layer.rows_per_group, layer.n_row_tiles, layer.groups
    cin_g = layer.in_channels // n_g
    r = np.arange(n_r)
    first = r * n
    last = np.minimum((r + 1) * n, k) - 1
    c0 = first // taps
    c_max = int((last // taps - c0).max()) + 1
    m = np.arange(c_max)
    rows = (c0[:, None, None] + m[None, :, None]) * taps + np.arange(taps)[None, None, :]
    valid = (rows >= first[:, None, None]) & (rows <= last[:, None, None])
    rows_c = np.where(valid, rows, 0)
    chan = np.minimum(c0[:, None] + m[None, :], cin_g - 1)
    chan_index = (np.arange(n_g)[:, None, None] * cin_g + chan[None]).reshape(-1)
    return chan_index.astype(np.int64), rows_c.reshape(-1).astype(np.int64), valid, c_max


def _conv_attrs(st: dict[str, Any]) -> dict[str, Any]:
    kh, kw = st["kernel_size"]
    pads = st["pads"]
    return {
        "kernel_shape": [kh, kw],
        "strides": list(st["stride"]),
        "pads": list(pads),
        "dilations": list(st["dilation"]),
    }


def _conv_body(
    st: dict[str, Any], layer: CrossbarConv2d, has_bias: bool, noisy: bool, seed: int
) -> _Body:
    b = _Body()
    g, n_r, n, _k = st["groups"], st["n_row_tiles"], st["tile_size"], st["rows_per_group"]
    o, n_t = st["cols_per_group"], st["n_slices"]
    kh, kw = st["kernel_size"]
    attrs = _conv_attrs(st)
    tiled = bool(st["adc_bits"]) or (st["bit_slicing"] and noisy)
    cin_g = layer.in_channels // g
    folded = bool(st["adc_bits"]) and not noisy
    if folded:
        xin, scale = _folded_input(b, st)
    else:
        xin, scale = _converted_input(b, st, tiled), np.float32(1.0)
    if not tiled:

        def dense(w: str) -> str:  # [G, K, O] -> [G*O, Cin/G, kh, kw]
            m = _dense_weight(b, w, st) if w == "W" else _noise_dense(b, st)
            m = b.op("Transpose", [m], perm=[0, 2, 1])
            return b.op("Reshape", [m, b.ints([g * o, cin_g, kh, kw])])

        inputs = [xin, dense("W")] + (["B"] if has_bias and not noisy else [])
        y = b.op("Conv", inputs, group=g, **attrs)
        if noisy:
            var = b.op("Conv", [b.op("Mul", [xin, xin]), dense("NZ")], group=g, **attrs)
            y = b.op("Add", [y, _noise(b, var, y, seed)])
            if has_bias:
                y = b.op("Add", [y, b.op("Reshape", ["B", b.ints([1, -1, 1, 1])])])
        b.op("Identity", [y], out="Y")
        return b
    chan_index, rows_c, valid, c_max = _conv_tiling(layer)
    taps = kh * kw
    m_cols = n_t * o

    def split(w: str) -> str:  # [G, n_r, N, T*O] -> [G*n_r*T*O, c_max, kh, kw] masked kernels
        flat = b.op("Reshape", [w, b.ints([g, n_r * n, m_cols])])
        gathered = b.op("Gather", [flat, b.ints(rows_c.tolist())], axis=1)
        gathered = b.op("Reshape", [gathered, b.ints([g, n_r, c_max, taps, m_cols])])
        mask = valid.reshape(1, n_r, c_max, taps, 1).astype(np.float32)
        gathered = b.op("Mul", [gathered, b.const(mask)])
        gathered = b.op("Transpose", [gathered], perm=[0, 1, 4, 2, 3])
        return b.op("Reshape", [gathered, b.ints([g * n_r * m_cols, c_max, kh, kw])])

    identity = chan_index.size == layer.in_channels and bool(
        (chan_index == np.arange(layer.in_channels)).all()
    )
    xg = xin if identity else b.op("Gather", [xin, b.ints(chan_index.tolist())], axis=1)
    kernels = _scaled(b, split("W"), scale)
    p4 = b.op("Conv", [xg, kernels], group=g * n_r, **attrs)  # [B', G*n_r*M, Ho, Wo]
    spatial = b.op("Slice", [b.op("Shape", [p4]), b.ints([2]), b.ints([4]), b.ints([0])])
    p = b.op("Reshape", [p4, b.ints([0, g, n_r, m_cols, -1])])
    if noisy:
        var4 = b.op("Conv", [b.op("Mul", [xg, xg]), split("NZ")], group=g * n_r, **attrs)
        var = b.op("Reshape", [var4, b.ints([0, g, n_r, m_cols, -1])])
        p = b.op("Add", [p, _noise(b, var, p, seed)])
    y = _adc(b, p, st, 2, m_cols, scale if folded else None)  # [B', G, M, HW]
    if st["bit_slicing"]:
        coeff = _stream_coeff(b, st, [-1, 1, 1, n_t, 1, 1])  # [S', 1, 1, T, 1, 1]
        s_kept = b.op("Slice", [b.op("Shape", [coeff]), b.ints([0]), b.ints([1]), b.ints([0])])
        hw = b.op("Slice", [b.op("Shape", [y]), b.ints([3]), b.ints([4]), b.ints([0])])
        shape = b.op("Concat", [s_kept, b.ints([-1, g, n_t, o]), hw], axis=0)
        y = b.op("Reshape", [y, shape])  # [S', B, G, T, O, HW]
        y = b.op("ReduceSum", [b.op("Mul", [y, coeff]), b.ints([0, 3])], keepdims=0)
    shape = b.op("Concat", [b.ints([0, g * o]), spatial], axis=0)
    y = b.op("Reshape", [y, shape])
    if has_bias:
        y = b.op("Add", [y, b.op("Reshape", ["B", b.ints([1, -1, 1, 1])])])
    b.op("Identity", [y], out="Y")
    return b


def _noise_dense(b: _Body, st: dict[str, Any]) -> str:
    g, n_r, n = st["groups"], st["n_row_tiles"], st["tile_size"]
    k, o = st["rows_per_group"], st["cols_per_group"]
    full = b.op("Reshape", ["NZ", b.ints([g, n_r * n, o])])
    return b.op("Slice", [full, b.ints([0]), b.ints([k]), b.ints([1])])


# ====================================================================== node attributes
def _layer_state(layer: CrossbarLayer) -> dict[str, Any]:
    """``programmed_state`` plus converter steps computed in float32 as the simulator does."""
    st: dict[str, Any] = dict(layer.programmed_state())
    cfg = layer.config
    if st["dac_bits"]:
        st["dac_step32"] = np.float32(
            torch.clamp(layer.dac_range.float(), min=1e-30) / st["dac_qmax"]
        )
    if st["adc_bits"]:
        if cfg.bit_slicing:
            st["adc_step32"] = np.float32(st["adc_step"])
        else:
            st["adc_step32"] = np.float32(
                torch.clamp(layer.adc_range.float(), min=1e-30) / st["adc_qmax"]
            )
    if isinstance(layer, CrossbarConv2d):
        kh, kw = layer.kernel_size
        st["pads"] = _onnx_pads(layer)
        st["kernel_size"] = [kh, kw]
    return st


def _onnx_pads(layer: CrossbarConv2d) -> list[int]:
    pad = layer.padding
    if isinstance(pad, str):
        if pad == "valid":
            return [0, 0, 0, 0]
        if pad == "same" and tuple(layer.stride) == (1, 1):
            total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
            begin = [t // 2 for t in total]
            return [begin[0], begin[1], total[0] - begin[0], total[1] - begin[1]]
        raise ExportError(f"Conv2d padding={pad!r} with stride {layer.stride} cannot be exported")
    ph, pw = pad
    return [ph, pw, ph, pw]


def _node_attributes(spec: _LayerSpec, has_bias: bool, noisy: bool) -> dict[str, Any]:
    st, cfg = spec.state, spec.layer.config
    attrs: dict[str, Any] = {
        "tile_size": int(st["tile_size"]),
        "groups": int(st["groups"]),
        "rows_per_group": int(st["rows_per_group"]),
        "cols_per_group": int(st["cols_per_group"]),
        "n_row_tiles": int(st["n_row_tiles"]),
        "n_slices": int(st["n_slices"]),
        "act_bits": int(st.get("act_bits", 0) or 0),
        "act_signed": int(bool(st.get("act_signed"))),
        "dac_bits": int(st["dac_bits"]),
        "dac_qmax": int(st.get("dac_qmax", 0)),
        "dac_step": float(st.get("dac_step32", 0.0)),
        "adc_bits": int(st["adc_bits"]),
        "adc_qmax": int(st.get("adc_qmax", 0)),
        "adc_step": float(st.get("adc_step32", 0.0)),
        "bit_slicing": int(bool(st["bit_slicing"])),
        "input_bits": int(st["input_bits"]),
        "input_frac_bits": int(st["input_frac_bits"]),
        "weight_frac_bits": int(st["weight_frac_bits"]),
        "stream_width": int(st["stream_width"]),
        "slice_width": int(st["slice_width"]),
        "n_streams": int(st["n_streams"]),
        "read_noise": int(noisy),
        "read_noise_sigma": float(cfg.read_noise_sigma if noisy else 0.0),
        "seed": int(spec.noise_seed),
        "has_bias": int(has_bias),
    }
    if st["kind"] == "conv2d":
        attrs.update(_conv_attrs(st))
    return attrs


def _overload(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", key) or "root"


def crossbar_functions(model: onnx.ModelProto, specs: dict[str, _LayerSpec]) -> onnx.ModelProto:
    """Turn the traced placeholder nodes into ``nvmpriv`` nodes with their function bodies.

    Args:
        model: The traced model (placeholder nodes carry a ``layer`` attribute).
        specs: Layer key -> spec.

    Returns:
        The same model, modified in place.
    """
    functions = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        key = next(a.s.decode() for a in node.attribute if a.name == "layer")
        spec = specs[key]
        has_bias = "bias" in spec.state
        noisy = len(node.input) == (4 if has_bias else 3)
        conv = spec.state["kind"] == "conv2d"
        node.op_type = "CrossbarConv" if conv else "CrossbarGemm"
        node.overload = _overload(key)
        attrs = _node_attributes(spec, has_bias, noisy)
        del node.attribute[:]
        node.attribute.extend(oh.make_attribute(k, v) for k, v in sorted(attrs.items()))
        if conv:
            assert isinstance(spec.layer, CrossbarConv2d)
            body = _conv_body(spec.state, spec.layer, has_bias, noisy, spec.noise_seed)
        else:
            body = _gemm_body(spec.state, has_bias, noisy, spec.noise_seed)
        inputs = ["X", "W"] + (["B"] if has_bias else []) + (["NZ"] if noisy else [])
        fn = oh.make_function(
            DOMAIN,
            node.op_type,
            inputs,
            ["Y"],
            body.nodes,
            [oh.make_opsetid("", OPSET)],
            attributes=sorted(attrs),
            doc_string=f"crossbar layer {key!r} (see nvmpriv.crossbar.CrossbarLayer)",
            overload=node.overload,
        )
        functions.append(fn)
    model.functions.extend(functions)
    return model


# ====================================================================== export
def _metadata(
    config: CrossbarConfig | None,
    *,
    chip_seed: int | None,
    split_hash: str | None,
    input_shape: Sequence[int],
    num_classes: int,
    calibration: str,
    extra: dict[str, str] | None,
    noise_seed: int | None = None,
) -> dict[str, str]:
    meta = {
        "nvmpriv.version": __version__,
        "nvmpriv.crossbar": DIGITAL
        if config is None
        else json.dumps(config.to_dict(), default=str),
        "nvmpriv.crossbar_name": DIGITAL if config is None else config.name,
        "nvmpriv.chip_seed": "" if chip_seed is None or config is None else str(int(chip_seed)),
        # base seed of the per-query read noise (node i draws from noise_seed + i); "" without
        "nvmpriv.noise_seed": "" if noise_seed is None else str(int(noise_seed)),
        "nvmpriv.split_hash": split_hash or "",
        "nvmpriv.input_name": INPUT_NAME,
        "nvmpriv.output_name": OUTPUT_NAME,
        "nvmpriv.output": "probabilities",
        "nvmpriv.input_shape": json.dumps([int(d) for d in input_shape]),
        "nvmpriv.num_classes": str(int(num_classes)),
        "nvmpriv.opset": str(OPSET),
        "nvmpriv.domain_version": str(DOMAIN_VERSION),
        "nvmpriv.calibration": calibration,
    }
    meta.update(extra or {})
    return meta


def resolve_output(output: str | os.PathLike[str] | None, name: str) -> Path:
    """The output path: ``output`` as given, or ``exports/<name>.onnx``.

    Args:
        output: Requested path or ``None``.
        name: Default file stem.

    Returns:
        The path (``.onnx`` suffix enforced).

    Raises:
        ExportError: If the suffix is not ``.onnx``.
    """
    path = DEFAULT_FOLDER / f"{name}.onnx" if output is None else Path(output)
    if path.suffix != ".onnx":
        raise ExportError(f"--output {path} must end in .onnx; e.g. exports/{name}.onnx")
    return path


def _atomic_write_bytes(path: Path, data: bytes, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; pass --overwrite or choose another --output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ExportError(
            f"--output {path}: {path.parent} is not a folder (a file is in the way); choose "
            "another --output"
        ) from None
    fd, tmp = mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not overwrite:
            # link() refuses an existing destination: no window where another writer is clobbered
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ExportError(
                    f"{path} already exists; pass --overwrite or choose another --output"
                ) from None
            except OSError:
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def export_model(
    net: nn.Module,
    config: CrossbarConfig | None,
    output: str | os.PathLike[str],
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    chip_seed: int = 0,
    calibration: np.ndarray | torch.Tensor | None = None,
    calibration_note: str = "",
    split_hash: str | None = None,
    noise_seed: int | None = None,
    overwrite: bool = False,
    check: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``net`` (digital, or programmed onto a chip) to an ONNX file.

    Args:
        net: The trained digital network (inputs -> logits); left untouched.
        config: Crossbar configuration, or ``None`` for the plain digital model.
        output: Destination ``.onnx`` path (written atomically).
        input_shape: Shape of one input without the batch dimension (e.g. ``[64]``).
        num_classes: Number of classes (inferred from a forward pass when ``None``).
        chip_seed: Chip seed (one config + seed = one chip, as :func:`nvmpriv.crossbar.convert`).
        calibration: Batch that calibrates DAC/ADC full scale (required when the config has a
            DAC/ADC); the training audit uses the first 256 rows of ``target_train``.
        calibration_note: Where the calibration batch came from (stored in the metadata).
        split_hash: Membership split hash of the run (stored in the metadata).
        noise_seed: Base seed of the per-query read-noise generators (node ``i`` gets
            ``noise_seed + i``); default ``chip_seed``.
        overwrite: Replace an existing file.
        check: Run ``onnx.checker.check_model(full_check=True)`` before writing.
        metadata: Extra ``metadata_props`` entries.

    Returns:
        The written path.

    Raises:
        ExportError: If the file exists and ``overwrite`` is false, or calibration is missing.
    """
    path = Path(output)
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; pass --overwrite or choose another --output")
    data = export_bytes(
        net,
        config,
        input_shape=input_shape,
        num_classes=num_classes,
        chip_seed=chip_seed,
        calibration=calibration,
        calibration_note=calibration_note,
        split_hash=split_hash,
        noise_seed=noise_seed,
        check=check,
        metadata=metadata,
    )
    _atomic_write_bytes(path, data, overwrite)
    return path


def _check_finite(net: nn.Module, probe: torch.Tensor, what: str) -> None:
    """Refuse to export a model whose outputs on the calibration rows are not finite."""
    # forked: a chip's read noise must not shift the caller's random stream
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        finite = bool(torch.isfinite(net(probe)).all())
    if not finite:
        raise ExportError(
            f"{what} gives non-finite outputs on the calibration batch; check the checkpoint "
            "(a diverged run?) and the crossbar's parameters"
        )


def export_bytes(
    net: nn.Module,
    config: CrossbarConfig | None,
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    chip_seed: int = 0,
    calibration: np.ndarray | torch.Tensor | None = None,
    calibration_note: str = "",
    split_hash: str | None = None,
    noise_seed: int | None = None,
    check: bool = True,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Like :func:`export_model` but return the serialized model instead of writing it.

    Args:
        net: See :func:`export_model`.
        config: See :func:`export_model`.
        input_shape: See :func:`export_model`.
        num_classes: See :func:`export_model`.
        chip_seed: See :func:`export_model`.
        calibration: See :func:`export_model`.
        calibration_note: See :func:`export_model`.
        split_hash: See :func:`export_model`.
        noise_seed: See :func:`export_model`.
        check: See :func:`export_model`.
        metadata: See :func:`export_model`.

    Returns:
        The ONNX model bytes.

    Raises:
        ExportError: If the config has a DAC/ADC and no calibration batch is given.
    """
    net = copy.deepcopy(net).cpu().float().eval()
    for param in net.parameters():
        param.requires_grad_(False)
    shape = [int(d) for d in input_shape]
    example = torch.zeros(2, *shape)
    specs: dict[str, _LayerSpec] = {}
    noise_base: int | None = None
    if config is None:
        probe = example if calibration is None else np.asarray(calibration)[:64]
        _check_finite(net, torch.as_tensor(probe).float(), "the digital net")
    if config is not None:
        if config.needs_calibration and calibration is None:
            raise ExportError(
                f"crossbar {config.name!r} has a DAC/ADC: give a calibration batch "
                "(the audit uses the first 256 rows of target_train)"
            )
        calib = None if calibration is None else torch.as_tensor(np.asarray(calibration)).float()
        try:
            chip = convert(net, config, seed=int(chip_seed), calibration=calib).eval()
        except ValueError as exc:
            raise ExportError(f"crossbar {config.name!r}: {exc}") from None
        _check_finite(chip, example if calib is None else calib[:64], f"crossbar {config.name!r}")
        for param in chip.parameters():
            param.requires_grad_(False)  # traced as constants inside the placeholder op
        if calib is not None:
            example = calib[:2].clone()
        base = int(chip_seed if noise_seed is None else noise_seed)
        layers = crossbar_layers(chip)
        if config.has_read_noise:
            noise_base = base
            try:
                check_noise_seed(base, len(layers))
            except ValueError as exc:
                which = "--seed (the default noise seed)" if noise_seed is None else "--noise-seed"
                raise ExportError(f"{which}: {exc}") from None
        for i, (name, layer) in enumerate(layers.items()):
            key = name or "root"
            specs[key] = _LayerSpec(key, layer, _layer_state(layer), base + i)
        mapping = {id(s.layer): _ExportStub(k, s.layer) for k, s in specs.items()}
        if isinstance(chip, CrossbarLayer):
            chip = mapping[id(chip)]
        else:
            for parent in list(chip.modules()):
                for attr, child in list(parent._modules.items()):
                    if child is not None and id(child) in mapping:
                        parent._modules[attr] = mapping[id(child)]
        net = chip
    wrapped = _WithSoftmax(net).eval()
    buffer = io.BytesIO()
    _ACTIVE.clear()
    _ACTIVE.update(specs)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if num_classes is None:
                num_classes = int(wrapped(example).shape[1])
            torch.onnx.export(
                wrapped,
                (example,),
                buffer,  # type: ignore[arg-type]  # a file object is accepted
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
                custom_opsets={DOMAIN: DOMAIN_VERSION} if specs else None,
                do_constant_folding=True,
            )
    finally:
        _ACTIVE.clear()
    model = onnx.load_from_string(buffer.getvalue())
    if specs:
        crossbar_functions(model, specs)
        model.ir_version = max(model.ir_version, IR_VERSION)
    model.producer_name = "nvmpriv"
    model.producer_version = __version__
    model.doc_string = (
        "nvmpriv export: input 'input' [batch, *input_shape] -> 'probabilities' [batch, C]; "
        f"crossbar nodes in domain '{DOMAIN}' v{DOMAIN_VERSION} carry their ONNX function "
        f"(opset {OPSET}), see nvmpriv.export"
    )
    meta = _metadata(
        config,
        chip_seed=chip_seed,
        split_hash=split_hash,
        input_shape=shape,
        num_classes=int(num_classes),
        calibration=calibration_note,
        extra=metadata,
        noise_seed=noise_base,
    )
    oh.set_model_props(model, meta)
    oh.set_model_props(model, {**meta, CONTENT_DIGEST_KEY: content_digest(model)})
    if check:
        onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


# ====================================================================== loading a run
def _read_run_config(cfg_file: Path, overrides: Sequence[tuple[str, Any]]) -> Any:
    """The run's YAML with the ``--set`` overrides applied (not validated further)."""
    from nvmpriv.yamlfile import read_yaml, set_dotted

    if not cfg_file.is_file():
        raise ExportError(f"--config {cfg_file} not found; give the training YAML")
    cfg = read_yaml(cfg_file, "--config") or {}
    for key, value in overrides:
        if not isinstance(cfg, dict):
            break  # the caller reports a config that is not a mapping
        try:
            set_dotted(cfg, key, value)
        except ValueError as exc:
            raise ExportError(f"--set: {exc}") from None
    return cfg


def load_run(
    config_path: str | os.PathLike[str],
    ckpt_path: str | os.PathLike[str] | None,
    overrides: Sequence[tuple[str, Any]] = (),
) -> tuple[nn.Module, Any]:
    """The trained net and the data module of a run (split restored from the checkpoint).

    Args:
        config_path: Training config YAML (the one given to ``fit`` or the run's config.yaml).
        ckpt_path: Lightning checkpoint (``state_dict`` keys ``net.*``); ``None`` keeps the
            freshly initialised net (for tests).
        overrides: ``(dotted key, value)`` pairs set in the config before anything is built,
            e.g. ``("data.init_args.root", "/new/place")`` when the data has moved.

    Returns:
        ``(net, datamodule)``.

    Raises:
        ExportError: On a missing or malformed file.
    """
    cfg_file = Path(config_path)
    cfg = _read_run_config(cfg_file, overrides)
    if (
        not isinstance(cfg, dict)
        or not isinstance(cfg.get("model"), dict)
        or not isinstance(cfg.get("data"), dict)
    ):
        raise ExportError(f"--config {cfg_file} needs 'model' and 'data' sections (a fit config)")
    model_args = (cfg["model"] or {}).get("init_args") or {}
    if not isinstance(model_args, dict) or not isinstance(model_args.get("net"), dict):
        raise ExportError(
            f"--config {cfg_file}: model.init_args.net is missing or not a class_path mapping"
        )
    net: nn.Module = instantiate(model_args["net"])
    dm = instantiate(cfg["data"])
    if ckpt_path is not None:
        ckpt_file = Path(ckpt_path)
        try:
            check_checkpoint_file(ckpt_file)
        except (FileNotFoundError, ValueError) as exc:
            raise ExportError(str(exc)) from None
        try:
            ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ExportError(
                f"{ckpt_file} is not a readable checkpoint ({type(exc).__name__}); give a "
                "Lightning .ckpt written by nvmpriv"
            ) from exc
        state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
        net_state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        if not net_state:
            raise ExportError(f"{ckpt_file} has no 'net.*' weights; is it an nvmpriv checkpoint?")
        try:
            net.load_state_dict(net_state)
        except RuntimeError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), "")
            raise ExportError(
                f"{ckpt_file} does not fit the net of --config {cfg_file} ({first}); give the "
                "config the checkpoint was trained with"
            ) from None
        dm_state = ckpt.get(type(dm).__qualname__)
        if dm_state is not None:
            dm.load_state_dict(dm_state)
    net.eval()
    return net, dm


def _parser() -> CommandParser:
    p = CommandParser(
        prog="python -m nvmpriv export",
        description="Export a trained model (digital or on a simulated crossbar chip) to ONNX.",
    )
    p.add_argument("--config", required=True, help="training config YAML of the run")
    p.add_argument(
        "--ckpt_path",
        required=True,
        help="Lightning checkpoint (.ckpt), or 'last': the newest last.ckpt of the config's run "
        "folders, as fit --ckpt_path last finds it",
    )
    p.add_argument(
        "--crossbar", default=DIGITAL, help="'digital', a preset name or a YAML of config fields"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="chip seed (default 0)")
    p.add_argument(
        "--noise-seed", type=nonnegative_int, default=None, help="base seed of per-query read noise"
    )
    p.add_argument(
        "--calibration-samples",
        type=positive_int,
        default=256,
        help="rows of target_train that calibrate DAC/ADC (default 256, as CrossbarAudit)",
    )
    p.add_argument(
        "--calibration-role", default="target_train", help="split role used for calibration"
    )
    p.add_argument(
        "--output",
        default=None,
        help="output .onnx (default exports/<run>_<crossbar>[_seed<S>].onnx)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the run's config before loading (YAML value), e.g. "
        "data.init_args.root=/new/place when the data has moved",
    )
    return p


def export_stem(prefix: str, config: CrossbarConfig | None, chip_seed: int) -> str:
    """File stem of an export: ``<prefix>_digital`` or ``<prefix>_<preset>_seed<S>``."""
    if config is None:
        return f"{prefix}_{DIGITAL}"
    return f"{prefix}_{config.name}_seed{chip_seed}"


def run_name(config_path: str | os.PathLike[str], ckpt_path: str | os.PathLike[str]) -> str:
    """The run an export belongs to, named as the ``ExportOnnx`` callback names it.

    ``<logs>/<name>/<version>/checkpoints/x.ckpt`` (or a run folder's ``config.yaml``, beside its
    ``splits.npz``) gives ``<name>_<version>``, so exports of different runs never share a file name; any other
    layout falls back to the config's file stem.

    Args:
        config_path: Training config YAML.
        ckpt_path: Lightning checkpoint.

    Returns:
        The run name.
    """
    ckpt = Path(os.path.abspath(ckpt_path))  # "..", "." and relative paths name real folders
    if ckpt.parent.name == "checkpoints" and ckpt.parents[1].name and ckpt.parents[2].name:
        return f"{ckpt.parents[2].name}_{ckpt.parents[1].name}"
    cfg = Path(os.path.abspath(config_path))
    if cfg.name == "config.yaml" and (cfg.parent / "splits.npz").is_file() and cfg.parents[1].name:
        return f"{cfg.parents[1].name}_{cfg.parent.name}"
    return Path(config_path).stem


def export_run(
    net: nn.Module,
    dm: Any,
    config: CrossbarConfig | None,
    output: str | os.PathLike[str],
    *,
    chip_seed: int = 0,
    calibration_samples: int = 256,
    calibration_role: str = "target_train",
    noise_seed: int | None = None,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export a run's net, calibrated like the training audit, with the run's split hash.

    Args:
        net: The trained net.
        dm: The run's ``MembershipDataModule`` (split already set up).
        config: Crossbar configuration, or ``None`` for the digital model.
        output: Destination ``.onnx``.
        chip_seed: Chip seed.
        calibration_samples: First rows of ``calibration_role`` that calibrate DAC/ADC (the
            audit's ``CrossbarAudit.calibration_samples`` uses the same rows).
        calibration_role: Split role of the calibration rows.
        noise_seed: See :func:`export_model`.
        overwrite: Replace an existing file.
        metadata: Extra ``metadata_props`` entries.

    Returns:
        The written path.
    """
    if calibration_samples < 1:
        raise ExportError(f"calibration_samples={calibration_samples} must be >= 1")
    x_cal = dm.arrays(calibration_role, limit=calibration_samples)[0]
    splits = getattr(dm, "splits", None)
    return export_model(
        net,
        config,
        output,
        input_shape=list(x_cal.shape[1:]),
        num_classes=getattr(dm, "num_classes", None) or None,
        chip_seed=chip_seed,
        calibration=x_cal,
        calibration_note=f"first {len(x_cal)} rows of {calibration_role}",
        split_hash=None if splits is None else splits.split_hash,
        noise_seed=noise_seed,
        overwrite=overwrite,
        metadata=metadata,
    )


def _resolve_last(config_path: str, overrides: Sequence[tuple[str, Any]]) -> str:
    """``--ckpt_path last``: the newest ``last.ckpt`` under the config's logger, as ``fit``."""
    from nvmpriv.ckptfile import last_checkpoint_of_config

    cfg = _read_run_config(Path(config_path), overrides)
    found = last_checkpoint_of_config(cfg) if isinstance(cfg, dict) else None
    if found is None:
        raise ExportError(
            f"--ckpt_path last: no version folder of the logger in {config_path} holds "
            "checkpoints/last.ckpt; pass the checkpoint file itself"
        )
    return str(found)


def cli_main(argv: list[str]) -> int:
    """``python -m nvmpriv export``.

    Args:
        argv: Arguments after ``export``.

    Returns:
        Exit code (0 on success).

    Raises:
        ExportError: On invalid options (printed as one line by ``nvmpriv.__main__``).
    """
    from nvmpriv.yamlfile import parse_override

    args = _parser().parse_args(argv)
    try:
        overrides = [
            parse_override(item, "--set", example="data.init_args.root=/data") for item in args.set
        ]
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    config = load_crossbar(args.crossbar)
    ckpt_path = (
        _resolve_last(args.config, overrides) if args.ckpt_path == "last" else args.ckpt_path
    )
    net, dm = load_run(args.config, ckpt_path, overrides)
    run = run_name(args.config, ckpt_path)
    name = export_stem(run, config, args.seed)
    path = export_run(
        net,
        dm,
        config,
        resolve_output(args.output, name),
        chip_seed=args.seed,
        calibration_samples=args.calibration_samples,
        calibration_role=args.calibration_role,
        noise_seed=args.noise_seed,
        overwrite=args.overwrite,
        metadata={"nvmpriv.run": run, "nvmpriv.crossbar_spec": args.crossbar},
    )
    chip = DIGITAL if config is None else f"{config.name}, chip seed {args.seed}"
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, crossbar {chip})")
    return 0
