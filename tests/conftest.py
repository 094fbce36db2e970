"""Shared fixtures: small files in the exact formats of the real data sets (never the network)."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")
ROOT = Path(__file__).resolve().parents[1]


def write_purchase(folder: Path, n: int = 300, n_features: int = 600, seed: int = 0) -> Path:
    """``dataset_purchase``: CSV, no header, label 1..100 then binary features."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, 101, n)
    feats = rng.integers(0, 2, (n, n_features))
    path = folder / "dataset_purchase"
    path.write_text(
        "\n".join(
            f"{lab}," + ",".join(map(str, row)) for lab, row in zip(labels, feats, strict=True)
        )
        + "\n"
    )
    return path


def write_texas(
    folder: Path, n: int = 300, layout: str = "texas/100", n_features: int = 6169
) -> Path:
    """``texas/100/feats`` (CSV 0/1) and ``texas/100/labels`` (one label 1..100 per line)."""
    rng = np.random.default_rng(1)
    sub = folder / layout
    sub.mkdir(parents=True, exist_ok=True)
    feats = rng.integers(0, 2, (n, n_features))
    (sub / "feats").write_text("\n".join(",".join(map(str, row)) for row in feats) + "\n")
    (sub / "labels").write_text("\n".join(str(v) for v in rng.integers(1, 101, n)) + "\n")
    return sub


def write_location(folder: Path, n: int = 300) -> Path:
    """``bangkok``: quoted label "k" (1..30) then 446 binary features."""
    rng = np.random.default_rng(2)
    rows = [
        f'"{rng.integers(1, 31)}",' + ",".join(map(str, rng.integers(0, 2, 446))) for _ in range(n)
    ]
    path = folder / "bangkok"
    path.write_text("\n".join(rows) + "\n")
    return path


def write_cifar10(folder: Path, per_batch: int = 20) -> Path:
    """``cifar-10-batches-py`` pickle batches (data uint8 [n, 3072], labels list)."""
    rng = np.random.default_rng(3)
    sub = folder / "cifar-10-batches-py"
    sub.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "batch_label": name,
        }
        with (sub / name).open("wb") as handle:
            pickle.dump(batch, handle)
    return sub


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    """An unsigned-byte IDX file as MNIST ships it."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def write_mnist(folder: Path, variant: str = "MNIST", n: int = 50, compress: bool = False) -> Path:
    rng = np.random.default_rng(4)
    raw = folder / variant / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        write_idx(
            raw / f"{prefix}-images-idx3-ubyte",
            rng.integers(0, 256, (n, 28, 28)),
            compress=compress,
        )
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), compress=compress)
    return raw


@pytest.fixture
def tabular_root(tmp_path: Path) -> Path:
    write_purchase(tmp_path)
    write_texas(tmp_path)
    write_location(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """One intra-op thread per test process: the suite shares 2 cores, oversubscription is slower."""
    import torch

    torch.set_num_threads(1)
