"""Tests of the datasets and the Dirichlet partition."""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_hyperprism.setup import data as data_module
from flwr_hyperprism.setup.data import (
    NUM_CLASSES,
    dirichlet_partition,
    load_dataset,
    synthetic_dataset,
)

# --- helpers -------------------------------------------------------------------------------


def balanced_labels(n: int, classes: int = NUM_CLASSES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % classes)


def label_histograms(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """(num_partitions, classes) label fractions of each partition."""
    counts = np.stack([np.bincount(labels[p], minlength=NUM_CLASSES) for p in parts])
    return counts / counts.sum(axis=1, keepdims=True)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == n
    np.testing.assert_array_equal(np.sort(merged), np.arange(n))
    for part in parts:
        assert part.dtype == np.int64
        assert (np.diff(part) > 0).all()  # sorted, no duplicates


# --- Dirichlet partition -------------------------------------------------------------------


@pytest.mark.parametrize("alpha", (0.05, 0.1, 1.0, 1e3))
@pytest.mark.parametrize("num_partitions", (1, 5, 20))
def test_partition_assigns_every_index_once_and_meets_min_size(num_partitions, alpha):
    labels = balanced_labels(3000)

    parts = dirichlet_partition(labels, num_partitions, alpha, seed=1, min_size=10)

    assert len(parts) == num_partitions
    assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 10


def test_partition_handles_unbalanced_and_non_contiguous_labels():
    labels = np.repeat([3, 7, 42], [500, 100, 10])

    parts = dirichlet_partition(labels, 4, alpha=0.5, seed=3, min_size=5)

    assert_exact_cover(parts, len(labels))


def test_large_alpha_gives_near_uniform_label_histograms():
    labels = balanced_labels(10_000)

    hist = label_histograms(labels, dirichlet_partition(labels, 5, alpha=1e3, seed=2))

    # Each share ~ Dirichlet(1e3): standard deviation ~0.006 around 0.2 of a class.
    np.testing.assert_allclose(hist, 1 / NUM_CLASSES, atol=0.02)


def test_small_alpha_gives_skewed_label_histograms():
    labels = balanced_labels(10_000)

    hist = label_histograms(labels, dirichlet_partition(labels, 5, alpha=0.1, seed=2))

    assert hist.max(axis=1).mean() > 0.4  # a dominant class per partition (uniform: 0.1)
    assert (hist < 0.01).sum() >= 10  # and many classes (nearly) absent


def test_partition_is_deterministic_under_seed():
    labels = balanced_labels(2000)

    def draw(seed):
        return dirichlet_partition(labels, 6, alpha=0.3, seed=seed)

    first, again, other = draw(7), draw(7), draw(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_too_many_partitions_for_min_size_raise():
    with pytest.raises(ValueError, match=r"min-partition-size=10.*lower num-nodes"):
        dirichlet_partition(balanced_labels(99), 10, alpha=1.0, seed=0, min_size=10)


def test_unreachable_min_size_raises_after_retries():
    # 100 samples for 10 partitions of >= 10 each: only an exactly even split would do.
    with pytest.raises(ValueError, match=r"did not give every partition.*raise alpha"):
        dirichlet_partition(balanced_labels(100), 10, alpha=0.1, seed=0, min_size=10,
                            max_attempts=5)


@pytest.mark.parametrize("kwargs", ({"num_partitions": 0}, {"alpha": 0.0}, {"alpha": -1.0},
                                    {"alpha": float("nan")}))
def test_bad_partition_arguments_raise(kwargs):
    args = {"labels": balanced_labels(100), "num_partitions": 2, "alpha": 1.0, "seed": 0} | kwargs
    with pytest.raises(ValueError, match="num_partitions|alpha"):
        dirichlet_partition(**args)


# --- synthetic dataset ---------------------------------------------------------------------


def test_synthetic_dataset_shapes_and_types():
    data = synthetic_dataset(0, num_train=300, num_test=50)

    assert data.train.x.shape == (300, 1, 28, 28) and data.test.x.shape == (50, 1, 28, 28)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert len(data.train) == 300 and len(data.test) == 50
    assert data.input_shape == (1, 28, 28)
    assert set(data.train.y.tolist()) == set(range(NUM_CLASSES))


def test_synthetic_dataset_is_a_function_of_the_seed():
    first, again, other = (synthetic_dataset(s, num_train=200, num_test=20) for s in (4, 4, 5))

    for a, b in ((first.train, again.train), (first.test, again.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(first.train.x, other.train.x)


def test_load_dataset_synthetic_needs_no_data_dir(monkeypatch):
    small = functools.partial(synthetic_dataset, num_train=40, num_test=10)
    monkeypatch.setattr(data_module, "synthetic_dataset", small)

    data = load_dataset("synthetic", seed=3)

    assert torch.equal(data.test.x, small(3).test.x)


# --- torchvision datasets from tiny IDX files ----------------------------------------------

_IMAGE_MAGIC, _LABEL_MAGIC = 0x00000803, 0x00000801
_FOLDERS = {"mnist": ("MNIST", 0.1307, 0.3081), "fashion-mnist": ("FashionMNIST", 0.2860, 0.3530)}


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_layout(root: Path, folder: str, sizes=(12, 5), seed=0) -> dict:
    """Write tiny train/t10k IDX files under root/folder/raw; return the arrays written."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in zip(("train", "t10k"), sizes):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, NUM_CLASSES, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", _IMAGE_MAGIC, images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", _LABEL_MAGIC, labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("name", _FOLDERS)
def test_load_torchvision_dataset_from_idx_files(tmp_path, name):
    folder, mean, std = _FOLDERS[name]
    arrays = write_mnist_layout(tmp_path, folder)

    data = load_dataset(name, str(tmp_path))

    for split, prefix in ((data.train, "train"), (data.test, "t10k")):
        images, labels = arrays[prefix]
        assert split.x.shape == (len(labels), 1, 28, 28) and split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
        np.testing.assert_array_equal(split.y.numpy(), labels)
        expected = (images[:, None].astype(np.float64) / 255.0 - mean) / std
        np.testing.assert_allclose(split.x.numpy(), expected, rtol=0, atol=1e-5)
    assert data.input_shape == (1, 28, 28)


@pytest.mark.parametrize("name", _FOLDERS)
def test_missing_files_raise_file_not_found_naming_dir_and_download(tmp_path, name):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, str(tmp_path))

    message = str(info.value)
    assert str(tmp_path) in message and "download" in message


def test_missing_test_split_raises_file_not_found(tmp_path):
    write_mnist_layout(tmp_path, "MNIST")
    for path in (tmp_path / "MNIST" / "raw").glob("t10k-*"):
        path.unlink()

    with pytest.raises(FileNotFoundError, match="download"):
        load_dataset("mnist", str(tmp_path))


def test_wrong_folder_is_not_found(tmp_path):
    write_mnist_layout(tmp_path, "MNIST")  # MNIST files do not make a FashionMNIST dataset

    with pytest.raises(FileNotFoundError):
        load_dataset("fashion-mnist", str(tmp_path))


@pytest.mark.parametrize("name", ("mnist", "fashion-mnist", "cifar10"))
def test_empty_data_dir_raises_value_error(name):
    with pytest.raises(ValueError, match=r"data-dir"):
        load_dataset(name, "")


def test_unknown_dataset_raises_value_error():
    with pytest.raises(ValueError, match=r"'imagenet'.*synthetic"):
        load_dataset("imagenet", "/tmp")


def test_load_cifar10_from_python_batches(tmp_path, cifar10_files):
    dataset = load_dataset("cifar10", str(tmp_path))

    assert dataset.train.x.shape == (100, 3, 32, 32) and dataset.test.x.shape == (20, 3, 32, 32)
    assert dataset.test.y.tolist() == [c for c in range(10) for _ in range(2)]
    red = cifar10_files["test_batch"][0, :1024].reshape(32, 32) / 255.0
    expected = (red - 0.4914) / 0.2470  # channel 0 is red, normalised
    np.testing.assert_allclose(dataset.test.x[0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
