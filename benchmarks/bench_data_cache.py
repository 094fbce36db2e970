"""Texas100-format parse time vs cached load, on a generated full-size file (67,330 x 6,169).

python benchmarks/bench_data_cache.py [--rows 67330] [--dir /tmp/nvmpriv-texas-bench]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from nvmpriv.datasets import load_texas100


def write_full_size(root: Path, rows: int, cols: int = 6169) -> None:
    sub = root / "texas" / "100"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    line = np.full((rows, 2 * cols), ord(","), dtype=np.uint8)
    line[:, 0::2] = rng.integers(0, 2, (rows, cols), dtype=np.uint8) + ord("0")
    line[:, -1] = ord("\n")
    (sub / "feats").write_bytes(line.tobytes())
    (sub / "labels").write_text("\n".join(map(str, rng.integers(1, 101, rows))) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=67330)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/nvmpriv-texas-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    write_full_size(args.dir, args.rows)
    size_mb = (args.dir / "texas/100/feats").stat().st_size / 1e6
    start = time.perf_counter()
    parsed = load_texas100(args.dir)
    t_parse = time.perf_counter() - start
    cache = next(args.dir.rglob("*.nvmpriv.npz"))
    start = time.perf_counter()
    cached = load_texas100(args.dir)
    t_cache = time.perf_counter() - start
    assert cached.content_hash == parsed.content_hash
    print(
        f"Texas100 format, {args.rows} x 6169, CSV {size_mb:.0f} MB, cache {cache.stat().st_size / 1e6:.1f} MB"
    )
    print(
        f"parse + write cache: {t_parse:.2f} s; cached load: {t_cache:.2f} s; ratio {t_parse / t_cache:.1f}x"
    )
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
