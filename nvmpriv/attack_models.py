"""The attacker's own learned models: shadow/reference training and learned MIA classifiers.

The target is only ever reached through a query function ``x -> probabilities`` (numpy in,
numpy out); nothing here opens the target's weights. The attacker trains shadow and reference
models "like the target" from a network factory and a :class:`TrainConfig`. Scoring and metrics
are delegated to the torch-free :mod:`nvmpriv.attacks`, so every attack returns the same
:class:`~nvmpriv.attacks.AttackResult`. Uses torch and scikit-learn, never Lightning.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from torch import nn

from nvmpriv.attacks import (
    AttackInputError,
    AttackInputs,
    AttackResult,
    ReferenceScores,
    result_from_scores,
)
from nvmpriv.attacks._validate import check_probabilities

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "LEARNED_ATTACKS",
    "MembershipSplit",
    "NasrAttackModel",
    "SamiaAttackModel",
    "TrainConfig",
    "TrainedShadow",
    "default_shadow_net",
    "ml_leaks_attack",
    "nasr_attack",
    "nn_shadow_attack",
    "predict_proba_fn",
    "reference_attack_inputs",
    "run_learned_attack",
    "samia_attack",
    "sensitivity_scores",
    "shadow_attack_inputs",
    "train_classifier",
    "train_classifiers",
    "train_reference_models",
    "train_shadow_models",
]

QueryFn = Callable[[np.ndarray], np.ndarray]
NetFactory = Callable[[], nn.Module]


@dataclass(frozen=True)
class TrainConfig:
    """How the attacker trains shadow/reference models (meant to mimic the target's training)."""

    epochs: int = 30
    """Passes over each model's training set."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 64
    """Mini-batch size (samples)."""
    weight_decay: float = 0.0
    """L2 penalty coefficient of Adam."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(
                f"TrainConfig needs epochs>=1, batch_size>=1, lr>0, weight_decay>=0; got {self}"
            )


@dataclass(frozen=True)
class MembershipSplit:
    """Ground-truth target members and non-members (inputs and labels), numpy arrays.

    Raises:
        AttackInputError: On length mismatches or an empty set.
    """

    member_x: np.ndarray
    member_y: np.ndarray
    nonmember_x: np.ndarray
    nonmember_y: np.ndarray

    def __post_init__(self) -> None:
        for side in ("member", "nonmember"):
            x, y = getattr(self, f"{side}_x"), getattr(self, f"{side}_y")
            if len(x) == 0:
                raise AttackInputError(f"{side}_x is empty; give at least one sample")
            if len(x) != len(y):
                raise AttackInputError(
                    f"{side}_x has {len(x)} rows but {side}_y has {len(y)}; one label per input"
                )

    @property
    def x(self) -> np.ndarray:
        """Members then non-members, concatenated."""
        return np.concatenate([self.member_x, self.nonmember_x])

    @property
    def y(self) -> np.ndarray:
        """Labels of :attr:`x`."""
        return np.concatenate([self.member_y, self.nonmember_y]).astype(np.int64)

    @property
    def n_members(self) -> int:
        """Number of members."""
        return len(self.member_x)


class _CountingQuery:
    """Wraps a query function, validates its outputs and counts queried samples."""

    def __init__(self, fn: QueryFn) -> None:
        self.fn = fn
        self.count = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.count += len(x)
        p = check_probabilities(self.fn(x), "query output")
        if p.shape[0] != len(x):
            raise AttackInputError(f"query returned {p.shape[0]} rows for {len(x)} inputs")
        return p


# --------------------------------------------------------------------------- training
def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def _own_rng(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` on a forked CPU torch RNG: it seeds itself and leaves the caller's stream as it was."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper


@_own_rng
def train_classifier(
    net_factory: NetFactory,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Train a fresh network with Adam and cross-entropy (a plain loop, no Lightning).

    Args:
        net_factory: Builds an untrained ``nn.Module`` mapping inputs to logits ``[n, C]``.
        x: Training inputs ``[n, ...]``.
        y: Integer labels ``[n]``.
        epochs: Passes over the data.
        lr: Adam learning rate.
        batch_size: Mini-batch size (samples).
        seed: Seed of initialization and shuffling (on a forked RNG: the caller's global torch
            RNG is left as it was).
        weight_decay: Adam L2 coefficient.

    Returns:
        The trained module in eval mode.

    Raises:
        AttackInputError: If ``x`` is empty or lengths differ.
    """
    if len(x) == 0 or len(x) != len(y):
        raise AttackInputError(f"training set needs len(x) == len(y) > 0, got {len(x)}/{len(y)}")
    torch.manual_seed(seed)
    net = net_factory()
    xt, yt = _tensor(x), torch.as_tensor(np.asarray(y), dtype=torch.long)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def _has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def _has_dropout(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in net.modules())


@_own_rng
def train_classifiers(
    net_factory: NetFactory,
    x: np.ndarray,
    y: np.ndarray,
    masks: np.ndarray,
    *,
    train: TrainConfig | None = None,
    seed: int = 0,
    batched: bool = True,
) -> list[nn.Module]:
    """Train ``R`` models at once, model ``r`` on the samples where ``masks[r]`` is True.

    With masks of equal size (as the shadow and reference sets are drawn), model ``r`` depends
    only on ``seed``, ``r`` and its mask, not on how many models are trained together, so the
    first models of a shared set equal a smaller set's; the batched path sizes its mixed batches
    from the mean mask size, so unequal masks couple the models through that size. Like
    :func:`train_classifier` it runs on a forked RNG and leaves the caller's torch RNG untouched.

    With ``batched=True`` (and no BatchNorm or dropout) the ``R`` networks are stacked with ``torch.func``
    and trained in one vectorized loop: every mini-batch is drawn from all samples and each
    model's loss is the mean over its own samples in it, so each model still sees each of its
    samples once per epoch; Adam's updates are per-parameter, hence independent across models.
    Otherwise the models are trained one after the other with :func:`train_classifier`.

    Args:
        net_factory: Builds an untrained network (inputs -> logits).
        x: Inputs ``[n, ...]``.
        y: Labels ``[n]``.
        masks: ``[R, n]`` bool training membership.
        train: Training hyper-parameters.
        seed: Base seed.
        batched: Try the vectorized path.

    Returns:
        ``R`` trained modules in eval mode.

    Raises:
        AttackInputError: If a mask is empty or shapes disagree.
    """
    cfg = train or TrainConfig()
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != len(x) or not masks.any(axis=1).all():
        raise AttackInputError(
            f"masks must be [n_models, {len(x)}] with at least one True per row, got {masks.shape}"
        )
    torch.manual_seed(seed)
    nets = [net_factory() for _ in range(masks.shape[0])]
    # Dropout in a vmapped loop draws for all models from one stream, so model r would depend
    # on how many are trained together; train those (and BatchNorm nets) one by one.
    if not batched or _has_batchnorm(nets[0]) or _has_dropout(nets[0]):
        return [
            train_classifier(
                net_factory,
                x[m],
                y[m],
                epochs=cfg.epochs,
                lr=cfg.lr,
                batch_size=cfg.batch_size,
                seed=seed + r,
                weight_decay=cfg.weight_decay,
            )
            for r, m in enumerate(masks)
        ]
    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")

    def forward(
        p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor
    ) -> torch.Tensor:
        return functional_call(base, (p, b), (xb,))

    vforward = vmap(forward, in_dims=(0, 0, None), randomness="different")
    xt, yt = _tensor(x), torch.as_tensor(np.asarray(y), dtype=torch.long)
    w_all = torch.as_tensor(masks, dtype=torch.float32)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    # Each model owns only part of a mixed batch; enlarge it so per-model batches match.
    step = max(1, round(float(cfg.batch_size * len(x) / max(1.0, masks.sum(axis=1).mean()))))
    base.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), step):
            idx = perm[i : i + step]
            w = w_all[:, idx]
            if not bool((w.sum(dim=1) > 0).any()):
                continue
            logits = vforward(params, buffers, xt[idx])  # [R, B, C]
            r, b, c = logits.shape
            ce = nn.functional.cross_entropy(
                logits.reshape(r * b, c), yt[idx].repeat(r), reduction="none"
            ).reshape(r, b)
            loss = ((ce * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = []
    for r, net in enumerate(nets):
        state = {k: v[r].detach().clone() for k, v in {**params, **buffers}.items()}
        net.load_state_dict(state)
        out.append(net.eval())
    return out


def predict_proba_fn(model: nn.Module, *, batch_size: int = 4096) -> QueryFn:
    """Wrap a trained torch model as a black-box query function.

    Args:
        model: Network mapping inputs to logits.
        batch_size: Samples per forward pass.

    Returns:
        ``x (numpy) -> softmax probabilities [n, C]`` as ``float64`` numpy.
    """

    def query(x: np.ndarray) -> np.ndarray:
        model.eval()
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                outs.append(torch.softmax(model(_tensor(x[i : i + batch_size])).double(), dim=1))
        return torch.cat(outs).numpy()

    return query


@dataclass(frozen=True)
class TrainedShadow:
    """One shadow model with its exact membership on the attacker's data."""

    query: QueryFn
    """Black-box access to the shadow model."""
    member_idx: np.ndarray
    """Indices (into the shadow pool) of its training samples."""
    nonmember_idx: np.ndarray
    """Indices of held-out samples of the same size."""
    model: nn.Module = field(repr=False)
    """The module itself (the attacker's own)."""


def train_shadow_models(
    net_factory: NetFactory,
    x: np.ndarray,
    y: np.ndarray,
    n_shadow: int,
    *,
    train: TrainConfig | None = None,
    seed: int = 0,
    batched: bool = True,
) -> list[TrainedShadow]:
    """Train ``n_shadow`` models, each on a random half of the attacker's pool (Shokri et al.).

    Args:
        net_factory: Builds an untrained network like the target's.
        x: Attacker's data ``[n, ...]`` (same distribution as the target's).
        y: Labels ``[n]``.
        n_shadow: Number of shadow models (>= 1).
        train: Training hyper-parameters (like the target's).
        seed: Seed of splits and training.
        batched: Train the models together when possible (see :func:`train_classifiers`).

    Returns:
        The shadow models with their member/non-member indices.

    Raises:
        AttackInputError: If ``n_shadow < 1`` or the pool has fewer than 2 samples.
    """
    if n_shadow < 1 or len(x) < 2:
        raise AttackInputError(f"need n_shadow >= 1 and >= 2 samples, got {n_shadow}, {len(x)}")
    rng = np.random.default_rng(seed)
    halves = [rng.permutation(len(x)) for _ in range(n_shadow)]
    h = len(x) // 2
    masks = np.zeros((n_shadow, len(x)), dtype=bool)
    for r, perm in enumerate(halves):
        masks[r, perm[:h]] = True
    nets = train_classifiers(net_factory, x, y, masks, train=train, seed=seed, batched=batched)
    return [
        TrainedShadow(predict_proba_fn(net), np.sort(perm[:h]), np.sort(perm[h : 2 * h]), net)
        for net, perm in zip(nets, halves, strict=True)
    ]


def _shadow_subset(
    shadows: Sequence[TrainedShadow] | None,
    n_shadow: int,
    net_factory: NetFactory,
    x: np.ndarray,
    y: np.ndarray,
    train: TrainConfig | None,
    seed: int,
) -> list[TrainedShadow]:
    """The first ``n_shadow`` of the given shadow models, or ``n_shadow`` newly trained ones."""
    if shadows is None:
        return train_shadow_models(net_factory, x, y, n_shadow, train=train, seed=seed)
    if len(shadows) < n_shadow:
        raise AttackInputError(
            f"{len(shadows)} shadow models given but the attack uses n_shadow={n_shadow}; "
            f"train at least {n_shadow} with train_shadow_models"
        )
    for sh in shadows[:n_shadow]:
        top = max(int(sh.member_idx.max(initial=-1)), int(sh.nonmember_idx.max(initial=-1)))
        if top >= len(x):
            raise AttackInputError(
                f"a shadow model's indices reach {top} but shadow_x has {len(x)} rows; pass the "
                "shadow_x/shadow_y the shadow models were trained on"
            )
    return list(shadows[:n_shadow])


# ----------------------------------------------------------------- inputs for score attacks
def shadow_attack_inputs(
    query_fn: QueryFn,
    target: MembershipSplit,
    shadow_x: np.ndarray,
    shadow_y: np.ndarray,
    net_factory: NetFactory,
    *,
    train: TrainConfig | None = None,
    seed: int = 0,
    shadow: TrainedShadow | None = None,
) -> AttackInputs:
    """Query the target and one shadow model: inputs for every threshold attack.

    Args:
        query_fn: Black-box target ``x -> probabilities``.
        target: Target members and non-members to score.
        shadow_x: Attacker's data ``[n, ...]``.
        shadow_y: Its labels.
        net_factory: Builds a network like the target's.
        train: Shadow training hyper-parameters.
        seed: Seed.
        shadow: A shadow model already trained on ``shadow_x`` (e.g. the first of a set shared
            with the learned attacks); ``None`` trains one.

    Returns:
        :class:`~nvmpriv.attacks.AttackInputs` with shadow outputs filled in.

    Raises:
        AttackInputError: If ``shadow``'s indices do not fit ``shadow_x``.
    """
    q = _CountingQuery(query_fn)
    (sh,) = _shadow_subset(
        None if shadow is None else [shadow], 1, net_factory, shadow_x, shadow_y, train, seed
    )
    return AttackInputs(
        q(target.member_x),
        target.member_y,
        q(target.nonmember_x),
        target.nonmember_y,
        shadow_member_outputs=sh.query(shadow_x[sh.member_idx]),
        shadow_member_labels=shadow_y[sh.member_idx],
        shadow_nonmember_outputs=sh.query(shadow_x[sh.nonmember_idx]),
        shadow_nonmember_labels=shadow_y[sh.nonmember_idx],
        queries=q.count,
    )


def _reference_scores(
    nets: list[nn.Module], x: np.ndarray, y: np.ndarray, masks: np.ndarray
) -> ReferenceScores:
    probs = np.stack([predict_proba_fn(n)(x) for n in nets])
    probs = probs / probs.sum(axis=2, keepdims=True)
    return ReferenceScores.from_outputs(probs, y, masks)


def train_reference_models(
    net_factory: NetFactory,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    candidate_x: np.ndarray,
    candidate_y: np.ndarray,
    n_ref: int,
    *,
    online: bool = False,
    train: TrainConfig | None = None,
    seed: int = 0,
    batched: bool = True,
) -> tuple[ReferenceScores, ReferenceScores]:
    """Train reference models for LiRA/RMIA on random halves of the population pool.

    Offline: each model trains on a random half of ``pool`` (candidates are OUT for every
    model). Online: each model trains on a random half of ``pool + candidates``, so each
    candidate is IN for about half of the models.

    Args:
        net_factory: Builds a network like the target's.
        pool_x: Attacker's population data ``[m, ...]`` (never the target's members).
        pool_y: Its labels.
        candidate_x: Samples whose membership is tested ``[N, ...]``.
        candidate_y: Their labels.
        n_ref: Number of reference models (>= 2 for calibration).
        online: Include candidates in the reference training sets.
        train: Training hyper-parameters.
        seed: Seed.
        batched: Train the models together when possible.

    Returns:
        ``(candidate_scores [n_ref, N], pool_scores [n_ref, m])``.

    Raises:
        AttackInputError: If ``n_ref < 1``.
    """
    if n_ref < 1:
        raise AttackInputError(f"n_ref must be >= 1, got {n_ref}")
    rng = np.random.default_rng(seed)
    m, n = len(pool_x), len(candidate_x)
    total = m + n if online else m
    masks = np.zeros((n_ref, total), dtype=bool)
    for r in range(n_ref):
        masks[r, rng.permutation(total)[: total // 2]] = True
    x_all = np.concatenate([pool_x, candidate_x]) if online else pool_x
    y_all = np.concatenate([pool_y, candidate_y]) if online else pool_y
    nets = train_classifiers(
        net_factory, x_all, np.asarray(y_all), masks, train=train, seed=seed, batched=batched
    )
    cand_mask = masks[:, m:] if online else np.zeros((n_ref, n), dtype=bool)
    return (
        _reference_scores(nets, candidate_x, candidate_y, cand_mask),
        _reference_scores(nets, pool_x, pool_y, masks[:, :m]),
    )


def reference_attack_inputs(
    query_fn: QueryFn,
    target: MembershipSplit,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    net_factory: NetFactory,
    *,
    n_ref: int = 8,
    online: bool = False,
    train: TrainConfig | None = None,
    seed: int = 0,
    batched: bool = True,
) -> AttackInputs:
    """Inputs for LiRA and RMIA: target queries plus attacker-trained reference models.

    The pool doubles as RMIA's population ``z`` and as the leave-one-model-out calibration set.

    Args:
        query_fn: Black-box target ``x -> probabilities``.
        target: Target members and non-members.
        pool_x: Attacker's population data (disjoint from the target's training set).
        pool_y: Its labels.
        net_factory: Builds a network like the target's.
        n_ref: Number of reference models.
        online: Train the reference models on the candidates too.
        train: Training hyper-parameters.
        seed: Seed.
        batched: Train the models together when possible.

    Returns:
        :class:`~nvmpriv.attacks.AttackInputs` with ``reference``, ``calibration`` and population
        fields.
    """
    q = _CountingQuery(query_fn)
    cand, pool = train_reference_models(
        net_factory,
        pool_x,
        pool_y,
        target.x,
        target.y,
        n_ref,
        online=online,
        train=train,
        seed=seed,
        batched=batched,
    )
    return AttackInputs(
        q(target.member_x),
        target.member_y,
        q(target.nonmember_x),
        target.nonmember_y,
        reference=cand,
        calibration=pool,
        population_outputs=q(pool_x),
        population_labels=pool_y,
        population_reference=pool,
        queries=q.count,
    )


# --------------------------------------------------------------------------- attack classifiers
def _mlp(n_in: int, hidden: tuple[int, ...], n_out: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        n_in = h
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class _Concat(nn.Module):
    """Apply a module to the concatenation of several feature tensors."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *feats: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(feats, dim=1))


class NasrAttackModel(nn.Module):
    """Nasr et al.'s inference model: a logits branch and a label branch, then a joint MLP.

    Args:
        n_classes: Number of classes ``C``.
        widths: Scale of the hidden layers (1.0 = Purchase sizes 1024/512/64 and 128/64).
    """

    def __init__(self, n_classes: int, widths: float = 1.0) -> None:
        super().__init__()

        def w(k: int) -> int:
            return max(8, int(k * widths))

        self.logits_branch = nn.Sequential(
            nn.Linear(n_classes, w(1024)),
            nn.ReLU(),
            nn.Linear(w(1024), w(512)),
            nn.ReLU(),
            nn.Linear(w(512), 64),
            nn.ReLU(),
        )
        self.label_branch = nn.Sequential(
            nn.Linear(n_classes, w(128)), nn.ReLU(), nn.Linear(w(128), 64), nn.ReLU()
        )
        self.joint = _mlp(128, (w(512), w(256), w(128), 64), 1)

    def forward(self, logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Return membership logits ``[n, 1]``.

        Args:
            logits: Target logits (or centered log-probabilities) ``[n, C]``.
            onehot: One-hot true labels ``[n, C]``.

        Returns:
            Membership logit per sample.
        """
        return self.joint(torch.cat([self.logits_branch(logits), self.label_branch(onehot)], 1))


class SamiaAttackModel(nn.Module):
    """SAMIA (Yuan & Zhang): one token ``(p_i, s_i, onehot_i)`` per class into a Transformer.

    BatchNorm1d(3C) -> tokens [C, 3] -> Linear(3, d) + GELU -> TransformerEncoder (no positional
    encoding) -> flatten -> Linear(C d, 64) -> GELU -> Linear(64, 2).

    Args:
        n_classes: Number of classes ``C``.
        d_model: Token width.
        n_layers: Encoder layers.
        n_heads: Attention heads.
        ff: Feed-forward width.
        dropout: Dropout probability.
    """

    def __init__(
        self,
        n_classes: int,
        d_model: int = 64,
        n_layers: int = 3,
        n_heads: int = 4,
        ff: int = 128,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.norm = nn.BatchNorm1d(3 * n_classes)
        self.embed = nn.Sequential(nn.Linear(3, d_model), nn.GELU())
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, ff, dropout=dropout, batch_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(n_classes * d_model, 64), nn.GELU(), nn.Linear(64, 2)
        )

    def forward(
        self, probs: torch.Tensor, sens: torch.Tensor, onehot: torch.Tensor
    ) -> torch.Tensor:
        """Return 2-class logits ``[n, 2]`` (column 1 = member).

        Args:
            probs: Probabilities ``[n, C]``.
            sens: Sensitivities ``[n, C]`` (1/input unit).
            onehot: One-hot labels ``[n, C]``.

        Returns:
            Logits.
        """
        z = self.norm(torch.cat([probs, sens, onehot], dim=1))
        tokens = z.view(-1, 3, self.n_classes).transpose(1, 2)  # [n, C, 3]
        return self.head(self.encoder(self.embed(tokens)))


def _fit_binary(
    model: nn.Module,
    feats: list[np.ndarray],
    labels: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
) -> Callable[[list[np.ndarray]], np.ndarray]:
    """Train a membership classifier; return ``features -> membership logit`` (numpy)."""
    torch.manual_seed(seed)
    # Standardize with shadow statistics: posteriors near 1 differ by tiny amounts otherwise.
    stats = [(f.mean(axis=0), np.maximum(f.std(axis=0), 1e-6)) for f in feats]

    def norm(fs: list[np.ndarray]) -> list[torch.Tensor]:
        return [_tensor((f - mu) / sd) for f, (mu, sd) in zip(fs, stats, strict=True)]

    ts = norm(feats)
    yt = torch.as_tensor(labels, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            out = model(*[t[idx] for t in ts])
            if out.shape[-1] == 2:
                loss = nn.functional.cross_entropy(out, yt[idx].long())
            else:
                loss = nn.functional.binary_cross_entropy_with_logits(out[:, 0], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()

    def score(f: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = model(*norm(f)).double()
        # Logit of P(member): finer than a probability that saturates at 1.0.
        return (out[:, 1] - out[:, 0] if out.shape[-1] == 2 else out[:, 0]).numpy()

    return score


def _onehot(y: np.ndarray, c: int) -> np.ndarray:
    return np.eye(c)[np.asarray(y, dtype=np.int64)]


def _shadow_training_set(
    shadows: list[TrainedShadow],
    x: np.ndarray,
    y: np.ndarray,
    featurize: Callable[[QueryFn, np.ndarray, np.ndarray], list[np.ndarray]],
) -> tuple[list[np.ndarray], np.ndarray]:
    feats: list[list[np.ndarray]] = []
    labels = []
    for sh in shadows:
        for idx, lab in ((sh.member_idx, 1.0), (sh.nonmember_idx, 0.0)):
            feats.append(featurize(sh.query, x[idx], y[idx]))
            labels.append(np.full(len(idx), lab))
    return [np.concatenate(parts) for parts in zip(*feats, strict=True)], np.concatenate(labels)


@_own_rng
def _learned_attack(
    name: str,
    query_fn: QueryFn,
    target: MembershipSplit,
    shadow_x: np.ndarray,
    shadow_y: np.ndarray,
    net_factory: NetFactory,
    featurize: Callable[[QueryFn, np.ndarray, np.ndarray], list[np.ndarray]],
    make_model: Callable[[int], nn.Module],
    *,
    n_shadow: int,
    shadows: Sequence[TrainedShadow] | None,
    train: TrainConfig | None,
    attack_epochs: int,
    attack_lr: float,
    attack_batch_size: int,
    seed: int,
    extra: dict[str, Any],
) -> AttackResult:
    t0 = time.perf_counter()
    shadow_y = np.asarray(shadow_y, dtype=np.int64)
    used = _shadow_subset(shadows, n_shadow, net_factory, shadow_x, shadow_y, train, seed)
    feats, labels = _shadow_training_set(used, shadow_x, shadow_y, featurize)
    n_classes = int(used[0].query(shadow_x[:1]).shape[1])
    # Seeded here, not by whatever ran before: the attack model must not depend on whether the
    # shadow models were trained just now or passed in.
    torch.manual_seed(seed)
    score = _fit_binary(
        make_model(n_classes),
        feats,
        labels,
        epochs=attack_epochs,
        lr=attack_lr,
        batch_size=attack_batch_size,
        seed=seed,
    )
    shadow_acc = float(np.mean((score(feats) >= 0) == (labels == 1)))
    q = _CountingQuery(query_fn)
    s_in = score(featurize(q, target.member_x, np.asarray(target.member_y)))
    s_out = score(featurize(q, target.nonmember_x, np.asarray(target.nonmember_y)))
    return result_from_scores(
        name,
        s_in,
        s_out,
        threshold=0.0,
        threshold_source="attack model (p >= 0.5)",
        queries=q.count,
        seconds=time.perf_counter() - t0,
        extra={"n_shadow": n_shadow, "attack_train_accuracy": shadow_acc, **extra},
    )


def nn_shadow_attack(
    query_fn: QueryFn,
    target: MembershipSplit,
    shadow_x: np.ndarray,
    shadow_y: np.ndarray,
    net_factory: NetFactory,
    *,
    n_shadow: int = 4,
    use_label: bool = True,
    classifier: str = "torch",
    train: TrainConfig | None = None,
    attack_epochs: int = 40,
    attack_lr: float = 1e-3,
    seed: int = 0,
    shadows: Sequence[TrainedShadow] | None = None,
) -> AttackResult:
    """Shokri et al.'s shadow-model attack with one attack MLP on posteriors [+ one-hot label].

    Args:
        query_fn: Black-box target.
        target: Target members/non-members.
        shadow_x: Attacker's data.
        shadow_y: Its labels.
        net_factory: Builds a network like the target's.
        n_shadow: Number of shadow models.
        use_label: Append the one-hot true label to the posteriors.
        classifier: ``"torch"`` (MLP 512-256-128) or ``"sklearn"`` (``MLPClassifier`` 64-64).
        train: Shadow training hyper-parameters.
        attack_epochs: Attack-model epochs.
        attack_lr: Attack-model Adam learning rate.
        seed: Seed.
        shadows: Shadow models already trained on ``shadow_x`` (see :func:`train_shadow_models`);
            the first ``n_shadow`` are used, so one set serves several attacks. ``None`` trains
            ``n_shadow`` new ones.

    Returns:
        Result named ``nn_shadow``.

    Raises:
        AttackInputError: On an unknown classifier, or fewer ``shadows`` than ``n_shadow``.
    """

    def featurize(q: QueryFn, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        p = q(x)
        return [np.concatenate([p, _onehot(y, p.shape[1])], 1) if use_label else p]

    if classifier == "sklearn":
        return _sklearn_shadow_attack(
            query_fn,
            target,
            shadow_x,
            shadow_y,
            net_factory,
            featurize,
            n_shadow,
            shadows,
            train,
            seed,
        )
    if classifier != "torch":
        raise AttackInputError(f"classifier must be 'torch' or 'sklearn', got {classifier!r}")
    return _learned_attack(
        "nn_shadow",
        query_fn,
        target,
        shadow_x,
        shadow_y,
        net_factory,
        featurize,
        lambda c: _Concat(_mlp(2 * c if use_label else c, (512, 256, 128))),
        n_shadow=n_shadow,
        shadows=shadows,
        train=train,
        attack_epochs=attack_epochs,
        attack_lr=attack_lr,
        attack_batch_size=128,
        seed=seed,
        extra={"use_label": use_label, "classifier": classifier},
    )


@_own_rng
def _sklearn_shadow_attack(
    query_fn: QueryFn,
    target: MembershipSplit,
    shadow_x: np.ndarray,
    shadow_y: np.ndarray,
    net_factory: NetFactory,
    featurize: Callable[[QueryFn, np.ndarray, np.ndarray], list[np.ndarray]],
    n_shadow: int,
    shadows: Sequence[TrainedShadow] | None,
    train: TrainConfig | None,
    seed: int,
) -> AttackResult:
    from sklearn.neural_network import MLPClassifier

    t0 = time.perf_counter()
    shadow_y = np.asarray(shadow_y, dtype=np.int64)
    used = _shadow_subset(shadows, n_shadow, net_factory, shadow_x, shadow_y, train, seed)
    (feats,), labels = _shadow_training_set(used, shadow_x, shadow_y, featurize)
    clf = MLPClassifier((64, 64), max_iter=300, random_state=seed).fit(feats, labels)
    q = _CountingQuery(query_fn)

    def score(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        p = np.clip(clf.predict_proba(featurize(q, x, np.asarray(y))[0])[:, 1], 1e-12, 1 - 1e-12)
        return np.log(p) - np.log1p(-p)

    return result_from_scores(
        "nn_shadow",
        score(target.member_x, target.member_y),
        score(target.nonmember_x, target.nonmember_y),
        threshold=0.0,
        threshold_source="attack model (p >= 0.5)",
        queries=q.count,
        seconds=time.perf_counter() - t0,
        extra={"n_shadow": n_shadow, "classifier": "sklearn"},
    )


def ml_leaks_attack(
    query_fn: QueryFn,
    target: MembershipSplit,
    shadow_x: np.ndarray,
    shadow_y: np.ndarray,
    net_factory: NetFactory,
    *,
    top_k: int = 3,
    train: TrainConfig | None = None,
    attack_epochs: int = 40,
    attack_lr: float = 1e-3,
    seed: int = 0,
    shadows: Sequence[TrainedShadow] | None = None,
) -> AttackResult:
    """ML-Leaks (Salem et al.): one shadow model, attack MLP on the sorted top-k posteriors.

    Args:
        query_fn: Black-box target.
        target: Target members/non-members.
        shadow_x: Attacker's data.
        shadow_y: Its labels (used only to train the shadow model).
        net_factory: Builds a network like the target's.
        top_k: Number of largest posteriors kept (3 in the paper).
        train: Shadow training hyper-parameters.
        attack_epochs: Attack-model epochs.
        attack_lr: Attack-model learning rate.
        seed: Seed.
        shadows: Shadow models already trained on ``shadow_x``; the first ``n_shadow`` are used
            (``None`` trains new ones).

    Returns:
        Result named ``ml_leaks``.

    Raises:
        AttackInputError: If ``shadows`` holds fewer models than the attack uses.
    """

    def featurize(q: QueryFn, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        p = np.sort(q(x), axis=1)[:, ::-1]
        return [np.ascontiguousarray(p[:, :top_k])]

    return _learned_attack(
        "ml_leaks",
        query_fn,
        target,
        shadow_x,
        shadow_y,
        net_factory,
        featurize,
        lambda c: _Concat(_mlp(min(top_k, c), (64, 64))),
        n_shadow=1,
        shadows=shadows,
        train=train,
        attack_epochs=attack_epochs,
        attack_lr=attack_lr,
        attack_batch_size=128,
        seed=seed,
        extra={"top_k": top_k},
    )


def nasr_attack(
    query_fn: QueryFn,
    target: MembershipSplit,
    shadow_x: np.ndarray,
    shadow_y: np.ndarray,
    net_factory: NetFactory,
    *,
    n_shadow: int = 1,
    widths: float = 0.25,
    train: TrainConfig | None = None,
    attack_epochs: int = 40,
    attack_lr: float = 1e-3,
    seed: int = 0,
    shadows: Sequence[TrainedShadow] | None = None,
) -> AttackResult:
    """Nasr et al.'s black-box inference model on logits and the one-hot label.

    Black-box queries return probabilities, so the logits branch receives centered
    log-probabilities ``log p - mean(log p)``, which equal the logits up to a per-row constant.

    Args:
        query_fn: Black-box target.
        target: Target members/non-members.
        shadow_x: Attacker's data.
        shadow_y: Its labels.
        net_factory: Builds a network like the target's.
        n_shadow: Number of shadow models.
        widths: Hidden-width scale: 1.0 is the paper's Purchase model (1024/512/64 and
            128/64); the default 0.25 is a quarter-width model (256/128/64 and 32/64) that trains
            in seconds on a CPU.
        train: Shadow training hyper-parameters.
        attack_epochs: Attack-model epochs.
        attack_lr: Attack-model learning rate.
        seed: Seed.
        shadows: Shadow models already trained on ``shadow_x``; the first ``n_shadow`` are used
            (``None`` trains new ones).

    Returns:
        Result named ``nasr``.

    Raises:
        AttackInputError: If ``shadows`` holds fewer models than the attack uses.
    """

    def featurize(q: QueryFn, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        p = q(x)
        logp = np.log(np.maximum(p, 1e-30))
        return [logp - logp.mean(axis=1, keepdims=True), _onehot(y, p.shape[1])]

    return _learned_attack(
        "nasr",
        query_fn,
        target,
        shadow_x,
        shadow_y,
        net_factory,
        featurize,
        lambda c: NasrAttackModel(c, widths),
        n_shadow=n_shadow,
        shadows=shadows,
        train=train,
        attack_epochs=attack_epochs,
        attack_lr=attack_lr,
        attack_batch_size=128,
        seed=seed,
        extra={"widths": widths},
    )


def sensitivity_scores(
    query_fn: QueryFn,
    x: np.ndarray,
    *,
    m: int = 10,
    eps: float = 1e-3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """SAMIA sensitivities ``s_i = mean_k |p_i(x + eps u_k) - p_i(x)| / eps``, ``u_k ~ N(0, I)``.

    Uses ``m + 1`` queries per sample (one batched call for the perturbed copies).

    Args:
        query_fn: Black-box model.
        x: Inputs ``[n, ...]``.
        m: Number of random directions.
        eps: Perturbation size (input units).
        seed: Seed of the directions.

    Returns:
        ``(probs [n, C], sensitivity [n, C])``; sensitivity in 1/input unit.

    Raises:
        AttackInputError: If ``m < 1`` or ``eps <= 0``.
    """
    if m < 1 or not eps > 0:
        raise AttackInputError(f"need m >= 1 and eps > 0, got m={m}, eps={eps}")
    x = np.asarray(x, dtype=np.float32)
    p0 = query_fn(x)
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((m, *x.shape)).astype(np.float32)
    pk = query_fn((x[None] + eps * u).reshape(m * len(x), *x.shape[1:]))
    pk = pk.reshape(m, len(x), -1)
    return p0, np.abs(pk - p0[None]).mean(axis=0) / eps


def samia_attack(
    query_fn: QueryFn,
    target: MembershipSplit,
    shadow_x: np.ndarray,
    shadow_y: np.ndarray,
    net_factory: NetFactory,
    *,
    n_shadow: int = 5,
    m: int = 10,
    eps: float = 1e-3,
    train: TrainConfig | None = None,
    attack_epochs: int = 40,
    attack_lr: float = 1e-3,
    seed: int = 0,
    shadows: Sequence[TrainedShadow] | None = None,
) -> AttackResult:
    """SAMIA (Yuan & Zhang): sensitivity tokens and a small Transformer, black-box.

    Args:
        query_fn: Black-box target.
        target: Target members/non-members.
        shadow_x: Attacker's data.
        shadow_y: Its labels.
        net_factory: Builds a network like the target's.
        n_shadow: Number of shadow models whose outputs train the attack model (5 in the paper).
        m: Random directions per sample.
        eps: Perturbation size (input units).
        train: Shadow training hyper-parameters.
        attack_epochs: Attack-model epochs.
        attack_lr: Attack-model learning rate.
        seed: Seed.
        shadows: Shadow models already trained on ``shadow_x``; the first ``n_shadow`` are used
            (``None`` trains new ones).

    Returns:
        Result named ``samia``; ``queries`` counts the ``m + 1`` queries per sample.

    Raises:
        AttackInputError: If ``shadows`` holds fewer models than the attack uses.
    """

    def featurize(q: QueryFn, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        p, s = sensitivity_scores(q, x, m=m, eps=eps, seed=seed)
        return [p, s, _onehot(y, p.shape[1])]

    return _learned_attack(
        "samia",
        query_fn,
        target,
        shadow_x,
        shadow_y,
        net_factory,
        featurize,
        SamiaAttackModel,
        n_shadow=n_shadow,
        shadows=shadows,
        train=train,
        attack_epochs=attack_epochs,
        attack_lr=attack_lr,
        attack_batch_size=64,
        seed=seed,
        extra={"m": m, "eps": eps},
    )


#: Learned attacks, all with signature
#: ``(query_fn, target, shadow_x, shadow_y, net_factory, **kw) -> AttackResult``.
LEARNED_ATTACKS: dict[str, Callable[..., AttackResult]] = {
    "nn_shadow": nn_shadow_attack,
    "ml_leaks": ml_leaks_attack,
    "nasr": nasr_attack,
    "samia": samia_attack,
}


def run_learned_attack(
    name: str,
    query_fn: QueryFn,
    target: MembershipSplit,
    shadow_x: np.ndarray,
    shadow_y: np.ndarray,
    net_factory: NetFactory,
    **kwargs: Any,
) -> AttackResult:
    """Run one learned attack by name.

    Args:
        name: Key of :data:`LEARNED_ATTACKS`.
        query_fn: Black-box target.
        target: Target members/non-members.
        shadow_x: Attacker's data.
        shadow_y: Its labels.
        net_factory: Builds a network like the target's.
        **kwargs: Attack options.

    Returns:
        The attack's result.

    Raises:
        AttackInputError: On an unknown name.
    """
    if name not in LEARNED_ATTACKS:
        raise AttackInputError(f"unknown learned attack {name!r}; choose {sorted(LEARNED_ATTACKS)}")
    return LEARNED_ATTACKS[name](query_fn, target, shadow_x, shadow_y, net_factory, **kwargs)


def default_shadow_net(input_shape: Sequence[int], num_classes: int) -> NetFactory:
    """The attacker's default architecture (it does not know the target's).

    Flat inputs: MLP ``in -> 256 -> 128 -> C`` (ReLU). Images ``[C, H, W]``: conv 32 -> pool ->
    conv 64 -> pool -> adaptive average pool 4x4 -> 128 -> C.

    Args:
        input_shape: One input's shape without the batch axis.
        num_classes: Number of classes.

    Returns:
        A factory building an untrained ``nn.Module``.
    """
    shape = [int(d) for d in input_shape]

    def factory() -> nn.Module:
        if len(shape) == 1:
            return nn.Sequential(
                nn.Linear(shape[0], 256),
                nn.ReLU(),
                nn.Linear(256, 128),
                nn.ReLU(),
                nn.Linear(128, num_classes),
            )
        return nn.Sequential(
            nn.Conv2d(shape[0], 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    return factory
