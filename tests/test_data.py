"""Membership splits and DataModules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar10, write_purchase

from nvmpriv.data import CIFAR10, ROLES, Digits, Purchase100, SplitFileError, Splits, make_splits


def test_default_fractions_are_yuan_zhang() -> None:
    roles = make_splits(1000, seed=0)
    sizes = {role: len(idx) for role, idx in roles.items()}
    assert (
        sizes["target_train"] == 225 and sizes["target_val"] == 50 and sizes["target_test"] == 225
    )
    assert (
        sizes["shadow_train"] == 225 and sizes["shadow_val"] == 50 and sizes["shadow_test"] == 225
    )
    # population defaults to the attacker's half
    shadow = np.concatenate([roles["shadow_train"], roles["shadow_val"], roles["shadow_test"]])
    np.testing.assert_array_equal(np.sort(shadow), roles["population"])


def test_roles_disjoint_and_cover() -> None:
    roles = make_splits(997, seed=3, population_fraction=0.2)
    seen: set[int] = set()
    for role in ROLES:
        idx = set(roles[role].tolist())
        assert not idx & seen, role
        seen |= idx
    assert seen == set(range(997))


def test_same_seed_same_split_other_seed_differs() -> None:
    a, b, c = make_splits(500, seed=1), make_splits(500, seed=1), make_splits(500, seed=2)
    assert all(np.array_equal(a[r], b[r]) for r in ROLES)
    assert not np.array_equal(a["target_train"], c["target_train"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_fraction": 0.6, "val_fraction": 0.5}, "must be < 1"),
        ({"target_fraction": 1.2}, "outside"),
        ({"max_samples": 0}, "positive"),
    ],
)
def test_bad_fractions(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_splits(100, seed=0, **kwargs)  # type: ignore[arg-type]


def test_split_file_round_trip_and_tamper(tmp_path: Path) -> None:
    dm = Digits()
    dm.setup()
    assert dm.splits is not None
    path = dm.splits.save(tmp_path)
    loaded = Splits.load(tmp_path)
    assert loaded.split_hash == dm.splits.split_hash
    loaded.check_matches(dm.raw)
    stored = dict(np.load(path))
    stored["idx_target_train"] = stored["idx_target_train"][:-1]
    np.savez(path, **stored)
    with pytest.raises(SplitFileError, match="hash check"):
        Splits.load(path)


def test_split_file_from_other_data_set_is_refused(tmp_path: Path) -> None:
    write_purchase(tmp_path)
    purchase = Purchase100(root=str(tmp_path))
    purchase.setup()
    assert purchase.splits is not None
    purchase.splits.save(tmp_path / "run")
    digits = Digits(splits_path=str(tmp_path / "run"))
    with pytest.raises(SplitFileError, match="made on purchase100"):
        digits.setup()


def test_reload_identity_through_splits_path(tmp_path: Path) -> None:
    first = Digits(seed=5)
    first.setup()
    assert first.splits is not None
    first.splits.save(tmp_path)
    second = Digits(seed=99, splits_path=str(tmp_path))
    second.setup()
    for role in ROLES:
        np.testing.assert_array_equal(first.indices(role), second.indices(role))


def test_state_dict_round_trip() -> None:
    a = Digits(seed=1)
    a.setup()
    b = Digits(seed=2)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.indices("target_test"), b.indices("target_test"))


def test_tabular_module_batches(tmp_path: Path) -> None:
    write_purchase(tmp_path)
    dm = Purchase100(root=str(tmp_path), batch_size=16)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 600) and x.dtype == torch.float32 and y.max() < 100
    xs, _ = dm.arrays("target_test")
    assert xs.shape[1] == 600 and len(xs) == len(dm.indices("target_test"))


def test_image_module_augments_only_training(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=40)
    dm = CIFAR10(root=str(tmp_path), batch_size=8)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    xs, _ = dm.arrays("target_train")
    clean = dm.dataset("target_train")[0][0].numpy()
    np.testing.assert_allclose(xs[0], clean, atol=1e-7)


def test_unknown_role() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        Digits().indices("members")


def test_worker_augmentation_replays_after_a_resume(tmp_path: Path) -> None:
    """With worker processes, epoch 1 after restoring the epoch-0 RNG state equals epoch 1 of an
    uninterrupted run (order and random crops/flips): nothing random lives only in a worker."""
    write_cifar10(tmp_path, per_batch=40)
    dm = CIFAR10(root=str(tmp_path), batch_size=8, num_workers=2)
    dm.setup()
    torch.manual_seed(0)
    loader = dm.train_dataloader()
    list(loader)  # epoch 0
    state = torch.get_rng_state()  # what the checkpoint at the end of epoch 0 holds
    uninterrupted = torch.cat([x for x, _ in loader])
    torch.set_rng_state(state)
    resumed = torch.cat([x for x, _ in dm.train_dataloader()])
    assert torch.equal(uninterrupted, resumed)


def test_capped_role_is_a_fixed_random_subset_not_the_first_rows() -> None:
    # A raw file ordered by class: the first 100 of 450 members would hold about two classes.
    labels = np.repeat(np.arange(10), 200)
    split = Splits(make_splits(len(labels), seed=0), data_hash="x", dataset="ordered")
    full = split.indices["target_train"]
    small, large = split.subset("target_train", 50), split.subset("target_train", 100)
    assert len(small) == 50 and len(large) == 100 and np.all(np.diff(large) > 0)
    assert set(small) <= set(large) <= set(full)  # nested: a smaller cap is a subset
    assert np.bincount(labels[full[:100]], minlength=10)[3:].sum() == 0  # what a prefix gives
    counts = np.bincount(labels[large], minlength=10)
    assert counts.min() >= 3 and counts.max() <= 20, counts
    same = Splits(dict(split.indices), data_hash="x", dataset="ordered")
    np.testing.assert_array_equal(same.subset("target_train", 100), large)
    other = split.subset("target_test", 100)
    assert not set(other) & set(large)
    np.testing.assert_array_equal(split.subset("target_train", None), full)
    np.testing.assert_array_equal(split.subset("target_train", 10**6), full)

    dm = Digits()
    x, y = dm.arrays("target_train", limit=40)
    idx = dm.splits.subset("target_train", 40) if dm.splits is not None else None
    assert idx is not None and len(x) == 40
    np.testing.assert_array_equal(y, dm.raw.labels[idx])
    assert not np.array_equal(idx, dm.indices("target_train")[:40])


def test_prepare_data_downloads_once_before_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning runs prepare_data on one process per node before setup on every process: the
    download happens there, so DDP ranks do not fetch and extract into one folder at once."""
    import tarfile

    from nvmpriv import datasets

    source = tmp_path / "src"
    source.mkdir()
    write_purchase(source, n=30)
    archive = source / "purchase.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "dataset_purchase", arcname="dataset_purchase")
    monkeypatch.setitem(datasets.ARCHIVES, "purchase100", archive.as_uri())
    offline = Purchase100(root=str(tmp_path / "offline"))
    offline.prepare_data()  # nothing to fetch and nothing read without download: true
    assert not (tmp_path / "offline").exists() and offline._raw is None
    dm = Purchase100(root=str(tmp_path / "data"), download=True)
    dm.prepare_data()
    assert (tmp_path / "data" / "dataset_purchase").is_file()
    monkeypatch.setitem(datasets.ARCHIVES, "purchase100", "file:///nonexistent.tgz")
    dm.setup("fit")  # reads what prepare_data fetched
    assert dm.raw.features.shape == (30, 600)
