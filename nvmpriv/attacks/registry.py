"""Registry of attacks on :class:`AttackInputs` and the single entry point ``run_attack``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from nvmpriv.attacks._validate import AttackInputError
from nvmpriv.attacks.inputs import AttackInputs
from nvmpriv.attacks.reference import lira_attack, rmia_attack
from nvmpriv.attacks.result import AttackResult
from nvmpriv.attacks.threshold import (
    class_threshold_attack,
    gap_attack,
    global_threshold_attack,
)

__all__ = ["ATTACK_REQUIREMENTS", "SCORE_ATTACKS", "available_attacks", "run_attack", "run_attacks"]

AttackFn = Callable[..., AttackResult]

#: Attack name -> function ``(inputs, **kwargs) -> AttackResult``. A plain dict: add your own.
SCORE_ATTACKS: dict[str, AttackFn] = {}
#: Attack name -> what it needs beyond target outputs: ``shadow``, ``reference``, ``population``.
ATTACK_REQUIREMENTS: dict[str, frozenset[str]] = {}

for _s in ("confidence", "loss", "entropy", "modified_entropy", "logit_scaled_confidence"):
    SCORE_ATTACKS[_s] = functools.partial(global_threshold_attack, score=_s)
    ATTACK_REQUIREMENTS[_s] = frozenset()
    SCORE_ATTACKS[f"{_s}_class_threshold"] = functools.partial(class_threshold_attack, score=_s)
    ATTACK_REQUIREMENTS[f"{_s}_class_threshold"] = frozenset({"shadow"})
SCORE_ATTACKS["correctness"] = functools.partial(global_threshold_attack, score="correctness")
ATTACK_REQUIREMENTS["correctness"] = frozenset()
SCORE_ATTACKS["gap"] = gap_attack
ATTACK_REQUIREMENTS["gap"] = frozenset()
SCORE_ATTACKS["lira_offline"] = functools.partial(lira_attack, online=False)
ATTACK_REQUIREMENTS["lira_offline"] = frozenset({"reference"})
SCORE_ATTACKS["lira_online"] = functools.partial(lira_attack, online=True)
ATTACK_REQUIREMENTS["lira_online"] = frozenset({"reference", "reference_in"})
SCORE_ATTACKS["rmia_offline"] = functools.partial(rmia_attack, online=False)
ATTACK_REQUIREMENTS["rmia_offline"] = frozenset({"reference", "population"})
SCORE_ATTACKS["rmia_online"] = functools.partial(rmia_attack, online=True)
ATTACK_REQUIREMENTS["rmia_online"] = frozenset({"reference", "reference_in", "population"})


def _has(inputs: AttackInputs) -> set[str]:
    have = set()
    if inputs.has_shadow:
        have.add("shadow")
    if inputs.reference is not None:
        have.add("reference")
        if inputs.reference.in_mask.any():
            have.add("reference_in")
    if inputs.has_population and inputs.population_reference is not None:
        have.add("population")
    return have


def available_attacks(inputs: AttackInputs) -> list[str]:
    """Names of the registered attacks whose requirements ``inputs`` meets.

    Args:
        inputs: Attack inputs.

    Returns:
        Registry names in registration order.
    """
    have = _has(inputs)
    return [n for n in SCORE_ATTACKS if ATTACK_REQUIREMENTS.get(n, frozenset()) <= have]


def run_attack(name: str, inputs: AttackInputs, **kwargs: Any) -> AttackResult:
    """Run one registered attack.

    Args:
        name: Key of :data:`SCORE_ATTACKS`.
        inputs: Validated attack inputs.
        **kwargs: Attack options (e.g. ``global_variance`` for LiRA, ``gamma``/``a`` for RMIA).

    Returns:
        The attack's result.

    Raises:
        AttackInputError: On an unknown name or missing inputs.
    """
    if name not in SCORE_ATTACKS:
        raise AttackInputError(f"unknown attack {name!r}; choose one of {sorted(SCORE_ATTACKS)}")
    missing = ATTACK_REQUIREMENTS.get(name, frozenset()) - _has(inputs)
    if missing:
        raise AttackInputError(
            f"attack {name!r} needs {sorted(missing)} in AttackInputs; "
            "see nvmpriv.attacks.AttackInputs for the fields"
        )
    return SCORE_ATTACKS[name](inputs, **kwargs)


def run_attacks(names: Iterable[str] | None, inputs: AttackInputs) -> dict[str, AttackResult]:
    """Run several attacks on the same inputs.

    Args:
        names: Registry names, or ``None`` for every attack the inputs allow.
        inputs: Validated attack inputs.

    Returns:
        Name -> result, in the given order.

    Raises:
        AttackInputError: If a named attack is unknown or its inputs are missing.
    """
    chosen = available_attacks(inputs) if names is None else list(names)
    return {n: run_attack(n, inputs) for n in chosen}
