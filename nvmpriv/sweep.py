"""``python -m nvmpriv sweep``: experiment grids, resumable, gathered into tables and plots.

A sweep YAML names base ``fit`` configs and the axes to vary (seeds, any dotted config field);
every combination is a *cell*, i.e. one ordinary ``python -m nvmpriv fit`` run in a subprocess,
optionally followed by ``python -m nvmpriv export`` and ``python -m nvmpriv attack`` (black box).
Crossbar presets and privacy attacks are not cell axes: one trained model is audited on every
listed crossbar by :class:`nvmpriv.callbacks.CrossbarAudit`, so they are written into each cell's
audit callback instead of multiplying the training runs.

Layout under the sweep folder (``results/<name>/`` by default)::

    cells/<cell_id>.yaml   resolved fit config of the cell (what was run)
    cells/<cell_id>.json   status record: done | failed, return code, error line, run folder
    cells/<cell_id>.log    stdout + stderr of the cell's subprocesses
    runs/<cell_id>/version_N/   the Lightning run (results.json, checkpoints, TensorBoard)
    results.csv  results.md  plots/*.png

A cell is finished when its record says ``done`` and its run folder has ``results.json``;
re-running the sweep skips finished cells and retries failed ones. Cells run in local processes
(``executor: local``, ``max_parallel`` at a time) or as Ray tasks (``executor: ray``), which
needs Ray (``pip install 'nvmpriv[ray]'``) and a file system shared by the driver and workers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from nvmpriv.atomic import atomic_write_json, atomic_write_text
from nvmpriv.classpath import check_spec
from nvmpriv.cliargs import CommandParser, nonnegative_int, positive_int
from nvmpriv.yamlfile import parse_override, read_yaml, set_dotted

__all__ = [
    "AUDIT_CLASS",
    "Cell",
    "ConfigEntry",
    "SweepSpec",
    "cell_config",
    "check_cell_config",
    "cli_main",
    "expand_grid",
    "gather",
    "load_sweep",
    "run_cell",
    "run_sweep",
    "set_dotted",
    "write_outputs",
]

AUDIT_CLASS = "nvmpriv.callbacks.CrossbarAudit"
EXECUTORS = ("local", "ray")
DIGITAL = "digital"
#: What a cell's seed sets besides ``seed_everything`` (``seed_also``): the membership split
#: (``data.init_args.seed``) and the chip (the audit's and the export's ``chip_seed``).
SEED_ALSO = ("split", "chip")
_SWEEP_KEYS = {
    "name",
    "description",
    "configs",
    "base_configs",
    "seeds",
    "seed_also",
    "crossbars",
    "attacks",
    "overrides",
    "audit",
    "axes",
    "executor",
    "max_parallel",
    "blackbox",
    "blackbox_attacks",
    "blackbox_crossbars",
    "threads",
    "cell_timeout_s",
    "ray",
    "output",
}
_ENTRY_KEYS = {"config", "label", "overrides", "axes", "audit"}


# ---------------------------------------------------------------------- specification
@dataclass(frozen=True)
class ConfigEntry:
    """One base ``fit`` config of a sweep with its own overrides and axes.

    Attributes:
        config: Path of the base LightningCLI YAML (as written in the sweep file).
        path: The resolved path that exists on disk.
        label: Short name used in cell ids, tables and plot legends.
        overrides: Dotted config path -> value, applied to this config only.
        axes: Axis -> list of values, varied for this config only (see :class:`SweepSpec`).
        audit: CrossbarAudit init_args applied to this config only.
    """

    config: str
    path: Path
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep YAML.

    Attributes:
        name: Sweep name (folder name under ``results/``).
        source: The sweep YAML file.
        entries: Base configs, each with its own overrides/axes.
        seeds: Values of ``seed_everything``, one cell each.
        seed_also: What else the cell's seed sets (subset of :data:`SEED_ALSO`): ``split``
            (the membership split's ``data.init_args.seed``) and ``chip`` (``chip_seed`` of the
            audit and the export). Empty: only the training run varies (init, order, dropout).
        crossbars: Crossbar presets written into every cell's CrossbarAudit (``None`` keeps
            the base config's list).
        attacks: Score attacks written into every cell's CrossbarAudit (``None`` keeps them).
        overrides: Dotted config path -> value applied to every cell.
        audit: Extra CrossbarAudit init_args for every cell (e.g. ``every_n_epochs``).
        axes: Axis -> values varied for every config. An axis is a dotted path
            (``model.init_args.eps``) or several comma-joined paths whose values are lists of
            the same length (zipped: ``model.init_args.weight_bits,model.init_args.act_bits``).
        executor: ``local`` (processes on this machine) or ``ray``.
        max_parallel: Cells at a time with the local executor.
        blackbox: After fit, export ONNX models and attack them as a black box.
        blackbox_attacks: Attacks for ``python -m nvmpriv attack`` (default: ``attacks``).
        blackbox_crossbars: Crossbars exported for the black box (default: ``digital`` and
            every audited crossbar).
        threads: If set, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of each cell (threads).
        cell_timeout_s: Wall-clock limit of one subprocess (seconds); ``None`` = no limit.
        ray: Ray options: ``address`` (``auto`` joins a running cluster), ``num_cpus`` and
            ``num_gpus`` per cell.
        output: The sweep folder.
    """

    name: str
    source: Path
    entries: tuple[ConfigEntry, ...]
    seeds: tuple[int, ...]
    crossbars: tuple[str, ...] | None
    attacks: tuple[str, ...] | None
    overrides: dict[str, Any]
    audit: dict[str, Any]
    axes: dict[str, list[Any]]
    executor: str
    max_parallel: int
    blackbox: bool
    blackbox_attacks: tuple[str, ...] | None
    blackbox_crossbars: tuple[str, ...] | None
    threads: int | None
    cell_timeout_s: float | None
    ray: dict[str, Any]
    output: Path
    seed_also: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a base config, a seed and one value per axis.

    Attributes:
        cell_id: Stable id: readable slug plus a hash of everything that changes the run.
        entry: The base config.
        seed: ``seed_everything``.
        values: Axis -> value of this cell.
        params: JSON-safe description of the cell (hashed into ``cell_id``).
    """

    cell_id: str
    entry: ConfigEntry
    seed: int
    values: dict[str, Any]
    params: dict[str, Any]


def _resolve_path(raw: str, sweep_file: Path) -> Path:
    """A config path relative to the working directory, else to the sweep file's ancestors."""
    candidate = Path(raw)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    for folder in [sweep_file.parent, *sweep_file.resolve().parents]:
        if (folder / raw).exists():
            return folder / raw
    raise FileNotFoundError(
        f"sweep {sweep_file}: config {raw!r} not found relative to {Path.cwd()} or the sweep "
        "file's folders; give a path relative to the repository root"
    )


def _check_axes(axes: Any, where: str) -> dict[str, list[Any]]:
    if axes is None:
        return {}
    if not isinstance(axes, dict):
        raise ValueError(f"{where}: axes must be a mapping 'dotted.path: [values]', got {axes!r}")
    out: dict[str, list[Any]] = {}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: axis {key!r} must be a non-empty list of values")
        paths = str(key).split(",")
        if len(paths) > 1:
            for v in values:
                if not isinstance(v, list) or len(v) != len(paths):
                    raise ValueError(
                        f"{where}: zipped axis {key!r} needs lists of {len(paths)} values "
                        f"(one per path), got {v!r}"
                    )
        out[str(key)] = values
    return out


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}: {value!r}")
    return {str(k): v for k, v in value.items()}


def _names(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of names, got {value!r}")
    return tuple(str(v) for v in value)


def load_sweep(path: str | Path, output: str | Path | None = None) -> SweepSpec:
    """Read and validate a sweep YAML.

    Args:
        path: The sweep file.
        output: Sweep folder (default: the file's ``output`` key, else ``results/<name>``).

    Returns:
        The specification.

    Raises:
        FileNotFoundError: The sweep file or a base config is missing.
        ValueError: A key is unknown or has the wrong type/value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found")
    raw = read_yaml(path, "sweep") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"sweep {path}: top level must be a mapping")
    unknown = sorted(set(raw) - _SWEEP_KEYS)
    if unknown:
        raise ValueError(
            f"sweep {path}: unknown keys {unknown}; allowed: {', '.join(sorted(_SWEEP_KEYS))}"
        )
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"sweep {path}: name={name!r} may use only letters, digits, _ . -")
    configs = raw.get("configs", raw.get("base_configs"))
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"sweep {path}: 'configs' must be a non-empty list of fit config paths")
    entries = []
    for i, item in enumerate(configs):
        where = f"sweep {path}: configs[{i}]"
        if isinstance(item, str):
            item = {"config": item}
        if not isinstance(item, dict) or "config" not in item:
            raise ValueError(f"{where} must be a path or a mapping with a 'config' key")
        bad = sorted(set(item) - _ENTRY_KEYS)
        if bad:
            raise ValueError(f"{where}: unknown keys {bad}; allowed: {sorted(_ENTRY_KEYS)}")
        resolved = _resolve_path(str(item["config"]), path)
        label = str(item.get("label") or Path(str(item["config"])).stem)
        entries.append(
            ConfigEntry(
                config=str(item["config"]),
                path=resolved,
                label=label,
                overrides=_mapping(item.get("overrides"), f"{where}.overrides"),
                axes=_check_axes(item.get("axes"), where),
                audit=_mapping(item.get("audit"), f"{where}.audit"),
            )
        )
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"sweep {path}: config labels {labels} repeat; give each a 'label'")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"sweep {path}: seeds must be a non-empty list of integers, got {seeds!r}")
    seed_also = raw.get("seed_also") or []
    if not isinstance(seed_also, list) or not set(seed_also) <= set(SEED_ALSO):
        raise ValueError(
            f"sweep {path}: seed_also={seed_also!r} must be a list of {list(SEED_ALSO)}"
        )
    executor = str(raw.get("executor", "local"))
    if executor not in EXECUTORS:
        raise ValueError(f"sweep {path}: executor={executor!r}; choose one of {EXECUTORS}")
    max_parallel = raw.get("max_parallel", 1)
    if not isinstance(max_parallel, int) or max_parallel < 1:
        raise ValueError(f"sweep {path}: max_parallel={max_parallel!r} must be an integer >= 1")
    threads = raw.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"sweep {path}: threads={threads!r} must be an integer >= 1 or null")
    timeout = raw.get("cell_timeout_s")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise ValueError(f"sweep {path}: cell_timeout_s={timeout!r} must be > 0 or null")
    crossbars = _names(raw.get("crossbars"), f"sweep {path}: crossbars")
    attacks = _names(raw.get("attacks"), f"sweep {path}: attacks")
    _check_known(crossbars, attacks, path)
    out = Path(output or raw.get("output") or Path("results") / name)
    return SweepSpec(
        name=name,
        source=path,
        entries=tuple(entries),
        seeds=tuple(int(s) for s in seeds),
        crossbars=crossbars,
        attacks=attacks,
        overrides=_mapping(raw.get("overrides"), f"sweep {path}: overrides"),
        audit=_mapping(raw.get("audit"), f"sweep {path}: audit"),
        axes=_check_axes(raw.get("axes"), f"sweep {path}"),
        executor=executor,
        max_parallel=max_parallel,
        blackbox=bool(raw.get("blackbox", False)),
        blackbox_attacks=_names(raw.get("blackbox_attacks"), f"sweep {path}: blackbox_attacks"),
        blackbox_crossbars=_names(
            raw.get("blackbox_crossbars"), f"sweep {path}: blackbox_crossbars"
        ),
        threads=threads,
        cell_timeout_s=float(timeout) if timeout is not None else None,
        ray=_mapping(raw.get("ray"), f"sweep {path}: ray"),
        output=out,
        seed_also=tuple(s for s in SEED_ALSO if s in seed_also),
    )


def _check_known(
    crossbars: Sequence[str] | None, attacks: Sequence[str] | None, path: Path
) -> None:
    """Reject unknown presets and attacks before any cell starts, not in every cell's log."""
    if crossbars:
        from nvmpriv.crossbar import PRESETS

        bad = [c for c in crossbars if c not in PRESETS]
        if bad:
            raise ValueError(
                f"sweep {path}: unknown crossbars {bad}; choose from {', '.join(PRESETS)}"
            )
    if attacks:
        from nvmpriv.attacks import SCORE_ATTACKS

        bad = [a for a in attacks if a not in SCORE_ATTACKS]
        if bad:
            raise ValueError(
                f"sweep {path}: unknown attacks {bad}; choose from {', '.join(sorted(SCORE_ATTACKS))}"
            )


# ---------------------------------------------------------------------- grid
def _slug(value: Any) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int | float):
        text = f"{value:g}"
    elif isinstance(value, str):
        text = value.rsplit(".", 1)[-1]
    elif isinstance(value, dict) and "class_path" in value:
        args = value.get("init_args") or {}
        text = str(value["class_path"]).rsplit(".", 1)[-1] + "".join(
            _slug(v) for v in args.values() if isinstance(v, int | float | str)
        )
    elif isinstance(value, list):
        text = "x".join(_slug(v) for v in value)
    else:
        text = hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return re.sub(r"[^A-Za-z0-9.]+", "", text)[:24] or "v"


def _axis_name(key: str) -> str:
    return ",".join(p.rsplit(".", 1)[-1] for p in key.split(","))


def _file_sha256(path: Path) -> str | None:
    """SHA-256 of a file's bytes, or ``None`` if it cannot be read (reported elsewhere)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def expand_grid(spec: SweepSpec) -> list[Cell]:
    """Every cell of the sweep, in a stable order (config, axes, seed).

    Args:
        spec: The sweep.

    Returns:
        The cells; ids depend only on what changes the run (config, overrides, axis values,
        seed, audited crossbars and attacks), so they survive reordering the sweep file.
    """
    cells = []
    for entry in spec.entries:
        axes = {**spec.axes, **entry.axes}
        keys = list(axes)
        for combo in product(*(axes[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            for seed in spec.seeds:
                params = {
                    "config": entry.config,
                    # the base config's text, so that editing it re-runs its cells
                    "config_sha256": _file_sha256(entry.path),
                    "overrides": {**spec.overrides, **entry.overrides},
                    "audit": {**spec.audit, **entry.audit},
                    "values": values,
                    "seed": seed,
                    "crossbars": list(spec.crossbars) if spec.crossbars else None,
                    "attacks": list(spec.attacks) if spec.attacks else None,
                }
                if spec.seed_also:  # only when set, so earlier sweeps keep their cell ids
                    params["seed_also"] = list(spec.seed_also)
                digest = hashlib.sha1(
                    json.dumps(params, sort_keys=True, default=str).encode()
                ).hexdigest()[:8]
                slug = "-".join(
                    [entry.label]
                    + [f"{_axis_name(k)[:12]}{_slug(v)}" for k, v in values.items()]
                    + [f"s{seed}"]
                )
                slug = re.sub(r"[^A-Za-z0-9_.=-]+", "", slug)[:80]
                cells.append(Cell(f"{slug}-{digest}", entry, seed, values, params))
    return cells


def _find_callback(config: dict[str, Any], name: str | tuple[str, ...]) -> dict[str, Any] | None:
    """The first trainer callback whose class path ends with ``name`` (the live mapping)."""
    for cb in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith(name):
            return cb
    return None


def _audit_args(config: dict[str, Any]) -> dict[str, Any]:
    cb = _find_callback(config, AUDIT_CLASS)
    if cb is not None:
        if cb.get("init_args") is None:
            cb["init_args"] = {}
        args: dict[str, Any] = cb["init_args"]
        return args  # the live mapping: callers edit it in place
    raise ValueError(
        f"config has no {AUDIT_CLASS} callback under trainer.callbacks; every shipped config "
        "has one, add it so the cell writes results.json"
    )


def check_cell_config(config: dict[str, Any], cell_id: str) -> None:
    """Check a cell's resolved config without building or training anything (``--dry-run``).

    Imports the class paths of ``model``, ``data``, ``trainer`` (callbacks, logger) and checks
    every ``init_args`` name and simple value type against the classes, so that a mistyped axis
    (``model.init_args.lamda``) stops the dry run instead of failing every cell later.

    Args:
        config: The output of :func:`cell_config`.
        cell_id: Named in the message.

    Raises:
        ValueError: The first problem, naming the cell and the config location.
    """
    trainer = dict(config.get("trainer") or {})
    nested = {k: trainer.pop(k) for k in ("callbacks", "logger", "plugins") if k in trainer}
    specs = {
        "model": config.get("model"),
        "data": config.get("data"),
        "trainer": {"class_path": "lightning.pytorch.Trainer", "init_args": trainer},
        **{f"trainer.{k}": v for k, v in nested.items()},
    }
    for where, spec in specs.items():
        try:
            check_spec(spec, where)
        except ValueError as exc:
            raise ValueError(f"cell {cell_id}: {exc}") from None


def check_cell_data(config: dict[str, Any], cell_id: str, checked: set[str]) -> None:
    """Read a cell's data set as its run would (``--dry-run``), once per distinct data spec.

    A missing, corrupt or mislabelled data file then stops the dry run with the loader's
    message instead of failing every cell. Data modules with ``download: true`` are skipped,
    since a dry run must not fetch anything.

    Args:
        config: The output of :func:`cell_config` (already checked by
            :func:`check_cell_config`).
        cell_id: Named in the message.
        checked: Keys of the data specs read so far; updated in place.

    Raises:
        ValueError: The data module cannot be built or its files cannot be read.
    """
    spec = config.get("data")
    key = json.dumps(spec, sort_keys=True, default=str)
    if key in checked or not isinstance(spec, dict):
        return
    checked.add(key)
    from nvmpriv.classpath import instantiate  # imports torch via the data module

    try:
        data = instantiate(spec)
        if getattr(data, "download", False):
            return
        _ = data.raw
    except (ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"cell {cell_id}: data: {first}") from None


def cell_config(spec: SweepSpec, cell: Cell) -> dict[str, Any]:
    """The resolved ``fit`` config of a cell.

    Args:
        spec: The sweep.
        cell: The cell.

    Returns:
        The base config with the sweep's overrides, the cell's axis values and seed, the audit's
        crossbars/attacks, the run folder ``<sweep>/runs/<cell_id>`` and no progress bar.

    Raises:
        ValueError: An override path does not fit the config, or the audit callback is missing.
    """
    config = read_yaml(cell.entry.path, "sweep config entry") or {}
    if not isinstance(config, dict):
        raise ValueError(f"sweep config entry {cell.entry.path} must hold a mapping (a fit config)")
    for key, value in {**spec.overrides, **cell.entry.overrides}.items():
        set_dotted(config, key, value)
    for key, value in cell.values.items():
        paths = key.split(",")
        parts = value if len(paths) > 1 else [value]
        for p, v in zip(paths, parts, strict=True):
            set_dotted(config, p, v)
    config["seed_everything"] = cell.seed
    trainer = config.setdefault("trainer", {})
    logger = trainer.get("logger")
    if not isinstance(logger, dict) or "class_path" not in logger:
        logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {}}
    logger.setdefault("init_args", {})
    logger["init_args"]["save_dir"] = str((spec.output / "runs").resolve())
    logger["init_args"]["name"] = cell.cell_id
    logger["init_args"].pop("version", None)
    trainer["logger"] = logger
    # Progress bars only fill the log files of unattended runs.
    trainer["callbacks"] = [
        cb
        for cb in trainer.get("callbacks") or []
        if not (isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ProgressBar"))
    ]
    trainer["enable_progress_bar"] = False
    export = _find_callback(config, "ExportOnnx")
    if export is not None:
        # An ONNX export at fit end belongs with the sweep, not in the working directory.
        export.setdefault("init_args", {})
        export["init_args"]["folder"] = str((spec.output / "exports").resolve())
    audit = _audit_args(config)
    if spec.crossbars:
        audit["crossbars"] = list(spec.crossbars)
    if spec.attacks:
        audit["attacks"] = list(spec.attacks)
    audit.update({**spec.audit, **cell.entry.audit})
    if "split" in spec.seed_also:
        set_dotted(config, "data.init_args.seed", cell.seed)
    if "chip" in spec.seed_also:
        audit["chip_seed"] = cell.seed
        if export is not None:
            export["init_args"]["chip_seed"] = cell.seed
    return config


# ---------------------------------------------------------------------- running one cell
def _paths(output: Path, cell_id: str) -> dict[str, Path]:
    cells = output / "cells"
    return {
        "yaml": cells / f"{cell_id}.yaml",
        "record": cells / f"{cell_id}.json",
        "log": cells / f"{cell_id}.log",
        "runs": output / "runs" / cell_id,
    }


def _trained_run(runs: Path) -> Path | None:
    """The newest ``version_N`` folder of a cell that has ``results.json``."""
    found = sorted(
        (p.parent for p in runs.glob("version_*/results.json")),
        key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else -1,
    )
    return found[-1] if found else None


def _blackbox_reports(run_dir: Path, crossbars: Sequence[str]) -> dict[str, Path]:
    return {c: run_dir / "blackbox" / f"{c}.json" for c in crossbars}


def _callback_args(config: dict[str, Any], name: str | tuple[str, ...]) -> dict[str, Any] | None:
    """A copy of the ``init_args`` of the callback :func:`_find_callback` finds, or ``None``."""
    cb = _find_callback(config, name)
    return None if cb is None else dict(cb.get("init_args") or {})


def _fit_exports(config: dict[str, Any], run_dir: Path, chip_seed: int) -> dict[str, Path]:
    """ONNX files the run's ``ExportOnnx`` wrote at the end of ``fit``, by crossbar preset name.

    Only the digital file and presets programmed with ``chip_seed`` (the audit's chip) count;
    crossbars given as YAML files are left to the checkpoint export.
    """
    args = _callback_args(config, "ExportOnnx")
    if args is None or args.get("enabled") is False:
        return {}
    folder = Path(args.get("folder", "exports"))
    run = args.get("name") or f"{run_dir.parent.name}_{run_dir.name}"
    seed = int(args.get("chip_seed", 0))
    files = {}
    for crossbar in args.get("crossbars", ["digital", "64x64_100k"]):
        crossbar = str(crossbar)
        if crossbar == "digital":
            stem = f"{run}_digital"
        elif seed == chip_seed and not crossbar.endswith((".yaml", ".yml", ".json")):
            stem = f"{run}_{crossbar}_seed{seed}"
        else:
            continue
        if (folder / f"{stem}.onnx").exists():
            files[crossbar] = folder / f"{stem}.onnx"
    return files


def _export_checkpoint(run_dir: Path, config: dict[str, Any]) -> Path | None:
    """The checkpoint whose weights are the model ``fit`` left behind.

    ``last.ckpt``, except when ``RestoreBestWeights`` put back an earlier epoch: then the single
    best checkpoint of a ``ModelCheckpoint`` (or ``LastEpochCheckpoint``) that monitors the same
    metric the same way.
    """
    folder = run_dir / "checkpoints"
    restore = _callback_args(config, "RestoreBestWeights")
    keep = _callback_args(config, ("ModelCheckpoint", "LastEpochCheckpoint"))
    if restore is not None and keep is not None:
        same = (keep.get("monitor"), keep.get("mode", "min")) == (
            restore.get("monitor", "val/acc"),
            restore.get("mode", "max"),
        )
        best = [p for p in folder.glob("*.ckpt") if not p.name.startswith("last")]
        if same and len(best) == 1:
            return best[0]
    if (folder / "last.ckpt").exists():
        return folder / "last.ckpt"
    candidates = sorted(folder.glob("*.ckpt"))
    return candidates[-1] if candidates else None


def _error_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    return lines[-1] if lines else ""


def _run(cmd: list[str], log: Path, env: dict[str, str], timeout: float | None) -> int:
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        handle.flush()
        try:
            return subprocess.run(
                cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            handle.write(f"error: cell timed out after {timeout:g} s (cell_timeout_s)\n")
            return 124


def run_cell(task: dict[str, Any]) -> dict[str, Any]:
    """Run one cell (fit, then optionally export + black-box attack) and record its outcome.

    Plain-data in and out so that a Ray worker can run it; it writes only below the sweep folder.

    Args:
        task: ``cell_id``, ``output`` (sweep folder), ``config`` (resolved fit config),
            ``params``, ``blackbox`` (bool), ``blackbox_attacks``, ``blackbox_crossbars``,
            ``seed``, ``threads`` and ``timeout``.

    Returns:
        The status record (also written atomically to ``cells/<cell_id>.json``): ``status``
        (``done`` or ``failed``), ``stage``, ``returncode``, ``error``, ``run_dir``,
        ``seconds``, ``blackbox`` (crossbar -> report path).
    """
    output = Path(task["output"])
    paths = _paths(output, task["cell_id"])
    paths["yaml"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths["yaml"], yaml.safe_dump(task["config"], sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if task.get("threads"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(task["threads"])
    timeout = task.get("timeout")
    start = time.perf_counter()
    record: dict[str, Any] = {
        "cell_id": task["cell_id"],
        "params": task["params"],
        "status": "failed",
        "stage": "fit",
        "returncode": None,
        "error": "",
        "run_dir": None,
        "blackbox": {},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run_dir = _trained_run(paths["runs"])
    if run_dir is None:
        cmd = [sys.executable, "-m", "nvmpriv", "fit", "--config", str(paths["yaml"])]
        code = _run(cmd, paths["log"], env, timeout)
        record["returncode"] = code
        run_dir = _trained_run(paths["runs"])
        if code != 0 or run_dir is None:
            record["error"] = _error_line(paths["log"]) or f"fit exited with code {code}"
            if code == 0:
                record["error"] = "fit finished without results.json (CrossbarAudit missing?)"
            return _finish(record, paths["record"], start)
    record["run_dir"] = str(run_dir)
    if task.get("blackbox"):
        record["stage"] = "blackbox"
        ok = _run_blackbox(task, run_dir, paths, env, timeout, record)
        if not ok:
            return _finish(record, paths["record"], start)
    record["status"] = "done"
    record["stage"] = "done"
    record["returncode"] = 0
    return _finish(record, paths["record"], start)


def _run_blackbox(
    task: dict[str, Any],
    run_dir: Path,
    paths: dict[str, Path],
    env: dict[str, str],
    timeout: float | None,
    record: dict[str, Any],
) -> bool:
    """Attack each crossbar's ONNX model through ``nvmpriv attack``.

    The files the fit's own ``ExportOnnx`` wrote (the model ``fit`` left behind, as audited) are
    used where they cover the crossbar and the audit's chip seed; other crossbars are exported
    from the checkpoint holding the same weights (see :func:`_export_checkpoint`).
    """
    fit_files = _fit_exports(task["config"], run_dir, int(task["chip_seed"]))
    ckpt = None
    for crossbar, report in _blackbox_reports(run_dir, task["blackbox_crossbars"]).items():
        if report.exists():
            record["blackbox"][crossbar] = str(report)
            continue
        model = fit_files.get(crossbar, run_dir / "exports" / f"{crossbar}.onnx")
        if not model.exists():
            ckpt = ckpt or _export_checkpoint(run_dir, task["config"])
            if ckpt is None:
                record["error"] = f"no checkpoint in {run_dir / 'checkpoints'} to export"
                return False
            cmd = [sys.executable, "-m", "nvmpriv", "export", "--config", str(paths["yaml"])]
            cmd += ["--ckpt_path", str(ckpt), "--seed", str(task["chip_seed"])]
            cmd += ["--output", str(model)]
            cmd += ["--crossbar", crossbar]
            code = _run(cmd, paths["log"], env, timeout)
            if code != 0 or not model.exists():
                record["returncode"] = code
                record["error"] = f"export {crossbar}: " + (
                    _error_line(paths["log"]) or f"exit code {code}"
                )
                return False
        cmd = [sys.executable, "-m", "nvmpriv", "attack", "--model", str(model)]
        cmd += ["--data", str(run_dir), "--attacks", ",".join(task["blackbox_attacks"])]
        cmd += ["--seed", str(task["seed"]), "--output", str(report)]
        code = _run(cmd, paths["log"], env, timeout)
        if code != 0 or not report.exists():
            record["returncode"] = code
            record["error"] = f"attack {crossbar}: " + (
                _error_line(paths["log"]) or f"exit code {code}"
            )
            return False
        record["blackbox"][crossbar] = str(report)
    return True


def _finish(record: dict[str, Any], path: Path, start: float) -> dict[str, Any]:
    record["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_json(path, record)
    return record


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _blackbox_crossbars(spec: SweepSpec, config: dict[str, Any]) -> list[str]:
    if spec.blackbox_crossbars:
        return list(spec.blackbox_crossbars)
    return [DIGITAL, *_audit_args(config).get("crossbars", [])]


def is_finished(spec: SweepSpec, cell: Cell) -> bool:
    """Whether a cell's last record says ``done`` and its outputs are still on disk.

    Args:
        spec: The sweep.
        cell: The cell.

    Returns:
        True if the cell can be skipped.
    """
    paths = _paths(spec.output, cell.cell_id)
    record = _read_record(paths["record"])
    if not record or record.get("status") != "done" or not record.get("run_dir"):
        return False
    run_dir = Path(record["run_dir"])
    if not (run_dir / "results.json").exists():
        return False
    if spec.blackbox:
        reports = _blackbox_reports(run_dir, _blackbox_crossbars(spec, cell_config(spec, cell)))
        return all(p.exists() for p in reports.values())
    return True


def _task(spec: SweepSpec, cell: Cell) -> dict[str, Any]:
    config = cell_config(spec, cell)
    audit = _audit_args(config)
    return {
        "cell_id": cell.cell_id,
        "output": str(spec.output.resolve()),
        "config": config,
        "params": cell.params,
        "seed": cell.seed,
        "chip_seed": int(audit.get("chip_seed", 0)),
        "blackbox": spec.blackbox,
        "blackbox_attacks": list(spec.blackbox_attacks or audit.get("attacks") or []),
        "blackbox_crossbars": _blackbox_crossbars(spec, config),
        "threads": spec.threads,
        "timeout": spec.cell_timeout_s,
    }


# ---------------------------------------------------------------------- executors
def _run_local(
    tasks: list[dict[str, Any]], max_parallel: int, report: Callable[[dict], None]
) -> None:
    # Threads only wait on subprocesses, so the GIL is no bottleneck.
    with ThreadPoolExecutor(max_workers=max_parallel) as pool:
        futures = {pool.submit(run_cell, t): t for t in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                report(future.result())
            except Exception as exc:
                record = {
                    "cell_id": task["cell_id"],
                    "status": "failed",
                    "stage": "driver",
                    "error": f"{type(exc).__name__}: {exc}",
                    "params": task["params"],
                }
                atomic_write_json(_paths(Path(task["output"]), task["cell_id"])["record"], record)
                report(record)


def _run_ray(
    tasks: list[dict[str, Any]], options: dict[str, Any], report: Callable[[dict], None]
) -> None:
    try:
        import ray
    except ImportError as exc:
        raise ValueError(
            "executor: ray needs Ray, which is not installed; pip install 'nvmpriv[ray]' "
            "(or pip install 'ray[default]'), or set executor: local"
        ) from exc
    if not ray.is_initialized():
        ray.init(address=options.get("address"), ignore_reinit_error=True)
    remote = ray.remote(
        num_cpus=float(options.get("num_cpus", 1)), num_gpus=float(options.get("num_gpus", 0))
    )(run_cell)
    pending = {remote.remote(t): t for t in tasks}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            task = pending.pop(ref)
            try:
                record = ray.get(ref)
            except Exception as exc:
                record = {
                    "cell_id": task["cell_id"],
                    "status": "failed",
                    "stage": "ray",
                    "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                    "params": task["params"],
                }
            # Written again by the driver: the worker's copy may live on another node's disk.
            atomic_write_json(_paths(Path(task["output"]), task["cell_id"])["record"], record)
            report(record)


@dataclass
class SweepOutcome:
    """What one ``run_sweep`` call did.

    Attributes:
        cells: Every cell of the (possibly truncated) grid.
        ran: Ids of cells run in this call.
        skipped: Ids of cells already finished.
        failed: Ids of cells whose run failed in this call.
        files: Output files written by the gather step.
    """

    cells: list[Cell]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def run_sweep(
    spec: SweepSpec,
    *,
    max_cells: int | None = None,
    executor: str | None = None,
    max_parallel: int | None = None,
    gather_only: bool = False,
    log: Callable[[str], None] = print,
) -> SweepOutcome:
    """Run the unfinished cells of a sweep and gather every result into tables and plots.

    Args:
        spec: The sweep.
        max_cells: Only the first ``max_cells`` cells of the grid.
        executor: Override of ``spec.executor``.
        max_parallel: Override of ``spec.max_parallel``.
        gather_only: Run nothing; rebuild the CSV, table and plots from what is on disk.
        log: Where progress lines go.

    Returns:
        What was run, skipped and failed, and the files written.

    Raises:
        ValueError: Bad executor, or a cell's overrides do not fit its config (raised before
            anything runs).
    """
    cells = expand_grid(spec)
    if max_cells is not None:
        cells = cells[:max_cells]
    outcome = SweepOutcome(cells=cells)
    executor = executor or spec.executor
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}; choose one of {EXECUTORS}")
    todo = []
    for cell in cells:
        if is_finished(spec, cell):
            outcome.skipped.append(cell.cell_id)
        else:
            todo.append(_task(spec, cell))  # resolves the config: bad overrides fail here
    if not gather_only and todo:
        log(
            f"sweep {spec.name}: {len(todo)} to run, {len(outcome.skipped)} finished "
            f"({executor}, {max_parallel or spec.max_parallel} at a time) -> {spec.output}"
        )
        counter = {"n": 0}

        def report(record: dict[str, Any]) -> None:
            counter["n"] += 1
            outcome.ran.append(record["cell_id"])
            if record.get("status") != "done":
                outcome.failed.append(record["cell_id"])
            msg = record.get("error") or f"{record.get('seconds', 0):.0f} s"
            log(f"[{counter['n']}/{len(todo)}] {record['cell_id']}: {record.get('status')} ({msg})")

        if executor == "ray":
            _run_ray(todo, spec.ray, report)
        else:
            _run_local(todo, max_parallel or spec.max_parallel, report)
    nothing_new = outcome.ran and len(outcome.failed) == len(outcome.ran) and not outcome.skipped
    if nothing_new and (spec.output / "results.csv").exists():
        # Typically a mistyped override or axis: every cell fails the same way. The tables of
        # an earlier sweep into this folder are worth more than a table of failures.
        log(
            f"sweep {spec.name}: every cell failed; {spec.output / 'results.csv'} and "
            "results.md are left as they were (errors in cells/<cell_id>.json and .log)"
        )
        return outcome
    rows = gather(spec, cells)
    outcome.files = write_outputs(spec, rows)
    return outcome


# ---------------------------------------------------------------------- gathering
_BASE_COLUMNS = [
    "sweep",
    "cell_id",
    "status",
    "config",
    "method",
    "data",
    "net",
    "seed",
]
_CELL_TAIL = [
    "crossbar",
    "acc",
    "train_acc",
    "acc_drop",
    "nf",
    "epoch",
    "threshold_source",
    "n_members",
    "n_nonmembers",
    "seconds",
    "run_dir",
    "error",
]


def _short_class(config: dict[str, Any], *path: str) -> str:
    node: Any = config
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return str(node).rsplit(".", 1)[-1] if node else ""


_BLACKBOX_SKIP = {"seconds", "threshold", "n_members", "n_nonmembers"}


def _is_cell_value(metric: str, value: Any) -> bool:
    """Whether an attack's result field becomes a table column.

    Numbers and flags do, and so do unmeasured TPRs (``None``): their column stays, empty,
    rather than vanishing.
    """
    return isinstance(value, int | float) or (value is None and "tpr" in metric)


def _cell_value(value: Any) -> Any:
    # a flag (degenerate) becomes 0/1, so its mean over seeds is the share of flagged seeds
    return int(value) if isinstance(value, bool) else value


def _blackbox_columns(report: Path) -> dict[str, Any]:
    """``blackbox/<attack>/<metric>`` numbers of a ``python -m nvmpriv attack`` report."""
    try:
        data = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return {"blackbox/error": f"unreadable report {report}"}
    out: dict[str, Any] = {}
    for attack, values in (data.get("attacks") or {}).items():
        for metric, value in (values or {}).items():
            if metric in _BLACKBOX_SKIP:
                continue
            if _is_cell_value(metric, value):
                out[f"blackbox/{attack}/{metric}"] = _cell_value(value)
    return out


def _value_text(value: Any) -> str:
    if isinstance(value, int | float | str | bool):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def gather(spec: SweepSpec, cells: Iterable[Cell]) -> list[dict[str, Any]]:
    """One row per finished cell × audited config (``digital`` included), one per failed cell.

    Args:
        spec: The sweep.
        cells: The cells to gather (cells never run are left out).

    Returns:
        Rows: the cell's parameters (config, method, data, net, seed, one column per axis),
        then per crossbar config ``acc``, ``train_acc``, ``acc_drop``, ``nf``,
        ``mia/<attack>/<metric>``, ``snr_db/<layer>``, ``ns/<layer>``, ``adv/eps_<e>/acc`` and
        ``blackbox/...`` (numbers of the black-box report of that crossbar, when run).
    """
    rows = []
    for cell in cells:
        paths = _paths(spec.output, cell.cell_id)
        record = _read_record(paths["record"])
        if record is None:
            continue
        config = yaml.safe_load(paths["yaml"].read_text()) if paths["yaml"].exists() else {}
        base: dict[str, Any] = {
            "sweep": spec.name,
            "cell_id": cell.cell_id,
            "status": record.get("status", "failed"),
            "config": cell.entry.label,
            "method": _short_class(config, "model", "class_path"),
            "data": _short_class(config, "data", "class_path"),
            "net": _short_class(config, "model", "init_args", "net", "class_path"),
            "seed": cell.seed,
        }
        for key, value in cell.values.items():
            base[key] = _value_text(value)
        tail = {
            "seconds": record.get("seconds"),
            "run_dir": record.get("run_dir") or "",
            "error": record.get("error", ""),
        }
        results_path = Path(record["run_dir"]) / "results.json" if record.get("run_dir") else None
        results = None
        if results_path is not None and results_path.exists():
            results = json.loads(results_path.read_text())
        if record.get("status") != "done" or not results:
            rows.append({**base, **tail})
            continue
        for name, entry in results.get("configs", {}).items():
            row = {**base, "crossbar": name}
            for key in ("acc", "train_acc", "acc_drop", "nf"):
                if key in entry:
                    row[key] = entry[key]
            for key in ("epoch", "threshold_source", "n_members", "n_nonmembers"):
                row[key] = results.get(key)
            for attack, values in entry.get("attacks", {}).items():
                for metric, value in values.items():
                    if _is_cell_value(metric, value):
                        row[f"mia/{attack}/{metric}"] = _cell_value(value)
            layers = entry.get("layers", {})
            for layer in entry.get("layer_order") or sorted(layers):  # older files: no order
                # null in results.json: an exact crossbar (infinite SNR)
                snr = layers[layer].get("snr_db")
                row[f"snr_db/{layer}"] = math.inf if snr is None else snr
                row[f"ns/{layer}"] = layers[layer].get("ns")
            for eps, acc in entry.get("adversarial", {}).items():
                row[f"adv/eps_{eps}/acc"] = acc
            report = (record.get("blackbox") or {}).get(name)
            if report and Path(report).exists():
                row.update(_blackbox_columns(Path(report)))
            rows.append({**row, **tail})
    return rows


def _columns(rows: list[dict[str, Any]], spec: SweepSpec) -> list[str]:
    axis_cols = list(dict.fromkeys(k for e in spec.entries for k in {**spec.axes, **e.axes}))
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    fixed = [
        c
        for c in _BASE_COLUMNS + axis_cols + _CELL_TAIL[:9]
        if c in present or c in [*_BASE_COLUMNS, "crossbar", "acc", "acc_drop"]
    ]
    metric_order = ("mia/", "snr_db/", "ns/", "adv/", "blackbox/")
    metrics = sorted(
        (c for c in present if c.startswith(metric_order)),
        key=lambda c: (next(i for i, p in enumerate(metric_order) if c.startswith(p)), c),
    )
    return fixed + metrics + ["seconds", "run_dir", "error"]


def _crossbar_order(names: Iterable[str], spec: SweepSpec) -> list[str]:
    listed = [DIGITAL, *(spec.crossbars or ())]

    def key(name: str) -> tuple[int, int, str]:
        if name in listed:
            return (0, listed.index(name), name)
        size = re.match(r"(\d+)x\d+", name) or re.search(r"_(\d+)$", name)
        return (1, int(size.group(1)) if size else 10**6, name)

    return sorted(set(names), key=key)


def _group(row: dict[str, Any], spec: SweepSpec) -> str:
    axes = [k for e in spec.entries for k in {**spec.axes, **e.axes}]
    parts = [str(row["config"])]
    parts += [
        f"{_axis_name(k)}={row[k]}" for k in dict.fromkeys(axes) if row.get(k) not in (None, "")
    ]
    return " ".join(parts)


def _mean_std(values: list[Any]) -> tuple[float, float]:
    vals = [
        float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))
    ]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return mean, math.sqrt(var)


def _aggregate(
    rows: list[dict[str, Any]], spec: SweepSpec
) -> dict[tuple[str, str], dict[str, Any]]:
    """(group, crossbar) -> mean/std over seeds of every numeric column and the seed count."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "done" and row.get("crossbar"):
            groups.setdefault((_group(row, spec), row["crossbar"]), []).append(row)
    out = {}
    for key, members in groups.items():
        numeric = {
            c
            for r in members
            for c, v in r.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and c != "seed"
        }
        stats = {c: _mean_std([r.get(c) for r in members]) for c in numeric}
        out[key] = {"n": len(members), "stats": stats}
    return out


def _fmt(stat: tuple[float, float], n: int, pct: bool = True) -> str:
    mean, std = stat
    if math.isnan(mean):
        return "–"
    scale = 100.0 if pct else 1.0
    text = f"{mean * scale:.1f}" if pct else f"{mean:.3g}"
    if n > 1:
        text += f" ± {std * scale:.1f}" if pct else f" ± {std:.2g}"
    return text


def _markdown(rows: list[dict[str, Any]], spec: SweepSpec, plots: list[Path]) -> str:
    agg = _aggregate(rows, spec)
    attacks = sorted({c.split("/")[1] for r in rows for c in r if c.startswith("mia/")})
    done = sorted({r["cell_id"] for r in rows if r.get("status") == "done"})
    failed = [r for r in rows if r.get("status") != "done"]
    lines = [
        f"# Sweep `{spec.name}`",
        "",
        f"Source: `{spec.source}`. Cells finished: {len(done)}; failed: {len(failed)}. "
        "Values are percent (except `nf`), mean ± sample std over seeds (n = number of seeds); "
        "`acc` is the non-member (test) accuracy, `drop` = digital − crossbar accuracy, `nf` the "
        "crossbar's IR-drop non-ideality factor as a fraction (Roy et al.), MIA columns are the "
        "balanced attack accuracy (chance 50).",
        "",
    ]
    order = _crossbar_order({k[1] for k in agg}, spec)
    nan = (math.nan, math.nan)

    def table(head: list[str], values: Callable[[dict[str, Any], int], list[str]]) -> list[str]:
        out = ["| " + " | ".join(["group", "crossbar", "n", *head]) + " |"]
        out.append("|" + "---|" * (3 + len(head)))
        for group in dict.fromkeys(k[0] for k in agg):
            for crossbar in order:
                if (group, crossbar) in agg:
                    item = agg[(group, crossbar)]
                    row = [group, crossbar, str(item["n"]), *values(item["stats"], item["n"])]
                    out.append("| " + " | ".join(row) + " |")
        return out

    def auc(stat: tuple[float, float], n: int) -> str:
        mean, std = stat
        if math.isnan(mean):
            return "–"
        return f"{mean:.3f}" + (f" ± {std:.3f}" if n > 1 else "")

    lines += table(
        ["acc", "drop", "nf"] + [f"MIA {a}" for a in attacks],
        lambda st, n: (
            [
                _fmt(st.get("acc", nan), n),
                _fmt(st.get("acc_drop", nan), n),
                _fmt(st.get("nf", nan), n, pct=False),
            ]
            + [_fmt(st.get(f"mia/{a}/acc", nan), n) for a in attacks]
        ),
    )
    # Threshold attacks read 50 % when the shadow threshold misses every target score (short
    # runs); the AUC does not depend on a threshold.
    lines += ["", "## MIA AUC", ""]
    lines += table(
        [f"AUC {a}" for a in attacks],
        lambda st, n: [auc(st.get(f"mia/{a}/auc", nan), n) for a in attacks],
    )
    blackbox = sorted(
        {
            c.split("/")[1]
            for r in rows
            for c in r
            if c.startswith("blackbox/") and c.count("/") == 2
        }
    )
    if blackbox:
        lines += [
            "",
            "## Black-box attacks on the exported files",
            "",
            "Accuracy (percent) / AUC of `python -m nvmpriv attack` on each cell's exported "
            "files (reports and files under `runs/<cell_id>/`; all metrics in results.csv).",
            "",
        ]
        lines += table(
            [f"{a} acc / AUC" for a in blackbox],
            lambda st, n: [
                f"{_fmt(st.get(f'blackbox/{a}/accuracy', nan), n)} / "
                f"{auc(st.get(f'blackbox/{a}/auc', nan), n)}"
                for a in blackbox
            ],
        )
    if failed:
        lines += ["", "## Failed cells", "", "| cell | error |", "|---|---|"]
        for r in failed:
            err = str(r.get("error", "")).replace("|", "\\|")[:300]
            lines.append(f"| `{r['cell_id']}` | {err} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"- `plots/{p.name}`" for p in plots]
    return "\n".join(lines) + "\n"


def _roc_arrays(node: Any) -> tuple[list[float], list[float]] | None:
    if (
        isinstance(node, dict)
        and isinstance(node.get("fpr"), list)
        and isinstance(node.get("tpr"), list)
    ):
        return node["fpr"], node["tpr"]
    if isinstance(node, list | tuple) and len(node) == 2 and all(isinstance(a, list) for a in node):
        return node[0], node[1]
    return None


def _find_rocs(node: Any, prefix: str = "") -> dict[str, tuple[list[float], list[float]]]:
    """Every ROC curve in a results/report document (``roc: {fpr, tpr}`` or ``[fpr, tpr]``)."""
    found: dict[str, tuple[list[float], list[float]]] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            arrays = _roc_arrays(value) if key == "roc" else None
            if arrays is not None:
                found[prefix or "roc"] = arrays
            elif isinstance(value, dict):
                found.update(_find_rocs(value, f"{prefix}/{key}" if prefix else str(key)))
    return found


def _plots(rows: list[dict[str, Any]], spec: SweepSpec, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from nvmpriv.plots import save_figure  # selects the headless Agg backend

    agg = _aggregate(rows, spec)
    if not agg:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    groups = list(dict.fromkeys(k[0] for k in agg))
    order = _crossbar_order({k[1] for k in agg}, spec)
    attacks = sorted({c.split("/")[1] for r in rows for c in r if c.startswith("mia/")})

    def series(group: str, column: str) -> tuple[list[int], list[float], list[float]]:
        xs, ms, ss = [], [], []
        for i, crossbar in enumerate(order):
            stats = agg.get((group, crossbar), {}).get("stats", {})
            if column in stats and not math.isnan(stats[column][0]):
                xs.append(i)
                ms.append(stats[column][0] * 100)
                ss.append(stats[column][1] * 100)
        return xs, ms, ss

    def save(fig: Any, name: str) -> None:
        path = folder / name
        save_figure(fig, path)
        written.append(path)

    if attacks:
        cols = min(3, len(attacks))
        nrows = math.ceil(len(attacks) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, attack in zip(axes.flat, attacks, strict=False):
            for group in groups:
                xs, ms, ss = series(group, f"mia/{attack}/acc")
                if xs:
                    ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=group)
            ax.axhline(50, color="k", lw=0.7, ls="--")
            ax.set_xticks(range(len(order)), order, rotation=30, fontsize=7)
            ax.set(title=attack, ylabel="MIA accuracy (%)")
        for ax in list(axes.flat)[len(attacks) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle(f"{spec.name}: MIA accuracy vs crossbar")
        fig.tight_layout()
        save(fig, "mia_vs_crossbar.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for group in groups:
        xs, ms, ss = series(group, "acc_drop")
        if xs:
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=group)
    ax.set_xticks(range(len(order)), order, rotation=30, fontsize=7)
    ax.set(ylabel="accuracy drop (points)", title=f"{spec.name}: accuracy drop vs crossbar")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save(fig, "acc_drop_vs_crossbar.png")

    # first-seen order: the network's (rows take the layers in results.json's layer_order)
    layers = list(
        dict.fromkeys(c.split("/", 1)[1] for r in rows for c in r if c.startswith("snr_db/"))
    )

    def layer_values(group: str, crossbar: str, metric: str) -> list[float]:
        stats = agg.get((group, crossbar), {}).get("stats", {})
        values = [stats.get(f"{metric}/{ly}", (math.nan, 0.0))[0] for ly in layers]
        # An exact (ideal) crossbar has infinite SNR: nothing to draw.
        return [v if math.isfinite(v) else math.nan for v in values]

    for crossbar in order:
        if not layers or all(
            math.isnan(v) for g in groups for v in layer_values(g, crossbar, "snr_db")
        ):
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        width = 0.8 / max(1, len(groups))
        for gi, group in enumerate(groups):
            pos = [i + gi * width for i in range(len(layers))]
            a1.bar(pos, layer_values(group, crossbar, "snr_db"), width, label=group)
            a2.bar(pos, layer_values(group, crossbar, "ns"), width, label=group)
        for ax, label in ((a1, "SNR (dB)"), (a2, "noise sensitivity")):
            ticks = [i + 0.4 - width / 2 for i in range(len(layers))]
            ax.set_xticks(ticks, layers, rotation=60, fontsize=6, ha="right")
            ax.set(ylabel=label)
        a1.legend(fontsize=6)
        fig.suptitle(f"{spec.name}: per-layer SNR / NS on {crossbar}")
        fig.tight_layout()
        save(fig, f"layers_{crossbar}.png")

    eps_cols = sorted(
        {c for r in rows for c in r if c.startswith("adv/")},
        key=lambda c: float(c.split("/")[1][4:]),
    )
    if eps_cols:
        eps = [float(c.split("/")[1][4:]) for c in eps_cols]
        fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
        for ax, group in zip(axes.flat, groups, strict=True):
            for crossbar in order:
                stats = agg.get((group, crossbar), {}).get("stats", {})
                ys = [stats.get(c, (math.nan, 0))[0] * 100 for c in eps_cols]
                if not all(math.isnan(y) for y in ys):
                    ax.plot(
                        eps, ys, marker="o", ls="-" if crossbar == DIGITAL else "--", label=crossbar
                    )
            ax.set(xlabel="PGD eps (input units)", ylabel="accuracy (%)", title=group)
            ax.legend(fontsize=6)
        fig.suptitle(f"{spec.name}: PGD accuracy vs eps, digital vs crossbar")
        fig.tight_layout()
        save(fig, "pgd_vs_eps.png")

    written += _roc_plots(rows, spec, folder, plt)
    return written


def _roc_plots(rows: list[dict[str, Any]], spec: SweepSpec, folder: Path, plt: Any) -> list[Path]:
    """Log-log ROCs of the first finished cell of each group, where ROC arrays were saved."""
    from nvmpriv.plots import save_figure

    written = []
    seen: set[str] = set()
    for row in rows:
        group = _group(row, spec)
        if row.get("status") != "done" or group in seen or not row.get("run_dir"):
            continue
        run_dir = Path(row["run_dir"])
        curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
        results = json.loads((run_dir / "results.json").read_text())
        for cfg, entry in results.get("configs", {}).items():
            for attack, values in entry.get("attacks", {}).items():
                arrays = _roc_arrays(values.get("roc"))
                if arrays:
                    curves.setdefault(cfg, {})[f"white-box {attack}"] = arrays
        for report in sorted((run_dir / "blackbox").glob("*.json")):
            for name, arrays in _find_rocs(json.loads(report.read_text())).items():
                curves.setdefault(report.stem, {})[f"black-box {name}"] = arrays
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", group)
        for png in sorted((run_dir / "blackbox").glob("*.png")):
            # `nvmpriv attack` draws its log-log ROC next to the report; keep one per group.
            target = folder / f"roc_blackbox_{slug}_{png.stem}.png"
            shutil.copyfile(png, target)
            written.append(target)
            seen.add(group)
        if not curves:
            continue
        seen.add(group)
        order = _crossbar_order(curves, spec)
        fig, axes = plt.subplots(1, len(order), figsize=(4 * len(order), 3.8), squeeze=False)
        floor = 1e-4
        for ax, cfg in zip(axes.flat, order, strict=True):
            for label, (fpr, tpr) in curves[cfg].items():
                ax.plot([max(f, floor) for f in fpr], [max(t, floor) for t in tpr], label=label)
            ax.plot([floor, 1], [floor, 1], "k--", lw=0.7)
            ax.set(xscale="log", yscale="log", xlabel="FPR", ylabel="TPR", title=cfg)
            ax.legend(fontsize=5)
        fig.suptitle(f"{group} (seed {row['seed']}): log-log ROC")
        fig.tight_layout()
        path = folder / f"roc_{re.sub(r'[^A-Za-z0-9_.=-]+', '_', group)}.png"
        save_figure(fig, path)
        written.append(path)
    return written


def write_outputs(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``results.csv``, the plots and ``results.md`` into the sweep folder (atomically).

    Args:
        spec: The sweep.
        rows: Rows from :func:`gather`.

    Returns:
        The files written.
    """
    spec.output.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows, spec)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = spec.output / "results.csv"
    atomic_write_text(csv_path, buffer.getvalue())
    plots = _plots(rows, spec, spec.output / "plots")
    md_path = spec.output / "results.md"
    atomic_write_text(md_path, _markdown(rows, spec, plots))
    return [csv_path, md_path, *plots]


# ---------------------------------------------------------------------- command line
def _parser() -> CommandParser:
    parser = CommandParser(
        prog="python -m nvmpriv sweep",
        description="Run a grid of fit runs (resumable) and gather results.csv, results.md, plots.",
    )
    parser.add_argument("--config", required=True, help="sweep YAML (lightning_configs/sweeps/)")
    parser.add_argument("--output", help="sweep folder (default results/<name>)")
    parser.add_argument(
        "--max-cells", type=positive_int, help="run only the first N cells of the grid"
    )
    parser.add_argument(
        "--epochs", type=positive_int, help="override trainer.max_epochs of every cell"
    )
    parser.add_argument(
        "--seeds", type=nonnegative_int, nargs="+", help="replace the sweep's seeds"
    )
    parser.add_argument("--executor", choices=EXECUTORS, help="override the sweep's executor")
    parser.add_argument(
        "--max-parallel", type=positive_int, help="cells at a time (local executor)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for every cell (YAML value), e.g. trainer.devices=2",
    )
    parser.add_argument("--blackbox", action="store_true", help="also export + black-box attack")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    parser.add_argument("--gather-only", action="store_true", help="only rebuild tables and plots")
    return parser


def cli_main(argv: list[str]) -> int:
    """``python -m nvmpriv sweep``.

    Args:
        argv: Arguments after ``sweep``.

    Returns:
        0 when every cell is finished, 1 when some failed (their errors are in
        ``results.md`` and ``cells/<id>.json``).

    Raises:
        ValueError: Bad sweep file or options (printed as one line by ``__main__``).
    """
    args = _parser().parse_args(argv)
    spec = load_sweep(args.config, args.output)
    overrides = dict(spec.overrides)
    if args.epochs is not None:  # positive_int already checked the counts
        overrides["trainer.max_epochs"] = args.epochs
    for item in args.set:
        key, value = parse_override(item, "--set", example="trainer.max_epochs=5")
        overrides[key] = value
    changes: dict[str, Any] = {"overrides": overrides}
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.blackbox:
        changes["blackbox"] = True
    spec = _replace(spec, **changes)
    if args.dry_run:
        cells = expand_grid(spec)[: args.max_cells]
        checked: set[str] = set()
        for cell in cells:
            config = cell_config(spec, cell)
            check_cell_config(config, cell.cell_id)
            check_cell_data(config, cell.cell_id, checked)
        for cell in cells:
            state = "done" if is_finished(spec, cell) else "todo"
            print(
                f"{state:5s} {cell.cell_id}  {cell.entry.config}  seed={cell.seed}  "
                + " ".join(f"{k}={_value_text(v)}" for k, v in cell.values.items())
            )
        print(f"{len(cells)} cells -> {spec.output}")
        return 0
    outcome = run_sweep(
        spec,
        max_cells=args.max_cells,
        executor=args.executor,
        max_parallel=args.max_parallel,
        gather_only=args.gather_only,
    )
    print(
        f"sweep {spec.name}: ran {len(outcome.ran)}, skipped {len(outcome.skipped)}, "
        f"failed {len(outcome.failed)}; results in {spec.output / 'results.csv'}"
    )
    failed_now = [
        c
        for c in outcome.cells
        if not is_finished(spec, c) and _read_record(_paths(spec.output, c.cell_id)["record"])
    ]
    return 1 if failed_now else 0


def _replace(spec: SweepSpec, **changes: Any) -> SweepSpec:
    from dataclasses import replace

    return replace(spec, **changes)
