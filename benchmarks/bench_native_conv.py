"""The native kernel's convolution paths, and the runtime's epilogue fusion (issue 7).

Part 1, side by side in one process on the same operands (64-row tiles, ADC clip 20, bias and
ReLU in the epilogue): the three kernel paths of a crossbar convolution,

* ``gathered``: panels of 64 output positions gathered from the padded input (im2col per panel);
* ``rows``: row segments, 16 adjacent output positions of an output row loaded straight from the
  input (stride 1 along the width, at least 16 output columns);
* ``direct``: positions by channel vectors, inputs broadcast from the input (weights padded to
  16 channels);

with the path ``runtime.load`` picks (:meth:`nvmpriv.runtime_native._NativeNode.conv_path`).
The outputs must be identical (checked). Part 2 (``--resnet``): a CIFAR ResNet-18 export
(64x64_100k) queried at batch 32 through ``runtime.load`` with the epilogue fusion
(BatchNormalization, residual Add and ReLU in the kernel) and without it (BatchNormalization
left to onnxruntime, hence no Add or ReLU either), and the digital export, in blocks taken in
turn with a pause before each block (as ``bench_export.py``).

    .venv/bin/python benchmarks/bench_native_conv.py [--threads 2] [--reps 30] [--resnet]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from timing import median_seconds

from nvmpriv import runtime_native
from nvmpriv.native.library import AdcGemmLibrary, conv_direct, conv_rows, row_segments_apply

#: (label, batch, in channels, out channels, output size, kernel, padding)
SHAPES = [
    ("LeNet-5 conv1", 256, 1, 6, 28, 5, 2),
    ("LeNet-5 conv2", 256, 6, 16, 10, 5, 0),
    ("ResNet-18 stem", 32, 3, 64, 32, 3, 1),
    ("ResNet-18 stage 1", 32, 64, 64, 32, 3, 1),
    ("ResNet-18 stage 2", 32, 128, 128, 16, 3, 1),
    ("ResNet-18 stage 3", 32, 256, 256, 8, 3, 1),
    ("16 -> 32, 20 columns", 64, 16, 32, 20, 3, 1),
    ("8 -> 16, 5x5, 32 columns", 64, 8, 16, 32, 5, 2),
    ("3 -> 20, 145 columns", 4, 3, 20, 145, 3, 1),
]


def kernel_paths(lib: AdcGemmLibrary, threads: int, reps: int) -> None:
    print(f"{'convolution':26s} {'gathered':>9s} {'rows':>9s} {'direct':>9s}  picked  (ms)")
    for shape in SHAPES:
        one_shape(lib, threads, reps, *shape)


def one_shape(
    lib: AdcGemmLibrary,
    threads: int,
    reps: int,
    label: str,
    b: int,
    c: int,
    m: int,
    size: int,
    kk: int,
    pad: int,
) -> None:
    rng = np.random.default_rng(0)
    h = w = size + kk - 1
    x = np.zeros((b, c, h, w), np.float32)
    x[:, :, pad : h - (kk - 1 - pad), pad : w - (kk - 1 - pad)] = rng.integers(
        -3, 4, (b, c, h - kk + 1, w - kk + 1)
    )
    k = c * kk * kk
    n_r = math.ceil(k / 64)
    ts = k if n_r == 1 else 64
    wk = np.zeros((m, n_r * ts), np.float32)
    wk[:, :k] = rng.integers(-2, 3, (m, k))
    gathered = np.ascontiguousarray(wk.reshape(m, n_r, ts).transpose(1, 0, 2))
    m_pad = math.ceil(m / 16) * 16
    direct = np.zeros((n_r, ts, m_pad), np.float32)
    direct[..., :m] = gathered.transpose(0, 2, 1)
    bias = rng.random(m).astype(np.float32)
    geo = np.array([c * h * w, h * w, w, 1, 0, kk, kk, 1, 1, 1, 1, size, size, k, x.size])
    geo = geo.astype(np.int64)
    big_l = size * size
    outs = {p: np.full((b, m, size, size), np.nan, np.float32) for p in ("g", "r", "d")}
    common: dict[str, Any] = dict(n_r=n_r, ts=ts, rows=k, qmax=20, scale=0.5, relu=True)
    common.update(threads=threads, m=m, n=b * big_l, conv=geo.ctypes.data)

    def at(p: str) -> tuple[int, int, int, int]:
        return (outs[p].ctypes.data, big_l, big_l, m * big_l)

    runs = {
        "gathered": lambda: lib.gemm(
            (gathered.ctypes.data, m * ts, ts), (x.ctypes.data, 0, 0), at("g"),
            packed=False, check=None, bias=(bias.ctypes.data, 0), **common,
        ),
        "rows": lambda: conv_rows(
            lib, gathered.ctypes.data, x.ctypes.data, at("r"), bias=bias.ctypes.data,
            **common,
        ),
        "direct": lambda: conv_direct(
            lib, direct.ctypes.data, x.ctypes.data, at("d"), m_pad=m_pad,
            bias=bias.ctypes.data, **common,
        ),
    }  # fmt: skip
    if size < 16:
        del runs["rows"]
    times = {name: median_seconds(fn, reps) for name, fn in runs.items()}
    for name, key in (("rows", "r"), ("direct", "d")):
        if name in runs and not np.array_equal(outs[key], outs["g"]):
            raise SystemExit(f"{label}: the {name} path disagrees with the gathered one")
    may_direct = m <= runtime_native._DIRECT_MAX_CHANNELS and k >= runtime_native._DIRECT_MIN_ROWS
    picked = runtime_native._conv_path(row_segments_apply(lib, 1, size), size, may_direct)
    cells = " ".join(
        f"{1e3 * times[p]:9.3f}" if p in times else f"{'-':>9s}"
        for p in ("gathered", "rows", "direct")
    )
    print(f"{label:26s} {cells}  {picked}")


def resnet_fusion(threads: int, reps: int) -> None:
    import torch

    from nvmpriv import nets, runtime
    from nvmpriv.crossbar import get_preset
    from nvmpriv.export import export_model

    torch.manual_seed(0)
    net = nets.ResNet18(num_classes=10).eval()
    x = torch.rand(32, 3, 32, 32)
    folder = Path(tempfile.mkdtemp())
    chip = export_model(
        net, get_preset("64x64_100k"), folder / "chip.onnx", input_shape=[3, 32, 32],
        calibration=x,
    )  # fmt: skip
    digital = export_model(net, None, folder / "digital.onnx", input_shape=[3, 32, 32])
    xs = x.numpy()
    fused = runtime.load(chip, threads=threads)
    with mock.patch.object(runtime_native.NativeGraphRunner, "_batchnorm", lambda *_: None):
        plain = runtime.load(chip, threads=threads)
    dig = runtime.load(digital, threads=threads)
    gap = float(np.abs(fused.predict_proba(xs) - plain.predict_proba(xs)).max())
    models = {"fused": fused, "unfused": plain, "digital": dig}
    times: dict[str, list[float]] = {name: [] for name in models}
    rounds = 6
    for _ in range(rounds):
        for name, model in models.items():
            time.sleep(0.05)
            model.predict_proba(xs, batch_size=len(xs))
            for _ in range(max(1, reps // rounds)):
                start = time.perf_counter()
                model.predict_proba(xs, batch_size=len(xs))
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"ResNet-18 batch 32: fused {1e3 * med['fused']:.1f} ms, unfused "
        f"{1e3 * med['unfused']:.1f} ms, digital {1e3 * med['digital']:.1f} ms; vs digital: "
        f"fused {med['fused'] / med['digital']:.2f}x, unfused "
        f"{med['unfused'] / med['digital']:.2f}x (largest probability difference {gap:.1e})"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--resnet", action="store_true", help="also the ResNet-18 fusion A/B")
    args = p.parse_args()
    lib = runtime_native.native_library()
    if lib is None or not lib.openmp:
        raise SystemExit("needs the native kernel built with OpenMP")
    kernel_paths(lib, args.threads, args.reps)
    if args.resnet:
        resnet_fusion(args.threads, args.reps)


if __name__ == "__main__":
    main()
