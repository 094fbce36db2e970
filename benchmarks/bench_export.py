"""ONNX export: onnxruntime throughput of the crossbar export vs the torch simulation and vs the
digital export, export time and file size. The same number of threads on every side (one by
default; ``--threads 2``: torch intra-op threads, and ``runtime.load``'s own policy for the files).

``floor`` is the same crossbar export with the ADC's Round and Clip left out (per-tile partial
sums still computed and summed): a lower bound on what standard onnxruntime ops can reach for a
per-tile ADC on this machine (its output is not the chip's).

The files are queried as an attacker queries them: through ``runtime.load`` in a separate,
torch-free process (``benchmarks/query_files.py``), once with the default engine (onnxruntime + the native crossbar
kernel for the deterministic per-tile-ADC nodes, :mod:`nvmpriv.runtime_native`) and once with
``native=False`` (stock onnxruntime running the function bodies).

    .venv/bin/python benchmarks/bench_export.py [--preset 64x64_100k] [--batch 256] [--reps 20]
        [--resnet]  # also CIFAR ResNet-18 at batch 32 (about 1 min more)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from timing import median_seconds

from nvmpriv import export as export_module
from nvmpriv import nets
from nvmpriv.crossbar import convert, get_preset
from nvmpriv.export import export_model


def _adc_without_arithmetic(b: Any, p: str, st: dict, axis: int, m: int, scale: Any = None) -> str:
    """``export._adc`` minus Round and Clip: partial sums only summed and scaled (the floor)."""
    if not st["adc_bits"]:
        return _ADC(b, p, st, axis, m, scale)
    step = b.const(st["adc_step32"])
    q = p if scale is not None else b.op("Div", [p, step])
    return b.op("Mul", [export_module._code_sum(b, q, axis, st["n_row_tiles"], m), step])


_ADC = export_module._adc
#: Alternations of the torch timing and the files' timing (see ``bench``).
ROUNDS = 3


def bench(
    name: str,
    net: torch.nn.Module,
    shape: list[int],
    preset: str,
    batch: int,
    reps: int,
    folder: Path,
) -> None:
    torch.manual_seed(0)
    x = torch.rand(batch, *shape)
    cfg = get_preset(preset)
    t = time.perf_counter()
    chip_file = export_model(
        net, cfg, folder / f"{name}_chip.onnx", input_shape=shape, calibration=x[:256]
    )
    t_export = time.perf_counter() - t
    t = time.perf_counter()
    dig_file = export_model(net, None, folder / f"{name}_dig.onnx", input_shape=shape)
    t_export_dig = time.perf_counter() - t
    with mock.patch.object(export_module, "_adc", _adc_without_arithmetic):
        floor_file = export_model(
            net, cfg, folder / f"{name}_floor.onnx", input_shape=shape, calibration=x[:256]
        )
    chip = convert(net, cfg, seed=0, calibration=x[:256]).eval()
    threads = torch.get_num_threads()
    np.save(folder / "x.npy", x.numpy())
    files = [chip_file, chip_file, dig_file, floor_file]
    natives = ["1", "0", "0", "0"]
    script = Path(__file__).with_name("query_files.py")
    cmd = [sys.executable, str(script), str(folder / "x.npy"), "--threads", str(threads)]
    cmd += ["--reps", str(reps), "--files", *map(str, files), "--natives", *natives]
    # The files are timed in one torch-free process (as an attacker's), in turn (see
    # query_files.py); the torch simulation, in this process, alternates with that process, and
    # each ratio to it is the median of the rounds' ratios.
    rounds = []
    for _ in range(ROUNDS):
        with torch.no_grad():
            t_torch = median_seconds(lambda: torch.softmax(chip(x), 1), reps)
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rounds.append([t_torch, *json.loads(done.stdout.strip().splitlines()[-1])["seconds"]])
    times = np.array(rounds)  # [round, (torch, runtime, stock, digital, floor)]
    t_torch, t_native, t_chip, t_dig, _ = np.median(times, axis=0)

    def ratio(num: int, den: int) -> float:
        return float(np.median(times[:, num] / times[:, den]))

    size_c, size_d = chip_file.stat().st_size, dig_file.stat().st_size
    print(
        f"{name:10s} {preset:22s} batch {batch}: torch sim {batch / t_torch:9.0f}/s | "
        f"runtime (ORT + native) {batch / t_native:9.0f}/s | stock ORT chip {batch / t_chip:9.0f}/s"
        f" | ORT digital {batch / t_dig:9.0f}/s"
    )
    print(
        f"{'':10s} vs torch sim: runtime {ratio(0, 1):.2f}x, stock ORT {ratio(0, 2):.2f}x faster"
        f" | vs ORT digital: runtime {ratio(1, 3):.2f}x, stock ORT {ratio(2, 3):.2f}x slower "
        f"(floor without Round/Clip {ratio(4, 3):.2f}x); rounds: runtime vs torch "
        + " ".join(f"{a / b:.2f}" for a, b in zip(times[:, 0], times[:, 1], strict=True))
        + ", vs digital "
        + " ".join(f"{a / b:.2f}" for a, b in zip(times[:, 1], times[:, 3], strict=True))
    )
    print(
        f"{'':10s} export {t_export:.2f} s (digital {t_export_dig:.2f} s); file "
        f"{size_c / 1e6:.2f} MB vs digital {size_d / 1e6:.2f} MB ({size_c / size_d:.2f}x)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="64x64_100k")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--resnet", action="store_true", help="also CIFAR ResNet-18 (batch 32)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bench(
            "ColumnFC",
            nets.ColumnFC(64, 10).eval(),
            [64],
            args.preset,
            args.batch,
            args.reps,
            folder,
        )
        bench(
            "NasrFC600",
            nets.NasrFC(600, 100).eval(),
            [600],
            args.preset,
            args.batch,
            args.reps,
            folder,
        )
        bench(
            "LeNet5",
            nets.LeNet5().eval(),
            [1, 28, 28],
            args.preset,
            args.batch,
            max(3, args.reps // 4),
            folder,
        )
        if args.resnet:
            bench(
                "ResNet18",
                nets.ResNet18(num_classes=10).eval(),
                [3, 32, 32],
                args.preset,
                32,
                max(3, args.reps // 3),
                folder,
            )


if __name__ == "__main__":
    main()
