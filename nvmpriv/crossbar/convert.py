"""Put a model on a simulated chip: convert (copy), simulate (in place, restored), calibrate."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from nvmpriv.crossbar.config import CrossbarConfig
from nvmpriv.crossbar.functional import layer_seed
from nvmpriv.crossbar.layers import CrossbarConv2d, CrossbarLayer, CrossbarLinear, is_dorefa_layer

__all__ = [
    "LAYER_MAP",
    "calibrate",
    "convert",
    "crossbar_layers",
    "reprogram",
    "simulate",
    "unsupported_layers",
]

#: Digital layer type -> crossbar layer type (a plain dict registry).
LAYER_MAP: dict[type[nn.Module], type[CrossbarLayer]] = {
    nn.Linear: CrossbarLinear,
    nn.Conv2d: CrossbarConv2d,
}

Batch = torch.Tensor | Sequence[torch.Tensor]


def _layer_class(module: nn.Module) -> type[CrossbarLayer] | None:
    """The crossbar type of ``module``: exact types via :data:`LAYER_MAP`, DoReFa layers by base."""
    cls = LAYER_MAP.get(type(module))
    if cls is None and is_dorefa_layer(module):
        cls = CrossbarLinear if isinstance(module, nn.Linear) else CrossbarConv2d
    return cls


def _mappable(module: nn.Module) -> bool:
    if _layer_class(module) is None:
        return False
    return not (isinstance(module, nn.Conv2d) and module.padding_mode != "zeros")


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Mappable layers in ``named_modules`` order (shared modules once); index = layer seed."""
    return [(name, m) for name, m in model.named_modules() if _mappable(m)]


def _build(
    module: nn.Module, config: CrossbarConfig, seed: int, index: int, name: str = ""
) -> CrossbarLayer:
    cls = _layer_class(module)
    assert cls is not None
    for pname, param in module.named_parameters(recurse=False):
        if not bool(torch.isfinite(param).all()):
            raise ValueError(
                f"layer {name or type(module).__name__}: {pname} holds NaN/inf values, which "
                "cannot be programmed as conductances; check the checkpoint (a diverged run?)"
            )
    layer = cls.from_module(module, config, seed=layer_seed(seed, index))  # type: ignore[attr-defined]
    layer.train(module.training)
    return layer


def _replace_all(
    root: nn.Module, mapping: Mapping[int, nn.Module]
) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every child reference found in ``mapping`` (by id); return what was replaced."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(root.modules()):
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                swapped.append((parent, attr, child))
                parent._modules[attr] = mapping[id(child)]
    return swapped


def convert(
    model: nn.Module,
    config: CrossbarConfig,
    *,
    seed: int,
    calibration: Batch | None = None,
) -> nn.Module:
    """Return a copy of ``model`` with every Linear/Conv2d programmed onto a simulated chip.

    DoReFa-quantized layers (``nvmpriv.quantization.QuantLinear`` / ``QuantConv2d``, or any
    Linear/Conv2d subclass with ``effective_weight`` and ``act_bits``) are programmed from their
    quantized weights and keep their input activation quantizer ahead of the DAC.

    Layers are numbered in ``named_modules`` order; layer ``i`` draws its static randomness
    from :func:`functional.layer_seed` ``(seed, i)``, so one config and seed give one chip.

    Args:
        model: The digital model (left untouched).
        config: Chip configuration.
        seed: Chip seed.
        calibration: Optional calibration batch; if given, DAC/ADC ranges are calibrated on it
            (see :func:`calibrate`).

    Returns:
        The converted copy (same training mode as ``model``).
    """
    if _mappable(model):
        layer: nn.Module = _build(model, config, seed, 0)
        if calibration is not None:
            calibrate(layer, calibration, seed=seed)
        return layer
    model_copy = copy.deepcopy(model)
    mapping = {
        id(m): _build(m, config, seed, i, n) for i, (n, m) in enumerate(_targets(model_copy))
    }
    _replace_all(model_copy, mapping)
    if calibration is not None:
        calibrate(model_copy, calibration, seed=seed)
    return model_copy


@contextmanager
def simulate(
    model: nn.Module,
    config: CrossbarConfig,
    *,
    seed: int,
    calibration: Batch | None = None,
) -> Iterator[nn.Module]:
    """Swap ``model``'s Linear/Conv2d layers for crossbar layers in place, restore on exit.

    The original module objects are put back on exit, also when the body raises, so their
    weights are bit-identical afterwards. The chip is the same one :func:`convert` builds with
    the same config and seed.

    Args:
        model: The model to run on the chip (its root must not itself be a Linear/Conv2d).
        config: Chip configuration.
        seed: Chip seed.
        calibration: Optional calibration batch (see :func:`calibrate`).

    Yields:
        ``model`` itself, with crossbar layers inside.

    Raises:
        ValueError: If ``model`` itself is a single Linear/Conv2d (use :func:`convert`).
    """
    if _mappable(model):
        raise ValueError(
            f"simulate() cannot swap the root module {type(model).__name__} in place; "
            "wrap it in nn.Sequential or use convert()"
        )
    mapping = {id(m): _build(m, config, seed, i, n) for i, (n, m) in enumerate(_targets(model))}
    swapped = _replace_all(model, mapping)
    try:
        if calibration is not None:
            calibrate(model, calibration, seed=seed)
        yield model
    finally:
        for parent, attr, original in reversed(swapped):
            parent._modules[attr] = original


def crossbar_layers(model: nn.Module) -> dict[str, CrossbarLayer]:
    """The crossbar layers of a converted model, by qualified name.

    Args:
        model: A converted model (or one inside :func:`simulate`).

    Returns:
        Mapping from module name to layer.
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, CrossbarLayer)}


@torch.no_grad()
def calibrate(model: nn.Module, batch: Batch, *, seed: int = 0) -> nn.Module:
    """Set every crossbar layer's DAC and ADC full scale from one calibration batch.

    Runs ``model(batch)`` once in eval mode (training flags are restored afterwards); each
    layer sets its DAC range to the configured percentile of ``|input|`` and its ADC range to
    the percentile of ``|per-tile partial sums|`` of the DAC-quantized input, so downstream
    layers calibrate on the quantized outputs of upstream ones.

    Read noise drawn during this pass comes from a forked RNG seeded with ``seed``, so the ranges
    (and an exported file) depend on the chip seed only, not on what ran before; the caller's
    RNG streams are left as they were.

    Args:
        model: A converted model (or a single crossbar layer).
        batch: A tensor, or a sequence of tensors passed as ``model(*batch)``.
        seed: Seed of the read noise during calibration (:func:`convert` and :func:`simulate`
            pass the chip seed).

    Returns:
        ``model`` (calibrated in place).
    """
    layers = [m for m in model.modules() if isinstance(m, CrossbarLayer)]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for layer in layers:
        layer._calibrating = True
    first = batch if isinstance(batch, torch.Tensor) else batch[0]
    cuda = [first.device.index or 0] if first.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            if isinstance(batch, torch.Tensor):
                model(batch)
            else:
                model(*batch)
        for layer in layers:
            layer.calibrated.fill_(True)
    finally:
        for layer in layers:
            layer._calibrating = False
        for m, mode in modes.items():
            m.training = mode
    return model


@torch.no_grad()
def reprogram(model: nn.Module) -> nn.Module:
    """Write every crossbar layer's current ``weight`` onto its chip again (after training).

    Args:
        model: A converted model.

    Returns:
        ``model`` (reprogrammed in place; calibration ranges kept).
    """
    for layer in crossbar_layers(model).values():
        layer.program()
    return model


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """What stays digital under :func:`convert`, and why.

    Lists every module that owns parameters (or is a convolution) but is not mapped onto
    crossbars. Parameter-free modules (activations, pooling, reshapes) run digitally as they
    would on the chip's digital periphery and are not listed.

    Args:
        model: A digital model.

    Returns:
        Mapping from qualified module name to the reason it stays digital.
    """
    reasons: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, CrossbarLayer) or _mappable(m):
            continue
        label = name or "<root>"
        if isinstance(m, nn.Conv2d) and _layer_class(m) is not None:
            reasons[label] = f"Conv2d padding_mode={m.padding_mode!r}: only 'zeros' is mapped"
        elif isinstance(m, nn.modules.conv._ConvNd):
            reasons[label] = (
                f"{type(m).__name__}: no crossbar mapping (only Conv2d); runs digitally"
            )
        elif isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
            reasons[label] = (
                f"{type(m).__name__}: normalization (per-channel affine) runs digitally"
            )
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            reasons[label] = f"{type(m).__name__}: subclass of a mapped type; not converted"
        elif any(True for _ in m.parameters(recurse=False)):
            reasons[label] = f"{type(m).__name__}: has parameters but no crossbar mapping"
    return reasons
