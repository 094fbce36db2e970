"""Helpers shared by the training methods: knob validation, source checkpoints, masks, MIA gain.

Everything here is small and torch-only; the methods' maths lives in :mod:`nvmpriv.adversarial`,
:mod:`nvmpriv.quantization` and :mod:`nvmpriv.pruning`.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from nvmpriv.ckptfile import check_checkpoint_file
from nvmpriv.data import Splits
from nvmpriv.pruning import Masks, register_mask_hooks

__all__ = [
    "MaskKeeper",
    "best_threshold_accuracy",
    "check_nonnegative",
    "check_positive_int",
    "check_source_split",
    "collect_logits",
    "load_net_weights",
    "loss_threshold_attack_accuracy",
]


def check_nonnegative(value: float, name: str, hint: str = "") -> float:
    """Validate a real knob that must be >= 0 (a one-line error otherwise).

    Args:
        value: The value.
        name: Field name shown in the error.
        hint: Extra advice appended to the error.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: If ``value`` is not a real number >= 0.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a number >= 0{hint}")
    return float(value)


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    """Validate an integer knob that must be >= ``minimum``.

    Args:
        value: The value.
        name: Field name shown in the error.
        minimum: Smallest allowed value.

    Returns:
        ``value``.

    Raises:
        ValueError: If ``value`` is not an integer >= ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {minimum}")
    return value


def check_source_split(
    source: Splits | None, datamodule: Any, field: str = "source_checkpoint"
) -> None:
    """Refuse a source checkpoint trained on another membership split than this run's.

    Fine-tuning a net on data it was not trained on, then attacking with the run's split,
    measures nothing: some "non-members" were the source's training data.

    Args:
        source: The split :func:`load_net_weights` found in the source checkpoint (``None``:
            no check).
        datamodule: The run's data module (an nvmpriv ``MembershipDataModule``).
        field: Config field named in the error.

    Raises:
        ValueError: If the data or any role's indices differ (their ``split_hash``).
    """
    splits = getattr(datamodule, "splits", None)
    if source is None or splits is None or source.split_hash == splits.split_hash:
        return
    raise ValueError(
        f"{field} was trained on another membership split than this run's (split "
        f"{source.split_hash} vs {splits.split_hash}): use the source run's split (the same "
        "data.init_args.seed, or data.init_args.splits_path=<source run>/splits.npz)"
    )


def load_net_weights(
    net: nn.Module, path: str | Path, field: str = "source_checkpoint"
) -> Splits | None:
    """Load a trained net's weights from a Lightning checkpoint (or a plain state dict) in place.

    A Lightning checkpoint stores the method's ``state_dict`` under ``"state_dict"``; the
    classifier's entries are the keys starting with ``net.`` (the prefix is stripped). A file
    holding a bare ``net.state_dict()`` works too. The file is read with ``weights_only=True``.

    Args:
        net: Net of the architecture the checkpoint was trained with (modified in place).
        path: Checkpoint file.
        field: Name of the config field, used in error messages.

    Returns:
        The membership split an nvmpriv data module stored in the checkpoint (for
        :func:`check_source_split`), or ``None`` (a plain state dict, or no split).

    Raises:
        ValueError: If ``path`` is empty or missing, the file is not a checkpoint, or its net's
            parameter names or shapes differ from ``net`` (the first mismatch is named).
    """
    if not path:
        raise ValueError(f"{field} is empty: give the path of a trained checkpoint (.ckpt)")
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"{field}={str(path)!r} does not exist: train a model first (fit) and "
            "pass its checkpoint, e.g. logs/<run>/version_0/checkpoints/last.ckpt"
        )
    if zipfile.is_zipfile(file):  # a plain pickled state_dict has no records to verify
        check_checkpoint_file(file, field)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(
            f"{field}={str(path)!r} is not a readable checkpoint ({type(exc).__name__}); "
            "pass a Lightning .ckpt or a saved state_dict"
        ) from exc
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{field}={str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint")
    state = ckpt.get("state_dict", ckpt)
    if any(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    own = net.state_dict()
    for key, value in own.items():
        if key not in state:
            raise ValueError(
                f"{field}={str(path)!r} does not match the net: it has no entry {key!r}; "
                "configure the same net class and sizes as the run that wrote it"
            )
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{field}={str(path)!r} does not match the net: {key!r} has shape "
                f"{tuple(state[key].shape)} there but {tuple(value.shape)} here; configure the "
                "same net class and sizes as the run that wrote it"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(
            f"{field}={str(path)!r} does not match the net: unexpected entry {extra[0]!r}; "
            "configure the same net class and sizes as the run that wrote it"
        )
    net.load_state_dict(state)
    for value in ckpt.values():  # the data module's state_dict (see MembershipDataModule)
        if isinstance(value, Mapping) and "indices" in value and "data_hash" in value:
            return Splits.from_state(value)
    return None


def best_threshold_accuracy(member_scores: Tensor, nonmember_scores: Tensor) -> float:
    """Balanced accuracy of the best global threshold ``member iff score >= t``.

    Every distinct score (and +inf) is tried as ``t``; the result is
    ``max_t (TPR(t) + TNR(t)) / 2`` (dimensionless, in [0.5, 1]).

    Args:
        member_scores: Scores of members ``[n_in]`` (higher = more member-like).
        nonmember_scores: Scores of non-members ``[n_out]``.

    Returns:
        The best balanced accuracy.

    Raises:
        ValueError: If either set is empty.
    """
    s_in = member_scores.detach().double().flatten().cpu()
    s_out = nonmember_scores.detach().double().flatten().cpu()
    if s_in.numel() == 0 or s_out.numel() == 0:
        raise ValueError("member_scores and nonmember_scores must both be non-empty")
    thresholds = torch.cat([torch.unique(torch.cat([s_in, s_out])), torch.tensor([torch.inf])])
    # Sorted inputs + searchsorted count scores >= t for every t at once.
    n_in_ge = s_in.numel() - torch.searchsorted(torch.sort(s_in).values, thresholds, right=False)
    n_out_ge = s_out.numel() - torch.searchsorted(torch.sort(s_out).values, thresholds, right=False)
    tpr = n_in_ge.double() / s_in.numel()
    tnr = 1.0 - n_out_ge.double() / s_out.numel()
    return float(((tpr + tnr) / 2).max())


def loss_threshold_attack_accuracy(
    member_logits: Tensor, member_y: Tensor, nonmember_logits: Tensor, nonmember_y: Tensor
) -> float:
    """Best-threshold loss attack (Yeom et al.): members have a lower cross-entropy.

    Args:
        member_logits: Logits of members ``[n_in, C]``.
        member_y: Labels of members ``[n_in]``.
        nonmember_logits: Logits of non-members ``[n_out, C]``.
        nonmember_y: Labels of non-members ``[n_out]``.

    Returns:
        Balanced attack accuracy in [0.5, 1] (0.5 = no membership leak on these sets).
    """
    loss_in = F.cross_entropy(member_logits.float(), member_y, reduction="none")
    loss_out = F.cross_entropy(nonmember_logits.float(), nonmember_y, reduction="none")
    return best_threshold_accuracy(-loss_in, -loss_out)


@torch.no_grad()
def collect_logits(
    net: nn.Module, batches: Iterable[Any], max_samples: int | None = None
) -> tuple[Tensor, Tensor]:
    """Run ``net`` (in eval mode, modes restored) over ``(x, y)`` batches.

    Args:
        net: Classifier.
        batches: Iterable of ``(x, y)`` (a DataLoader).
        max_samples: Stop after this many samples (``None``: all).

    Returns:
        ``(logits [n, C], labels [n])`` on the CPU.
    """
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    logits, labels, n = [], [], 0
    try:
        for x, y in batches:
            logits.append(net(x.to(device)).cpu())
            labels.append(y.cpu())
            n += len(y)
            if max_samples is not None and n >= max_samples:
                break
    finally:
        for m, flag in flags:
            m.training = flag
    out_logits, out_y = torch.cat(logits), torch.cat(labels)
    if max_samples is not None:
        out_logits, out_y = out_logits[:max_samples], out_y[:max_samples]
    return out_logits, out_y


class MaskKeeper:
    """Holds pruning masks and keeps the masked entries at exactly zero while training.

    The hooks (a gradient mask per parameter plus a re-masking after every optimizer step, see
    :func:`nvmpriv.pruning.register_mask_hooks`) are registered once per fit with the raw torch
    optimizer, and can be restored from a checkpoint.
    """

    def __init__(self) -> None:
        self.masks: Masks = {}
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self, net: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Apply the masks and register the hooks (no-op without masks or if attached).

        Args:
            net: The pruned net.
            optimizer: The raw torch optimizer updating ``net``.
        """
        if not self.masks or self.attached:
            return
        device = next(net.parameters()).device
        self.masks = {k: v.to(device) for k, v in self.masks.items()}
        self._handles = register_mask_hooks(net, self.masks, optimizer)

    def detach(self) -> None:
        """Remove the hooks (masks are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Tensor]:
        """Masks as CPU bool tensors (checkpointable with ``weights_only=True``)."""
        return {k: v.detach().to("cpu", torch.bool) for k, v in self.masks.items()}

    def load_state_dict(self, masks: Mapping[str, Tensor]) -> None:
        """Replace the masks (hooks are re-registered by the next :meth:`attach`).

        Args:
            masks: Masks from :meth:`state_dict`.
        """
        self.detach()
        self.masks = {k: v.to(torch.bool) for k, v in masks.items()}
