"""Tests for nvmpriv.adversarial against closed forms (linear models) and a PGD-training check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from nvmpriv.adversarial import (
    fgsm_attack,
    pgd_attack,
    pgd_eps_from_pixels,
    robust_accuracy,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    X, Y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(Y)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _train(
    x: torch.Tensor, y: torch.Tensor, *, adv_eps: float | None, epochs: int = 30, seed: int = 0
) -> nn.Module:
    model = _mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(200):
            xb, yb = x[idx], y[idx]
            if adv_eps is not None:
                xb = pgd_attack(
                    model, xb, yb, eps=adv_eps, alpha=adv_eps / 2.5, steps=5, generator=gen
                )
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model


@pytest.fixture(scope="module")
def split(digits):
    x, y = digits
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    return x[tr], y[tr], x[te], y[te]


def test_eps_from_pixels() -> None:
    assert pgd_eps_from_pixels(8) == 8 / 255
    assert pgd_eps_from_pixels(0) == 0.0
    with pytest.raises(ValueError, match="eps_255"):
        pgd_eps_from_pixels(-1)
    with pytest.raises(ValueError, match="eps_255"):
        pgd_eps_from_pixels(300)


@pytest.mark.parametrize(
    ("shape", "model"),
    [
        pytest.param((16, 64), lambda: _mlp(), id="tabular"),
        pytest.param(
            (8, 1, 8, 8),
            lambda: nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
            ),
            id="image",
        ),
    ],
)
def test_inside_ball_and_range_exact(shape, model) -> None:
    net = model()
    x = torch.rand(shape)
    x[0].fill_(0.0)  # on the boundary of the valid range, so clamping is active
    x[1].fill_(1.0)
    y = torch.randint(0, 10, (shape[0],))
    eps = 0.1
    x_adv = pgd_attack(net, x, y, eps=eps, alpha=0.03, steps=7)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    # Exact: the same float expressions that define the ball.
    assert bool((x_adv <= x + eps).all()) and bool((x_adv >= x - eps).all())
    assert bool((x_adv >= 0).all()) and bool((x_adv <= 1).all())
    assert (x_adv - x).abs().max() > 0.05  # it actually moved


def test_mode_grads_and_bn_untouched() -> None:
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()
    net[3].eval()  # a mixed state must be restored exactly
    before = [m.training for m in net.modules()]
    stats = net[1].running_mean.clone()
    x, y = torch.rand(10, 5), torch.randint(0, 3, (10,))
    pgd_attack(net, x, y, eps=0.2, alpha=0.05, steps=3)
    assert [m.training for m in net.modules()] == before
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(net[1].running_mean, stats)
    # Pre-existing gradients are left exactly as they were.
    F.cross_entropy(net(x), y).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    pgd_attack(net, x, y, eps=0.2, alpha=0.05, steps=3)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads, strict=True))


def test_generator_reproducible() -> None:
    net = _mlp()
    x, y = torch.rand(6, 64), torch.randint(0, 10, (6,))
    a = pgd_attack(
        net, x, y, eps=0.1, alpha=0.0, steps=0, generator=torch.Generator().manual_seed(3)
    )
    b = pgd_attack(
        net, x, y, eps=0.1, alpha=0.0, steps=0, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b) and not torch.equal(a, x)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inf"])
def test_works_under_no_grad_and_inference_mode(context) -> None:
    # Lightning runs validation_step under inference mode; the attack must still see gradients.
    net = _mlp()
    x, y = torch.rand(6, 64), torch.randint(0, 10, (6,))
    ref = pgd_attack(net, x, y, eps=0.1, alpha=0.02, steps=3, random_start=False)
    with context():
        xi, yi = x.clone(), y.clone()
        got = pgd_attack(net, xi, yi, eps=0.1, alpha=0.02, steps=3, random_start=False)
        acc = robust_accuracy(net, xi, yi, [0.1], steps=3, random_start=False)
    assert torch.equal(got, ref) and not torch.equal(got, x)
    assert acc == robust_accuracy(net, x, y, [0.1], steps=3, random_start=False)


def _linear(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def test_binary_linear_closed_form() -> None:
    # For 2 logits, CE = softplus(-(m)) with margin m = (w_y - w_o).x + (b_y - b_o); over the
    # L-inf ball the worst case is x - eps * sign(w_y - w_o), margin m - eps ||w_y - w_o||_1.
    w, b = torch.randn(2, 20), torch.randn(2)
    lin = _linear(w, b)
    x, y = torch.randn(32, 20), torch.randint(0, 2, (32,))
    eps = 0.3
    d = w[y] - w[1 - y]
    x_star = x - eps * d.sign()
    margin = (d * x).sum(1) + b[y] - b[1 - y] - eps * d.abs().sum(1)
    closed = F.softplus(-margin).mean()
    x_adv = pgd_attack(lin, x, y, eps=eps, alpha=eps / 4, steps=10, clamp=None)
    assert torch.allclose(x_adv, x_star, atol=1e-6)
    assert F.cross_entropy(lin(x_adv), y).item() == pytest.approx(closed.item(), rel=1e-5)
    # FGSM reaches the same optimum in one step for a linear model.
    assert torch.allclose(fgsm_attack(lin, x, y, eps=eps, clamp=None), x_star, atol=1e-6)


def test_multiclass_linear_margin_closed_form() -> None:
    # Targeted margin loss z_t - z_y is linear in x, so its max over the ball is attained at
    # x - eps * sign(w_y - w_t) with value (w_t - w_y).x + b_t - b_y + eps ||w_y - w_t||_1.
    C, D = 5, 12
    w, b = torch.randn(C, D), torch.randn(C)
    lin = _linear(w, b)
    x, y = torch.randn(16, D), torch.randint(0, C, (16,))
    t = (y + 1) % C

    def margin_loss(z: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return (z.gather(1, ((yy + 1) % C)[:, None]) - z.gather(1, yy[:, None])).sum()

    d = w[y] - w[t]
    closed = ((-d * x).sum(1) + b[t] - b[y] + 0.2 * d.abs().sum(1)).sum()
    x_adv = pgd_attack(lin, x, y, eps=0.2, alpha=0.05, steps=10, clamp=None, loss_fn=margin_loss)
    assert margin_loss(lin(x_adv), y).item() == pytest.approx(closed.item(), rel=1e-5, abs=1e-4)


def test_robust_accuracy_linear_oracle() -> None:
    # A binary linear classifier stays correct under eps iff margin > eps ||w_y - w_o||_1.
    w, b = torch.randn(2, 10), torch.randn(2)
    lin = _linear(w, b)
    x = torch.rand(200, 10)
    y = lin(x).argmax(1)
    flip = torch.rand(200) < 0.2
    y = torch.where(flip, 1 - y, y)
    d = w[y] - w[1 - y]
    margin = (d * x).sum(1) + b[y] - b[1 - y]
    eps_list = [0.0, 0.02, 0.05]
    got = robust_accuracy(lin, x, y, eps_list, steps=10, clamp=None)
    for eps in eps_list:
        oracle = ((margin - eps * d.abs().sum(1)) > 0).float().mean().item()
        assert got[eps] == pytest.approx(oracle)
    assert list(got) == eps_list


def test_pgd_loss_exceeds_clean_loss(split) -> None:
    xtr, ytr, xte, yte = split
    model = _train(xtr, ytr, adv_eps=None, epochs=10)
    x_adv = pgd_attack(model, xte, yte, eps=0.1, alpha=0.025, steps=10)
    with torch.no_grad():
        clean = F.cross_entropy(model(xte), yte, reduction="none")
        adv = F.cross_entropy(model(x_adv), yte, reduction="none")
    assert bool((adv >= clean - 1e-6).all())
    assert adv.mean() > 2 * clean.mean()
    # PGD is at least as strong as FGSM on average.
    x_f = fgsm_attack(model, xte, yte, eps=0.1)
    with torch.no_grad():
        assert adv.mean() >= F.cross_entropy(model(x_f), yte)


def test_pgd_training_improves_robustness(split) -> None:
    xtr, ytr, xte, yte = split
    eps = 0.15
    standard = _train(xtr, ytr, adv_eps=None)
    robust = _train(xtr, ytr, adv_eps=eps)
    gen = torch.Generator().manual_seed(1)
    acc_std = robust_accuracy(standard, xte, yte, [0.0, eps], generator=gen)
    acc_rob = robust_accuracy(robust, xte, yte, [0.0, eps], generator=gen)
    assert acc_std[0.0] > 0.9 and acc_rob[0.0] > 0.85
    assert acc_rob[eps] > acc_std[eps] + 0.25


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"eps": -0.1, "alpha": 0.1, "steps": 1}, "eps"),
        ({"eps": 0.1, "alpha": -1.0, "steps": 1}, "alpha"),
        ({"eps": 0.1, "alpha": 0.1, "steps": -1}, "steps"),
        ({"eps": 0.1, "alpha": 0.1, "steps": 1, "clamp": (1.0, 0.0)}, "clamp"),
    ],
)
def test_bad_arguments(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        pgd_attack(_mlp(), torch.rand(2, 64), torch.zeros(2, dtype=torch.long), **kwargs)


def test_input_outside_range_rejected() -> None:
    with pytest.raises(ValueError, match="clamp"):
        pgd_attack(_mlp(), torch.randn(4, 64) * 3, torch.zeros(4, dtype=torch.long), eps=0.1,
                   alpha=0.1, steps=1)  # fmt: skip
    with pytest.raises(ValueError, match="eps"):
        robust_accuracy(_mlp(), torch.rand(4, 64), torch.zeros(4, dtype=torch.long), [-0.1])
