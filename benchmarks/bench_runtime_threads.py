"""Black-box query throughput: concurrent single-threaded chunks vs onnxruntime intra-op threads.

For deterministic crossbar exports on the onnxruntime engine (``native=False``; the default
native engine threads inside its kernel instead), :func:`nvmpriv.runtime.load` splits each
query batch into chunks run concurrently, one onnxruntime thread each (its per-tile
``Round``/``Clip`` kernels are single-threaded). This compares that policy with one session
using the same number of intra-op threads on the same file, and checks that both give
identical probabilities.

    .venv/bin/python benchmarks/bench_runtime_threads.py [--threads 2] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from timing import median_seconds

from nvmpriv import nets, runtime
from nvmpriv.crossbar import get_preset
from nvmpriv.export import export_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-resnet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases: list[tuple[str, torch.nn.Module, list[int], int, tuple[str, ...]]] = [
        ("NasrFC600", nets.NasrFC(600, 100), [600], 4096, ("64x64_100k", "64x64_100k_bitsliced")),
        ("LeNet5", nets.LeNet5(), [1, 28, 28], 4096, ("64x64_100k", "64x64_100k_bitsliced")),
    ]
    if not args.skip_resnet:
        cases.append(("ResNet18", nets.ResNet18(num_classes=10), [3, 32, 32], 256, ("64x64_100k",)))
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, batch_size 1024, median of 3")
    with tempfile.TemporaryDirectory() as tmp:
        for name, net, shape, n, presets in cases:
            net.eval()
            torch.manual_seed(0)
            x = torch.rand(n, *shape)
            xn = x.numpy()
            for preset in presets:
                path = export_model(
                    net,
                    get_preset(preset),
                    Path(tmp) / f"{name}_{preset}.onnx",
                    input_shape=shape,
                    calibration=x[:64],
                )
                chunks = runtime.load(path, threads=args.threads, native=False)
                intra = runtime.load(path, threads=1, native=False)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = args.threads
                opts.inter_op_num_threads = 1
                intra._runner = ort.InferenceSession(
                    str(path), opts, providers=["CPUExecutionProvider"]
                )
                same = np.array_equal(chunks.predict_proba(xn), intra.predict_proba(xn))
                t_chunks = median_seconds(functools.partial(chunks.predict_proba, xn), 3)
                t_intra = median_seconds(functools.partial(intra.predict_proba, xn), 3)
                print(
                    f"{name:9s} {preset:21s} n={n:5d}: intra-op {t_intra * 1e3:8.1f} ms | "
                    f"{chunks._workers} concurrent chunks {t_chunks * 1e3:8.1f} ms | "
                    f"{t_intra / t_chunks:.2f}x faster | identical {same}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
