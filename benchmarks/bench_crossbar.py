"""Crossbar simulator speed and memory vs the digital forward, measured side by side.

Run: .venv/bin/python benchmarks/bench_crossbar.py [--threads 2] [--skip-resnet]

Prints one table: for each case the digital and crossbar forward times (median of repeats,
same thread count, same inputs, torch.no_grad), their ratio, forward + backward to the input
(what a PGD attack needs; parameters frozen), the one-off programming time
(effective matrices etc.; wall and CPU seconds, and wall time in units of one digital
forward), and the peak of live tensor memory allocated by one forward
(torch profiler memory events, chronological running sum). The ``floor`` column times the
same forward with the ADC's round and clamp taken out of the fast paths: the per-tile partial sums
are still computed and summed, which any per-tile-ADC simulator must do, so it is a lower bound
on the ratio that eager torch can reach on this machine (the output is then not the chip's).
The ``torch`` column is the same forward on the pure-torch path (native fused GEMM + ADC kernel
switched off), ``diff`` the largest output difference between the two paths; the main ratio
uses the native kernel where it loaded (the first line says whether it did).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from unittest import mock

import numpy as np
import torch
from timing import median_seconds
from torch import nn

from nvmpriv.crossbar import PRESETS, CrossbarLinear, convert
from nvmpriv.crossbar import layers as xbar_layers
from nvmpriv.crossbar.circuit import column_currents
from nvmpriv.crossbar.layers import release_workspaces
from nvmpriv.crossbar.native import native_status


def texas_fc() -> nn.Module:
    try:
        from nvmpriv.nets import NasrFC

        return NasrFC(6169, 100)
    except Exception:  # pragma: no cover - nets.py not available
        dims = [6169, 1024, 512, 256, 128, 100]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers[:-1])


def resnet18() -> nn.Module:
    from nvmpriv.nets import ResNet18

    return ResNet18(num_classes=100)


def peak_mb(fn: Callable[[], object]) -> float:
    """Peak of live tensor memory allocated during ``fn`` (MB), from the profiler's events."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start
    )
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def case(name: str, model: nn.Module, cfg_name: str, x: torch.Tensor, repeats: int) -> dict:
    model.eval()
    t0, c0 = time.perf_counter(), time.process_time()
    chip = convert(model, PRESETS[cfg_name], seed=0, calibration=x).eval()
    t_prog = time.perf_counter() - t0
    c_prog = time.process_time() - c0  # CPU seconds, all threads: robust to a busy machine
    with torch.no_grad():
        t_dig = median_seconds(lambda: model(x), repeats)
        t_xb = median_seconds(lambda: chip(x), repeats)
        y_native = chip(x)
        with mock.patch.object(xbar_layers, "_native_kernel", lambda u, qmax: None):
            t_torch = median_seconds(lambda: chip(x), repeats)
            diff = float((chip(x) - y_native).abs().max())
        # Lower bound of any per-tile-ADC forward in eager torch: the same chunked loop with the
        # ADC's round and clamp removed (per-tile partial sums still materialized and summed).
        with (
            mock.patch.object(xbar_layers, "_quantize_rows", lambda p, qmax, clip, check: []),
            mock.patch.object(xbar_layers, "_native_kernel", lambda u, qmax: None),
        ):
            t_floor = median_seconds(lambda: chip(x), repeats)
        m_dig = peak_mb(lambda: model(x))
        release_workspaces()  # count the fast path's scratch buffers in its peak memory
        m_xb = peak_mb(lambda: chip(x))
    # Input gradient through each model (what a PGD attack needs; "ste" through the chip),
    # parameters frozen on both sides so that only the input gradient is computed.
    flags = [q.requires_grad for q in model.parameters()]
    for net in (model, chip):
        for q in net.parameters():
            q.requires_grad_(False)

    def fwd_bwd(net: nn.Module) -> None:
        xx = x.clone().requires_grad_()
        net(xx).logsumexp(1).sum().backward()

    g_dig = median_seconds(lambda: fwd_bwd(model), max(2, repeats // 2))
    g_xb = median_seconds(lambda: fwd_bwd(chip), max(2, repeats // 2))
    for q, flag in zip(model.parameters(), flags, strict=True):
        q.requires_grad_(flag)
    return {
        "case": name,
        "config": cfg_name,
        "digital_ms": 1e3 * t_dig,
        "crossbar_ms": 1e3 * t_xb,
        "ratio": t_xb / t_dig,
        "floor_ratio": t_floor / t_dig,
        "torch_ratio": t_torch / t_dig,
        "diff": diff,
        "program_s": t_prog,
        "program_cpu_s": c_prog,
        "program_per_fwd": t_prog / t_dig,
        "mem_digital_mb": m_dig,
        "mem_crossbar_mb": m_xb,
        "grad_digital_ms": 1e3 * g_dig,
        "grad_crossbar_ms": 1e3 * g_xb,
    }


def nodal_vs_fast(repeats: int) -> dict:
    """PytorX approach (nodal solve of every tile at every forward) vs the effective matrices."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 128)
    cfg = PRESETS["64x64_100k"].replace(dac_bits=None, adc_bits=None, variation_sigma=0.0)
    layer = CrossbarLinear.from_module(lin, cfg, seed=0)
    x = torch.randn(16, 128)
    w = lin.weight.detach().double().numpy().T
    w_max = np.abs(w).max()
    dg = cfg.g_max - cfg.g_min
    n = cfg.tile_size
    kw = dict(r_wire=cfg.r_wire, r_source=cfg.r_source, r_sink=cfg.r_sink)

    def per_forward_solve() -> np.ndarray:
        xv = x.double().numpy().T
        y = np.zeros((128, xv.shape[1]))
        for r in range(0, 128, n):
            for c in range(0, 128, n):
                blk = w[r : r + n, c : c + n] / w_max
                ip = column_currents(cfg.g_min + np.maximum(blk, 0) * dg, xv[r : r + n], **kw)
                im = column_currents(cfg.g_min + np.maximum(-blk, 0) * dg, xv[r : r + n], **kw)
                y[c : c + n] += (ip - im) * w_max / dg
        return y.T + lin.bias.detach().double().numpy()

    with torch.no_grad():
        t_fast = median_seconds(lambda: layer(x), max(repeats, 20))
        ref = per_forward_solve()
        err = float(np.abs(layer(x).double().numpy() - ref).max() / np.abs(ref).max())
    t_slow = median_seconds(per_forward_solve, 1)
    return {
        "case": "Linear 128x128, B=16, per-forward nodal solve vs fast path",
        "config": "64x64_100k (IR drop only)",
        "nodal_ms": 1e3 * t_slow,
        "fast_ms": 1e3 * t_fast,
        "speedup": t_slow / t_fast,
        "max_rel_diff": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fc-batch", type=int, default=256)
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    fc = texas_fc()
    x = torch.rand(args.fc_batch, 6169).round()  # binary features like Texas-100
    rows.append(case("Texas FC", fc, "64x64_100k", x, args.repeats))
    no_adc = PRESETS["64x64_100k"].replace(name="64x64_100k_noadc", adc_bits=None)
    PRESETS[no_adc.name] = no_adc
    rows.append(case("Texas FC", fc, no_adc.name, x, args.repeats))
    rows.append(case("Texas FC", fc, "64x64_100k_bitsliced", x, args.repeats))
    if not args.skip_resnet:
        net = resnet18()
        xr = torch.randn(args.resnet_batch, 3, 32, 32)
        rows.append(case("CIFAR ResNet-18", net, "64x64_100k", xr, max(2, args.repeats // 2)))
    print(f"torch {torch.__version__}, threads={args.threads}, no_grad, median of repeats")
    print(native_status())
    hdr = (
        f"{'case':<16} {'config':<22} {'digital ms':>10} {'xbar ms':>9} {'ratio':>6} {'torch':>6} {'diff':>7} {'floor':>6} "
        f"{'program s':>9} {'prog cpu s':>10} {'prog/dig fwd':>12} {'mem dig MB':>10} "
        f"{'mem xbar MB':>11} {'grad dig ms':>11} {'grad xbar ms':>12} {'grad ratio':>10}"
    )
    print(hdr)
    for r in rows:
        print(
            f"{r['case']:<16} {r['config']:<22} {r['digital_ms']:>10.1f} {r['crossbar_ms']:>9.1f} "
            f"{r['ratio']:>6.2f} {r['torch_ratio']:>6.2f} {r['diff']:>7.1e} {r['floor_ratio']:>6.2f} {r['program_s']:>9.1f} {r['program_cpu_s']:>10.1f} "
            f"{r['program_per_fwd']:>12.0f} {r['mem_digital_mb']:>10.1f} "
            f"{r['mem_crossbar_mb']:>11.1f} {r['grad_digital_ms']:>11.1f} "
            f"{r['grad_crossbar_ms']:>12.1f} {r['grad_crossbar_ms'] / r['grad_digital_ms']:>10.2f}"
        )
    nv = nodal_vs_fast(args.repeats)
    print(
        f"{nv['case']}: nodal {nv['nodal_ms']:.1f} ms, fast {nv['fast_ms']:.3f} ms, "
        f"speedup {nv['speedup']:.0f}x, max rel diff {nv['max_rel_diff']:.1e}"
    )


if __name__ == "__main__":
    main()
