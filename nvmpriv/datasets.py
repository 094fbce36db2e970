"""Readers for the real file formats of the data sets nvmpriv trains on (numpy only, no torch).

Each reader returns a :class:`RawDataset`: features (or images) as a ``uint8``/``float32`` array,
labels ``0..C-1`` as ``int64`` and a content hash. Tabular sets are parsed once and cached as a
compact ``.npz`` next to the source file (Texas100's 67,330 x 6,169 binary matrix is bit-packed),
so later runs load in a fraction of a second. ``download=True`` fetches the public archive when a
network exists; a missing file raises :class:`DataFileError` naming the path and the archive.

Formats (see ``shared/reference/privacy.md``):

* Purchase100 -- ``dataset_purchase``: CSV, no header, column 0 = label 1..100, 600 binary features.
* Texas100 -- ``texas/100/feats`` (CSV of 0/1, 6,169 columns) and ``texas/100/labels`` (one label
  1..100 per line); some mirrors use ``dataset_texas/feats`` and ``dataset_texas/labels``.
* Location30 -- ``bangkok``: each line a quoted label ``"k"`` (1..30), then 446 comma-separated 0/1.
* CIFAR-10/100 -- the python pickle batches; MNIST / Fashion-MNIST -- IDX files (optionally gzip);
  SVHN -- ``train_32x32.mat`` / ``test_32x32.mat``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nvmpriv.atomic import atomic_save_npz

__all__ = [
    "ARCHIVES",
    "IMAGE_SOURCES",
    "DataFileError",
    "RawDataset",
    "atomic_save_npz",
    "content_hash",
    "load_cifar",
    "load_digits_dataset",
    "load_location30",
    "load_mnist_idx",
    "load_purchase100",
    "load_svhn",
    "load_texas100",
]

#: Public archives of the tabular sets (Shokri et al.'s hosting; mirrored by privacytrustlab/datasets).
ARCHIVES: dict[str, str] = {
    "purchase100": "https://www.comp.nus.edu.sg/~reza/files/dataset_purchase.tgz",
    "texas100": "https://www.comp.nus.edu.sg/~reza/files/dataset_texas.tgz",
    "location30": "https://github.com/privacytrustlab/datasets/raw/master/dataset_location.tgz",
}

#: Where the image sets come from (torchvision downloads them with ``download: true``).
IMAGE_SOURCES: dict[str, str] = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "mnist": "https://yann.lecun.com/exdb/mnist/",
    "fashionmnist": "https://github.com/zalandoresearch/fashion-mnist",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
}

#: Bump when the cache layout or its stamp changes (old caches are then rebuilt).
_CACHE_VERSION = 2


class DataFileError(ValueError):
    """A data file is missing, truncated or not in the expected format."""


@dataclass(frozen=True)
class RawDataset:
    """A whole data set as arrays, before any membership split.

    Attributes:
        features: ``[n, d]`` tabular features or ``[n, H, W, C]`` uint8 images.
        labels: ``[n]`` int64 class labels in ``0..num_classes-1``.
        num_classes: Number of classes C.
        name: Data set name (``"texas100"``, ``"cifar10"``, ...).
        content_hash: SHA-256 (hex, 16 chars) of labels and features; ties split files to data.
    """

    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    content_hash: str


def content_hash(features: np.ndarray, labels: np.ndarray) -> str:
    """Return a short SHA-256 of a data set's features and labels.

    Args:
        features: Feature or image array.
        labels: Label array.

    Returns:
        The first 16 hex digits of the digest; equal arrays give equal hashes.
    """
    digest = hashlib.sha256()
    digest.update(str(features.shape).encode())
    digest.update(np.ascontiguousarray(features).tobytes())
    digest.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
    return digest.hexdigest()[:16]


def _missing(path: Path, name: str) -> DataFileError:
    if name in ARCHIVES:
        fix = f"fetch and extract the archive from {ARCHIVES[name]} (or pass download: true)"
    else:
        source = IMAGE_SOURCES.get(name)
        fix = f"fetch it from {source} (or pass download: true)" if source else "fetch it"
    return DataFileError(f"{name}: data file {path} not found; {fix}")


def _corrupt(path: Path, name: str, exc: BaseException) -> DataFileError:
    reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
    return DataFileError(f"{name}: {path} is truncated or corrupt ({reason}); download it again")


def _download_archive(name: str, root: Path) -> None:
    """Fetch and extract the public archive of a tabular data set into ``root``."""
    url = ARCHIVES[name]
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".tgz")
    os.close(fd)
    try:
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as exc:
            raise DataFileError(
                f"{name}: download of {url} failed ({exc}); download it by hand and extract it "
                f"into {root}"
            ) from exc
        # Extract beside the data, then move each complete file into place: a corrupt archive
        # or an interrupted extraction leaves no partial data file that would pass as present.
        with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as staging:
            try:
                with tarfile.open(tmp) as archive:
                    archive.extractall(staging, filter="data")
            except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
                reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
                raise DataFileError(
                    f"{name}: the archive downloaded from {url} is corrupt or truncated "
                    f"({reason}); try again, or download it by hand and extract it into {root}"
                ) from None
            for file in sorted(Path(staging).rglob("*")):
                if file.is_file():
                    target = root / file.relative_to(staging)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(file, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _binary_csv(raw: bytes, n_cols: int, path: Path) -> np.ndarray | None:
    """Fast path for CSV rows of single-character values: one reshape, no per-value parsing.

    Returns ``None`` when the rows are not all single-character fields of equal length, so the
    caller can fall back to the general parser.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size == 0:
        return None
    has_cr = b"\r\n" in raw[: 2 * n_cols + 4]
    line_len = 2 * n_cols - 1 + (2 if has_cr else 1)
    trailing = 0 if data[-1] == ord("\n") else 1
    if (data.size + trailing) % line_len:
        return None
    if trailing:
        data = np.concatenate([data, np.frombuffer(b"\r\n" if has_cr else b"\n", np.uint8)])
    rows = data.reshape(-1, line_len)
    values = rows[:, 0 : 2 * n_cols - 1 : 2]
    seps = rows[:, 1 : 2 * n_cols - 1 : 2]
    if not (np.all(seps == ord(",")) and np.all(rows[:, -1] == ord("\n"))):
        return None
    digits = values - np.uint8(ord("0"))  # bytes below '0' wrap around to large values
    if digits.max() > 9:
        return None
    return digits


def _general_csv(path: Path, name: str) -> np.ndarray:
    """Parse a numeric CSV (fields may be double-quoted) with numpy's C parser."""
    try:
        table = np.loadtxt(path, delimiter=",", quotechar='"', dtype=np.float64, ndmin=2)
    except ValueError as exc:
        # numpy's own advice ("use usecols ...") is wrong for a truncated file: drop it
        reason = str(exc).splitlines()[0].split("; use `usecols`")[0].split(". use `usecols`")[0]
        raise DataFileError(
            f"{name}: {path} is not a valid numeric CSV ({reason}); the file is truncated or "
            "corrupt -- re-extract the archive"
        ) from exc
    if table.size == 0:
        raise DataFileError(f"{name}: {path} holds no rows; the file is empty or truncated")
    return table


def _check_features(features: np.ndarray, expected: int, path: Path, name: str) -> None:
    if features.ndim != 2 or features.shape[1] != expected:
        got = features.shape[1] if features.ndim == 2 else features.shape
        raise DataFileError(
            f"{name}: {path} has {got} features per row, expected {expected}; "
            "wrong file or corrupt archive"
        )


def _labels_1_to_c(raw_labels: np.ndarray, num_classes: int, path: Path, name: str) -> np.ndarray:
    labels = np.asarray(raw_labels)
    if labels.size == 0:
        raise DataFileError(f"{name}: {path} holds no rows; the file is empty or truncated")
    if not np.all(np.equal(np.mod(labels, 1), 0)):
        raise DataFileError(f"{name}: {path} has non-integer labels; expected 1..{num_classes}")
    labels = labels.astype(np.int64)
    if labels.min() < 1 or labels.max() > num_classes:
        raise DataFileError(
            f"{name}: {path} has labels in {labels.min()}..{labels.max()}, expected "
            f"1..{num_classes}; wrong file or wrong data set"
        )
    return labels - 1


def _cached(
    name: str,
    sources: list[Path],
    num_classes: int,
    parse: Callable[[], tuple[np.ndarray, np.ndarray]],
) -> RawDataset:
    """Load a tabular set from its compact cache, or parse the sources and write the cache."""
    cache = sources[0].with_name(sources[0].name + ".nvmpriv.npz")
    # Size and modification time: an edited file of the same size must not hit a stale cache.
    stats = [p.stat() for p in sources]
    # The set's name too: another loader pointed at the same file must parse (and check) it.
    stamp = np.array(
        [f"{_CACHE_VERSION}:{name}:" + ";".join(f"{st.st_size}@{st.st_mtime_ns}" for st in stats)]
    )
    if cache.exists():
        try:
            with np.load(cache) as stored:
                if str(stored["stamp"][0]) == str(stamp[0]):
                    n_features = int(stored["n_features"])
                    features = np.unpackbits(stored["packed"], axis=1, count=n_features)
                    return RawDataset(
                        features, stored["labels"], num_classes, name, str(stored["hash"])
                    )
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # a stale or corrupt cache is simply rebuilt from the source files
    features, labels = parse()
    binary = features.max() <= 1 if features.dtype == np.uint8 else np.isin(features, (0, 1)).all()
    if not binary:
        raise DataFileError(f"{name}: {sources[0]} has non-binary features; expected 0/1 values")
    features = features.astype(np.uint8)
    digest = content_hash(features, labels)
    try:
        atomic_save_npz(
            cache,
            packed=np.packbits(features, axis=1),
            labels=labels,
            n_features=np.array(features.shape[1]),
            hash=np.array(digest),
            stamp=stamp,
        )
    except OSError as exc:  # a read-only data folder: the data is usable, only not cached
        warnings.warn(
            f"{name}: could not write the parse cache {cache} ({exc.strerror or exc}); "
            "the files will be parsed again next time (make the folder writable to cache them)",
            stacklevel=2,
        )
    return RawDataset(features, labels, num_classes, name, digest)


def _read_bytes(path: Path, name: str) -> bytes:
    if not path.is_file():
        raise _missing(path, name)
    return path.read_bytes()


def load_purchase100(root: str | Path, *, download: bool = False) -> RawDataset:
    """Load Purchase100 (197,324 x 600 binary, 100 classes) from ``root/dataset_purchase``.

    Args:
        root: Folder holding ``dataset_purchase`` (or the file itself).
        download: Fetch and extract the public archive when the file is missing.

    Returns:
        The data set with labels shifted to ``0..99``.

    Raises:
        DataFileError: Missing, truncated or malformed file.
    """
    name, n_features = "purchase100", 600
    root = Path(root)
    path = root if root.is_file() else root / "dataset_purchase"
    if not path.is_file() and download:
        _download_archive(name, root)

    def parse() -> tuple[np.ndarray, np.ndarray]:
        table = _general_csv(path, name)
        _check_features(table[:, 1:], n_features, path, name)
        return table[:, 1:], _labels_1_to_c(table[:, 0], 100, path, name)

    if not path.is_file():
        raise _missing(path, name)
    return _cached(name, [path], 100, parse)


def _texas_paths(root: Path) -> tuple[Path, Path]:
    for sub in ("texas/100", "dataset_texas", "."):
        feats, labels = root / sub / "feats", root / sub / "labels"
        if feats.is_file() or labels.is_file():
            return feats, labels
    return root / "texas/100/feats", root / "texas/100/labels"


def load_texas100(root: str | Path, *, download: bool = False) -> RawDataset:
    """Load Texas100 (67,330 x 6,169 binary, 100 classes).

    Accepts both layouts: ``root/texas/100/{feats,labels}`` and ``root/dataset_texas/{feats,labels}``.

    Args:
        root: Folder holding one of the layouts.
        download: Fetch and extract the public archive when the files are missing.

    Returns:
        The data set with labels shifted to ``0..99``.

    Raises:
        DataFileError: Missing, truncated or malformed files, or feature/label counts that differ.
    """
    name, n_features = "texas100", 6169
    root = Path(root)
    feats, labels_path = _texas_paths(root)
    if not (feats.is_file() and labels_path.is_file()) and download:
        _download_archive(name, root)
        feats, labels_path = _texas_paths(root)
    for path in (feats, labels_path):
        if not path.is_file():
            raise _missing(path, name)

    def parse() -> tuple[np.ndarray, np.ndarray]:
        raw = _read_bytes(feats, name)
        features = _binary_csv(raw, n_features, feats)
        if features is None:
            features = _general_csv(feats, name)
        _check_features(features, n_features, feats, name)
        label_text = _read_bytes(labels_path, name).decode("ascii", errors="replace").split()
        try:
            raw_labels = np.array(label_text, dtype=np.float64)
        except ValueError as exc:
            raise DataFileError(f"{name}: {labels_path} has a non-numeric label ({exc})") from exc
        if raw_labels.size != features.shape[0]:
            raise DataFileError(
                f"{name}: {feats} has {features.shape[0]} rows but {labels_path} has "
                f"{raw_labels.size} labels; one file is truncated -- re-extract the archive"
            )
        return features, _labels_1_to_c(raw_labels, 100, labels_path, name)

    return _cached(name, [feats, labels_path], 100, parse)


def load_location30(root: str | Path, *, download: bool = False) -> RawDataset:
    """Load Location30 (5,010 x 446 binary, 30 classes) from ``root/bangkok``.

    Args:
        root: Folder holding ``bangkok`` (or the file itself).
        download: Fetch and extract the public archive when the file is missing.

    Returns:
        The data set with labels shifted to ``0..29``.

    Raises:
        DataFileError: Missing, truncated or malformed file.
    """
    name, n_features = "location30", 446
    root = Path(root)
    path = root if root.is_file() else root / "bangkok"
    if not path.is_file() and download:
        _download_archive(name, root)
    if not path.is_file():
        raise _missing(path, name)

    def parse() -> tuple[np.ndarray, np.ndarray]:
        table = _general_csv(path, name)
        _check_features(table[:, 1:], n_features, path, name)
        return table[:, 1:], _labels_1_to_c(table[:, 0], 30, path, name)

    return _cached(name, [path], 30, parse)


def load_digits_dataset() -> RawDataset:
    """Load scikit-learn's embedded digits (1,797 x 64, 10 classes), scaled to [0, 1].

    Returns:
        The data set; features are ``float32`` pixel intensities divided by 16.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = (bunch.data / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    return RawDataset(features, labels, 10, "digits", content_hash(features, labels))


def _unpickle(path: Path, name: str) -> dict[str, object]:
    if not path.is_file():
        raise _missing(path, name)
    try:
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataFileError(
            f"{name}: {path} is not a CIFAR pickle batch ({exc}); re-extract"
        ) from exc


def load_cifar(root: str | Path, *, num_classes: int) -> RawDataset:
    """Load CIFAR-10 or CIFAR-100 (train + test pooled, 60,000 images) from the python batches.

    Args:
        root: Folder holding ``cifar-10-batches-py`` or ``cifar-100-python``.
        num_classes: 10 or 100.

    Returns:
        Images ``[n, 32, 32, 3]`` uint8 and labels.

    Raises:
        DataFileError: Missing or malformed batch files.
    """
    name = f"cifar{num_classes}"
    if num_classes == 10:
        folder = Path(root) / "cifar-10-batches-py"
        files, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
    elif num_classes == 100:
        folder = Path(root) / "cifar-100-python"
        files, key = ["train", "test"], "fine_labels"
    else:
        raise ValueError(f"num_classes={num_classes} is not a CIFAR variant; use 10 or 100")
    images, labels = [], []
    for file in files:
        batch = _unpickle(folder / file, name)
        if not isinstance(batch, dict) or "data" not in batch or key not in batch:
            raise DataFileError(
                f"{name}: {folder / file} is not a {name} batch (no 'data' and {key!r} entries); "
                "wrong CIFAR variant or corrupt file -- download it again"
            )
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataFileError(
                f"{name}: {folder / file} has data of shape {data.shape}, not [n, 3072]"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[key], dtype=np.int64))
    x, y = np.concatenate(images), np.concatenate(labels)
    _check_range(y, num_classes, folder, name)
    return RawDataset(x, y, num_classes, name, content_hash(x, y))


def _check_range(labels: np.ndarray, num_classes: int, path: Path, name: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFileError(
            f"{name}: {path} has labels in {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )


def _read_idx(path: Path, name: str) -> np.ndarray:
    candidates = [path, path.with_name(path.name + ".gz")]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise _missing(path, name)
    try:
        raw = gzip.decompress(found.read_bytes()) if found.suffix == ".gz" else found.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise _corrupt(found, name, exc) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataFileError(f"{name}: {found} is not an unsigned-byte IDX file; re-download it")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataFileError(f"{name}: {found} ends inside its IDX header; truncated file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataFileError(
            f"{name}: {found} holds {body.size} bytes of data, header says {shape}; truncated file"
        )
    return body.reshape(shape)


def load_mnist_idx(root: str | Path, *, variant: str = "MNIST") -> RawDataset:
    """Load MNIST or Fashion-MNIST (train + test pooled, 70,000 images) from torchvision's IDX files.

    Args:
        root: torchvision root; files are read from ``root/<variant>/raw``.
        variant: ``"MNIST"`` or ``"FashionMNIST"``.

    Returns:
        Images ``[n, 28, 28, 1]`` uint8 and labels.

    Raises:
        DataFileError: Missing or malformed IDX files.
    """
    name = variant.lower()
    raw_dir = Path(root) / variant / "raw"
    xs, ys = [], []
    for prefix in ("train", "t10k"):
        images = _read_idx(raw_dir / f"{prefix}-images-idx3-ubyte", name)
        labels = _read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", name).astype(np.int64)
        if images.shape[0] != labels.shape[0]:
            raise DataFileError(
                f"{name}: {raw_dir} has {images.shape[0]} {prefix} images but "
                f"{labels.shape[0]} labels; re-download"
            )
        xs.append(images[..., None])
        ys.append(labels)
    x, y = np.concatenate(xs), np.concatenate(ys)
    _check_range(y, 10, raw_dir, name)
    return RawDataset(x, y, 10, name, content_hash(x, y))


def load_svhn(root: str | Path) -> RawDataset:
    """Load SVHN (train + test pooled, 99,289 images) from ``train_32x32.mat`` and ``test_32x32.mat``.

    Args:
        root: Folder holding the two ``.mat`` files.

    Returns:
        Images ``[n, 32, 32, 3]`` uint8 and labels (the file's label 10 is digit 0).

    Raises:
        DataFileError: Missing or malformed files.
    """
    from scipy.io import loadmat

    name = "svhn"
    xs, ys = [], []
    for split in ("train", "test"):
        path = Path(root) / f"{split}_32x32.mat"
        if not path.is_file():
            raise _missing(path, name)
        try:
            mat = loadmat(path)
            images, labels = np.asarray(mat["X"], np.uint8), np.asarray(mat["y"]).reshape(-1)
        except Exception as exc:  # scipy raises MatReadError, IndexError, ... on non-.mat bytes
            raise DataFileError(
                f"{name}: {path} is not an SVHN .mat file ({type(exc).__name__}: {exc}); "
                "re-download"
            ) from None
        if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != labels.size:
            raise DataFileError(
                f"{name}: {path} holds X of shape {images.shape} and {labels.size} labels, not "
                "[32, 32, 3, n] and n; re-download"
            )
        xs.append(images.transpose(3, 0, 1, 2))
        ys.append(np.where(labels == 10, 0, labels).astype(np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    _check_range(y, 10, Path(root), name)
    return RawDataset(x, y, 10, name, content_hash(x, y))
