"""Atomic file outputs: write a temporary file in the destination folder, then rename it.

A reader (or a crash) never sees a half-written results file, split, cache or report; numpy only,
so the torch-free black-box side and the sweep driver can use it too.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_save_npz",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_safe",
    "mkstemp_beside",
    "sync_to_disk",
]


@functools.cache
def _new_file_mode() -> int:
    # the process umask can only be read by setting it; read once, restore at once
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def mkstemp_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """Create a hidden temporary file in ``path``'s folder, with a new file's usual permissions.

    ``tempfile.mkstemp`` creates files readable by their owner only (0600) whatever the umask,
    and the rename keeps that mode: results, exports and reports would be unreadable to the
    other users of a shared or container-mounted folder. The file gets ``0666 & ~umask``
    instead, as ``open()`` would give it.

    Args:
        path: The destination the temporary file will replace.
        suffix: The temporary file's suffix (some writers choose the format from it).

    Returns:
        ``(fd, name)`` as from ``tempfile.mkstemp``.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, _new_file_mode())
    return fd, tmp


def sync_to_disk(path: str | Path) -> None:
    """Flush a written temporary file to the disk before it is renamed into place.

    Without it a crash soon after the rename can leave the new name pointing at an empty or
    partial file on file systems that reorder data and metadata writes.

    Args:
        path: The file (closed or open elsewhere; it is reopened read-only).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically.

    Args:
        path: Destination (its folder is created).
        data: Contents.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically.

    Args:
        path: Destination (its folder is created).
        text: Contents.

    Returns:
        The path written.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write an uncompressed ``.npz`` atomically.

    Args:
        path: Destination (its folder is created).
        **arrays: Arrays to store.

    Returns:
        The path written.
    """
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return atomic_write_bytes(path, buffer.getvalue())


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (containers copied).

    Python's ``json`` writes ``Infinity``/``NaN``, which strict JSON parsers (JavaScript,
    ``jq --strict``, most non-Python readers) reject.

    Args:
        value: Nested dicts/lists/tuples of JSON-able values.

    Returns:
        The same structure (tuples become lists) with ``inf``/``nan`` floats as ``None``.
    """
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: str | Path, value: Any, *, sort_keys: bool = True) -> Path:
    """Write ``value`` as strict JSON (non-finite floats as ``null``), atomically.

    Args:
        path: Destination file.
        value: JSON-able structure; other objects are written with ``str``.
        sort_keys: Sort object keys.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    text = json.dumps(json_safe(value), indent=2, sort_keys=sort_keys, allow_nan=False, default=str)
    return atomic_write_text(path, text)
