r"""White-box L-infinity adversarial examples: PGD (Madry et al.) and FGSM, plus an eps sweep.

Pure torch; used by the PGD adversarial-training method and by robustness evaluation.
"Adversarial" here always means input perturbation, never a privacy attack.

The PGD iteration (Madry et al., 2018) for an input :math:`x` with label :math:`y` is

.. math::

    x^{0} = \Pi_{[lo, hi]}\bigl(x + u\bigr),\quad u \sim \mathcal U[-\epsilon, \epsilon]^d
    \qquad\text{(random start, optional)}

    x^{t+1} = \Pi_{[lo, hi]}\Bigl(\Pi_{B_\infty(x, \epsilon)}\bigl(x^{t}
        + \alpha\,\operatorname{sign}\nabla_{x} \mathcal L(f(x^{t}), y)\bigr)\Bigr)

where :math:`\Pi_{B_\infty(x,\epsilon)}` clips each coordinate to :math:`[x-\epsilon, x+\epsilon]`
and :math:`\Pi_{[lo, hi]}` clamps to the valid input range. Because the clean input lies in the
valid range, clamping after the ball projection keeps the iterate inside both sets.

Units: ``eps`` and ``alpha`` are in the units of the model input. For images scaled to [0, 1],
use :func:`pgd_eps_from_pixels` to convert the customary 8-bit values (e.g. 8/255).

Binary tabular data (Purchase100, Texas100, Location30): perturbed inputs are kept continuous in
[0, 1] (``clamp=(0, 1)``); they are *not* re-binarised. This is the usual white-box threat model
(the attacker feeds real-valued features to the net) and keeps the attack differentiable; a
rounding step would make most perturbations smaller than 0.5 vanish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LossFn",
    "fgsm_attack",
    "pgd_attack",
    "pgd_eps_from_pixels",
    "robust_accuracy",
]

#: A loss ``loss_fn(logits, y) -> scalar``; PGD ascends it.
LossFn = Callable[[Tensor, Tensor], Tensor]


def pgd_eps_from_pixels(eps_255: float) -> float:
    """Convert a perturbation budget on the 8-bit pixel scale to the [0, 1] input scale.

    Args:
        eps_255: Budget in 8-bit intensity levels (e.g. 8 for the common ``8/255``), in [0, 255].

    Returns:
        ``eps_255 / 255`` (dimensionless, for inputs scaled to [0, 1]).

    Raises:
        ValueError: If ``eps_255`` is outside [0, 255].

    Example:
        >>> round(pgd_eps_from_pixels(8), 6)
        0.031373
    """
    if not 0.0 <= float(eps_255) <= 255.0:
        raise ValueError(
            f"eps_255={eps_255!r} is outside [0, 255]: give the budget in 8-bit levels, e.g. 8"
        )
    return float(eps_255) / 255.0


@contextmanager
def _eval_mode(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Temporarily put ``model`` in eval mode, then restore every submodule's own flag."""
    if not enabled:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _validate(eps: float, alpha: float, steps: int, clamp: tuple[float, float] | None) -> None:
    if not eps >= 0.0:
        raise ValueError(f"eps={eps!r} is invalid: expected eps >= 0 (input units)")
    if not alpha >= 0.0:
        raise ValueError(f"alpha={alpha!r} is invalid: expected a step size alpha >= 0")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} is invalid: expected an integer >= 0")
    if clamp is not None and not clamp[0] < clamp[1]:
        raise ValueError(f"clamp={clamp!r} is invalid: expected (lo, hi) with lo < hi, or None")


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """Gradient of the loss with respect to the input only; parameters' ``.grad`` untouched."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        (grad,) = torch.autograd.grad(loss, [x])
    return grad


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    loss_fn: LossFn = F.cross_entropy,
    generator: torch.Generator | None = None,
    eval_mode: bool = True,
) -> Tensor:
    """L-infinity projected gradient ascent on the loss (Madry et al.).

    Works for any input shape (images ``[B, C, H, W]``, tabular ``[B, F]``); the perturbation is
    element-wise. Parameters' ``.grad`` are never written (the input gradient is taken with
    :func:`torch.autograd.grad`), and every submodule's train/eval flag is restored on exit.

    Args:
        model: Classifier returning logits.
        x: Clean inputs, inside ``clamp`` when given.
        y: Labels (whatever ``loss_fn`` expects; class indices for cross-entropy).
        eps: L-infinity radius, in input units (e.g. ``8/255`` for [0, 1] images).
        alpha: Step size per iteration, in input units (Madry: ``2.5 * eps / steps``).
        steps: Number of gradient steps (0 returns the random start, or ``x`` without one).
        random_start: Start from a uniform point in the eps-ball (clamped to the valid range).
        clamp: Valid input range ``(lo, hi)`` applied after every step, or ``None`` for no
            range constraint. Binary tabular inputs use ``(0, 1)`` and stay continuous.
        loss_fn: ``loss_fn(logits, y) -> scalar`` to maximise; defaults to mean cross-entropy.
            Any positive rescaling gives the same iterates (only the gradient sign is used).
        generator: Random generator for the random start (reproducible attacks).
        eval_mode: Run the model in eval mode during the attack (BatchNorm statistics are not
            updated, dropout is off); the previous modes are restored afterwards.

    Returns:
        Adversarial inputs, detached, same shape/dtype/device as ``x``, with
        ``x - eps <= x_adv <= x + eps`` and ``lo <= x_adv <= hi`` element-wise.

    Raises:
        ValueError: On a negative ``eps``/``alpha``/``steps``, a bad ``clamp``, or ``x`` outside
            ``clamp`` (e.g. normalised images: pass the normalised range or ``None``).
    """
    _validate(eps, alpha, steps, clamp)
    # Lightning validates under torch.inference_mode(); leave it so the input gradient exists.
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.detach().clone(), y.clone()
        return _pgd(
            model, x, y, eps, alpha, steps, random_start, clamp, loss_fn, generator, eval_mode
        )


def _pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool,
    clamp: tuple[float, float] | None,
    loss_fn: LossFn,
    generator: torch.Generator | None,
    eval_mode: bool,
) -> Tensor:
    if clamp is not None and x.numel() > 0 and (x.min() < clamp[0] or x.max() > clamp[1]):
        raise ValueError(
            f"x has values in [{x.min().item():.4g}, {x.max().item():.4g}] outside "
            f"clamp={clamp}: pass the range of your (normalised) inputs as clamp, or clamp=None"
        )
    lower, upper = x - eps, x + eps

    def project(z: Tensor) -> Tensor:
        z = torch.maximum(torch.minimum(z, upper), lower)
        return z.clamp(clamp[0], clamp[1]) if clamp is not None else z

    x_adv = x.clone()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_adv = project(x + (2.0 * noise - 1.0) * eps)
    with _eval_mode(model, eval_mode):
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y, loss_fn)
            x_adv = project(x_adv + alpha * grad.sign())
    return x_adv.detach()


def fgsm_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    loss_fn: LossFn = F.cross_entropy,
    eval_mode: bool = True,
) -> Tensor:
    """Fast gradient sign method: one PGD step of size ``eps`` from ``x`` (no random start).

    ``x_adv = clamp(x + eps * sign(grad_x loss))``.

    Args:
        model: Classifier returning logits.
        x: Clean inputs, inside ``clamp`` when given.
        y: Labels.
        eps: L-infinity radius, in input units.
        clamp: Valid input range ``(lo, hi)`` or ``None``.
        loss_fn: Loss to ascend, ``loss_fn(logits, y) -> scalar``.
        eval_mode: Run the model in eval mode during the attack (modes restored afterwards).

    Returns:
        Adversarial inputs, detached, same shape as ``x``.

    Raises:
        ValueError: As :func:`pgd_attack`.
    """
    return pgd_attack(
        model,
        x,
        y,
        eps=eps,
        alpha=eps,
        steps=1,
        random_start=False,
        clamp=clamp,
        loss_fn=loss_fn,
        eval_mode=eval_mode,
    )


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_list: Iterable[float],
    *,
    steps: int = 10,
    alpha_factor: float = 2.5,
    random_start: bool = True,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[float, float]:
    """Accuracy under PGD for each budget in ``eps_list`` (an eps sweep).

    For each ``eps`` the step size is ``alpha = alpha_factor * eps / steps`` (Madry's rule;
    with the defaults, eps = 8/255 gives alpha = 2/255). ``eps = 0`` gives the clean accuracy.
    The model is evaluated in eval mode; its modes are restored afterwards.

    Args:
        model: Classifier returning logits ``[B, C]``.
        x: Inputs ``[N, ...]`` inside ``clamp``.
        y: Integer labels ``[N]``.
        eps_list: Budgets in input units (e.g. ``[0, 2/255, 4/255, 8/255]``).
        steps: PGD steps per budget (>= 1).
        alpha_factor: Step size relative to ``eps / steps`` (> 0).
        random_start: Use a random start in the eps-ball.
        clamp: Valid input range or ``None``.
        loss_fn: Loss ascended by PGD.
        batch_size: Evaluate in chunks of this many samples (``None``: all at once).
        generator: Random generator for the random starts.

    Returns:
        ``{eps: accuracy}`` with accuracy the fraction (in [0, 1]) of samples whose PGD
        example is still classified as ``y``.

    Raises:
        ValueError: On bad ``steps``, ``alpha_factor``, ``batch_size`` or an invalid ``eps``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: expected an integer >= 1")
    if not alpha_factor > 0:
        raise ValueError(f"alpha_factor={alpha_factor!r} is invalid: expected > 0, e.g. 2.5")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected >= 1 or None")
    eps_values = [float(e) for e in eps_list]
    for eps in eps_values:
        _validate(eps, 0.0, 0, None)
    n = x.shape[0]
    chunk = max(n if batch_size is None else batch_size, 1)
    result: dict[float, float] = {}
    with _eval_mode(model, True):
        for eps in eps_values:
            correct = 0
            for start in range(0, n, chunk):
                xb, yb = x[start : start + chunk], y[start : start + chunk]
                if eps > 0:
                    xb = pgd_attack(
                        model,
                        xb,
                        yb,
                        eps=eps,
                        alpha=alpha_factor * eps / steps,
                        steps=steps,
                        random_start=random_start,
                        clamp=clamp,
                        loss_fn=loss_fn,
                        generator=generator,
                        eval_mode=False,
                    )
                with torch.no_grad():
                    correct += int((model(xb).argmax(dim=1) == yb).sum().item())
            result[eps] = correct / n if n else float("nan")
    return result
