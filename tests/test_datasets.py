"""Readers of the real file formats, on tiny generated files in exactly those formats."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cifar10, write_location, write_mnist, write_purchase, write_texas

from nvmpriv import datasets as ds
from nvmpriv.datasets import DataFileError


def test_purchase_parses_labels_and_features(tmp_path: Path) -> None:
    path = write_purchase(tmp_path)
    raw = ds.load_purchase100(tmp_path)
    table = np.loadtxt(path, delimiter=",")
    assert raw.features.shape == (300, 600)
    np.testing.assert_array_equal(raw.labels, table[:, 0].astype(int) - 1)
    np.testing.assert_array_equal(raw.features, table[:, 1:])
    assert raw.labels.min() >= 0 and raw.labels.max() <= 99


def test_cache_is_used_and_identical(tmp_path: Path) -> None:
    write_purchase(tmp_path)
    first = ds.load_purchase100(tmp_path)
    cache = tmp_path / "dataset_purchase.nvmpriv.npz"
    assert cache.exists()
    (tmp_path / "dataset_purchase").write_bytes((tmp_path / "dataset_purchase").read_bytes())
    second = ds.load_purchase100(tmp_path)
    assert second.content_hash == first.content_hash
    np.testing.assert_array_equal(second.features, first.features)


def test_same_size_edit_is_not_served_from_the_cache(tmp_path: Path) -> None:
    import os

    write_purchase(tmp_path)
    first = ds.load_purchase100(tmp_path)
    path = tmp_path / "dataset_purchase"
    raw = bytearray(path.read_bytes())
    comma = raw.index(b",")  # the first feature of the first row: flip 0 <-> 1, same size
    raw[comma + 1] = ord("1") if raw[comma + 1] == ord("0") else ord("0")
    path.write_bytes(bytes(raw))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = ds.load_purchase100(tmp_path)
    assert second.features[0, 0] == 1 - first.features[0, 0]
    assert second.content_hash != first.content_hash


@pytest.mark.parametrize("layout", ["texas/100", "dataset_texas"])
def test_texas_both_layouts(tmp_path: Path, layout: str) -> None:
    sub = write_texas(tmp_path, layout=layout)
    raw = ds.load_texas100(tmp_path)
    expected = np.loadtxt(sub / "feats", delimiter=",")
    np.testing.assert_array_equal(raw.features, expected)
    np.testing.assert_array_equal(raw.labels, np.loadtxt(sub / "labels").astype(int) - 1)
    assert raw.features.dtype == np.uint8 and raw.num_classes == 100


def test_texas_crlf_and_no_trailing_newline(tmp_path: Path) -> None:
    sub = write_texas(tmp_path, n=20)
    text = (sub / "feats").read_text().rstrip("\n").replace("\n", "\r\n")
    (sub / "feats").write_text(text, newline="")
    raw = ds.load_texas100(tmp_path)
    assert raw.features.shape == (20, 6169)


def test_texas_label_count_mismatch(tmp_path: Path) -> None:
    sub = write_texas(tmp_path, n=30)
    labels = (sub / "labels").read_text().splitlines()
    (sub / "labels").write_text("\n".join(labels[:-3]) + "\n")
    with pytest.raises(DataFileError, match=r"30 rows but .* 27 labels"):
        ds.load_texas100(tmp_path)


def test_location_quoted_labels(tmp_path: Path) -> None:
    path = write_location(tmp_path)
    raw = ds.load_location30(tmp_path)
    first_label = int(path.read_text().split(",")[0].strip('"'))
    assert raw.features.shape == (300, 446)
    assert raw.labels[0] == first_label - 1
    assert raw.labels.min() >= 0 and raw.labels.max() <= 29


def test_missing_file_names_path_and_archive(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=r"dataset_purchase not found.*dataset_purchase\.tgz"):
        ds.load_purchase100(tmp_path)
    with pytest.raises(DataFileError, match=r"texas/100/feats not found.*dataset_texas\.tgz"):
        ds.load_texas100(tmp_path)


def test_wrong_feature_count(tmp_path: Path) -> None:
    write_purchase(tmp_path, n_features=599)
    with pytest.raises(DataFileError, match="599 features per row, expected 600"):
        ds.load_purchase100(tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    path = write_purchase(tmp_path, n=50)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match="truncated or corrupt"):
        ds.load_purchase100(tmp_path)


def test_labels_out_of_range(tmp_path: Path) -> None:
    path = write_location(tmp_path, n=10)
    path.write_text(
        path.read_text()
        .replace('"', "", 2)
        .replace(path.read_text().split(",")[0].strip('"'), "31", 1)
    )
    with pytest.raises(DataFileError, match=r"expected 1\.\.30"):
        ds.load_location30(tmp_path)


def test_cifar10_batches(tmp_path: Path) -> None:
    sub = write_cifar10(tmp_path)
    raw = ds.load_cifar(tmp_path, num_classes=10)
    assert raw.features.shape == (120, 32, 32, 3)
    with (sub / "data_batch_1").open("rb") as handle:
        batch = pickle.load(handle)
    # channel-major rows -> HWC images
    np.testing.assert_array_equal(raw.features[0, :, :, 0].reshape(-1), batch["data"][0, :1024])
    assert raw.labels[0] == batch["labels"][0]


def test_cifar100_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sub = tmp_path / "cifar-100-python"
    sub.mkdir()
    for name in ("train", "test"):
        with (sub / name).open("wb") as handle:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (7, 3072), dtype=np.uint8),
                    "fine_labels": rng.integers(0, 100, 7).tolist(),
                },
                handle,
            )
    raw = ds.load_cifar(tmp_path, num_classes=100)
    assert raw.features.shape == (14, 32, 32, 3) and raw.labels.max() < 100


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx(tmp_path: Path, compress: bool) -> None:
    write_mnist(tmp_path, "FashionMNIST", n=12, compress=compress)
    raw = ds.load_mnist_idx(tmp_path, variant="FashionMNIST")
    assert raw.features.shape == (24, 28, 28, 1) and raw.name == "fashionmnist"


def test_mnist_truncated(tmp_path: Path) -> None:
    raw_dir = write_mnist(tmp_path, n=12)
    path = raw_dir / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataFileError, match="truncated"):
        ds.load_mnist_idx(tmp_path)


def test_svhn_mat(tmp_path: Path) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        savemat(
            tmp_path / f"{split}_32x32.mat",
            {
                "X": rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8),
                "y": np.array([[10], [1], [2], [3], [9]], dtype=np.uint8),
            },
        )
    raw = ds.load_svhn(tmp_path)
    assert raw.features.shape == (10, 32, 32, 3)
    assert raw.labels[0] == 0 and raw.labels[4] == 9  # SVHN's label 10 is the digit 0


def test_digits_embedded() -> None:
    raw = ds.load_digits_dataset()
    assert raw.features.shape == (1797, 64) and raw.features.max() <= 1.0
    assert raw.content_hash == ds.load_digits_dataset().content_hash


def test_benchmark_sized_parse_fast_path_matches_general(tmp_path: Path) -> None:
    sub = write_texas(tmp_path, n=40)
    raw = (sub / "feats").read_bytes()
    fast = ds._binary_csv(raw, 6169, sub / "feats")
    assert fast is not None
    np.testing.assert_array_equal(fast, ds._general_csv(sub / "feats", "texas100"))


def test_read_only_data_folder_is_parsed_without_caching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder the cache cannot be written to (a read-only mount; simulated, since the tests
    may run as root) still loads, with one warning naming the cache."""
    import errno

    def read_only(path: Path, **arrays: np.ndarray) -> Path:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    path = write_purchase(tmp_path)
    monkeypatch.setattr(ds, "atomic_save_npz", read_only)
    with pytest.warns(UserWarning, match=r"could not write the parse cache .*Read-only"):
        raw = ds.load_purchase100(tmp_path)
    table = np.loadtxt(path, delimiter=",")
    np.testing.assert_array_equal(raw.features, table[:, 1:])
    assert not (tmp_path / "dataset_purchase.nvmpriv.npz").exists()


def test_broken_image_files_name_the_file(tmp_path: Path) -> None:
    """Truncated gzip, an IDX file cut in its header, an HTML page saved as .mat and a CIFAR
    batch of the other variant: each a DataFileError naming the file (a bare EOFError or
    IndexError before, which also kept download: true from fetching the file again)."""
    raw_dir = write_mnist(tmp_path / "gz", n=4, compress=True)
    gz = raw_dir / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte\.gz is truncated or corrupt"):
        ds.load_mnist_idx(tmp_path / "gz")
    raw_dir = write_mnist(tmp_path / "idx", n=4)
    idx = raw_dir / "train-labels-idx1-ubyte"
    idx.write_bytes(idx.read_bytes()[:6])
    with pytest.raises(DataFileError, match=r"train-labels-idx1-ubyte ends inside its IDX header"):
        ds.load_mnist_idx(tmp_path / "idx")
    for split in ("train", "test"):
        (tmp_path / f"{split}_32x32.mat").write_text("<html>404 not found</html>\n")
    with pytest.raises(DataFileError, match=r"train_32x32\.mat is not an SVHN \.mat file"):
        ds.load_svhn(tmp_path)
    sub = tmp_path / "cifar-100-python"
    sub.mkdir()
    for name in ("train", "test"):  # CIFAR-10-style batches where CIFAR-100 ones belong
        with (sub / name).open("wb") as handle:
            pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, handle)
    with pytest.raises(DataFileError, match=r"cifar-100-python/train is not a cifar100 batch"):
        ds.load_cifar(tmp_path, num_classes=100)


def test_missing_image_file_names_its_source(tmp_path: Path) -> None:
    with pytest.raises(
        DataFileError,
        match=r"cifar-10-batches-py/data_batch_1 not found; fetch it "
        r"from https://www\.cs\.toronto\.edu/~kriz/cifar-10-python\.tar\.gz",
    ):
        ds.load_cifar(tmp_path, num_classes=10)
    with pytest.raises(DataFileError, match=r"svhn: .* fetch it from http://ufldl"):
        ds.load_svhn(tmp_path)


def test_a_cache_written_for_another_data_set_is_not_served(tmp_path: Path) -> None:
    path = write_location(tmp_path, n=20)
    parsed: list[str] = []

    def parse(tag: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        def run() -> tuple[np.ndarray, np.ndarray]:
            parsed.append(tag)
            return np.ones((3, 5), np.uint8), np.zeros(3, np.int64)

        return run

    ds._cached("location30", [path], 30, parse("location"))
    ds._cached("location30", [path], 30, parse("again"))  # a cache hit
    ds._cached("purchase100", [path], 100, parse("purchase"))  # the other loader parses
    assert parsed == ["location", "purchase"]


def _archive(folder: Path, files: dict[str, bytes]) -> Path:
    path = folder / "archive.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_download_extracts_whole_files_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    write_purchase(source, n=30)
    good = _archive(source, {"dataset_purchase": (source / "dataset_purchase").read_bytes()})
    broken = source / "broken.tgz"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    root = tmp_path / "data"
    monkeypatch.setitem(ds.ARCHIVES, "purchase100", broken.as_uri())
    with pytest.raises(DataFileError, match=r"archive downloaded from file://.* is corrupt"):
        ds.load_purchase100(root, download=True)
    assert not any(p.is_file() for p in root.rglob("*"))  # no partial data file, no temp files
    monkeypatch.setitem(ds.ARCHIVES, "purchase100", good.as_uri())
    raw = ds.load_purchase100(root, download=True)
    assert raw.features.shape == (30, 600)
    assert sorted(p.name for p in root.iterdir()) == [
        "dataset_purchase",
        "dataset_purchase.nvmpriv.npz",
    ]
