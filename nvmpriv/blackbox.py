r"""Membership inference against an exported ONNX file, through ``predict_proba`` queries only.

The target is reached exclusively through :func:`nvmpriv.runtime.load` (numpy + onnxruntime):
this module never opens a checkpoint or the target's training code. The attacker's own models
(shadow and reference models) are trained here with torch via :mod:`nvmpriv.attack_models`, on
the attacker's own data, with an architecture the attacker chooses (the black-box attacker does
not know the target's): by default :func:`nvmpriv.attack_models.default_shadow_net` (an MLP 256-128 for flat inputs,
a small CNN for images), or any class given by ``--shadow-net``.

CLI::

    python -m nvmpriv attack --model exports/NAME.onnx --data RUN_DIR|DATA.yaml|ARRAYS.npz \\
        [--attacks all|a,b,c] [--queries k] [--output report.json]
        [--engine auto|onnxruntime|reference]

``--data`` is (a) a run folder (its ``config.yaml`` rebuilds the DataModule, its ``splits.npz``
gives the roles; checkpoints are ignored), (b) a data config YAML (a ``data:`` section or a
``class_path``), or (c) an ``.npz`` with ``member_x, member_y, nonmember_x, nonmember_y`` and
optionally ``shadow_x, shadow_y`` and ``population_x, population_y``. Roles: members =
``target_train``, non-members = ``target_test``, the attacker's data = ``shadow_train`` +
``shadow_test``, the reference pool = ``population``.

Attacks: every name of :data:`nvmpriv.attacks.SCORE_ATTACKS` (threshold attacks take their
threshold from one shadow model; ``lira_offline``/``rmia_offline`` use reference models) and of
:data:`nvmpriv.attack_models.LEARNED_ATTACKS`; ``all`` = :data:`ALL_ATTACKS`.
"""

from __future__ import annotations

import inspect
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvmpriv import attacks as mia
from nvmpriv.classpath import import_object, instantiate
from nvmpriv.cliargs import CommandParser, nonnegative_int, positive_int
from nvmpriv.runtime import Predictor, load
from nvmpriv.yamlfile import read_yaml

__all__ = [
    "ALL_ATTACKS",
    "AttackData",
    "attack_model",
    "cli_main",
    "format_report",
    "load_attack_data",
]

#: Threshold attacks (shadow thresholds), offline reference attacks and one learned attack.
ALL_ATTACKS: tuple[str, ...] = (
    "confidence",
    "loss",
    "entropy",
    "modified_entropy",
    "logit_scaled_confidence",
    "correctness",
    "gap",
    "confidence_class_threshold",
    "loss_class_threshold",
    "lira_offline",
    "rmia_offline",
    "nn_shadow",
)
_REFERENCE = {"lira_offline", "rmia_offline", "lira_online", "rmia_online"}
#: ``--engine`` choices (see :func:`nvmpriv.runtime.load`).
ENGINES = ("auto", "onnxruntime", "reference")


@dataclass(frozen=True)
class AttackData:
    """The attacker's view: target candidates with ground truth, and its own data.

    Attributes:
        member_x: Target members (inputs).
        member_y: Their labels.
        nonmember_x: Target non-members.
        nonmember_y: Their labels.
        shadow_x: Attacker's data for shadow models (``None`` if not given).
        shadow_y: Its labels.
        population_x: Attacker's reference pool (``None``: the shadow data is used).
        population_y: Its labels.
        source: Where the arrays came from.
        split_hash: Hash of the membership split the arrays come from (run folders and data
            YAMLs; ``None`` for an ``.npz``).
    """

    member_x: np.ndarray
    member_y: np.ndarray
    nonmember_x: np.ndarray
    nonmember_y: np.ndarray
    shadow_x: np.ndarray | None = None
    shadow_y: np.ndarray | None = None
    population_x: np.ndarray | None = None
    population_y: np.ndarray | None = None
    source: str = ""
    split_hash: str | None = None


def _cap(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    return (x, y) if n is None else (x[:n], y[:n])


def _datamodule_from_yaml(spec: Any, splits_path: str | None) -> Any:
    if isinstance(spec, dict) and isinstance(spec.get("data"), dict):
        spec = spec["data"]
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError("--data YAML needs a 'data:' section or a 'class_path' of a DataModule")
    if not isinstance(spec.get("init_args", {}), dict):
        raise ValueError(
            "--data YAML: data.init_args must be a mapping of the DataModule's arguments"
        )
    extra = {} if splits_path is None else {"splits_path": splits_path}
    dm = instantiate(spec, **extra)
    if not hasattr(dm, "arrays"):
        raise ValueError(
            f"--data YAML: {spec['class_path']} is not an nvmpriv DataModule (nvmpriv.data.*)"
        )
    dm.setup()
    return dm


def load_attack_data(spec: str | Path, *, max_samples: int | None = 1000) -> AttackData:
    """Read the candidates and the attacker's data from a run folder, a data YAML or an npz.

    Args:
        spec: Run folder (``config.yaml`` + ``splits.npz``), data config YAML, or ``.npz``.
        max_samples: Cap on the members, the non-members and each shadow role (the population:
            twice it). From a run or a data YAML these are the split's fixed random subsets
            (:meth:`nvmpriv.data.Splits.subset`), the members and non-members the same ones
            :class:`nvmpriv.callbacks.CrossbarAudit` attacks; from an ``.npz``, the first rows.
            ``None`` keeps all.

    Returns:
        The arrays.

    Raises:
        ValueError: On a missing path, a missing array or an unreadable file.
    """
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--data {path} not found; give a run folder, a data YAML or an .npz")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(
                f"--data {path} is not a readable .npz ({exc}); save it again with numpy.savez"
            ) from None
        except ValueError as exc:  # e.g. object arrays, which need pickle
            raise ValueError(
                f"--data {path}: {exc}; save plain numeric arrays with numpy.savez"
            ) from None
        need = ["member_x", "member_y", "nonmember_x", "nonmember_y"]
        missing = [k for k in need if k not in arrays]
        if missing:
            raise ValueError(f"--data {path} lacks arrays {missing}; it holds {sorted(arrays)}")
        for name, array in arrays.items():
            _check_array(path, name, array)
        _check_pairs(path, arrays)
        mx, my = _cap(arrays["member_x"], arrays["member_y"], max_samples)
        nx, ny = _cap(arrays["nonmember_x"], arrays["nonmember_y"], max_samples)
        return AttackData(
            mx,
            my.astype(np.int64),
            nx,
            ny.astype(np.int64),
            arrays.get("shadow_x"),
            _opt_int(arrays.get("shadow_y")),
            arrays.get("population_x"),
            _opt_int(arrays.get("population_y")),
            source=str(path),
        )
    if path.is_dir():
        cfg_file = path / "config.yaml"
        missing = [f for f in ("config.yaml", "splits.npz") if not (path / f).is_file()]
        if missing:
            raise ValueError(
                f"--data {path} is a folder without {' and '.join(missing)}; give a run folder "
                "(logs/<name>/version_N), a data config YAML or an .npz of arrays"
            )
        yaml_file, splits = cfg_file, str(path)
    else:
        yaml_file, splits = path, None
    try:
        dm = _datamodule_from_yaml(read_yaml(yaml_file, "--data") or {}, splits)
    except ValueError as exc:
        message = str(exc)
        raise ValueError(
            message if message.startswith(str(yaml_file)) else f"{yaml_file}: {message}"
        ) from None
    mx, my = dm.arrays("target_train", limit=max_samples)
    nx, ny = dm.arrays("target_test", limit=max_samples)
    # The attacker's own data: up to max_samples of each shadow role and twice that of the
    # population, random subsets fixed by the split (raw files can be ordered by class).
    (stx, sty) = dm.arrays("shadow_train", limit=max_samples)
    (svx, svy) = dm.arrays("shadow_test", limit=max_samples)
    sx, sy = np.concatenate([stx, svx]), np.concatenate([sty, svy])
    px, py = dm.arrays("population", limit=None if max_samples is None else 2 * max_samples)
    return AttackData(
        mx,
        my.astype(np.int64),
        nx,
        ny.astype(np.int64),
        sx,
        sy.astype(np.int64),
        px,
        py.astype(np.int64),
        source=str(path),
        split_hash=getattr(getattr(dm, "splits", None), "split_hash", None),
    )


def _check_array(path: Path, name: str, array: np.ndarray) -> None:
    """Refuse arrays an ``astype`` would silently change: complex or fractional labels."""
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"--data {path}: {name} has dtype {array.dtype}; save real numbers (labels as integers)"
        )
    if name.endswith("_y"):
        if array.ndim != 1:
            raise ValueError(f"--data {path}: {name} must be 1-D labels, got shape {array.shape}")
        if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
            raise ValueError(f"--data {path}: {name} holds non-integer labels; save class indices")


def _check_pairs(path: Path, arrays: dict[str, np.ndarray]) -> None:
    for role in ("member", "nonmember", "shadow", "population"):
        x, y = arrays.get(f"{role}_x"), arrays.get(f"{role}_y")
        if (x is None) != (y is None):
            raise ValueError(f"--data {path}: give {role}_x and {role}_y together")
        if x is not None and y is not None and len(x) != len(y):
            raise ValueError(
                f"--data {path}: {role}_x has {len(x)} rows but {role}_y {len(y)} labels; "
                "save one label per sample"
            )


def _opt_int(y: np.ndarray | None) -> np.ndarray | None:
    return None if y is None else np.asarray(y).astype(np.int64)


def _class_factory(
    class_path: str, input_shape: Sequence[int], num_classes: int
) -> Callable[[], Any]:
    cls = import_object(class_path, what="--shadow-net")
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    if "in_features" in params:
        kwargs["in_features"] = int(np.prod(input_shape))
    if "in_channels" in params and len(input_shape) == 3:
        kwargs["in_channels"] = int(input_shape[0])
    return lambda: cls(**kwargs)


def _shadows_used(attack: Callable[..., Any]) -> int:
    """How many shadow models a learned attack uses by default (1 if it has no ``n_shadow``)."""
    param = inspect.signature(attack).parameters.get("n_shadow")
    return 1 if param is None else int(param.default)


def _parse_attacks(spec: str | Sequence[str]) -> list[str]:
    from nvmpriv.attack_models import LEARNED_ATTACKS

    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(ALL_ATTACKS)
    known = set(mia.SCORE_ATTACKS) | set(LEARNED_ATTACKS)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"--attacks {unknown or names} unknown; choose 'all' or from {', '.join(sorted(known))}"
        )
    return names


class _Counting:
    """Query function counting the samples sent to the target (times ``k`` when averaging)."""

    def __init__(self, model: Predictor, k: int) -> None:
        self.model, self.k, self.count = model, k, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.count += self.k * len(x)
        acc = self.model.predict_proba(x)
        for _ in range(self.k - 1):
            acc = acc + self.model.predict_proba(x)
        return acc / self.k


def attack_model(
    model: Predictor | str | Path,
    data: AttackData,
    attacks: Sequence[str] | str = "all",
    *,
    queries: int = 1,
    shadow_net: str | None = None,
    shadow_epochs: int = 30,
    n_ref: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the MIA suite on an exported model.

    Args:
        model: A loaded predictor or the path of an export.
        data: Candidates and the attacker's data (:func:`load_attack_data`).
        attacks: Names or ``"all"``.
        queries: Queries averaged per sample (``k``); with ``k > 1`` the report adds
            ``query_averaging``: the confidence attack vs ``1, 2, 4, ..., k`` averaged queries,
            its accuracy with the threshold of the attacker's first shadow model and the
            target-tuned accuracy bound.
        shadow_net: Class path of the attacker's architecture (default
            :func:`nvmpriv.attack_models.default_shadow_net`).
        shadow_epochs: Training epochs of shadow/reference models.
        n_ref: Reference models for LiRA/RMIA.
        seed: Seed of the attacker's training.

    Returns:
        The report: ``attacks`` (per attack: ``accuracy``, ``accuracy_upper_bound``, ``auc``,
        ``tpr_at_1pct_fpr``, ``tpr_at_01pct_fpr`` (``None`` when the budget is below
        ``1 / n_nonmembers``, reason under ``unmeasurable``), ``tpr_at_zero_fpr``,
        ``degenerate`` and ``degenerate_reason``, ``queries``, ``seconds``, ...),
        ``shadow_models`` (``n``, ``epochs``, ``seconds``: one shadow set trained once and shared
        by the score and learned attacks, each using its first ``n_shadow``; its training time is
        not in the attacks' ``seconds``), metadata and
        the ROC arrays under ``_roc`` (not JSON; dropped by the CLI).

    Raises:
        ValueError: On unknown attacks, ``queries < 1`` or missing attacker data.
    """
    from nvmpriv.attack_models import (
        LEARNED_ATTACKS,
        MembershipSplit,
        TrainConfig,
        default_shadow_net,
        reference_attack_inputs,
        run_learned_attack,
        shadow_attack_inputs,
        train_shadow_models,
    )

    if int(queries) < 1:
        raise ValueError(f"--queries={queries} must be >= 1 (queries averaged per sample)")
    predictor = model if isinstance(model, Predictor) else load(model)
    names = _parse_attacks(attacks)
    shape, n_classes = predictor.input_shape, predictor.num_classes
    for field in ("member_y", "nonmember_y", "shadow_y", "population_y"):
        labels = getattr(data, field)
        if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(
                f"{field} holds labels {int(labels.min())}..{int(labels.max())} but "
                f"{predictor.path.name} has {n_classes} classes; give labels in 0..{n_classes - 1}"
            )
    split = predictor.metadata.get("nvmpriv.split_hash")
    if data.split_hash and split and data.split_hash != split:
        raise ValueError(
            f"{predictor.path.name} was trained on split {split[:12]} but --data {data.source} "
            f"holds split {data.split_hash[:12]}: members would be mislabelled; give the run "
            "folder (or data config and seed) the model was trained with"
        )
    for field in ("member_x", "nonmember_x", "shadow_x", "population_x"):
        array = getattr(data, field)
        if array is not None and tuple(array.shape[1:]) != tuple(shape):
            raise ValueError(
                f"{field} has samples of shape {tuple(array.shape[1:])} but {predictor.path.name} "
                f"takes {tuple(shape)}; give data of the model's input shape (nvmpriv.input_shape)"
            )
    factory = (
        default_shadow_net(shape, n_classes)
        if shadow_net is None
        else _class_factory(shadow_net, shape, n_classes)
    )
    needs_shadow = [n for n in names if n not in _REFERENCE]
    if data.shadow_x is None and (needs_shadow or data.population_x is None):
        raise ValueError(
            "these attacks need the attacker's own data: give shadow_x/shadow_y in the .npz "
            "(or a run folder / data YAML)"
        )
    target = MembershipSplit(data.member_x, data.member_y, data.nonmember_x, data.nonmember_y)
    train = TrainConfig(epochs=shadow_epochs)
    results: dict[str, mia.AttackResult] = {}
    timing: dict[str, float] = {}
    score_names = [n for n in names if n in mia.SCORE_ATTACKS and n not in _REFERENCE]
    learned_names = [n for n in names if n in LEARNED_ATTACKS]
    # One shadow set serves every attack (each uses its first n_shadow models), so a suite of
    # several shadow-based attacks trains the attacker's models once.
    averaging = int(queries) > 1 and data.shadow_x is not None
    n_shadow = max(
        [1 if score_names or averaging else 0]
        + [_shadows_used(LEARNED_ATTACKS[n]) for n in learned_names]
    )
    shadows: list[Any] = []
    shadow_seconds = 0.0
    if n_shadow:
        assert data.shadow_x is not None and data.shadow_y is not None
        t0 = time.perf_counter()
        shadows = train_shadow_models(
            factory, data.shadow_x, data.shadow_y, n_shadow, train=train, seed=seed
        )
        shadow_seconds = time.perf_counter() - t0
    if score_names:
        q = _Counting(predictor, int(queries))
        t0 = time.perf_counter()
        assert data.shadow_x is not None and data.shadow_y is not None
        inputs = shadow_attack_inputs(
            q, target, data.shadow_x, data.shadow_y, factory, shadow=shadows[0]
        )
        prep = time.perf_counter() - t0
        for name in score_names:
            t1 = time.perf_counter()
            results[name] = mia.run_attack(name, inputs)
            timing[name] = prep + time.perf_counter() - t1
            results[name] = _with(results[name], queries=q.count)
    ref_names = [n for n in names if n in _REFERENCE]
    if ref_names:
        pool_x = data.population_x if data.population_x is not None else data.shadow_x
        pool_y = data.population_y if data.population_y is not None else data.shadow_y
        assert pool_x is not None and pool_y is not None
        q = _Counting(predictor, int(queries))
        t0 = time.perf_counter()
        online = any(n.endswith("_online") for n in ref_names)
        inputs = reference_attack_inputs(
            q, target, pool_x, pool_y, factory, n_ref=n_ref, online=online, train=train, seed=seed
        )
        prep = time.perf_counter() - t0
        for name in ref_names:
            t1 = time.perf_counter()
            results[name] = _with(mia.run_attack(name, inputs), queries=q.count)
            timing[name] = prep + time.perf_counter() - t1
    for name in learned_names:
        q = _Counting(predictor, int(queries))
        t0 = time.perf_counter()
        assert data.shadow_x is not None and data.shadow_y is not None
        r = run_learned_attack(
            name, q, target, data.shadow_x, data.shadow_y, factory, seed=seed, shadows=shadows
        )
        results[name] = _with(r, queries=q.count)
        timing[name] = time.perf_counter() - t0
    report: dict[str, Any] = {
        "model": str(predictor.path),
        "engine": predictor.engine,
        "crossbar": predictor.metadata.get("nvmpriv.crossbar_name", ""),
        "chip_seed": predictor.metadata.get("nvmpriv.chip_seed", ""),
        "split_hash": predictor.metadata.get("nvmpriv.split_hash", ""),
        "data": data.source,
        "queries_per_sample": int(queries),
        "n_members": len(data.member_y),
        "n_nonmembers": len(data.nonmember_y),
        "shadow_net": shadow_net or "default (nvmpriv.attack_models.default_shadow_net)",
        "shadow_models": {"n": n_shadow, "epochs": int(shadow_epochs), "seconds": shadow_seconds},
        "attacks": {},
    }
    for name in names:
        r = results[name]
        entry = r.to_dict(max_roc_points=500)
        entry.pop("roc_fpr", None)
        entry.pop("roc_tpr", None)
        entry["seconds"] = timing[name]
        report["attacks"][name] = entry
    if averaging:
        assert data.shadow_x is not None and data.shadow_y is not None
        ks = sorted({2**i for i in range(int(np.log2(queries)) + 1)} | {int(queries)})
        sh = shadows[0]  # its threshold is the attacker's; the target-tuned one is the bound
        curve = mia.query_averaging_curve(
            predictor.predict_proba,
            data.member_x,
            data.member_y,
            data.nonmember_x,
            data.nonmember_y,
            ks,
            shadow=(
                sh.query,
                data.shadow_x[sh.member_idx],
                data.shadow_y[sh.member_idx],
                data.shadow_x[sh.nonmember_idx],
                data.shadow_y[sh.nonmember_idx],
            ),
        )
        report["query_averaging"] = mia.averaging_report(curve)
    report["_roc"] = {n: {"roc": (r.fpr, r.tpr), "auc": r.auc} for n, r in results.items()}
    return report


def _with(result: mia.AttackResult, **changes: Any) -> mia.AttackResult:
    return mia.AttackResult(**{**result.__dict__, **changes})


def _tpr_cell(entry: dict[str, Any], key: str, column: str, notes: dict[str, None]) -> str:
    """The table cell of a low-FPR TPR: the value, or ``n/a`` with a note when not measured."""
    budget = mia.LOW_FPR_BUDGETS[key]
    value = entry.get(key)
    n_out = entry.get("n_nonmembers")
    # Re-checked from n_nonmembers too, so a report written before the null rule still prints
    # n/a instead of a TPR at zero false positives passed off as one at the budget.
    if value is not None and (n_out is None or mia.fpr_resolvable(budget, int(n_out))):
        return f"{value:7.3f}"
    need = mia.nonmembers_needed(budget)
    reason = (entry.get("unmeasurable") or {}).get(key) or (
        f"FPR {budget * 100:g}% needs >= {need} non-members, got {n_out}"
    )
    notes[f"{column} n/a (<{need} non-members): {reason}"] = None
    return f"{'n/a':>7s}"


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the report.

    A TPR whose FPR budget is below ``1 / n_nonmembers`` prints as ``n/a`` (explained in a note
    under the table), and a degenerate attack (constant scores, or a decision rule calling every
    sample a member or none) is marked ``DEGENERATE`` with its reason.

    Args:
        report: As returned by :func:`attack_model`.

    Returns:
        The table.
    """
    head = (
        f"{'attack':28s} {'acc':>6s} {'acc_ub':>6s} {'auc':>6s} {'tpr@1%':>7s} "
        f"{'tpr@.1%':>7s} {'queries':>8s} {'sec':>6s}"
    )
    engine = f"; {report['engine']}" if report.get("engine") else ""
    lines = [f"model {report['model']} (crossbar {report['crossbar']}{engine})", head]
    lines.append("-" * len(head))
    notes: dict[str, None] = {}  # ordered set: one note per distinct reason
    for name, e in report["attacks"].items():
        acc = "   n/a" if e.get("accuracy") is None else f"{e['accuracy']:6.3f}"
        tpr1 = _tpr_cell(e, "tpr_at_1pct_fpr", "tpr@1%", notes)
        tpr01 = _tpr_cell(e, "tpr_at_01pct_fpr", "tpr@.1%", notes)
        flag = "  DEGENERATE" if e.get("degenerate") else ""
        lines.append(
            f"{name:28s} {acc} {e['accuracy_upper_bound']:6.3f} {e['auc']:6.3f} "
            f"{tpr1} {tpr01} {e.get('queries') or 0:8d} {e['seconds']:6.1f}{flag}"
        )
        if e.get("degenerate"):
            notes[f"{name} DEGENERATE: {e.get('degenerate_reason') or 'no reason recorded'}"] = None
    for row in report.get("query_averaging", []):
        flag = "  DEGENERATE" if row.get("degenerate") else ""
        lines.append(
            f"  k={row['k']:<4d} confidence acc={row['accuracy']:.3f} "
            f"(target-tuned bound {row['accuracy_upper_bound']:.3f}){flag}"
        )
    if notes:
        lines.append("notes:")
        lines.extend(f"  {note}" for note in notes)
    return "\n".join(lines)


def _parser() -> CommandParser:
    p = CommandParser(
        prog="python -m nvmpriv attack",
        description="Membership inference against an exported ONNX model (queries only).",
    )
    p.add_argument("--model", required=True, help="exported .onnx file")
    p.add_argument("--data", required=True, help="run folder, data config YAML, or .npz")
    from nvmpriv.attack_models import LEARNED_ATTACKS

    known = ", ".join(sorted(set(mia.SCORE_ATTACKS) | set(LEARNED_ATTACKS)))
    p.add_argument(
        "--attacks",
        default="all",
        help=f"'all' ({len(ALL_ATTACKS)} standard attacks: {', '.join(ALL_ATTACKS)}) or "
        f"comma-separated from: {known}",
    )
    p.add_argument(
        "--queries", type=positive_int, default=1, help="queries averaged per sample (k)"
    )
    p.add_argument(
        "--output",
        default=None,
        help="report path; ROC PNG next to it (default: <model>.attack.json beside the model)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--shadow-net", default=None, help="class path of the attacker's net")
    p.add_argument(
        "--shadow-epochs", type=positive_int, default=30, help="attacker's training epochs"
    )
    p.add_argument("--n-ref", type=positive_int, default=4, help="reference models for LiRA/RMIA")
    p.add_argument("--max-samples", type=positive_int, default=1000, help="cap per candidate set")
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of the attacker's training"
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="what evaluates the file: 'auto' (the native crossbar kernel where it applies, "
        "else onnxruntime), 'onnxruntime' (the file's function bodies alone) or 'reference' "
        "(onnx's ReferenceEvaluator with numpy crossbar ops: slow, for cross-checks)",
    )
    return p


def cli_main(argv: list[str]) -> int:
    """``python -m nvmpriv attack``.

    Args:
        argv: Arguments after ``attack``.

    Returns:
        Exit code.
    """
    args = _parser().parse_args(argv)
    if args.output is None:
        args.output = str(Path(args.model).with_suffix(".attack.json"))
    _check_output(Path(args.output), args.overwrite)
    names = _parse_attacks(args.attacks)
    model = load(args.model, native=args.engine == "auto", reference=args.engine == "reference")
    data = load_attack_data(args.data, max_samples=args.max_samples)
    report = attack_model(
        model,
        data,
        names,
        queries=args.queries,
        shadow_net=args.shadow_net,
        shadow_epochs=args.shadow_epochs,
        n_ref=args.n_ref,
        seed=args.seed,
    )
    write_report(report, args.output)
    print(format_report(report))
    return 0


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a report path that would replace or cannot hold the outputs."""
    if out.suffix != ".json":
        raise ValueError(f"--output {out} must be a .json path (the ROC PNG is written next to it)")
    if out.is_dir():
        raise ValueError(f"--output {out} is a folder; give a file path such as {out}/report.json")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--output {out}: {parent} is a file, not a folder; choose another path")
    taken = [p for p in (out, out.with_suffix(".png")) if p.exists()]
    if taken and not overwrite:
        raise ValueError(
            f"--output {out}: {taken[0]} exists; pass --overwrite or choose another path"
        )


def write_report(report: dict[str, Any], output: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` (atomically) and a log-log ROC PNG next to it.

    Args:
        report: As returned by :func:`attack_model`.
        output: JSON path.

    Returns:
        ``(json_path, png_path)``.
    """
    from nvmpriv.atomic import atomic_write_json
    from nvmpriv.plots import roc_figure, save_figure

    out = Path(output)
    payload = {k: v for k, v in report.items() if not k.startswith("_")}
    atomic_write_json(out, payload)
    png = out.with_suffix(".png")
    fig = roc_figure(report["_roc"], f"{report['crossbar']} ({Path(report['model']).name})")
    save_figure(fig, png, dpi=120)
    return out, png
