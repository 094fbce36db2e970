"""Time ``runtime.load(...).predict_proba`` on exported files in a torch-free process.

Used by ``bench_export.py`` so that the files are queried as an attacker's process queries them
(no torch loaded, so no torch thread pool beside onnxruntime's). Prints one JSON line
``{"seconds": [...]}``, the median time of one whole-batch query per file (blocks of queries per
file, taken in turn over ``--rounds`` rounds).

    .venv/bin/python benchmarks/query_files.py X.npy --files A.onnx B.onnx --natives 1 0
        [--threads 1] [--reps 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from nvmpriv import runtime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("inputs", help=".npy batch to query")
    p.add_argument("--files", nargs="+", required=True)
    p.add_argument("--natives", nargs="+", required=True, help="1/0 per file: native engine")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=20, help="timed queries per file in all")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    x = np.load(args.inputs)
    models = []
    for file, native in zip(args.files, args.natives, strict=True):
        model = runtime.load(file, threads=args.threads, native=native == "1")
        if native == "1" and "native" not in model.engine:
            raise SystemExit(f"{file}: the native engine did not load ({model.engine})")
        models.append(model)
    # Blocks of queries per file, round after round, so that a drift in the machine's speed
    # reaches every file alike; before each block a pause lets the previous file's idle
    # onnxruntime/OpenMP workers stop spinning (they would take the cores from this one).
    times: list[list[float]] = [[] for _ in models]
    for _ in range(args.rounds):
        for model, got in zip(models, times, strict=True):
            time.sleep(0.05)
            model.predict_proba(x, batch_size=len(x))  # untimed: wakes the workers
            for _ in range(max(1, args.reps // args.rounds)):
                start = time.perf_counter()
                model.predict_proba(x, batch_size=len(x))
                got.append(time.perf_counter() - start)
    out = [statistics.median(t) for t in times]
    if "torch" in sys.modules:
        raise SystemExit("torch was imported: the timing is not the black-box process's")
    print(json.dumps({"seconds": out}))


if __name__ == "__main__":
    main()
