"""Tests for nvmpriv.quantization (DoReFa): hand-computed levels, closed-form gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from nvmpriv.nets import ColumnFC, LeNet5
from nvmpriv.quantization import (
    QuantAct,
    QuantConv2d,
    QuantLinear,
    check_bits,
    dorefa_activation,
    dorefa_weight,
    quantize_k,
    quantize_model,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _on_grid(values: torch.Tensor, grid: torch.Tensor) -> bool:
    return bool((values.reshape(-1, 1) - grid.reshape(1, -1)).abs().min(1).values.max() < 1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_quantize_k_levels_and_ste(k: int) -> None:
    n = 2**k - 1
    r = torch.rand(5000, dtype=torch.float64, requires_grad=True)
    q = quantize_k(r, k)
    # Hand formula, independent of the implementation's STE trick.
    expected = torch.round(r.detach() * n) / n
    assert torch.equal(q.detach(), expected)
    assert q.unique().numel() <= 2**k
    q.backward(torch.arange(5000, dtype=torch.float64))
    # (g * n) / n is the identity up to one rounding.
    assert torch.allclose(r.grad, torch.arange(5000, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("k", [32, None])
def test_full_precision_is_identity(k) -> None:
    r = torch.randn(10)
    assert quantize_k(r, k) is r
    assert dorefa_weight(r, k) is r
    assert dorefa_activation(r, k) is r
    assert torch.equal(QuantAct(k)(r), r)


def test_quantize_k_hand_values() -> None:
    r = torch.tensor([0.0, 0.16, 0.17, 0.5, 0.83, 1.0])
    # k = 2: levels 0, 1/3, 2/3, 1; 3*0.16 = 0.48 -> 0, 3*0.17 = 0.51 -> 1, 1.5 -> 2 (half to even)
    assert torch.allclose(quantize_k(r, 2), torch.tensor([0, 0, 1, 2, 2, 3]) / 3.0)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dorefa_weight_levels(k: int) -> None:
    w = torch.randn(64, 32)
    wq = dorefa_weight(w, k)
    grid = 2 * torch.arange(2**k) / (2**k - 1) - 1
    assert wq.unique().numel() <= 2**k
    assert _on_grid(wq, grid)
    # The entry of largest |w| is mapped to +-1 exactly.
    j = w.abs().argmax()
    assert wq.flatten()[j].item() == pytest.approx(float(torch.sign(w.flatten()[j])))
    if k == 1:
        assert set(wq.unique().tolist()) <= {-1.0, 1.0}


def test_dorefa_weight_gradient_closed_form() -> None:
    # With the STE, dL/dw = d/dw [tanh(w) / M] . g with M = max|tanh w| (attained at j):
    # g_i (1 - t_i^2) / M, plus at j: -(sum_l g_l t_l) / M^2 * sign(t_j) (1 - t_j^2).
    w = torch.randn(50, dtype=torch.float64, requires_grad=True)
    g = torch.randn(50, dtype=torch.float64)
    dorefa_weight(w, 3).backward(g)
    t = torch.tanh(w.detach())
    j = int(t.abs().argmax())
    M = t.abs()[j]
    expected = g * (1 - t**2) / M
    expected[j] -= (g * t).sum() / M**2 * torch.sign(t[j]) * (1 - t[j] ** 2)
    assert torch.allclose(w.grad, expected, atol=1e-12)


def test_dorefa_weight_all_zero_is_finite() -> None:
    wq = dorefa_weight(torch.zeros(4, 4), 4)
    assert torch.isfinite(wq).all()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dorefa_activation_levels_and_gradient(k: int) -> None:
    a = (torch.rand(4000, dtype=torch.float64) * 3 - 1).requires_grad_(True)
    aq = dorefa_activation(a, k)
    assert aq.unique().numel() <= 2**k
    assert _on_grid(aq, torch.arange(2**k) / (2**k - 1))
    aq.sum().backward()
    inside = (a.detach() > 0) & (a.detach() < 1)
    assert torch.equal(a.grad, inside.to(torch.float64))


def test_signed_activation_hand_values_levels_and_gradient() -> None:
    # k = 2: levels -1, -1/3, 1/3, 1; u = (a + 1) / 2, 3u rounded half to even
    a = torch.tensor([-2.0, -0.5, -0.2, 0.0, 0.2, 0.5, 0.9, 3.0], requires_grad=True)
    aq = dorefa_activation(a, 2, signed=True)
    # 3u = 0, 0.75, 1.2, 1.5, 1.8, 2.25, 2.85, 3 -> 0, 1, 1, 2, 2, 2, 3, 3
    expected = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3]) * 2 / 3.0 - 1
    torch.testing.assert_close(aq.detach(), expected, rtol=0, atol=1e-6)
    aq.sum().backward()
    assert torch.equal(a.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 0]))
    assert torch.equal(QuantAct(2, signed=True)(a.detach()), aq.detach())


@pytest.mark.parametrize("signed", [False, True])
def test_quantizer_after_dropout_equals_dropout_of_quantized(signed: bool) -> None:
    """DoReFa order: dropout(quantize(a)). A layer fed by dropout sees a * m / (1 - p)."""
    p = 0.5
    a = torch.rand(20000) * 2.4 - 1.2
    mask = (torch.rand(20000) >= p).float()
    dropped = a * mask / (1 - p)
    got = dorefa_activation(dropped, 3, signed=signed, dropout=p)
    oracle = dorefa_activation(a, 3, signed=signed) * mask / (1 - p)
    torch.testing.assert_close(got, oracle, rtol=0, atol=1e-6)
    # without the dropout's p, every activation above 1 - p = 0.5 saturates (the old bug)
    naive = dorefa_activation(dropped, 3, signed=signed)
    assert (naive - oracle).abs().max() > 0.4
    with pytest.raises(ValueError, match="dropout"):
        dorefa_activation(a, 3, dropout=1.0)


def test_quantize_model_sees_dropout_and_tanh_inputs() -> None:
    from nvmpriv.nets import NasrFC

    relu = quantize_model(ColumnFC(64, 10, dropout=0.3), 4, 4)
    layers = [m for m in relu.modules() if isinstance(m, QuantLinear)]
    assert [(m.act_signed, m.input_dropout) for m in layers] == [(False, 0.3), (False, 0.3)]
    tanh = quantize_model(NasrFC(32, 5), 4, 4)
    layers = [m for m in tanh.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 and all(m.act_signed and m.input_dropout == 0 for m in layers)
    forced = quantize_model(NasrFC(32, 5), 4, 4, act_range="unsigned")
    assert not any(m.act_signed for m in forced.modules() if isinstance(m, QuantLinear))
    with pytest.raises(ValueError, match="act_range='both' is unknown"):
        quantize_model(NasrFC(32, 5), 4, 4, act_range="both")

    # In training, the layer after a dropout quantizes the pre-dropout activation: same
    # forward as dropout(quantize(relu(h))) with the same mask (fixed by the seed).
    net = relu.train()
    x = torch.randn(64, 64)
    torch.manual_seed(5)
    got = net(x)
    torch.manual_seed(5)
    seq = net.net
    h = F.dropout(dorefa_activation(seq[1](seq[0](x)), 4), 0.3, training=True)
    h = F.dropout(dorefa_activation(seq[4](seq[3](h)), 4), 0.3, training=True)
    oracle = F.linear(h, seq[6].weight, seq[6].bias)
    torch.testing.assert_close(got, oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("bits", "ok"),
    [(1, 1), (31, 31), (32, None), (None, None), (0, "err"), (33, "err"), (2.5, "err"),
     (True, "err")],
)  # fmt: skip
def test_check_bits(bits, ok) -> None:
    if ok == "err":
        with pytest.raises(ValueError, match="weight_bits"):
            check_bits(bits, "weight_bits")
        with pytest.raises(ValueError, match="act_bits"):
            quantize_model(nn.Linear(2, 2), 4, bits)
    else:
        assert check_bits(bits) == ok


def test_quant_layers_forward_matches_formula() -> None:
    lin = QuantLinear(8, 5, weight_bits=3, act_bits=2)
    x = torch.randn(7, 8)
    expected = F.linear(dorefa_activation(x, 2), dorefa_weight(lin.weight, 3), lin.bias)
    assert torch.allclose(lin(x), expected)
    assert lin.effective_weight.unique().numel() <= 8

    conv = QuantConv2d(4, 4, 3, padding=1, groups=4, weight_bits=2)
    xi = torch.randn(2, 4, 6, 6)
    expected = F.conv2d(xi, dorefa_weight(conv.weight, 2), conv.bias, padding=1, groups=4)
    assert torch.allclose(conv(xi), expected, atol=1e-6)
    assert conv.effective_weight.unique().numel() <= 4
    # Gradient reaches the float master weights, which stay unquantized.
    conv(xi).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.weight.unique().numel() > 4


def test_from_module_copies_everything() -> None:
    conv = nn.Conv2d(3, 6, 5, stride=2, padding=1, dilation=1, bias=False)
    q = QuantConv2d.from_module(conv, 4)
    assert torch.equal(q.weight, conv.weight) and q.bias is None
    assert (q.stride, q.padding, q.kernel_size) == (conv.stride, conv.padding, conv.kernel_size)
    assert q.weight is not conv.weight
    lin = nn.Linear(4, 3)
    ql = QuantLinear.from_module(lin, None)
    x = torch.randn(2, 4)
    assert torch.equal(ql(x), lin(x))


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def test_quantize_model_lenet_default() -> None:
    model = LeNet5(1, 10, 28)
    qmodel = quantize_model(model, 2, 3)
    assert all(type(m) in (nn.Linear, nn.Conv2d) for _, m in _weight_layers(model))  # original
    layers = _weight_layers(qmodel)
    first, last = layers[0][1], layers[-1][1]
    assert type(first) is nn.Conv2d
    assert torch.equal(first.weight, model.features[0].weight)
    # Last layer: full-precision weights, quantized input.
    assert isinstance(last, QuantLinear) and last.weight_bits is None and last.act_bits == 3
    assert torch.equal(last.effective_weight, model.classifier[-1].weight)
    for _, m in layers[1:-1]:
        assert isinstance(m, QuantConv2d | QuantLinear)
        assert m.weight_bits == 2 and m.act_bits == 3
        assert m.effective_weight.unique().numel() <= 4
    assert list(qmodel.state_dict()) == list(model.state_dict())
    qmodel.load_state_dict(model.state_dict())
    assert qmodel(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_quantize_model_activations_are_k_bit() -> None:
    """Each later layer computes with its input rounded to 2 bits: its output equals a plain
    linear map of ``round(3 clip(x, 0, 1)) / 3`` (hand formula) with the layer's weights."""
    qmodel = quantize_model(ColumnFC(64, 10, dropout=0.0), 4, 2).eval()
    seen: list[tuple[torch.Tensor, torch.Tensor, nn.Module]] = []
    for _, m in _weight_layers(qmodel)[1:]:
        m.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out, mod)))
    with torch.no_grad():
        qmodel(torch.rand(16, 64) * 4)
    assert len(seen) == 2
    for x, out, layer in seen:
        xq = torch.round(x.clamp(0, 1) * 3) / 3
        assert not torch.equal(xq, x)  # the raw inputs are off the 2-bit grid
        expected = F.linear(xq, layer.effective_weight, layer.bias)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_quantize_model_no_skip_and_full_precision() -> None:
    model = ColumnFC(64, 10)
    q_all = quantize_model(model, 4, None, skip_first_last=False)
    assert all(isinstance(m, QuantLinear) and m.weight_bits == 4 for _, m in _weight_layers(q_all))
    identical = quantize_model(model.eval(), 32, 32).eval()
    x = torch.rand(5, 64)
    assert torch.equal(identical(x), model(x))


def test_quantized_training_learns_digits() -> None:
    X, Y = load_digits(return_X_y=True)
    x, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(Y)
    model = quantize_model(ColumnFC(64, 10, dropout=0.0), 2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9
