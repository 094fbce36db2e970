r"""Weight pruning: ADMM (Zhang et al.), magnitude, L1-filter and network-slimming masks.

Pure torch. Conventions shared by every function here:

* **Prunable weights** are the ``weight`` parameters of ``nn.Linear`` and ``nn.Conv2d`` modules
  (subclasses included, e.g. quantized layers). Biases and BatchNorm parameters are only masked
  by the structured methods, together with the channel they belong to.
* **Keys** are parameter names as in ``model.named_parameters()`` (``"features.0.weight"``).
  A ``sparsities`` argument is either one float (applied to every targeted weight) or a mapping
  from such names to floats.
* **Masks** are ``dict[str, BoolTensor]`` keyed by parameter name, same shape as the parameter,
  ``True`` = kept, ``False`` = pruned.
* **Count** (exact): pruning ``n`` items (entries, filters or channels) at sparsity ``s`` removes
  exactly ``floor(s * n)`` of them. ``s * n`` is first rounded to 6 decimals so that float noise
  (``0.57 * 100 = 56.99999999999999``) does not lose an item. Because ``s < 1``, at least one item
  is always kept.
* **Ties** (exact, deterministic): items are ranked by their score (``|w|``, the filter's L1 norm,
  ``|gamma|``) ascending, and among equal scores the one with the smaller flat index (row-major;
  for global rankings, earlier layer in ``named_parameters`` order first) is pruned first.

ADMM pruning solves :math:`\min_W f(W)` s.t. :math:`\|W_i\|_0 \le l_i` by alternating

.. math::

    W \leftarrow \arg\min_W f(W) + \sum_i \frac{\rho}{2}\,\|W_i - Z_i + U_i\|_F^2
    \quad\text{(a few epochs of SGD/Adam on the penalised loss)},

    Z_i \leftarrow \Pi_{\|\cdot\|_0 \le l_i}(W_i + U_i), \qquad U_i \leftarrow U_i + W_i - Z_i,

then hard-prunes :math:`W` to the largest-magnitude entries and retrains with masked gradients
(:func:`register_mask_hooks`). Zhang et al. use :math:`\rho/2 = 10^{-4}` on summed squares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "AdmmState",
    "Masks",
    "admm_penalty",
    "admm_update",
    "apply_masks",
    "check_sparsity",
    "global_magnitude_masks",
    "l1_filter_masks",
    "magnitude_mask",
    "magnitude_masks",
    "num_pruned",
    "project_to_sparsity",
    "prunable_weights",
    "register_mask_hooks",
    "slimming_masks",
    "slimming_penalty",
    "sparsity_report",
]

#: Masks keyed by parameter name; ``True`` = kept.
Masks = dict[str, Tensor]


# --------------------------------------------------------------------------- validation / counting


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Validate a sparsity (fraction of pruned items).

    Args:
        sparsity: Fraction in [0, 1).
        name: Field name used in the error message.

    Returns:
        ``float(sparsity)``.

    Raises:
        ValueError: If ``sparsity`` is not a number in [0, 1).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise ValueError(f"{name}={sparsity!r} is not a number: give a fraction in [0, 1)")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"{name}={sparsity!r} is outside [0, 1): give the fraction of weights to prune, "
            f"e.g. 0.7 (1.0 would remove every weight)"
        )
    return float(sparsity)


def num_pruned(n: int, sparsity: float) -> int:
    """Number of items pruned out of ``n`` at ``sparsity``: ``floor(sparsity * n)``.

    Args:
        n: Number of items (entries, filters, channels), >= 0.
        sparsity: Fraction in [0, 1).

    Returns:
        ``floor(round(sparsity * n, 6))``, always <= ``n - 1`` for ``n >= 1``.

    Raises:
        ValueError: If ``sparsity`` is outside [0, 1) or ``n`` is negative.

    Example:
        >>> num_pruned(100, 0.57), num_pruned(10, 0.99), num_pruned(7, 0.5)
        (57, 9, 3)
    """
    s = check_sparsity(sparsity)
    if n < 0:
        raise ValueError(f"n={n} is invalid: expected a non-negative number of items")
    return min(math.floor(round(s * n, 6)), max(n - 1, 0))


def _prune_lowest(scores: Tensor, n_prune: int) -> Tensor:
    """Keep-mask over 1-D ``scores``: the ``n_prune`` lowest (ties: lower index) are False."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        order = torch.sort(scores, stable=True).indices
        keep[order[:n_prune]] = False
    return keep


# --------------------------------------------------------------------------- unstructured


def magnitude_mask(w: Tensor, sparsity: float) -> Tensor:
    """Keep-mask of the largest-``|w|`` entries: exactly ``floor(sparsity * numel)`` are pruned.

    Args:
        w: Weight tensor (any shape).
        sparsity: Fraction of entries to prune, in [0, 1).

    Returns:
        Bool tensor shaped like ``w``; ties pruned in increasing flat (row-major) index order.

    Raises:
        ValueError: If ``sparsity`` is outside [0, 1).
    """
    n_prune = num_pruned(w.numel(), sparsity)
    return _prune_lowest(w.detach().abs().flatten(), n_prune).reshape(w.shape)


def project_to_sparsity(w: Tensor, sparsity: float) -> Tensor:
    """Euclidean projection onto ``{W : nnz(W) <= numel - floor(sparsity * numel)}``.

    Keeps the largest-magnitude entries and zeroes the rest (see :func:`magnitude_mask`).

    Args:
        w: Tensor to project (not modified).
        sparsity: Fraction of entries set to zero, in [0, 1).

    Returns:
        A new tensor ``w * mask``.

    Raises:
        ValueError: If ``sparsity`` is outside [0, 1).
    """
    return w * magnitude_mask(w, sparsity).to(w.dtype)


def prunable_weights(model: nn.Module) -> dict[str, Tensor]:
    """The prunable weights: ``weight`` of every ``nn.Linear`` / ``nn.Conv2d``, in module order.

    Args:
        model: Any module.

    Returns:
        ``{parameter name: parameter}`` (e.g. ``{"features.0.weight": ...}``).
    """
    return {name: module.weight for name, (_, module) in _owner_modules(model).items()}


def _resolve_sparsities(
    candidates: Mapping[str, Tensor], sparsities: float | Mapping[str, float], what: str
) -> dict[str, float]:
    if isinstance(sparsities, Mapping):
        unknown = sorted(set(sparsities) - set(candidates))
        if unknown:
            raise ValueError(
                f"sparsities has unknown {what} {unknown}: use parameter names from "
                f"named_parameters(), one of {sorted(candidates)}"
            )
        return {k: check_sparsity(v, f"sparsities[{k!r}]") for k, v in sparsities.items()}
    s = check_sparsity(sparsities)
    return dict.fromkeys(candidates, s)


def magnitude_masks(model: nn.Module, sparsities: float | Mapping[str, float]) -> Masks:
    """Per-layer L1 unstructured (magnitude) pruning masks.

    Args:
        model: Net whose prunable weights are ranked (see :func:`prunable_weights`).
        sparsities: One fraction in [0, 1) for every prunable weight, or ``{param name: fraction}``
            for just those weights.

    Returns:
        Masks for the targeted weights; each prunes exactly ``floor(s * numel)`` entries.

    Raises:
        ValueError: On a sparsity outside [0, 1) or an unknown/non-prunable parameter name.
    """
    weights = prunable_weights(model)
    targets = _resolve_sparsities(weights, sparsities, "prunable weights")
    return {name: magnitude_mask(weights[name], s) for name, s in targets.items()}


def global_magnitude_masks(
    model: nn.Module, sparsity: float, names: Iterable[str] | None = None
) -> Masks:
    """Global L1 unstructured pruning: one magnitude threshold across the selected weights.

    Exactly ``floor(sparsity * total)`` entries are pruned, where ``total`` is the number of
    entries of all selected weights; ties pruned in (layer order, flat index) order.

    Args:
        model: Net to prune.
        sparsity: Global fraction of entries to prune, in [0, 1).
        names: Parameter names to include (default: every prunable weight).

    Returns:
        Masks for the selected weights.

    Raises:
        ValueError: On a sparsity outside [0, 1) or an unknown parameter name.
    """
    weights = prunable_weights(model)
    selected = list(weights) if names is None else list(names)
    _resolve_sparsities(weights, dict.fromkeys(selected, 0.0), "prunable weights")
    flat = torch.cat([weights[n].detach().abs().flatten() for n in selected])
    keep = _prune_lowest(flat, num_pruned(flat.numel(), sparsity))
    masks: Masks = {}
    start = 0
    for n in selected:
        w = weights[n]
        masks[n] = keep[start : start + w.numel()].reshape(w.shape)
        start += w.numel()
    return masks


# --------------------------------------------------------------------------- structured


def _owner_modules(model: nn.Module) -> dict[str, tuple[str, nn.Linear | nn.Conv2d]]:
    """Map each prunable weight name to (module name, module), in module order."""
    out: dict[str, tuple[str, nn.Linear | nn.Conv2d]] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            out[f"{mod_name}.weight" if mod_name else "weight"] = (mod_name, module)
    return out


def _param_name(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def l1_filter_masks(
    model: nn.Module,
    sparsities: float | Mapping[str, float],
    *,
    exclude_last: bool = True,
) -> Masks:
    """L1 filter pruning: remove whole output channels (conv filters / linear rows) by L1 norm.

    For each targeted weight of shape ``[out, ...]`` the ``floor(s * out)`` output channels with
    the smallest ``sum |w[o]|`` are pruned (ties: lower channel index first); the matching bias
    entries are masked too, so a pruned channel outputs exactly 0 before any normalisation.

    Args:
        model: Net to prune.
        sparsities: One fraction for every targeted weight, or ``{param name: fraction}``.
        exclude_last: With a single float, skip the last prunable layer (pruning the classifier's
            rows would delete classes). Ignored when ``sparsities`` is a mapping.

    Returns:
        Masks for the targeted weights and their biases.

    Raises:
        ValueError: On a sparsity outside [0, 1) or an unknown parameter name.
    """
    owners = _owner_modules(model)
    weights = {n: m.weight for n, (_, m) in owners.items()}
    if not isinstance(sparsities, Mapping) and exclude_last and weights:
        last = list(weights)[-1]
        sparsities = dict.fromkeys([n for n in weights if n != last], sparsities)
    targets = _resolve_sparsities(weights, sparsities, "prunable weights")
    masks: Masks = {}
    for name, s in targets.items():
        mod_name, module = owners[name]
        w = weights[name].detach()
        scores = w.abs().flatten(1).sum(1)
        keep = _prune_lowest(scores, num_pruned(w.shape[0], s))
        masks[name] = keep.reshape(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
        if getattr(module, "bias", None) is not None:
            masks[_param_name(mod_name, "bias")] = keep.clone()
    return masks


def slimming_penalty(model: nn.Module, lam: float) -> Tensor:
    """Network-slimming sparsity regulariser ``lam * sum |gamma|`` over all BatchNorm scales.

    Args:
        model: Net with ``nn.BatchNorm1d/2d`` layers (affine).
        lam: Regularisation strength (Liu et al. use 1e-4 to 1e-5), >= 0.

    Returns:
        Scalar tensor (0 if the net has no affine BatchNorm).

    Raises:
        ValueError: If ``lam`` is negative.
    """
    if not lam >= 0:
        raise ValueError(f"lam={lam!r} is invalid: expected a regularisation strength >= 0")
    terms = [
        m.weight.abs().sum()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    if not terms:
        return torch.zeros(())
    return lam * torch.stack(terms).sum()


def slimming_masks(model: nn.Module, sparsity: float) -> Masks:
    """Network slimming (Liu et al.): prune channels with the smallest ``|gamma|`` globally.

    All affine BatchNorm channels of the net are ranked together by ``|gamma|``; exactly
    ``floor(sparsity * total_channels)`` are pruned (ties: earlier layer, then lower index first).
    For a pruned channel the mask zeroes the BatchNorm ``weight`` and ``bias`` (so the channel
    outputs exactly 0) and, when the layer registered just before the BatchNorm is a Linear/Conv2d
    with as many outputs as the BatchNorm has channels, that layer's filter (and bias) too.

    Args:
        model: Net with affine ``nn.BatchNorm1d/2d`` layers.
        sparsity: Fraction of channels to prune, in [0, 1). Note that a whole BatchNorm layer can
            be emptied at high sparsity, which cuts the signal in a plain (non-residual) chain.

    Returns:
        Masks keyed by parameter name (BatchNorm weight/bias and producer weight/bias).

    Raises:
        ValueError: If ``sparsity`` is outside [0, 1) or the net has no affine BatchNorm.
    """
    check_sparsity(sparsity)
    bns: list[
        tuple[str, nn.modules.batchnorm._BatchNorm, tuple[str, nn.Linear | nn.Conv2d] | None]
    ] = []
    producer: tuple[str, nn.Linear | nn.Conv2d] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            producer = (name, m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                match = producer
                if match is not None:
                    prod_out = getattr(match[1], "out_features", None) or getattr(
                        match[1], "out_channels", None
                    )
                    if prod_out != m.num_features:
                        match = None
                bns.append((name, m, match))
            producer = None
    if not bns:
        raise ValueError("model has no affine BatchNorm layer: network slimming needs BN scales")
    scores = torch.cat([bn.weight.detach().abs().flatten() for _, bn, _ in bns])
    keep_all = _prune_lowest(scores, num_pruned(scores.numel(), sparsity))
    masks: Masks = {}
    start = 0
    for name, bn, prod in bns:
        keep = keep_all[start : start + bn.num_features].clone()
        start += bn.num_features
        masks[_param_name(name, "weight")] = keep
        if bn.bias is not None:
            masks[_param_name(name, "bias")] = keep.clone()
        if prod is not None:
            pname, pmod = prod
            w = pmod.weight
            masks[_param_name(pname, "weight")] = (
                keep.reshape(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
            )
            if getattr(pmod, "bias", None) is not None:
                masks[_param_name(pname, "bias")] = keep.clone()
    return masks


# --------------------------------------------------------------------------- applying masks


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    params: dict[str, Tensor] = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(
                f"mask key {name!r} is not a parameter of the model: build masks from this model"
            )
        if mask.shape != params[name].shape:
            raise ValueError(
                f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has "
                f"{tuple(params[name].shape)}: rebuild the masks for this model"
            )
    return params


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned entries of the model's parameters in place.

    Args:
        model: Net to prune.
        masks: Keep-masks keyed by parameter name (bool or 0/1 tensors).

    Raises:
        ValueError: If a key is not a parameter name or a shape differs.
    """
    params = _check_masks(model, masks)
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            p.mul_(mask.to(device=p.device, dtype=p.dtype))


def register_mask_hooks(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> list[RemovableHandle]:
    """Keep pruned weights at exactly zero during masked retraining.

    Applies the masks once, then registers a gradient hook on each masked parameter that
    multiplies its gradient by the mask. With a fresh SGD/Adam optimizer that is enough; but
    momentum buffers or optimizer state from before pruning can still move a pruned entry, so
    if ``optimizer`` is given the masks are also re-applied after every ``optimizer.step()``
    (exact zeros whatever the optimizer).

    Args:
        model: Net being retrained.
        masks: Keep-masks keyed by parameter name.
        optimizer: Optional optimizer whose steps are followed by :func:`apply_masks`.

    Returns:
        Handles; call ``.remove()`` on each to stop masking.

    Raises:
        ValueError: If a key is not a parameter name or a shape differs.
    """
    params = _check_masks(model, masks)
    apply_masks(model, masks)
    handles: list[RemovableHandle] = []
    for name, mask in masks.items():
        p = params[name]
        m = mask.to(device=p.device, dtype=p.dtype)
        handles.append(p.register_hook(lambda g, m=m: g * m))
    if optimizer is not None:
        frozen = dict(masks)
        handles.append(
            optimizer.register_step_post_hook(lambda opt, args, kwargs: apply_masks(model, frozen))
        )
    return handles


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero entries of each prunable weight, plus their overall fraction.

    Args:
        model: Any net.

    Returns:
        ``{param name: zero fraction in [0, 1]}`` for every prunable weight, and ``"total"``:
        zeros / entries over all of them (0.0 if there are none).
    """
    report: dict[str, float] = {}
    zeros = total = 0
    for name, w in prunable_weights(model).items():
        z = int((w.detach() == 0).sum().item())
        report[name] = z / w.numel() if w.numel() else 0.0
        zeros += z
        total += w.numel()
    report["total"] = zeros / total if total else 0.0
    return report


# --------------------------------------------------------------------------- ADMM


@dataclass
class AdmmState:
    """Auxiliary ADMM variables ``Z`` (sparse copy) and ``U`` (scaled dual) for each pruned weight.

    Build it with :meth:`from_model`; keys are parameter names as in :func:`prunable_weights`.

    Attributes:
        sparsities: Target fraction of zeros per weight, in [0, 1).
        Z: Sparse auxiliary variables, same shapes as the weights.
        U: Scaled dual variables, same shapes as the weights.
    """

    sparsities: dict[str, float]
    Z: dict[str, Tensor] = field(default_factory=dict)
    U: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: nn.Module, sparsities: float | Mapping[str, float]) -> AdmmState:
        """Initialise ``Z = project(W)`` and ``U = 0`` (Zhang et al.).

        Args:
            model: Net to prune.
            sparsities: One fraction in [0, 1) for every prunable weight, or a mapping from
                parameter names to fractions.

        Returns:
            The new state (tensors on the weights' devices).

        Raises:
            ValueError: On a sparsity outside [0, 1) or an unknown parameter name.
        """
        weights = prunable_weights(model)
        targets = _resolve_sparsities(weights, sparsities, "prunable weights")
        Z = {n: project_to_sparsity(weights[n].detach(), s) for n, s in targets.items()}
        U = {n: torch.zeros_like(weights[n].detach()) for n in targets}
        return cls(targets, Z, U)

    def masks(self, model: nn.Module) -> Masks:
        """Hard-pruning masks: the largest-``|W|`` entries of the current weights.

        Args:
            model: The net being pruned.

        Returns:
            Masks with exactly ``floor(s * numel)`` pruned entries per weight.
        """
        return magnitude_masks(model, self.sparsities)

    def state_dict(self) -> dict[str, object]:
        """Return a checkpointable copy (for Lightning's ``on_save_checkpoint``)."""
        return {
            "sparsities": dict(self.sparsities),
            "Z": {k: v.clone() for k, v in self.Z.items()},
            "U": {k: v.clone() for k, v in self.U.items()},
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore from :meth:`state_dict` output.

        Args:
            state: Mapping with keys ``sparsities``, ``Z``, ``U``.
        """
        self.sparsities = dict(state["sparsities"])  # type: ignore[call-overload]
        self.Z = {k: v.clone() for k, v in state["Z"].items()}  # type: ignore[attr-defined]
        self.U = {k: v.clone() for k, v in state["U"].items()}  # type: ignore[attr-defined]

    def to(self, device: torch.device | str) -> AdmmState:
        """Move ``Z`` and ``U`` to ``device`` in place and return ``self``.

        Args:
            device: Target device.

        Returns:
            ``self``.
        """
        self.Z = {k: v.to(device) for k, v in self.Z.items()}
        self.U = {k: v.to(device) for k, v in self.U.items()}
        return self


def _state_weights(model: nn.Module, state: AdmmState) -> dict[str, Tensor]:
    params: dict[str, Tensor] = dict(model.named_parameters())
    missing = sorted(set(state.Z) - set(params))
    if missing:
        raise ValueError(f"AdmmState has weights {missing} that the model lacks: rebuild the state")
    for n in state.Z:
        # Follow the model if it was moved (e.g. by Lightning) after the state was built.
        if state.Z[n].device != params[n].device:
            state.Z[n] = state.Z[n].to(params[n].device)
            state.U[n] = state.U[n].to(params[n].device)
    return {n: params[n] for n in state.Z}


def admm_penalty(model: nn.Module, state: AdmmState, rho: float) -> Tensor:
    """ADMM augmented-Lagrangian term ``sum_i rho/2 * ||W_i - Z_i + U_i||_F^2`` (summed squares).

    Add it to the task loss during the W-phase; it is differentiable w.r.t. the weights only.

    Args:
        model: Net being pruned.
        state: Current ``Z``/``U``.
        rho: Penalty parameter, >= 0 (Zhang et al.: ``rho / 2 = 1e-4``).

    Returns:
        Scalar tensor.

    Raises:
        ValueError: If ``rho`` is negative or the state does not match the model.
    """
    if not rho >= 0:
        raise ValueError(f"rho={rho!r} is invalid: expected a penalty parameter >= 0")
    weights = _state_weights(model, state)
    terms = [(w - state.Z[n] + state.U[n]).pow(2).sum() for n, w in weights.items()]
    if not terms:
        return torch.zeros(())
    return 0.5 * rho * torch.stack(terms).sum()


def admm_update(model: nn.Module, state: AdmmState) -> dict[str, float]:
    """One ADMM dual step: ``Z = project(W + U)``, then ``U = U + W - Z`` (in place on ``state``).

    Args:
        model: Net being pruned (read only).
        state: State to update.

    Returns:
        Primal residual ``||W_i - Z_i||_F`` per weight after the update (convergence monitor).

    Raises:
        ValueError: If the state does not match the model.
    """
    weights = _state_weights(model, state)
    residuals: dict[str, float] = {}
    with torch.no_grad():
        for name, w in weights.items():
            w = w.detach()
            z = project_to_sparsity(w + state.U[name], state.sparsities[name])
            state.Z[name] = z
            state.U[name] = state.U[name] + w - z
            residuals[name] = float(torch.linalg.vector_norm(w - z))
    return residuals
