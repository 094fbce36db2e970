"""Config validation, presets (NF targets), serialization and the CLI."""

import json

import pytest

from nvmpriv.crossbar import PRESETS, CrossbarConfig, CrossbarConfigError, get_preset
from nvmpriv.crossbar.config import MEASURED_NF
from nvmpriv.crossbar.metrics import nonideality_factor
from nvmpriv.crossbar_cli import cli_main


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"r_wire": -1.0}, "r_wire", id="negative-r_wire"),
        pytest.param({"r_source": -5.0}, "r_source", id="negative-r_source"),
        pytest.param({"r_sink": float("nan")}, "r_sink", id="nan-r_sink"),
        pytest.param({"g_min": 2e-5, "g_max": 1e-5}, "g_min", id="gmin-above-gmax"),
        pytest.param({"g_min": 1e-5, "g_max": 1e-5}, "g_min", id="gmin-equals-gmax"),
        pytest.param({"adc_bits": 0}, "adc_bits", id="adc-zero-bits"),
        pytest.param({"dac_bits": -3}, "dac_bits", id="dac-negative-bits"),
        pytest.param({"input_bits": 0}, "input_bits", id="input-zero-bits"),
        pytest.param({"tile_size": 0}, "tile_size", id="tile-zero"),
        pytest.param({"tile_size": -8}, "tile_size", id="tile-negative"),
        pytest.param({"slice_width": 3}, "slice_width", id="slice-not-dividing"),
        pytest.param({"stream_width": 5}, "stream_width", id="stream-not-dividing"),
        pytest.param({"levels": 1}, "levels", id="one-level"),
        pytest.param({"p_stuck_min": 1.5}, "p_stuck_min", id="prob-above-one"),
        pytest.param({"variation_model": "uniform"}, "variation_model", id="bad-model"),
        pytest.param({"gradient": "none"}, "gradient", id="bad-gradient"),
        pytest.param({"calibration_percentile": True}, "calibration_percentile", id="bool-pct"),
        pytest.param({"p_stuck_min": True}, "p_stuck_min", id="bool-prob"),
        pytest.param({"v_read": True}, "v_read", id="bool-v_read"),
        pytest.param({"r_wire": True}, "r_wire", id="bool-r_wire"),
        pytest.param(
            {"drift_nu": 0.1, "drift_t0": float("inf"), "drift_time": float("inf")},
            "drift_t0",
            id="inf-drift-t0",
        ),
        pytest.param({"drift_nu": 0.1, "drift_time": float("inf")}, "drift_time", id="inf-drift"),
        pytest.param({"read_noise_sigma": 0.5}, "read_noise_sigma", id="noise-sigma-without-on"),
        pytest.param({"read_noise": True}, "read_noise_sigma", id="noise-on-without-sigma"),
    ],
)
def test_invalid_config_names_field_and_range(changes, field):
    with pytest.raises(CrossbarConfigError, match=f"CrossbarConfig.{field}=.*allowed"):
        CrossbarConfig(**changes)


def test_unknown_preset_lists_names():
    with pytest.raises(CrossbarConfigError, match=r"known presets: .*64x64_100k"):
        get_preset("65x65_100k")
    with pytest.raises(ValueError):
        CrossbarConfig.from_dict({"preset": "nope"})


def test_roundtrip_json():
    for cfg in PRESETS.values():
        again = CrossbarConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
    cfg = CrossbarConfig.from_dict({"preset": "64x64_100k", "adc_bits": 6})
    assert cfg.adc_bits == 6 and cfg.tile_size == 64
    with pytest.raises(CrossbarConfigError, match="unknown field"):
        CrossbarConfig.from_dict({"tile": 3})


def test_presets_are_frozen_and_roy_parameters():
    cfg = PRESETS["64x64_100k"]
    with pytest.raises(AttributeError):
        cfg.tile_size = 3  # type: ignore[misc]
    assert cfg.g_max == pytest.approx(1e-5) and cfg.g_max / cfg.g_min == pytest.approx(6)
    assert cfg.v_read == 0.25
    assert {"ideal", "32x32_100k", "64x64_100k", "128x128_100k", "pytorx_64"} <= set(PRESETS)


@pytest.mark.parametrize(("name", "target"), [("32x32_100k", 0.14), ("64x64_100k", 0.26)])
def test_preset_nonideality_factor(name, target):
    nf = nonideality_factor(PRESETS[name])
    assert abs(nf - target) <= 0.02
    assert nf == pytest.approx(MEASURED_NF[name], abs=1e-3)


@pytest.mark.parametrize(
    ("g_wire", "targets"), [(0.0357, (0.43, 0.69, 0.89)), (0.375, (0.06, 0.20, 0.44))]
)
def test_pytorx_column_errors_with_programmed_weights(g_wire, targets):
    # The reference's PytorX column errors (43/69/89 % and 6/20/44 % at N = 32/64/128) hold for
    # conductances programmed from weights, not for uniform conductances (which load the lines
    # more: 0.73/0.90/0.97 at 0.0357 S).
    cfg = PRESETS["pytorx_64"].replace(r_wire=1 / g_wire)
    for n, target in zip((32, 64, 128), targets, strict=True):
        weights = nonideality_factor(cfg, tile_size=n, n_tiles=8, conductances="gaussian_weights")
        uniform = nonideality_factor(cfg, tile_size=n, n_tiles=8)
        assert abs(weights - target) <= 0.05, (n, weights)
        assert uniform > weights + 0.05
    with pytest.raises(ValueError, match="gaussian_weights"):
        nonideality_factor(cfg, conductances="normal")


def test_cli_json(capsys):
    assert cli_main(["--preset", "32x32_100k", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["tile_size"] == 32
    assert abs(out["measured"]["nf"] - 0.14) <= 0.02
    assert 0.0 < out["measured"]["nf_gaussian_weights"] < out["measured"]["nf"]
    assert out["measured"]["mean_relative_column_error"] >= out["measured"]["nf"] - 1e-12
    assert out["simulator"].startswith(("native: ", "pure torch: "))


def test_cli_text_and_errors(capsys):
    assert cli_main(["--preset", "ideal"]) == 0
    text = capsys.readouterr().out
    assert "NF" in text and "simulator: " in text
    with pytest.raises(CrossbarConfigError, match="known presets"):
        cli_main(["--preset", "nope"])
    # through python -m nvmpriv: the common one-line error and exit code 2
    from nvmpriv.__main__ import main

    assert main(["crossbar", "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown crossbar preset 'nope'") and "--debug" in err
