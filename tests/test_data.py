"""Tests for mefbench.data: bundled datasets, on-disk loaders on tiny files, dequantisation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mefbench.data import (
    DATASETS,
    PATCH_PHOTOGRAPHS,
    SPLITS,
    UnsafePickleError,
    dequantize,
    load_dataset,
    random_hflip,
    split_sizes,
)

# ---------------------------------------------------------------------------------------------
# Registry and argument checks


def test_registry_fields() -> None:
    assert set(DATASETS) == {
        "patches32",
        "patches16",
        "digits",
        "cifar10",
        "imagenet32",
        "imagenet64",
    }
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.shape) == 3
    assert DATASETS["cifar10"].flip and DATASETS["patches32"].flip and DATASETS["patches16"].flip
    assert not DATASETS["digits"].flip and not DATASETS["imagenet32"].flip
    assert DATASETS["cifar10"].needs_data_dir and not DATASETS["patches32"].needs_data_dir


def test_unknown_name_and_split() -> None:
    with pytest.raises(ValueError, match=r"known datasets: .*cifar10"):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", "valid")


@pytest.mark.parametrize("name", ["cifar10", "imagenet32", "imagenet64"])
def test_missing_data_dir(name: str) -> None:
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset(name, "train")


# ---------------------------------------------------------------------------------------------
# Bundled datasets


@pytest.mark.parametrize(
    ("name", "size", "train_min", "test_min"),
    [
        ("patches32", 32, 1500, 200),
        ("patches16", 16, 6000, 800),
    ],
)
def test_patches(name: str, size: int, train_min: int, test_min: int) -> None:
    train = load_dataset(name, "train")
    test = load_dataset(name, "test")
    for x, floor in ((train, train_min), (test, test_min)):
        assert x.dtype == torch.uint8
        assert x.shape[1:] == (3, size, size)
        assert x.shape[0] >= floor
    assert torch.equal(train, load_dataset(name, "train"))  # deterministic
    # callers get their own copy
    train[0] = 0
    assert not torch.equal(train[0], load_dataset(name, "train")[0])
    # whole photographs held out: no tile occurs in two splits
    keys = {split: {bytes(t.numpy().tobytes()) for t in load_dataset(name, split)} for split in SPLITS}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


def test_patch_splits_are_whole_photographs_and_the_docstring_counts_them() -> None:
    """Every offline RGB photograph is in exactly one split, and the module docstring's table of
    photographs and tiles per split is what the loaders give (computed, not typed)."""
    import mefbench.data as data

    photos = [p for split in SPLITS for p in PATCH_PHOTOGRAPHS[split]]
    assert len(photos) == len(set(photos)) and {"motorcycle_left", "motorcycle_right"} <= set(
        PATCH_PHOTOGRAPHS["train"]
    )
    sizes = {name: split_sizes(name) for name in ("patches16", "patches32")}
    for split in SPLITS:
        row = f"{split:<10}  {len(PATCH_PHOTOGRAPHS[split]):<11}  {sizes['patches16'][split]['images']:<19}  "
        row += f"{sizes['patches32'][split]['images']}"
        assert row in data.__doc__, row
        assert sizes["patches16"][split]["photographs"] == len(PATCH_PHOTOGRAPHS[split])
    assert sizes["patches16"]["test"]["images"] > 2000 and len(PATCH_PHOTOGRAPHS["test"]) >= 3


def test_digits() -> None:
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    assert train.shape == (1500, 1, 8, 8) and test.shape == (297, 1, 8, 8)
    # no validation split of its own: the training split's tail (a validating run trains on the rest)
    assert torch.equal(load_dataset("digits", "validation"), train[-DATASETS["digits"].validation_tail :])
    assert train.dtype == torch.uint8
    assert int(train.max()) == 255 and int(train.min()) == 0
    # 17 grey levels mapped by round(v * 255 / 16)
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(torch.unique(torch.cat([train, test])).tolist()) <= levels


# ---------------------------------------------------------------------------------------------
# CIFAR-10 on tiny files in the official layouts


def _cifar_batches(folder: Path, rng: np.random.Generator, suffix: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """15 train images in five batch files and 2 test images, named as CIFAR-10 names them."""
    folder.mkdir(parents=True)
    train, test = (rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8) for n in (15, 2))
    batches = {f"data_batch_{i + 1}{suffix}": train[3 * i : 3 * i + 3] for i in range(5)}
    batches[f"test_batch{suffix}"] = test
    return train, test, batches


def _write_cifar_bin(folder: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, test, batches = _cifar_batches(folder, rng, ".bin")
    for fname, imgs in batches.items():
        labels = rng.integers(0, 10, size=(len(imgs), 1), dtype=np.uint8)
        (folder / fname).write_bytes(np.hstack([labels, imgs.reshape(len(imgs), -1)]).tobytes())
    return train, test


def _write_cifar_py(folder: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, test, batches = _cifar_batches(folder, rng, "")
    for fname, imgs in batches.items():
        d = {
            b"batch_label": fname.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, size=len(imgs))],
            b"data": imgs.reshape(len(imgs), -1),
            b"filenames": [f"img{i}.png".encode() for i in range(len(imgs))],
        }
        with open(folder / fname, "wb") as f:
            pickle.dump(d, f)
    return train, test


@pytest.mark.parametrize("layout", ["bin", "py"])
@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_roundtrip(tmp_path: Path, layout: str, point_at: str) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / f"cifar-10-batches-{layout}"
    writer = _write_cifar_bin if layout == "bin" else _write_cifar_py
    train, test = writer(folder, rng)
    data_dir = tmp_path if point_at == "parent" else folder
    got_train = load_dataset("cifar10", "train", data_dir)
    got_test = load_dataset("cifar10", "test", str(data_dir))
    assert got_train.dtype == torch.uint8 and got_train.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(got_train.numpy(), train)
    np.testing.assert_array_equal(got_test.numpy(), test)


def test_cifar10_channel_order(tmp_path: Path) -> None:
    """First 1024 bytes are the red plane, row-major: pixel (row 1, col 2) is byte 32 + 2."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rec = np.zeros(3073, dtype=np.uint8)
    rec[1 + 0 * 1024 + 32 * 1 + 2] = 10  # R at (1, 2)
    rec[1 + 1 * 1024 + 32 * 5 + 7] = 20  # G at (5, 7)
    rec[1 + 2 * 1024 + 32 * 31 + 0] = 30  # B at (31, 0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (folder / name).write_bytes(rec.tobytes())
    x = load_dataset("cifar10", "test", tmp_path)
    assert x[0, 0, 1, 2] == 10 and x[0, 1, 5, 7] == 20 and x[0, 2, 31, 0] == 30
    assert int(x.sum()) == 60


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > pwned.txt",))


def test_cifar10_malicious_pickle_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_py(folder, np.random.default_rng(1))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(UnsafePickleError, match=r"refusing to load global '(posix|nt|os)\.system'"):
        load_dataset("cifar10", "test", tmp_path)
    assert not (tmp_path / "pwned.txt").exists()
    # also catchable as the ValueError every other format error is
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", "test", tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_pickle_protocols(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    train, _ = _write_cifar_py(folder, np.random.default_rng(2))
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": train[:3].reshape(3, -1), b"labels": [1, 2, 3]}, f, protocol=protocol)
    np.testing.assert_array_equal(load_dataset("cifar10", "train", tmp_path).numpy(), train)


def test_cifar10_wrong_array_shape(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_py(folder, np.random.default_rng(3))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8)}, f)
    with pytest.raises(ValueError, match=r"test_batch.*\(N, 3072\)"):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar10_truncated_bin(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar_bin(folder, np.random.default_rng(4))
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"data_batch_3\.bin.*multiple of 3073.*cifar-10-batches-bin"):
        load_dataset("cifar10", "train", tmp_path)


def test_cifar10_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-bin"):
        load_dataset("cifar10", "train", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", "train", tmp_path)  # exists but empty
    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar_bin(folder, np.random.default_rng(5))
    (folder / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_4\.bin.*expected"):
        load_dataset("cifar10", "train", tmp_path)


# ---------------------------------------------------------------------------------------------
# Downsampled ImageNet on tiny files


def _write_npz(folder: Path, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    train = rng.integers(0, 256, size=(20, 3, size, size), dtype=np.uint8)
    for i in range(10):
        np.savez(
            folder / f"train_data_batch_{i + 1}.npz",
            data=train[2 * i : 2 * i + 2].reshape(2, -1),
            labels=np.arange(2),
        )
    val = rng.integers(0, 256, size=(3, 3, size, size), dtype=np.uint8)
    np.savez_compressed(folder / "val_data.npz", data=val.reshape(3, -1), labels=np.arange(3))
    return train, val


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_npz(tmp_path: Path, size: int) -> None:
    train, val = _write_npz(tmp_path, size, np.random.default_rng(size))
    name = f"imagenet{size}"
    np.testing.assert_array_equal(load_dataset(name, "train", tmp_path).numpy(), train)
    np.testing.assert_array_equal(load_dataset(name, "test", tmp_path).numpy(), val)


def test_imagenet_npz_official_subfolders(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    train, _ = _write_npz(tmp_path / "Imagenet32_train_npz", 32, rng)
    _, val = _write_npz(tmp_path / "Imagenet32_val_npz", 32, rng)
    np.testing.assert_array_equal(load_dataset("imagenet32", "train", tmp_path).numpy(), train)
    np.testing.assert_array_equal(load_dataset("imagenet32", "test", tmp_path).numpy(), val)


def test_imagenet_npz_wrong_size(tmp_path: Path) -> None:
    _write_npz(tmp_path, 32, np.random.default_rng(8))
    with pytest.raises(ValueError, match=r"val_data\.npz.*expected uint8 \(N, 12288\)"):
        load_dataset("imagenet64", "test", tmp_path)


def test_imagenet_npz_missing_batch(tmp_path: Path) -> None:
    _write_npz(tmp_path, 32, np.random.default_rng(9))
    (tmp_path / "train_data_batch_7.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_data_batch_7\.npz"):
        load_dataset("imagenet32", "train", tmp_path)


def _write_png_folder(folder: Path, size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    folder.mkdir(parents=True)
    imgs = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return imgs.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_png(tmp_path: Path, size: int) -> None:
    rng = np.random.default_rng(10)
    train = _write_png_folder(tmp_path / f"train_{size}x{size}", size, 4, rng)
    val = _write_png_folder(tmp_path / f"valid_{size}x{size}", size, 2, rng)
    name = f"imagenet{size}"
    np.testing.assert_array_equal(load_dataset(name, "train", tmp_path).numpy(), train)
    np.testing.assert_array_equal(load_dataset(name, "test", tmp_path).numpy(), val)


def test_imagenet_png_wrong_size(tmp_path: Path) -> None:
    folder = tmp_path / "valid_32x32"
    _write_png_folder(folder, 32, 2, np.random.default_rng(11))
    Image.fromarray(np.zeros((30, 32, 3), dtype=np.uint8)).save(folder / "bad.png")
    with pytest.raises(ValueError, match=r"bad\.png is 32x30, expected 32x32"):
        load_dataset("imagenet32", "test", tmp_path)


def test_imagenet_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train_data_batch_1\.\.10\.npz.*train_64x64"):
        load_dataset("imagenet64", "train", tmp_path)


# ---------------------------------------------------------------------------------------------
# Dequantisation and flips


def test_dequantize_range_and_bins() -> None:
    k = torch.arange(256, dtype=torch.uint8).repeat(400).view(100, 4, 16, 16)
    y = dequantize(k, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and y.shape == k.shape
    assert float(y.min()) >= -1.0 and float(y.max()) < 1.0
    assert torch.equal(torch.floor((y + 1) / 2 * 256).to(torch.uint8), k)
    # the noise fills each bin: mean offset within a bin is about 1/2
    u = (y.double() + 1) * 128 - k.double()
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert float(u.min()) < 0.01 and float(u.max()) > 0.99


def test_dequantize_extremes_and_determinism() -> None:
    k = torch.full((1000,), 255, dtype=torch.uint8)
    y = dequantize(k)
    assert float(y.max()) < 1.0
    assert torch.equal(torch.floor((y + 1) / 2 * 256), torch.full((1000,), 255.0))
    a = dequantize(k, torch.Generator().manual_seed(3))
    b = dequantize(k, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="uint8"):
        dequantize(k.float())


def test_random_hflip() -> None:
    x = torch.arange(64 * 2 * 3 * 5).view(64, 2, 3, 5)
    y = random_hflip(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(64)])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(64)])
    assert bool((flipped ^ kept).all())  # each image is either flipped or untouched
    assert 10 < int(flipped.sum()) < 54
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        random_hflip(x[0])
