"""LightningDataModules that know membership exactly.

Every data set is pooled (train and test files together, as Yuan & Zhang do) and split once, from
an explicit seed, into the roles of a membership experiment:

========================  =====================================================================
role                      meaning
========================  =====================================================================
``target_train``          the target model's training set: the **members**
``target_val``            the target's validation set (model selection, early stopping)
``target_test``           held out from the target: the **non-members**
``shadow_train``          the attacker's shadow-model training set (attacker's "members")
``shadow_val``            the shadow model's validation set
``shadow_test``           the attacker's "non-members"
``population``            the attacker's reference pool (LiRA / RMIA reference models)
========================  =====================================================================

Default fractions follow Yuan & Zhang: 50/50 target/shadow, each half 45% train / 10% validation /
45% test, so guessing scores 50%. With ``population_fraction=0`` the population pool is the
attacker's whole half (the union of the shadow roles); a positive fraction carves a separate pool
off first. The split indices are written to ``splits.npz`` in the run's log directory together
with the data's content hash, and stored in every checkpoint, so every later step (validation,
export, black-box attack) sees exactly the same membership ground truth.
"""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from abc import abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nvmpriv import datasets as ds
from nvmpriv.datasets import DataFileError, RawDataset

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "MNIST",
    "ROLES",
    "SVHN",
    "Digits",
    "FashionMNIST",
    "Location30",
    "MembershipDataModule",
    "Purchase100",
    "SplitFileError",
    "Splits",
    "Texas100",
    "make_splits",
]

ROLES: tuple[str, ...] = (
    "target_train",
    "target_val",
    "target_test",
    "shadow_train",
    "shadow_val",
    "shadow_test",
    "population",
)
SPLITS_FILE = "splits.npz"


class SplitFileError(ValueError):
    """A saved split file does not belong to the data it is used with."""


def make_splits(
    n: int,
    *,
    seed: int,
    target_fraction: float = 0.5,
    train_fraction: float = 0.45,
    val_fraction: float = 0.10,
    population_fraction: float = 0.0,
    max_samples: int | None = None,
) -> dict[str, np.ndarray]:
    """Split ``n`` sample indices into the membership roles (see the module docstring).

    Args:
        n: Number of samples in the pooled data set.
        seed: Seed of the permutation; same seed and sizes give the same split.
        target_fraction: Share of the (non-population) pool given to the target; the rest is the
            attacker's shadow half.
        train_fraction: Share of each half used for training.
        val_fraction: Share of each half used for validation; the remainder is the test role.
        population_fraction: Share of the pool carved off first as a separate population pool;
            0 means the population is the attacker's whole half.
        max_samples: Use only this many samples of the pool (a random subset), for quick runs.

    Returns:
        Mapping from role name to sorted ``int64`` index arrays; roles are pairwise disjoint except
        that with ``population_fraction=0`` the population is the union of the shadow roles.

    Raises:
        ValueError: Fractions outside their ranges or too few samples for every role.
    """
    for field, value, hi in (
        ("target_fraction", target_fraction, 1.0),
        ("train_fraction", train_fraction, 1.0),
        ("val_fraction", val_fraction, 1.0),
    ):
        if not 0.0 < value < hi:
            raise ValueError(f"{field}={value} is outside (0, 1); pick a fraction such as 0.45")
    if train_fraction + val_fraction >= 1.0:
        raise ValueError(
            f"train_fraction + val_fraction = {train_fraction + val_fraction} must be < 1 so the "
            "test (non-member) role is not empty"
        )
    if not 0.0 <= population_fraction < 1.0:
        raise ValueError(f"population_fraction={population_fraction} is outside [0, 1)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if max_samples is not None:
        if max_samples <= 0:
            raise ValueError(f"max_samples={max_samples} must be positive (or null for all)")
        order = order[:max_samples]
    n_pool = len(order)
    n_pop = round(population_fraction * n_pool)
    population, rest = order[:n_pop], order[n_pop:]
    n_target = round(target_fraction * len(rest))
    roles: dict[str, np.ndarray] = {}
    for prefix, half in (("target", rest[:n_target]), ("shadow", rest[n_target:])):
        n_train = round(train_fraction * len(half))
        n_val = round(val_fraction * len(half))
        roles[f"{prefix}_train"] = half[:n_train]
        roles[f"{prefix}_val"] = half[n_train : n_train + n_val]
        roles[f"{prefix}_test"] = half[n_train + n_val :]
    if n_pop == 0:
        population = rest[n_target:]
    roles["population"] = population
    empty = [role for role in ROLES if len(roles[role]) == 0]
    if empty:
        raise ValueError(
            f"{n_pool} samples are too few for the roles {empty}; use more data or larger fractions"
        )
    return {role: np.sort(roles[role]).astype(np.int64) for role in ROLES}


class Splits:
    """Membership split of one data set, with the content hash of the data it was made on.

    Args:
        indices: Role name -> index array (all of :data:`ROLES`).
        data_hash: :func:`nvmpriv.datasets.content_hash` of the pooled data set.
        dataset: Data set name.
        meta: Free-form settings (seed, fractions) kept for provenance.
    """

    def __init__(
        self,
        indices: dict[str, np.ndarray],
        data_hash: str,
        dataset: str,
        meta: dict[str, Any] | None = None,
    ) -> None:
        missing = [role for role in ROLES if role not in indices]
        if missing:
            raise SplitFileError(f"split is missing the roles {missing}; regenerate it")
        self.indices = {role: np.asarray(indices[role], dtype=np.int64) for role in ROLES}
        self.data_hash = data_hash
        self.dataset = dataset
        self.meta = dict(meta or {})

    @property
    def split_hash(self) -> str:
        """Short SHA-256 over the data hash and every role's indices."""
        digest = hashlib.sha256(self.data_hash.encode())
        for role in ROLES:
            digest.update(role.encode())
            digest.update(self.indices[role].tobytes())
        return digest.hexdigest()[:16]

    def subset(self, role: str, limit: int | None) -> np.ndarray:
        """At most ``limit`` indices of a role: a random subset fixed by the split, sorted.

        Raw files are often ordered (by class, by source file: CIFAR's training batches before
        its test batch), so the first ``limit`` indices would be a skewed sample. The subset is
        drawn from a permutation seeded by :attr:`split_hash` and the role, so it is the same in
        every process and for every consumer of the split (audit, export, black-box attack), and
        a smaller limit gives a subset of a larger one's.

        Args:
            role: One of :data:`ROLES`.
            limit: Cap; ``None`` (or at least the role's size) keeps every index.

        Returns:
            Sorted ``int64`` indices.
        """
        idx = self.indices[role]
        if limit is None or limit >= len(idx):
            return idx
        seed = [int(self.split_hash, 16) & 0xFFFFFFFF, ROLES.index(role)]
        order = np.random.default_rng(seed).permutation(len(idx))
        return np.sort(idx[order[: max(0, limit)]])

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Splits:
        """The split a :meth:`MembershipDataModule.state_dict` stored in a checkpoint.

        Args:
            state: Mapping with ``indices``, ``data_hash`` and optionally ``dataset``, ``meta``.

        Returns:
            The split.
        """
        return cls(
            {role: np.asarray(v) for role, v in state["indices"].items()},
            str(state["data_hash"]),
            str(state.get("dataset", "")),
            state.get("meta"),
        )

    def save(self, path: str | Path) -> Path:
        """Write ``splits.npz`` atomically (a folder path gets ``splits.npz`` appended).

        Args:
            path: File or folder.

        Returns:
            The file written.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path / SPLITS_FILE
        ds.atomic_save_npz(
            path,
            data_hash=np.array(self.data_hash),
            split_hash=np.array(self.split_hash),
            dataset=np.array(self.dataset),
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
            **{f"idx_{role}": self.indices[role] for role in ROLES},
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        """Read a split written by :meth:`save` (a run folder or the file itself).

        Args:
            path: ``splits.npz`` or a folder containing it.

        Returns:
            The split.

        Raises:
            SplitFileError: The file is missing, unreadable or internally inconsistent.
        """
        path = Path(path)
        if path.is_dir():
            path = path / SPLITS_FILE
        if not path.is_file():
            raise SplitFileError(f"split file {path} not found; point splits_path at a run folder")
        try:
            with np.load(path) as stored:
                indices = {role: stored[f"idx_{role}"] for role in ROLES}
                splits = cls(
                    indices,
                    str(stored["data_hash"]),
                    str(stored["dataset"]),
                    json.loads(str(stored["meta"])),
                )
                recorded = str(stored["split_hash"])
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise SplitFileError(f"split file {path} is unreadable ({exc}); regenerate it") from exc
        if recorded != splits.split_hash:
            raise SplitFileError(
                f"split file {path} fails its hash check; it was edited or damaged"
            )
        return splits

    def check_matches(self, raw: RawDataset) -> None:
        """Raise unless this split was made on exactly ``raw``.

        Args:
            raw: The data set the split is about to index.

        Raises:
            SplitFileError: Different data set or content.
        """
        if self.dataset != raw.name or self.data_hash != raw.content_hash:
            raise SplitFileError(
                f"split was made on {self.dataset} (hash {self.data_hash}) but the data is "
                f"{raw.name} (hash {raw.content_hash}); use the split file of this data set or "
                "drop splits_path to make a new split"
            )
        top = max(int(idx.max(initial=-1)) for idx in self.indices.values())
        if top >= len(raw.labels):
            raise SplitFileError(
                f"split indexes sample {top} but {raw.name} has {len(raw.labels)}; wrong split file"
            )


def _run_folder(trainer: pl.Trainer | None) -> Path | None:
    """The run's log folder on rank 0, ``None`` elsewhere or without a trainer.

    ``trainer.log_dir`` broadcasts from rank 0, so every rank must read it (a rank-0-only read
    would deadlock DDP).
    """
    if trainer is None:
        return None
    log_dir = trainer.log_dir
    return Path(log_dir) if log_dir and trainer.is_global_zero else None


def _global_rng_state() -> dict[str, Any]:
    """Every global RNG a training step draws from, in a form ``torch.load(weights_only=True)`` reads.

    Dropout, the shuffling sampler (it seeds itself from torch's global generator at every epoch)
    and image augmentations all draw from these, so a resumed run repeats the uninterrupted one
    only if they continue from where the checkpoint left them.
    """
    np_state: Any = np.random.get_state(legacy=True)
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            str(np_state[0]),
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`_global_rng_state` captured (CUDA only where it was captured and exists)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class _ImageDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """uint8 NHWC images served as float CHW tensors in [0, 1], optionally augmented."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        augment: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        self.images = images
        self.labels = torch.from_numpy(labels)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        image = image.float().div_(255.0)
        if self.augment is not None:
            image = self.augment(image)
        return image, self.labels[i]


class MembershipDataModule(pl.LightningDataModule):
    """Base DataModule: pooled data, membership roles, saved splits, loaders per role.

    Subclasses implement :meth:`load_raw` and set :attr:`num_classes` (a class attribute, so a
    model can be configured from it before any file is read).

    Args:
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test, prediction and audits.
        num_workers: DataLoader worker processes.
        seed: Seed of the membership split.
        target_fraction: See :func:`make_splits`.
        train_fraction: See :func:`make_splits`.
        val_fraction: See :func:`make_splits`.
        population_fraction: See :func:`make_splits`.
        max_samples: See :func:`make_splits`.
        splits_path: Reuse the split of an earlier run (its folder or ``splits.npz``) instead of
            drawing one; it must match the data's content hash.
    """

    num_classes: int = 0
    input_shape: tuple[int, ...] = ()

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        target_fraction: float = 0.5,
        train_fraction: float = 0.45,
        val_fraction: float = 0.10,
        population_fraction: float = 0.0,
        max_samples: int | None = None,
        splits_path: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0 or eval_batch_size <= 0:
            raise ValueError(
                f"batch_size={batch_size}, eval_batch_size={eval_batch_size} must be > 0"
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.split_settings: dict[str, Any] = {
            "seed": seed,
            "target_fraction": target_fraction,
            "train_fraction": train_fraction,
            "val_fraction": val_fraction,
            "population_fraction": population_fraction,
            "max_samples": max_samples,
        }
        self.splits_path = splits_path
        self._raw: RawDataset | None = None
        self.splits: Splits | None = None
        self._resumed_rng: dict[str, Any] | None = None

    @abstractmethod
    def load_raw(self) -> RawDataset:
        """Read the whole pooled data set (called once per process)."""

    @property
    def raw(self) -> RawDataset:
        """The pooled data set, read on first use."""
        if self._raw is None:
            raw = self.load_raw()
            if raw.num_classes != self.num_classes:
                raise DataFileError(
                    f"{raw.name} has {raw.num_classes} classes but {type(self).__name__} declares "
                    f"{self.num_classes}"
                )
            self._raw = raw
        return self._raw

    def prepare_data(self) -> None:
        """Fetch the files (``download: true``) once per node before any process reads them.

        Lightning runs this on one process per node, before ``setup`` on every process, so DDP
        ranks do not download and extract into one folder at the same time.
        """
        if getattr(self, "download", False):
            _ = self.raw

    def setup(self, stage: str | None = None) -> None:
        """Read the data, draw or reload the split and save it next to the run's logs."""
        if self.splits is None:
            if self.splits_path:
                splits = Splits.load(self.splits_path)
                splits.check_matches(self.raw)
            else:
                idx = make_splits(len(self.raw.labels), **self.split_settings)
                splits = Splits(idx, self.raw.content_hash, self.raw.name, self.split_settings)
            self.splits = splits
        folder = _run_folder(self.trainer)
        if folder is not None:
            self._save_splits(folder)

    def _save_splits(self, folder: Path, *, replace: bool = False) -> None:
        assert self.splits is not None
        target = folder / SPLITS_FILE
        if target.exists() and not replace:
            existing = Splits.load(target)
            if existing.split_hash != self.splits.split_hash:
                raise SplitFileError(
                    f"{target} already holds a different split; use a new log folder or pass "
                    f"splits_path={target}"
                )
            return
        self.splits.save(target)

    def _require_splits(self) -> Splits:
        if self.splits is None:
            self.setup()
        assert self.splits is not None
        return self.splits

    def indices(self, role: str, limit: int | None = None) -> np.ndarray:
        """Index array of a role (see :data:`ROLES`), optionally capped (:meth:`Splits.subset`)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
        return self._require_splits().subset(role, limit)

    def dataset(self, role: str, *, augment: bool = False) -> Dataset[Any]:
        """A torch Dataset of one role.

        Args:
            role: One of :data:`ROLES`.
            augment: Apply the training augmentations (only meaningful for images).

        Returns:
            Dataset yielding ``(x, y)``.
        """
        idx = self.indices(role)
        return self._make_dataset(self.raw.features[idx], self.raw.labels[idx], augment)

    def _make_dataset(
        self, features: np.ndarray, labels: np.ndarray, augment: bool
    ) -> Dataset[Any]:
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        return TensorDataset(x, torch.as_tensor(labels))

    def arrays(self, role: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Features as the model sees them (float32, no augmentation) and labels of a role.

        Args:
            role: One of :data:`ROLES`.
            limit: At most this many samples of the role, a random subset fixed by the split
                (:meth:`Splits.subset`; converted alone, so an audit of 1,000 images does not
                convert the whole role).

        Returns:
            ``(x, y)`` numpy arrays; images come as ``[n, C, H, W]`` in [0, 1].
        """
        idx = self.indices(role, limit)
        return self._model_input(self.raw.features[idx]), self.raw.labels[idx]

    def _model_input(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float32)

    def dataloader(
        self, role: str, *, shuffle: bool = False, augment: bool = False
    ) -> DataLoader[Any]:
        """A DataLoader over one role (evaluation batch size unless shuffling for training)."""
        return DataLoader(
            self.dataset(role, augment=augment),
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            # Workers are started (and seeded from the main RNG) at every epoch: persistent
            # workers keep an RNG a checkpoint cannot hold, so a resumed run would augment and
            # shuffle differently from an uninterrupted one.
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        """Members: the target's training set, shuffled and augmented.

        After a resume this is the first call that precedes the next training batch (the fit loop
        builds the loader after the sanity check, which Lightning runs under ``isolate_rng``), so
        the checkpoint's RNG state is restored here: the resumed epochs then shuffle, drop out and
        augment exactly as the uninterrupted run did.
        """
        if self._resumed_rng is not None:
            _set_global_rng_state(self._resumed_rng)
            self._resumed_rng = None
        return self.dataloader("target_train", shuffle=True, augment=True)

    def val_dataloader(self) -> DataLoader[Any]:
        """The target's validation set."""
        return self.dataloader("target_val")

    def test_dataloader(self) -> DataLoader[Any]:
        """Non-members: the target's held-out test set."""
        return self.dataloader("target_test")

    def predict_dataloader(self) -> DataLoader[Any]:
        """Non-members (the target's test set)."""
        return self.dataloader("target_test")

    def state_dict(self) -> dict[str, Any]:
        """Split indices and hashes, plus the global RNG state, stored in every checkpoint."""
        splits = self._require_splits()
        return {
            "indices": {role: splits.indices[role].tolist() for role in ROLES},
            "data_hash": splits.data_hash,
            "dataset": splits.dataset,
            "meta": splits.meta,
            "rng": _global_rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the split of a checkpoint, after checking it matches the data."""
        splits = Splits.from_state(state_dict)
        splits.check_matches(self.raw)
        self.splits = splits
        # Applied when the training loader is next built (see train_dataloader), not now: the
        # trainer still has set-up work to do that must not shift the restored streams.
        self._resumed_rng = state_dict.get("rng")
        folder = _run_folder(self.trainer)
        if folder is not None:
            # setup() ran before the checkpoint was restored and saved the config's split; the
            # checkpoint's split is the ground truth of this run, so it replaces that file.
            self._save_splits(folder, replace=True)


class _TabularFiles(MembershipDataModule):
    """Tabular set read from its real files under ``root``."""

    loader: Callable[..., RawDataset]

    def __init__(self, root: str = "data", download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download

    def load_raw(self) -> RawDataset:
        """Parse (or load the cache of) the real files."""
        return type(self).loader(self.root, download=self.download)


class Purchase100(_TabularFiles):
    """Purchase100: 197,324 shoppers x 600 binary features, 100 classes (``root/dataset_purchase``).

    Args:
        root: Folder holding ``dataset_purchase``.
        download: Fetch the public archive if missing.
        **kwargs: :class:`MembershipDataModule` arguments.
    """

    num_classes = 100
    input_shape = (600,)
    loader = staticmethod(ds.load_purchase100)


class Texas100(_TabularFiles):
    """Texas100: 67,330 patients x 6,169 binary features, 100 classes (``root/texas/100/``).

    Args:
        root: Folder holding ``texas/100/{feats,labels}`` or ``dataset_texas/{feats,labels}``.
        download: Fetch the public archive if missing.
        **kwargs: :class:`MembershipDataModule` arguments.
    """

    num_classes = 100
    input_shape = (6169,)
    loader = staticmethod(ds.load_texas100)


class Location30(_TabularFiles):
    """Location30: 5,010 users x 446 binary features, 30 classes (``root/bangkok``).

    Args:
        root: Folder holding ``bangkok``.
        download: Fetch the public archive if missing.
        **kwargs: :class:`MembershipDataModule` arguments.
    """

    num_classes = 30
    input_shape = (446,)
    loader = staticmethod(ds.load_location30)


class Digits(MembershipDataModule):
    """scikit-learn's embedded digits (1,797 x 64 in [0, 1], 10 classes): runs anywhere, offline.

    Args:
        **kwargs: :class:`MembershipDataModule` arguments.
    """

    num_classes = 10
    input_shape = (64,)

    def load_raw(self) -> RawDataset:
        """Load the embedded data set."""
        return ds.load_digits_dataset()


class _ImageFiles(MembershipDataModule):
    """Image set in torchvision's file formats; pixels scaled to [0, 1], no normalisation.

    Inputs stay in [0, 1] on purpose: PGD clamps to the valid pixel range and the crossbar's DAC
    calibrates on the model's real input range.
    """

    crop_padding: int = 0
    horizontal_flip: bool = False

    def __init__(self, root: str = "data", download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download

    @abstractmethod
    def _fetch(self) -> None:
        """Download the files through torchvision."""

    @abstractmethod
    def _read(self) -> RawDataset:
        """Read the files in their real format."""

    def load_raw(self) -> RawDataset:
        """Read the files, downloading them through torchvision first if asked to."""
        try:
            return self._read()
        except DataFileError:
            if not self.download:
                raise
        try:
            self._fetch()
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; torchvision's checks
            reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
            raise DataFileError(
                f"{type(self).__name__}: download into {self.root} failed ({reason}); fetch the "
                "files by hand (the error without download: true names them and their source)"
            ) from None
        return self._read()

    def _augmentation(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        from torchvision.transforms import v2

        steps: list[Any] = []
        if self.crop_padding:
            steps.append(v2.RandomCrop(self.input_shape[1], padding=self.crop_padding))
        if self.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps) if steps else None

    def _make_dataset(
        self, features: np.ndarray, labels: np.ndarray, augment: bool
    ) -> Dataset[Any]:
        return _ImageDataset(features, labels, self._augmentation() if augment else None)

    def _model_input(self, features: np.ndarray) -> np.ndarray:
        return features.transpose(0, 3, 1, 2).astype(np.float32) / 255.0


class CIFAR10(_ImageFiles):
    """CIFAR-10 (60,000 32x32 colour images, 10 classes) from ``root/cifar-10-batches-py``.

    Args:
        root: torchvision root folder.
        download: Download through torchvision if missing.
        **kwargs: :class:`MembershipDataModule` arguments.
    """

    num_classes = 10
    input_shape = (3, 32, 32)
    crop_padding = 4
    horizontal_flip = True

    def _fetch(self) -> None:
        from torchvision import datasets as tvd

        for train in (True, False):
            tvd.CIFAR10(self.root, train=train, download=True)

    def _read(self) -> RawDataset:
        return ds.load_cifar(self.root, num_classes=10)


class CIFAR100(CIFAR10):
    """CIFAR-100 (60,000 32x32 colour images, 100 classes) from ``root/cifar-100-python``."""

    num_classes = 100

    def _fetch(self) -> None:
        from torchvision import datasets as tvd

        for train in (True, False):
            tvd.CIFAR100(self.root, train=train, download=True)

    def _read(self) -> RawDataset:
        return ds.load_cifar(self.root, num_classes=100)


class MNIST(_ImageFiles):
    """MNIST (70,000 28x28 grey digits) from torchvision's IDX files in ``root/MNIST/raw``.

    Args:
        root: torchvision root folder.
        download: Download through torchvision if missing.
        **kwargs: :class:`MembershipDataModule` arguments.
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    variant = "MNIST"

    def _fetch(self) -> None:
        from torchvision import datasets as tvd

        cls = getattr(tvd, self.variant)
        for train in (True, False):
            cls(self.root, train=train, download=True)

    def _read(self) -> RawDataset:
        return ds.load_mnist_idx(self.root, variant=self.variant)


class FashionMNIST(MNIST):
    """Fashion-MNIST (70,000 28x28 grey images, 10 classes) from ``root/FashionMNIST/raw``."""

    variant = "FashionMNIST"


class SVHN(_ImageFiles):
    """SVHN cropped digits (99,289 32x32 colour images) from ``root/{train,test}_32x32.mat``.

    Args:
        root: torchvision root folder.
        download: Download through torchvision if missing.
        **kwargs: :class:`MembershipDataModule` arguments.
    """

    num_classes = 10
    input_shape = (3, 32, 32)
    crop_padding = 2

    def _fetch(self) -> None:
        from torchvision import datasets as tvd

        for split in ("train", "test"):
            tvd.SVHN(self.root, split=split, download=True)

    def _read(self) -> RawDataset:
        return ds.load_svhn(self.root)
