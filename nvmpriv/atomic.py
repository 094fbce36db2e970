"""Atomic file outputs: write a temporary file in the destination folder, then rename it.

A reader (or a crash) never sees a half-written results file, split, cache or report; numpy only,
so the torch-free black-box side and the sweep driver can use it too.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_save_npz", "atomic_write_bytes", "atomic_write_text"]


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
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
