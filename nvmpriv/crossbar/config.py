"""Crossbar configuration: one frozen dataclass, named presets, validation.

A :class:`CrossbarConfig` describes a simulated chip completely; together with a seed it
determines one chip (device variation and faults are drawn from that seed). Every field is
documented with its unit. Every non-ideality is switched off by its neutral value (``0``,
``None`` or ``False``); with all of them off the simulated layer computes the digital result
bit-exactly.

The configuration is deliberately flat (one level of fields) so that ``dataclasses.replace``
and YAML/JSON round trips (:meth:`CrossbarConfig.to_dict` / :meth:`CrossbarConfig.from_dict`)
stay one-liners.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MEASURED_NF",
    "PRESETS",
    "CrossbarConfig",
    "CrossbarConfigError",
    "get_preset",
]


class CrossbarConfigError(ValueError):
    """Invalid crossbar configuration (names the field, the allowed range and the fix)."""


_VARIATION_MODELS = ("lognormal", "gaussian")
_GRADIENTS = ("ste", "digital")


@dataclass(frozen=True)
class CrossbarConfig:
    """Parameters of a simulated RRAM/NVM crossbar chip.

    Static effects (drawn or computed once when a layer is programmed): weight-to-conductance
    mapping and its ``levels``, device-to-device variation, stuck-at faults, drift, IR drop.
    Per-query effects (applied at every forward): DAC and ADC quantization, bit streaming and
    read noise (``read_noise_sigma`` with ``read_noise=True``).
    """

    name: str = "custom"
    """Label of the configuration (no unit); presets carry their key here."""

    tile_size: int = 64
    """Crossbar size N (rows = columns = N cells, unitless). Layers are tiled into N x N arrays."""

    g_max: float = 1e-5
    """Highest programmable conductance, i.e. 1/R_on (siemens, S)."""

    g_min: float = 1e-5 / 6
    """Lowest programmable conductance, i.e. 1/R_off (siemens, S); 0 <= g_min < g_max."""

    levels: int | None = None
    """Programmable conductance states per device between g_min and g_max (count, >= 2);
    ``None`` = continuous (analog) programming. Ignored with bit slicing (slice width sets it)."""

    v_read: float = 0.25
    """Largest read voltage magnitude on a word line (volts, V). Signed inputs map to signed
    voltages in [-v_read, +v_read]."""

    dac_bits: int | None = None
    """Input DAC resolution (bits, sign included, >= 2); ``None`` = ideal DAC. Not used with
    bit slicing (the stream width sets the DAC)."""

    adc_bits: int | None = None
    """Per-tile ADC resolution (bits, sign included, >= 2) applied to every tile's column
    partial sums; ``None`` = ideal ADC (no quantization, no clipping). With bit slicing the ADC
    digitizes each (input stream, weight slice) partial sum in steps of 2^k counts, the least
    power of two whose full scale covers a tile's largest nominal sum
    (N (2^stream_width - 1)(2^slice_width - 1) counts; k = 0, one count per step, when the ADC
    has the bits); device variation can push a sum past that range, and then it clips."""

    calibration_percentile: float = 100.0
    """Percentile of |value| over the calibration batch that sets DAC and ADC full scale
    (percent, in (0, 100]; 100 = max-abs)."""

    bit_slicing: bool = False
    """Use PUMA-style bit slicing: fixed-point inputs streamed in ``stream_width``-bit digits,
    fixed-point weights cut into ``slice_width``-bit slices, ADC per (stream, slice),
    shift-and-add (no unit)."""

    input_bits: int = 16
    """Fixed-point input precision with bit slicing (bits, sign included)."""

    input_int_bits: int = 3
    """Integer bits of the fixed-point inputs, sign included (bits); fractional bits =
    input_bits - input_int_bits."""

    weight_bits: int = 16
    """Fixed-point weight precision with bit slicing (bits, sign included)."""

    weight_int_bits: int = 3
    """Integer bits of the fixed-point weights, sign included (bits); fractional bits =
    weight_bits - weight_int_bits."""

    stream_width: int = 4
    """Bits per input stream (bits); must divide ``input_bits``."""

    slice_width: int = 4
    """Bits per weight slice, i.e. log2 of the conductance levels per device (bits); must
    divide ``weight_bits``."""

    r_wire: float = 0.0
    """Wire resistance between neighbouring cells on word and bit lines (ohms)."""

    r_source: float = 0.0
    """Output resistance of each word-line driver (ohms)."""

    r_sink: float = 0.0
    """Input resistance of each bit-line sense circuit into virtual ground (ohms)."""

    variation_sigma: float = 0.0
    """Device-to-device programming variation, relative standard deviation of G (unitless
    fraction of the target conductance); static per chip."""

    variation_model: str = "lognormal"
    """``lognormal``: G * exp(s z - s^2 / 2) with s^2 = ln(1 + sigma^2), so the programmed G has
    mean G and relative standard deviation sigma; ``gaussian``: G * (1 + sigma * z), clipped
    at 0."""

    p_stuck_min: float = 0.0
    """Fraction of devices stuck at g_min (stuck-off, SA0), in [0, 1]; static per chip."""

    p_stuck_max: float = 0.0
    """Fraction of devices stuck at g_max (stuck-on, SA1), in [0, 1]; static per chip."""

    read_noise: bool = False
    """Apply per-query read noise (fresh draw at every forward, global torch RNG)."""

    read_noise_sigma: float = 0.0
    """Read-noise relative standard deviation of each device's conductance per query
    (unitless fraction of G)."""

    drift_nu: float = 0.0
    """Conductance drift exponent nu in G(t) = G0 (t / t0)^-nu (unitless); 0 = no drift."""

    drift_time: float = 1.0
    """Time since programming t at which the chip is read (seconds, s); >= drift_t0."""

    drift_t0: float = 1.0
    """Reference time t0 of the drift law (seconds, s); > 0."""

    gradient: str = "ste"
    """Backward pass: ``ste`` = straight-through the simulated chip (hardware in the loop:
    gradient of the effective weights, quantizers pass gradients inside their range);
    ``digital`` = gradient of the digital layer (non-adaptive attacks)."""

    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form provenance notes (no unit); ignored by the simulator."""

    def __post_init__(self) -> None:
        """Validate every field; raise :class:`CrossbarConfigError` on the first bad one."""
        _validate(self)

    # ------------------------------------------------------------------ derived properties
    @property
    def has_parasitics(self) -> bool:
        """Whether any wire, source or sink resistance is non-zero (IR drop is simulated)."""
        return self.r_wire > 0 or self.r_source > 0 or self.r_sink > 0

    @property
    def has_device_effects(self) -> bool:
        """Whether programmed conductances deviate from their targets (static effects)."""
        return (
            self.variation_sigma > 0
            or self.p_stuck_min > 0
            or self.p_stuck_max > 0
            or self.drift_nu > 0
        )

    @property
    def has_read_noise(self) -> bool:
        """Whether per-query read noise is on."""
        return self.read_noise and self.read_noise_sigma > 0

    @property
    def analog_exact(self) -> bool:
        """Whether the analog MVM equals the programmed (quantized) weights exactly."""
        return not (self.has_parasitics or self.has_device_effects or self.has_read_noise)

    @property
    def needs_calibration(self) -> bool:
        """Whether DAC or ADC ranges must be calibrated before inference."""
        return (not self.bit_slicing) and (self.dac_bits is not None or self.adc_bits is not None)

    @property
    def input_frac_bits(self) -> int:
        """Fractional bits of the fixed-point inputs (bits)."""
        return self.input_bits - self.input_int_bits

    @property
    def weight_frac_bits(self) -> int:
        """Fractional bits of the fixed-point weights (bits)."""
        return self.weight_bits - self.weight_int_bits

    @property
    def n_streams(self) -> int:
        """Number of input streams with bit slicing (count)."""
        return self.input_bits // self.stream_width

    @property
    def n_slices(self) -> int:
        """Number of weight slices with bit slicing (count)."""
        return self.weight_bits // self.slice_width

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (JSON/YAML friendly).

        Returns:
            Mapping from field name to value.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrossbarConfig:
        """Build a configuration from a dict such as :meth:`to_dict` returns.

        A ``preset`` key starts from that preset; the other keys override its fields.

        Args:
            data: Field values (unknown keys are rejected).

        Returns:
            The validated configuration.

        Raises:
            CrossbarConfigError: On an unknown key, an unknown preset or an invalid value.
        """
        data = dict(data)
        base: dict[str, Any] = {}
        if "preset" in data:
            base = get_preset(str(data.pop("preset"))).to_dict()
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CrossbarConfigError(
                f"CrossbarConfig: unknown field(s) {unknown}; allowed fields: {sorted(names)}"
            )
        base.update(data)
        return cls(**base)

    def replace(self, **changes: Any) -> CrossbarConfig:
        """Return a copy with some fields changed (validated again).

        Args:
            **changes: Field values to change.

        Returns:
            The new configuration.
        """
        return dataclasses.replace(self, **changes)


def _fail(field_name: str, value: object, allowed: str, fix: str) -> CrossbarConfigError:
    return CrossbarConfigError(
        f"CrossbarConfig.{field_name}={value!r} is invalid: allowed {allowed}; {fix}"
    )


def _check_bits(
    cfg: CrossbarConfig, name: str, minimum: int, optional: bool, maximum: int = 32
) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        allowed = f"an integer in [{minimum}, {maximum}]" + (" or None" if optional else "")
        raise _fail(name, value, allowed, f"set {name} to a bit count in that range")


def _is_real(value: object) -> bool:
    """A finite int or float; ``True``/``False`` are not numbers in a config."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_nonneg(cfg: CrossbarConfig, name: str, unit: str) -> None:
    value = getattr(cfg, name)
    if not _is_real(value) or value < 0:
        raise _fail(name, value, f">= 0 {unit} (finite)", f"use a non-negative {name}")


#: Largest tile edge accepted: the exact programming solves an N^2-node circuit per tile.
_MAX_TILE = 1024


def _validate(cfg: CrossbarConfig) -> None:
    if (
        isinstance(cfg.tile_size, bool)
        or not isinstance(cfg.tile_size, int)
        or not 1 <= cfg.tile_size <= _MAX_TILE
    ):
        raise _fail(
            "tile_size", cfg.tile_size, f"an integer in [1, {_MAX_TILE}]", "use e.g. 32, 64 or 128"
        )
    for name in ("g_max", "g_min"):
        _check_nonneg(cfg, name, "S")
    if cfg.g_max <= 0:
        raise _fail("g_max", cfg.g_max, "> 0 S", "set g_max = 1/R_on")
    if cfg.g_min >= cfg.g_max:
        raise _fail(
            "g_min", cfg.g_min, f"0 <= g_min < g_max={cfg.g_max!r} S", "lower g_min or raise g_max"
        )
    if cfg.levels is not None and (
        isinstance(cfg.levels, bool) or not isinstance(cfg.levels, int) or cfg.levels < 2
    ):
        raise _fail("levels", cfg.levels, "an integer >= 2 or None", "use e.g. 16 or None")
    if not _is_real(cfg.v_read) or not cfg.v_read > 0:
        raise _fail("v_read", cfg.v_read, "> 0 V", "use e.g. 0.25")
    # Codes must stay exact in float32 (24-bit significand).
    _check_bits(cfg, "dac_bits", 2, optional=True, maximum=24)
    _check_bits(cfg, "adc_bits", 2, optional=True, maximum=24)
    p = cfg.calibration_percentile
    if not _is_real(p) or not (0 < p <= 100):
        raise _fail("calibration_percentile", p, "(0, 100] percent", "use 100 for max-abs")
    for name in ("input_bits", "weight_bits", "stream_width", "slice_width"):
        _check_bits(cfg, name, 1, optional=False)
    for name, total in (("input_int_bits", cfg.input_bits), ("weight_int_bits", cfg.weight_bits)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= total):
            raise _fail(name, value, f"an integer in [1, {total}] (sign included)", "fix it")
    if cfg.input_bits % cfg.stream_width:
        raise _fail(
            "stream_width",
            cfg.stream_width,
            f"a divisor of input_bits={cfg.input_bits}",
            "pick a width that divides the input precision",
        )
    if cfg.weight_bits % cfg.slice_width:
        raise _fail(
            "slice_width",
            cfg.slice_width,
            f"a divisor of weight_bits={cfg.weight_bits}",
            "pick a width that divides the weight precision",
        )
    if cfg.bit_slicing and cfg.input_bits > 24:
        raise _fail("input_bits", cfg.input_bits, "<= 24 with bit slicing", "lower it")
    if cfg.bit_slicing and cfg.weight_bits > 24:
        raise _fail("weight_bits", cfg.weight_bits, "<= 24 with bit slicing", "lower it")
    for name in ("r_wire", "r_source", "r_sink"):
        _check_nonneg(cfg, name, "ohm")
    _check_nonneg(cfg, "variation_sigma", "(relative)")
    if cfg.variation_sigma > 1.0:
        raise _fail(
            "variation_sigma",
            cfg.variation_sigma,
            "<= 1 (relative spread of the conductances)",
            "use e.g. 0.02 to 0.3",
        )
    if cfg.variation_model not in _VARIATION_MODELS:
        raise _fail("variation_model", cfg.variation_model, str(_VARIATION_MODELS), "pick one")
    for name in ("p_stuck_min", "p_stuck_max"):
        value = getattr(cfg, name)
        if not _is_real(value) or not (0 <= value <= 1):
            raise _fail(name, value, "[0, 1]", "use a fraction of devices")
    if cfg.p_stuck_min + cfg.p_stuck_max > 1:
        raise _fail(
            "p_stuck_max", cfg.p_stuck_max, f"<= 1 - p_stuck_min={1 - cfg.p_stuck_min}", "lower it"
        )
    _check_nonneg(cfg, "read_noise_sigma", "(relative)")
    _check_nonneg(cfg, "drift_nu", "(unitless)")
    if not _is_real(cfg.drift_t0) or not cfg.drift_t0 > 0:
        raise _fail("drift_t0", cfg.drift_t0, "> 0 s (finite)", "use e.g. 1.0")
    if not _is_real(cfg.drift_time) or not cfg.drift_time >= cfg.drift_t0:
        raise _fail(
            "drift_time", cfg.drift_time, f">= drift_t0={cfg.drift_t0} s (finite)", "raise it"
        )
    if cfg.gradient not in _GRADIENTS:
        raise _fail("gradient", cfg.gradient, str(_GRADIENTS), "pick one")
    if not isinstance(cfg.read_noise, bool) or not isinstance(cfg.bit_slicing, bool):
        raise _fail("read_noise/bit_slicing", (cfg.read_noise, cfg.bit_slicing), "bool", "fix")
    # Two fields switch one effect: a half-set pair would silently simulate no read noise.
    if cfg.read_noise != (cfg.read_noise_sigma > 0):
        raise _fail(
            "read_noise_sigma",
            cfg.read_noise_sigma,
            "> 0 with read_noise=True, 0 with read_noise=False",
            "set both (read_noise: true, read_noise_sigma: e.g. 0.05) or neither",
        )


# ---------------------------------------------------------------------- presets
#
# The "100k" family (Roy et al., Table II): R_on = 100 kOhm (g_max = 1e-5 S), R_off/R_on = 6,
# Vmax = 0.25 V. One set of parasitic resistances is shared by the three sizes (same technology,
# only N changes); it was fitted so that the project's own NF function
# (nvmpriv.crossbar.metrics.nonideality_factor with its defaults) gives NF = 0.14 at N = 32 and
# 0.26 at N = 64. Measurement protocol (the defaults of nonideality_factor): 32 random tiles, each
# cell's conductance i.i.d. uniform in [g_min, g_max], 8 input vectors per tile with each row
# voltage i.i.d. uniform in [0, v_read]; NF = mean over tiles, inputs and columns of
# (I_ideal - I_nonideal) / I_ideal with I_nonideal from the exact nodal solution; seed 0.
# Measured values: see MEASURED_NF below (checked by tests/test_crossbar_config.py).

_G_MAX_100K = 1e-5
_G_MIN_100K = _G_MAX_100K / 6
_R_WIRE_100K = 3.4
_R_SOURCE_100K = 400.0
_R_SINK_100K = 400.0

#: NF measured with ``metrics.nonideality_factor(PRESETS[name])`` (defaults above), recorded
#: when the resistances were fitted (r_wire 3.39 ohm, r_source = r_sink 399.6 ohm solve the two
#: targets exactly; rounded to 3.4 and 400 ohm). 128x128_100k is a prediction, not a target.
MEASURED_NF: dict[str, float] = {"32x32_100k": 0.1401, "64x64_100k": 0.2602, "128x128_100k": 0.4467}


def _roy(n: int) -> CrossbarConfig:
    return CrossbarConfig(
        name=f"{n}x{n}_100k",
        tile_size=n,
        g_max=_G_MAX_100K,
        g_min=_G_MIN_100K,
        v_read=0.25,
        dac_bits=8,
        adc_bits=10,
        r_wire=_R_WIRE_100K,
        r_source=_R_SOURCE_100K,
        r_sink=_R_SINK_100K,
        variation_sigma=0.02,
        variation_model="lognormal",
        extra={
            "source": "Roy et al. Table II (R_on 100 kOhm, R_off/R_on 6, Vmax 0.25 V)",
            "added": "8-bit DAC, 10-bit per-tile ADC and 2 % lognormal variation are this "
            "project's choices (Table II gives only the devices and the NF)",
        },
    )


def _pytorx(n: int) -> CrossbarConfig:
    # PytorX defaults: Gmax 3.33e-4 S, Gmin 3.33e-7 S, wire conductance 0.0357 S, load
    # conductance 0.25 S (used here for both the driver and the sense side), 8-bit DAC/ADC,
    # Vdd 3.3 V. NF with uniform conductances: 0.727 / 0.905 / 0.970 at N = 32 / 64 / 128; with
    # conductances programmed from Gaussian weights 0.405 / 0.697 / 0.885, the 43 / 69 / 89 %
    # column errors reported for PytorX (tests/test_crossbar_config.py).
    return CrossbarConfig(
        name=f"pytorx_{n}",
        tile_size=n,
        g_max=3.33e-4,
        g_min=3.33e-7,
        v_read=3.3,
        dac_bits=8,
        adc_bits=8,
        r_wire=1 / 0.0357,
        r_source=1 / 0.25,
        r_sink=1 / 0.25,
        extra={"source": "PytorX defaults (Gwire 0.0357 S, Gload 0.25 S, 8-bit DAC/ADC)"},
    )


def _build_presets() -> dict[str, CrossbarConfig]:
    presets: dict[str, CrossbarConfig] = {
        "ideal": CrossbarConfig(name="ideal", extra={"source": "all effects off"}),
    }
    for n in (32, 64, 128):
        presets[f"{n}x{n}_100k"] = _roy(n)
    presets["64x64_100k_bitsliced"] = dataclasses.replace(
        _roy(64),
        name="64x64_100k_bitsliced",
        bit_slicing=True,
        dac_bits=None,
        adc_bits=15,
        input_bits=16,
        input_int_bits=3,
        weight_bits=16,
        weight_int_bits=3,
        stream_width=4,
        slice_width=4,
        variation_sigma=0.0,
        extra={
            "source": "Roy et al. Table III: 16-bit fixed point, 4-bit streams and slices; "
            "ADC 14 bits of magnitude + 1 sign bit for the differential readout",
            "integer_bits": "Table III's 'integer bits 13' read as fractional bits (PUMA's "
            "weight_bit_frac, default 12): 13 fractional + 3 integer bits (sign included); "
            "use input_int_bits = weight_int_bits = 4 for the CIFAR-100 setting (12)",
            "layout": "weight slices on separate N x N tiles, each with the tile's IR drop",
        },
    )
    for n in (32, 64, 128):
        presets[f"pytorx_{n}"] = _pytorx(n)
    presets["pytorx_64_saf"] = dataclasses.replace(
        _pytorx(64), name="pytorx_64_saf", p_stuck_min=0.1, p_stuck_max=0.1
    )
    return presets


PRESETS: dict[str, CrossbarConfig] = _build_presets()
"""Named configurations; see each preset's ``extra["source"]`` for its provenance."""


def get_preset(name: str) -> CrossbarConfig:
    """Return the preset called ``name``.

    Args:
        name: A key of :data:`PRESETS`.

    Returns:
        The (frozen) configuration.

    Raises:
        CrossbarConfigError: If the name is unknown (the message lists the known names).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise CrossbarConfigError(
            f"unknown crossbar preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
