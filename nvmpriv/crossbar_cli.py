"""``python -m nvmpriv crossbar --preset NAME [--json]``: show a preset and its measured NF."""

from __future__ import annotations

import json

from nvmpriv.cliargs import CommandParser, UsageError
from nvmpriv.crossbar.config import PRESETS, get_preset
from nvmpriv.crossbar.metrics import column_error
from nvmpriv.crossbar.native import native_status

__all__ = ["cli_main"]


def cli_main(argv: list[str]) -> int:
    """Print a preset's parameters and its measured NF and mean relative column error.

    Args:
        argv: Arguments after ``crossbar`` (``--preset NAME [--json]`` or ``--list``).

    Returns:
        Process exit code (0 on success).

    Raises:
        CrossbarConfigError: On an unknown preset name (one line from ``python -m nvmpriv``).
    """
    parser = CommandParser(
        prog="python -m nvmpriv crossbar", description="Show a crossbar preset and measure it."
    )
    parser.add_argument("--preset", help=f"one of: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list", action="store_true", help="list the preset names")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(PRESETS)))
        return 0
    if not args.preset:
        raise UsageError(
            f"{parser.prog}: give --preset NAME (one of: {', '.join(sorted(PRESETS))}) or --list"
        )
    cfg = get_preset(args.preset)  # an unknown name: CrossbarConfigError, one line from main
    stats = column_error(cfg)
    weights = column_error(cfg, conductances="gaussian_weights")
    params = cfg.to_dict()
    measured = {
        "nf": stats.nf,
        "mean_relative_column_error": stats.mean_abs_rel,
        "n_column_currents": stats.n_samples,
        "protocol": "G ~ U[g_min, g_max] i.i.d., V ~ U[0, v_read] i.i.d., 32 tiles x 8 inputs, "
        "seed 0, exact effective matrices",
        "nf_gaussian_weights": weights.nf,
        "protocol_gaussian_weights": "G+ of N(0, 1) weights programmed like a layer (largest "
        "|w| at g_max), otherwise as 'protocol'",
        # Roy et al.'s NF is the wires' (IR drop) error of a tile; the preset's other effects act
        # on the programmed devices and converters, which this protocol samples uniformly instead
        "scope": "IR drop only (wire, source and sink resistance); stuck-at faults, variation, "
        "drift, read noise, DAC and ADC are not part of NF",
    }
    # which ADC path this machine runs (native fused kernel, or pure torch and why)
    simulator = native_status()
    if args.json:
        out = {"preset": args.preset, "params": params, "measured": measured}
        print(json.dumps({**out, "simulator": simulator}))
        return 0
    width = max(len(k) for k in params)
    print(f"crossbar preset {args.preset!r}")
    for key, value in params.items():
        print(f"  {key:<{width}}  {value}")
    print(f"  {'NF':<{width}}  {stats.nf:.4f}")
    print(f"  {'mean rel. col. error':<{width}}  {stats.mean_abs_rel:.4f}")
    print(f"  {'NF (Gaussian weights)':<{width}}  {weights.nf:.4f}")
    print(f"  (NF and column error: {measured['scope']})")
    print(f"simulator: {simulator}")
    return 0
