"""Can a compiled ADC epilogue bring a per-tile ADC near the digital layer? (issue 3)

The first Texas FC layer (batch 256, 6169 binary inputs -> 1024 outputs, 64-row tiles, ADC clip
127), its per-tile partial sums by ``torch.bmm`` over chunks of tile rows into a reused buffer,
measured side by side in one run:

* ``digital``: ``x @ W``;
* ``eager``: each chunk rounded, clamped and summed in place (the simulator's passes);
* ``floor``: the same without round and clamp (partial sums computed and summed only);
* ``fused``: the chunk's round + clamp + sum as one ``torch.compile``d function (Inductor
  writes one C++ loop; needs a C++ compiler), after its compile.

Prints milliseconds and ratios to ``digital`` per chunk size, and checks that ``fused`` gives
the same codes as ``eager``.

    python benchmarks/bench_adc_epilogue.py --threads 2 --chunks 1 2 4 8 16 97
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from timing import median_seconds

BATCH, IN, OUT, TILE, QMAX = 256, 6169, 1024, 64, 127.0


def _variants(
    x_tiles: torch.Tensor, w_tiles: torch.Tensor, chunk: int, epilogue: Callable[..., torch.Tensor]
) -> dict[str, Callable[[], torch.Tensor]]:
    """The eager, floor and fused forwards for one chunk size (tile rows per ``bmm``)."""
    n_r = x_tiles.shape[0]
    buf = torch.empty(chunk, BATCH, OUT)
    starts = range(0, n_r, chunk)

    def partial(r0: int) -> torch.Tensor:
        r1 = min(n_r, r0 + chunk)
        return torch.bmm(x_tiles[r0:r1], w_tiles[r0:r1], out=buf[: r1 - r0])

    def eager() -> torch.Tensor:
        y = torch.zeros(BATCH, OUT)
        for r0 in starts:
            y.add_(partial(r0).round_().clamp_(-QMAX, QMAX).sum(0))
        return y

    def floor() -> torch.Tensor:
        y = torch.zeros(BATCH, OUT)
        for r0 in starts:
            y.add_(partial(r0).sum(0))
        return y

    def fused() -> torch.Tensor:
        y = torch.zeros(BATCH, OUT)
        for r0 in starts:
            y = epilogue(partial(r0), y)
        return y

    return {"eager": eager, "floor": floor, "fused": fused}


def main() -> None:
    """Run the comparison and print one row per chunk size."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 97])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_r = (IN + TILE - 1) // TILE
    x = torch.rand(BATCH, IN).round()  # binary features like Texas-100
    w = torch.randn(IN, OUT) * 0.05
    w_tiles = torch.nn.functional.pad(w, (0, 0, 0, n_r * TILE - IN)).view(n_r, TILE, OUT)
    x_tiles = torch.nn.functional.pad(x, (0, n_r * TILE - IN)).view(BATCH, n_r, TILE)
    w_tiles, x_tiles = w_tiles.contiguous(), x_tiles.transpose(0, 1)

    @torch.compile(dynamic=False, fullgraph=True)
    def epilogue(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + p.round().clamp(-QMAX, QMAX).sum(0)

    digital = median_seconds(lambda: x @ w, args.repeats)
    print(f"digital {digital * 1e3:.2f} ms ({args.threads} threads)")
    print("chunk  eager ms (ratio)   floor ms (ratio)   fused ms (ratio)   compile s  same codes")
    for chunk in args.chunks:
        run = _variants(x_tiles, w_tiles, chunk, epilogue)
        start = time.perf_counter()
        same = torch.equal(run["fused"](), run["eager"]())  # integer codes: order is exact
        compile_s = time.perf_counter() - start
        times = [median_seconds(run[k], args.repeats) for k in ("eager", "floor", "fused")]
        cells = "  ".join(f"{t * 1e3:7.2f} ({t / digital:4.2f}x)" for t in times)
        print(f"{chunk:5d}  {cells}  {compile_s:9.1f}  {same}")


if __name__ == "__main__":
    main()
