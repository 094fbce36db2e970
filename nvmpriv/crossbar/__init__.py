"""Physically faithful RRAM/NVM crossbar simulator (pure torch; scipy for the exact reference).

Typical use::

    from nvmpriv.crossbar import PRESETS, convert, simulate

    chip = convert(model, PRESETS["64x64_100k"], seed=0, calibration=x_cal)
    with simulate(model, PRESETS["32x32_100k"], seed=1, calibration=x_cal) as m:
        logits = m(x)
"""

from nvmpriv.crossbar.config import PRESETS, CrossbarConfig, CrossbarConfigError, get_preset
from nvmpriv.crossbar.convert import (
    calibrate,
    convert,
    crossbar_layers,
    reprogram,
    simulate,
    unsupported_layers,
)
from nvmpriv.crossbar.layers import (
    CrossbarConv2d,
    CrossbarLayer,
    CrossbarLinear,
    NotCalibratedError,
)
from nvmpriv.crossbar.metrics import (
    ColumnError,
    LayerNoise,
    column_error,
    layer_noise,
    noise_sensitivity,
    nonideality_factor,
    snr,
)

__all__ = [
    "PRESETS",
    "ColumnError",
    "CrossbarConfig",
    "CrossbarConfigError",
    "CrossbarConv2d",
    "CrossbarLayer",
    "CrossbarLinear",
    "LayerNoise",
    "NotCalibratedError",
    "calibrate",
    "column_error",
    "convert",
    "crossbar_layers",
    "get_preset",
    "layer_noise",
    "noise_sensitivity",
    "nonideality_factor",
    "reprogram",
    "simulate",
    "snr",
    "unsupported_layers",
]
