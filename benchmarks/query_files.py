"""Time ``runtime.load(...).predict_proba`` on exported files in a torch-free process.

Used by ``bench_export.py`` so that the files are queried as an attacker's process queries them
(no torch loaded, so no torch thread pool beside onnxruntime's). Prints one JSON line
``{"seconds": [...]}``, the median time of one whole-batch query per file.

    .venv/bin/python benchmarks/query_files.py X.npy --files A.onnx B.onnx --natives 1 0
        [--threads 1] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from timing import median_seconds

from nvmpriv import runtime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("inputs", help=".npy batch to query")
    p.add_argument("--files", nargs="+", required=True)
    p.add_argument("--natives", nargs="+", required=True, help="1/0 per file: native engine")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    x = np.load(args.inputs)
    out = []
    for file, native in zip(args.files, args.natives, strict=True):
        model = runtime.load(file, threads=args.threads, native=native == "1")
        if native == "1" and "native" not in model.engine:
            raise SystemExit(f"{file}: the native engine did not load ({model.engine})")
        out.append(median_seconds(lambda m=model: m.predict_proba(x, batch_size=len(x)), args.reps))
    if "torch" in sys.modules:
        raise SystemExit("torch was imported: the timing is not the black-box process's")
    print(json.dumps({"seconds": out}))


if __name__ == "__main__":
    main()
