"""Checks on a checkpoint file before anything loads it: present, a torch archive, intact.

``torch.save`` writes a zip archive (a ``data.pkl`` record plus one record per tensor storage)
and stores a CRC-32 for every record, but ``torch.load`` never verifies them: a checkpoint with
a flipped byte inside a weight tensor loads and runs with the wrong weight. Reading every record
through :mod:`zipfile` verifies them (measured: ~0.1 s per 100 MB), and a truncated file has lost
the archive's central directory. No torch import: the check costs no model load.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

__all__ = [
    "check_checkpoint_file",
    "find_last_checkpoint",
    "last_checkpoint_of_config",
    "logger_folder",
]


def check_checkpoint_file(path: str | Path, field: str = "--ckpt_path") -> None:
    """Reject a checkpoint that is missing, not a torch checkpoint, truncated or corrupted.

    Args:
        path: The checkpoint file.
        field: The option or config field that named it (starts every message).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a torch checkpoint, truncated, or a record fails its CRC-32.
    """
    path = Path(path)
    if not path.is_file():
        last = " or --ckpt_path last" if field == "--ckpt_path" else ""
        raise FileNotFoundError(
            f"{field} {path}: checkpoint not found; pass an existing .ckpt file (e.g. "
            f"logs/<name>/version_N/checkpoints/last.ckpt){last}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.endswith("data.pkl") for name in names):
                raise ValueError(
                    f"{field} {path}: a zip archive but not a torch checkpoint (no data.pkl); "
                    "pass a .ckpt file written by Lightning"
                )
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(
            f"{field} {path}: not a torch checkpoint, or truncated ({exc}); pass a .ckpt file "
            "written by Lightning, or last.ckpt of an earlier run"
        ) from exc
    if bad is not None:
        raise ValueError(
            f"{field} {path}: corrupted (record {bad!r} fails its CRC-32 check); restore the "
            "file from a copy or retrain"
        )


def find_last_checkpoint(save_dir: str | Path, name: str) -> Path | None:
    """The most recently written ``last.ckpt`` of an experiment's version folders.

    Args:
        save_dir: The logger's ``save_dir``.
        name: The logger's ``name`` (experiment folder under ``save_dir``).

    Returns:
        ``<save_dir>/<name>/<version>/checkpoints/last.ckpt`` with the newest modification time,
        or ``None`` when no version folder holds one.
    """
    candidates = list(Path(save_dir, name).glob("*/checkpoints/last.ckpt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def logger_folder(logger: Any, default_root_dir: Any = None) -> tuple[Any, str, str] | None:
    """Where a configured logger writes: its init_args, ``save_dir`` and experiment ``name``.

    Args:
        logger: ``trainer.logger`` of a config (a ``class_path``/``init_args`` mapping or
            namespace, a list of them, ``True`` for Lightning's default logger, or ``None``/
            ``False``).
        default_root_dir: ``trainer.default_root_dir`` (the default logger's root).

    Returns:
        ``(init_args, save_dir, name)``; ``init_args`` is ``None`` for the default logger.
        ``None`` without a logger or without ``init_args``.
    """
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if logger is None or logger is False:
        return None
    if logger is True:  # Lightning's default TensorBoardLogger under default_root_dir
        return None, str(default_root_dir or "."), "lightning_logs"
    init_args = logger.get("init_args") if hasattr(logger, "get") else None
    if init_args is None:
        return None
    save_dir = init_args.get("save_dir") or init_args.get("root_dir") or "."
    return init_args, str(save_dir), str(init_args.get("name") or "lightning_logs")


def last_checkpoint_of_config(config: dict[str, Any]) -> Path | None:
    """``--ckpt_path last`` for a plain fit config (a dict read from YAML), as ``fit`` finds it.

    Args:
        config: The run's config; an absent ``trainer.logger`` is Lightning's default logger.

    Returns:
        The newest ``last.ckpt`` of the logger's experiment folder, or ``None``.
    """
    trainer = config.get("trainer") or {}
    if not isinstance(trainer, dict):
        trainer = {}
    folder = logger_folder(trainer.get("logger", True), trainer.get("default_root_dir"))
    return find_last_checkpoint(folder[1], folder[2]) if folder is not None else None
