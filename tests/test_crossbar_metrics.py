"""SNR / noise sensitivity against hand computations."""

import math

import pytest
import torch
from torch import nn

from nvmpriv.crossbar import CrossbarConfig, convert, layer_noise, noise_sensitivity, snr


def test_snr_and_ns_hand_computed():
    zd = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    za = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # sample 0: |za|^2 = 2, |zd-za|^2 = 1; sample 1: |za|^2 = 1, |zd-za|^2 = 1, |zd|^2 = 4
    assert snr(zd, za) == pytest.approx(math.log10((2.0 + 1.0) / 2))  # log of the mean ratio
    # ratios 121 and 4: log10(62.5) = 1.796, not the mean of the logs (1.342)
    zd2, za2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.1, 0.0], [2.0, 0.0]])
    assert snr(zd2, za2) == pytest.approx(math.log10((121.0 + 4.0) / 2), rel=1e-5)
    assert noise_sensitivity(zd, za) == pytest.approx((1.0 + 0.25) / 2)


def test_layer_noise_uniform_attenuation():
    # drift scales every conductance by f, so each pre-activation is scaled by f (layer 1)
    # and f^2 (layer 2, whose input is relu(f z) = f relu(z)); no bias keeps it exact.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))
    with torch.no_grad():
        model[0].weight.abs_()  # positive inputs and weights: no sample is all-zero after ReLU
    cfg = CrossbarConfig(tile_size=4, drift_nu=0.1, drift_time=10.0)
    f = 10.0**-0.1
    res = layer_noise(model, convert(model, cfg, seed=0), torch.rand(32, 6) + 0.1)
    assert set(res) == {"0", "2"}
    assert res["0"].noise_sensitivity == pytest.approx((1 - f) ** 2, rel=1e-4)
    assert res["0"].snr == pytest.approx(math.log10(f**2 / (1 - f) ** 2), rel=1e-4)
    assert res["2"].noise_sensitivity == pytest.approx((1 - f * f) ** 2, rel=1e-4)
    assert res["0"].snr_db == pytest.approx(10 * res["0"].snr)


def test_layer_noise_runs_in_eval_mode_and_restores_modes():
    # Same drift oracle as above, through a net with dropout and BatchNorm left in train mode:
    # in eval mode dropout is the identity and BatchNorm an affine map of its running statistics
    # (made positive here), so the attenuations are still f and f^2; the caller's modes and
    # running statistics come back untouched.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 5, bias=False),
        nn.BatchNorm1d(5, affine=False),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(5, 3, bias=False),
    )
    with torch.no_grad():
        model[0].weight.abs_()
        model[1].running_mean.zero_()
        model[1].running_var.fill_(4.0)
    cfg = CrossbarConfig(tile_size=4, drift_nu=0.1, drift_time=10.0)
    f = 10.0**-0.1
    chip = convert(model, cfg, seed=0)
    model.train()
    chip.train()
    stats = [model[1].running_mean.clone(), model[1].running_var.clone()]
    res = layer_noise(model, chip, torch.rand(32, 6) + 0.1)
    assert res["0"].noise_sensitivity == pytest.approx((1 - f) ** 2, rel=1e-4)
    assert res["4"].noise_sensitivity == pytest.approx((1 - f * f) ** 2, rel=1e-4)
    assert all(m.training for m in model.modules()) and all(m.training for m in chip.modules())
    assert torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].running_var, stats[1])
