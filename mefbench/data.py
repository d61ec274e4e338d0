"""Datasets as in-memory 8-bit tensors, dequantisation and flip augmentation.

Every dataset is returned by :func:`load_dataset` as a ``torch.uint8`` tensor of shape
(N, C, H, W) holding the raw 8-bit pixels; labels are not kept. :func:`dequantize` turns a batch
into the model's float input in [-1, 1) (DESIGN §3) and :func:`random_hflip` is the flip
augmentation (used where ``DATASETS[name].flip`` is True).

Datasets that ship with installed packages (no ``data_dir``)
------------------------------------------------------------
``patches32``, ``patches16``
    Non-overlapping P×P tiles (stride P, row-major from the top-left corner, ragged borders
    dropped) cut from every natural RGB photograph in scikit-image's ``skimage.data`` that loads
    offline (0.26 ships nine; ``eagle``, ``lily``, ``skin`` and the rest need a pooch download,
    and the greyscale photographs, whose tiles would have R = G = B, are left out). Tiles whose
    range (max − min over all pixels and channels) is at most 4 grey levels are dropped: they
    are the black background of retina and clipped highlights, not image content. No
    randomness is involved. Whole photographs are held out, three ways
    (:data:`PATCH_PHOTOGRAPHS`):

    ==========  ========================================================================
    split       photographs
    ==========  ========================================================================
    train       astronaut, motorcycle_left, motorcycle_right (a stereo pair, so both stay
                in train), retina, hubble_deep_field
    validation  rocket (held out from the training photographs, for early stopping)
    test        chelsea, coffee, immunohistochemistry
    ==========  ========================================================================

    Sizes with scikit-image 0.26 (:func:`split_sizes` computes them; a test checks these):

    ==========  ===========  ===================  ===================
    split       photographs  patches16 tiles      patches32 tiles
    ==========  ===========  ===================  ===================
    train       5            13379                3365
    validation  1            1040                 260
    test        3            2448                 598
    ==========  ===========  ===================  ===================

``digits``
    scikit-learn's ``load_digits`` 8×8 images (levels 0..16) mapped to 8 bits with
    ``floor(v * 255 / 16 + 0.5)``, shape (N, 1, 8, 8). Fixed split: the first 1500 images are
    train, the last 297 test; validation is the last 200 training images (see below).

The validation split
--------------------
``load_dataset(name, "validation")`` exists for every dataset. The patches hold out their own
photographs. The others have no official validation split: theirs is the last
``DatasetInfo.validation_tail`` images of the official training split, and a run that
validates (``TrainConfig.validate``) trains on the images before them, so that it never
validates on an image it trained on; a run that does not validate trains on the whole official
split, as the paper does.

Datasets read from a user's directory (CLI ``--data-dir``)
----------------------------------------------------------
``cifar10`` (50000 train / 10000 test, 3×32×32). Either official release, extracted:

* binary version: ``cifar-10-batches-bin/data_batch_1.bin`` … ``data_batch_5.bin`` and
  ``test_batch.bin``; each record is 1 label byte then 3072 pixel bytes (1024 R, 1024 G,
  1024 B, each row-major 32×32);
* python version: ``cifar-10-batches-py/data_batch_1`` … ``data_batch_5`` and ``test_batch``;
  pickled dicts whose ``b'data'`` is a uint8 array of shape (N, 3072) in the same order. They
  are read with a restricted unpickler that only rebuilds numpy arrays (see
  :class:`UnsafePickleError`).

``data_dir`` may be the folder that contains ``cifar-10-batches-bin`` / ``cifar-10-batches-py``
or one of those folders itself. The binary version is used when both are present.

``imagenet32``, ``imagenet64`` (Oord et al. downsampled ImageNet, ~1.28M train / 50000 test,
3×S×S with S = 32 or 64; the test split is the validation set). ``data_dir`` is the folder
holding, for S = 32 (likewise 64):

* npz batches ``train_data_batch_1.npz`` … ``train_data_batch_10.npz`` and ``val_data.npz``,
  each with key ``data`` of shape (N, 3·S·S), uint8, flattened in C, H, W order. They may sit
  in ``data_dir`` itself or in the folders the official zips extract to,
  ``Imagenet32_train_npz/`` and ``Imagenet32_val_npz/``; or
* image folders ``train_32x32/*.png`` and ``valid_32x32/*.png`` (one S×S image per file,
  loaded in sorted file-name order).

The npz batches are used when present. ImageNet64 train takes about 16 GB of memory.
"""

from __future__ import annotations

import functools
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "PATCH_PHOTOGRAPHS",
    "SPLITS",
    "DatasetInfo",
    "UnsafePickleError",
    "dequantize",
    "load_dataset",
    "random_hflip",
    "split_sizes",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")

Loader = Callable[[str, str | Path | None], torch.Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    """One registered dataset.

    Args:
        name: registry key, as passed to :func:`load_dataset` and the CLI.
        shape: (C, H, W) of one image.
        needs_data_dir: whether the files must come from a user's directory (``--data-dir``).
        loader: ``loader(split, data_dir) -> uint8 tensor (N, C, H, W)``.
        description: one line for listings.
        flip: whether random horizontal flips are the standard training augmentation.
        validation_tail: 0 when the loader has its own validation split; otherwise the
            validation split is the last ``validation_tail`` images of the training split (and a
            run that validates trains on the images before them).
    """

    name: str
    shape: tuple[int, int, int]
    needs_data_dir: bool
    loader: Loader
    description: str
    flip: bool
    validation_tail: int = 0


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a global that the restricted CIFAR-10 unpickler does not allow."""


# ---------------------------------------------------------------------------------------------
# Public entry points


def load_dataset(name: str, split: str, data_dir: str | Path | None = None) -> torch.Tensor:
    """Load one split of a registered dataset as a uint8 tensor of shape (N, C, H, W).

    Args:
        name: a key of :data:`DATASETS`.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        data_dir: folder with the dataset's files; required when
            ``DATASETS[name].needs_data_dir``, ignored otherwise. The expected layouts are in
            this module's docstring.

    Returns:
        A fresh tensor that the caller may modify.
    """
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    info = DATASETS[name]
    if info.needs_data_dir and data_dir is None:
        raise ValueError(
            f"dataset {name!r} is read from disk: pass --data-dir (data_dir=...) pointing at "
            f"the folder that holds it ({_LAYOUT_HINTS[name]})"
        )
    if split == "validation" and info.validation_tail:
        x = info.loader("train", data_dir if info.needs_data_dir else None)[-info.validation_tail :].clone()
    else:
        x = info.loader(split, data_dir if info.needs_data_dir else None)
    if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != info.shape:
        raise RuntimeError(
            f"loader for {name!r} returned {x.dtype} {tuple(x.shape)}, expected uint8 "
            f"(N, {', '.join(map(str, info.shape))}); this is a bug in mefbench.data"
        )
    return x


# Largest u is 1 - 2^-16: then y = (k + u)/128 - 1 stays at least 2^-23 below the bin's upper
# edge, so y < 1 and floor((y + 1) / 2 * 256) == k hold exactly in float32 arithmetic.
_U_SCALE = 1.0 - 2.0**-16


def dequantize(x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """y = 2(k + u)/256 − 1 with u ~ U[0, 1) per entry: float32 in [−1, 1).

    Uniform dequantisation of 8-bit values k (DESIGN §3). u is drawn in float32 and scaled by
    1 − 2⁻¹⁶ so that, despite rounding, every y lies in its own bin:
    ``floor((y + 1) / 2 * 256) == k`` exactly, and y < 1.

    Args:
        x_uint8: uint8 tensor of any shape (usually (B, C, H, W)).
        generator: optional generator for the noise; the noise is drawn on its device and
            moved to ``x_uint8``'s device.
    """
    if x_uint8.dtype != torch.uint8:
        raise TypeError(
            f"dequantize expects the raw uint8 pixels, got {x_uint8.dtype}; pass the tensor "
            "returned by load_dataset (or a batch of it) before any conversion"
        )
    noise_device = generator.device if generator is not None else x_uint8.device
    u = torch.rand(x_uint8.shape, generator=generator, device=noise_device, dtype=torch.float32)
    u = (u * _U_SCALE).to(x_uint8.device)
    k = x_uint8.to(torch.float32)
    return (k / 128.0 - 1.0) + u / 128.0


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of a batch left-right with probability 1/2.

    Args:
        x: batch of shape (B, C, H, W), any dtype.
        generator: optional generator for the coin flips (drawn on its device).

    Returns:
        A new tensor of the same shape and dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"random_hflip expects a batch (B, C, H, W), got shape {tuple(x.shape)}")
    coin_device = generator.device if generator is not None else x.device
    flip = torch.rand(x.shape[0], generator=generator, device=coin_device) < 0.5
    flip = flip.to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


# ---------------------------------------------------------------------------------------------
# Patches from scikit-image's photographs

# Every RGB photograph scikit-image 0.26 ships without a download, split by photograph.
PATCH_PHOTOGRAPHS: dict[str, tuple[str, ...]] = {
    "train": ("astronaut", "motorcycle_left", "motorcycle_right", "retina", "hubble_deep_field"),
    "validation": ("rocket",),
    "test": ("chelsea", "coffee", "immunohistochemistry"),
}
_MIN_TILE_RANGE = 5  # tiles with max - min below this many grey levels are dropped


def _photo(name: str) -> np.ndarray:
    """One of scikit-image's RGB photographs as a uint8 (H, W, 3) array."""
    from skimage import data as skdata

    try:
        if name == "motorcycle_left":
            img = skdata.stereo_motorcycle()[0]
        elif name == "motorcycle_right":
            img = skdata.stereo_motorcycle()[1]
        else:
            img = getattr(skdata, name)()
    except Exception as err:
        raise RuntimeError(
            f"could not load skimage.data.{name} (needed by the patches datasets): {err}. "
            "The photographs ship inside scikit-image; reinstall scikit-image>=0.21"
        ) from err
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] < 3:
        raise RuntimeError(f"skimage.data.{name} gave {img.dtype} {img.shape}, expected an 8-bit RGB image")
    return img[:, :, :3]


def _tiles(img: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping size×size tiles, row-major, as (N, 3, size, size); flat tiles dropped."""
    rows, cols = img.shape[0] // size, img.shape[1] // size
    t = img[: rows * size, : cols * size].reshape(rows, size, cols, size, 3)
    t = t.transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, size, size)
    flat = t.reshape(len(t), -1)
    keep = (flat.max(axis=1).astype(np.int16) - flat.min(axis=1)) >= _MIN_TILE_RANGE
    return t[keep]


@functools.cache
def _cached_patches(size: int, split: str) -> torch.Tensor:
    tiles = np.concatenate([_tiles(_photo(p), size) for p in PATCH_PHOTOGRAPHS[split]])
    return torch.from_numpy(np.ascontiguousarray(tiles))


def split_sizes(name: str, data_dir: str | Path | None = None) -> dict[str, dict[str, int | None]]:
    """{split: {"images": N, "photographs": P}} of a dataset, counted from the loaded splits
    (``photographs`` is None for datasets that are not cut from photographs)."""
    out: dict[str, dict[str, int | None]] = {}
    for split in SPLITS:
        photos = len(PATCH_PHOTOGRAPHS[split]) if name.startswith("patches") else None
        out[split] = {"images": len(load_dataset(name, split, data_dir)), "photographs": photos}
    return out


def _patches_loader(size: int) -> Loader:
    def load(split: str, data_dir: str | Path | None = None) -> torch.Tensor:
        """Photograph tiles (cached per process; a clone is returned)."""
        return _cached_patches(size, split).clone()

    return load


# ---------------------------------------------------------------------------------------------
# scikit-learn digits

_DIGITS_TEST = 297


@functools.cache
def _cached_digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = np.asarray(load_digits().images, dtype=np.float64)  # (1797, 8, 8), 0..16
    x = np.floor(images * 255.0 / 16.0 + 0.5).astype(np.uint8)
    return torch.from_numpy(x[:, None])


def _load_digits(split: str, data_dir: str | Path | None = None) -> torch.Tensor:
    """8×8 digits in 8 bits; first 1500 train, last 297 test (a clone of a cached tensor)."""
    x = _cached_digits()
    return (x[:-_DIGITS_TEST] if split == "train" else x[-_DIGITS_TEST:]).clone()


# ---------------------------------------------------------------------------------------------
# CIFAR-10

_CIFAR_LAYOUT = (
    "expected cifar-10-batches-bin/{data_batch_1..5.bin, test_batch.bin} or "
    "cifar-10-batches-py/{data_batch_1..5, test_batch}, extracted from the official "
    "cifar-10-binary.tar.gz or cifar-10-python.tar.gz; data_dir may be the folder holding "
    "them or the batches folder itself"
)
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_files(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _find_cifar(data_dir: Path) -> tuple[str, Path]:
    """('bin' | 'py', folder holding the batch files)."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"CIFAR-10 data_dir {data_dir} is not a directory; {_CIFAR_LAYOUT}")
    for kind, sub, ext in (
        ("bin", "cifar-10-batches-bin", ".bin"),
        ("py", "cifar-10-batches-py", ""),
    ):
        for folder in (data_dir / sub, data_dir):
            if any((folder / (stem + ext)).is_file() for stem in ("data_batch_1", "test_batch")):
                return kind, folder
    raise FileNotFoundError(f"no CIFAR-10 batches found in {data_dir}; {_CIFAR_LAYOUT}")


def _read_cifar_bin(path: Path) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise ValueError(
            f"{path} has {raw.size} bytes, not a positive multiple of {_CIFAR_RECORD} "
            "(1 label byte + 3072 pixel bytes per image); the file is truncated or not a "
            f"CIFAR-10 binary batch ({_CIFAR_LAYOUT})"
        )
    return raw.reshape(-1, _CIFAR_RECORD)[:, 1:].reshape(-1, 3, 32, 32)


@functools.lru_cache(maxsize=1)
def _allowed_pickle_globals() -> dict[tuple[str, str], object]:
    """What a pickled uint8 numpy array inside a dict needs, under every numpy/Python version."""
    import _codecs

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray}
    allowed[("numpy", "dtype")] = np.dtype
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        # pickle protocol 5 rebuilds contiguous arrays with numeric._frombuffer
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer  # type: ignore[attr-defined]  # private: not in numpy's stubs
    # Python 3 writes bytes at protocol <= 2 as _codecs.encode(str, "latin1")
    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed to rebuild numpy arrays."""

    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        try:
            return _allowed_pickle_globals()[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global '{module}.{name}'; CIFAR-10 python "
                "batches may only contain dicts, lists, bytes, ints and numpy uint8 arrays. "
                "Use the official files, or the binary version (cifar-10-batches-bin)"
            ) from None


def _read_cifar_py(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as err:
            raise ValueError(
                f"{path} is not a readable CIFAR-10 python batch ({type(err).__name__}: {err}); "
                f"the file may be truncated ({_CIFAR_LAYOUT})"
            ) from err
    data = obj.get(b"data", obj.get("data")) if isinstance(obj, dict) else obj
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(
            f"{path}: expected a dict whose b'data' is a uint8 array of shape (N, 3072), got {got} ({_CIFAR_LAYOUT})"
        )
    return data.reshape(-1, 3, 32, 32)


def _load_cifar10(split: str, data_dir: str | Path | None) -> torch.Tensor:
    """CIFAR-10 from either official on-disk version (see the module docstring)."""
    kind, folder = _find_cifar(Path(data_dir))  # type: ignore[arg-type]
    parts = []
    for stem in _cifar_files(split):
        path = folder / (stem + ".bin" if kind == "bin" else stem)
        if not path.is_file():
            raise FileNotFoundError(f"missing CIFAR-10 file {path}; {_CIFAR_LAYOUT}")
        parts.append(_read_cifar_bin(path) if kind == "bin" else _read_cifar_py(path))
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts)))


# ---------------------------------------------------------------------------------------------
# Downsampled ImageNet (Oord et al.)


def _imagenet_layout(size: int) -> str:
    return (
        f"expected in data_dir either train_data_batch_1..10.npz and val_data.npz (key 'data', "
        f"uint8 (N, {3 * size * size}); also found under Imagenet{size}_train_npz/ and "
        f"Imagenet{size}_val_npz/), or image folders train_{size}x{size}/*.png and "
        f"valid_{size}x{size}/*.png"
    )


def _npz_files(root: Path, size: int, split: str) -> list[Path] | None:
    """The split's npz files, or None when this layout is absent."""
    if split == "train":
        names = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
        folders = (root, root / f"Imagenet{size}_train_npz")
    else:
        names = ["val_data.npz"]
        folders = (root, root / f"Imagenet{size}_val_npz")
    for folder in folders:
        if (folder / names[0]).is_file():
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; {_imagenet_layout(size)}")
            return [folder / n for n in names]
    return None


def _npz_data_rows(path: Path) -> int:
    """Number of rows of 'data' in an npz, read from the .npy header without loading it."""
    with zipfile.ZipFile(path) as zf:
        if "data.npy" not in zf.namelist():
            raise ValueError(f"{path} has no key 'data' (keys: {zf.namelist()})")
        with zf.open("data.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return int(shape[0]) if shape else 0


def _load_imagenet_npz(files: list[Path], size: int) -> torch.Tensor:
    out = torch.empty((sum(_npz_data_rows(p) for p in files), 3, size, size), dtype=torch.uint8)
    row = 0
    for path in files:
        with np.load(path, allow_pickle=False) as npz:
            data = npz["data"]
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * size * size:
            raise ValueError(
                f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 "
                f"(N, {3 * size * size}) for {size}x{size} images; {_imagenet_layout(size)}"
            )
        out[row : row + len(data)] = torch.from_numpy(data.reshape(-1, 3, size, size))
        row += len(data)
    return out


def _load_imagenet_png(folder: Path, size: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .png files; {_imagenet_layout(size)}")
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as img:
            if img.size != (size, size):
                raise ValueError(
                    f"{path} is {img.size[0]}x{img.size[1]}, expected {size}x{size}; {_imagenet_layout(size)}"
                )
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        out[i] = torch.from_numpy(arr.transpose(2, 0, 1).copy())
    return out


def _imagenet_loader(size: int) -> Loader:
    def load(split: str, data_dir: str | Path | None) -> torch.Tensor:
        """Downsampled ImageNet from npz batches or PNG folders (see the module docstring)."""
        root = Path(data_dir)  # type: ignore[arg-type]
        if not root.is_dir():
            raise FileNotFoundError(f"ImageNet data_dir {root} is not a directory; {_imagenet_layout(size)}")
        files = _npz_files(root, size, split)
        if files is not None:
            return _load_imagenet_npz(files, size)
        folder = root / f"{'train' if split == 'train' else 'valid'}_{size}x{size}"
        if folder.is_dir():
            return _load_imagenet_png(folder, size)
        raise FileNotFoundError(f"no ImageNet {size}x{size} {split} data in {root}; {_imagenet_layout(size)}")

    return load


# ---------------------------------------------------------------------------------------------
# Registry

_LAYOUT_HINTS: dict[str, str] = {
    "cifar10": _CIFAR_LAYOUT,
    "imagenet32": _imagenet_layout(32),
    "imagenet64": _imagenet_layout(64),
}

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "patches32",
            (3, 32, 32),
            False,
            _patches_loader(32),
            "32x32 RGB tiles of scikit-image photographs; validation and test photographs held out",
            True,
        ),
        DatasetInfo(
            "patches16",
            (3, 16, 16),
            False,
            _patches_loader(16),
            "16x16 RGB tiles of scikit-image photographs; validation and test photographs held out",
            True,
        ),
        DatasetInfo(
            "digits",
            (1, 8, 8),
            False,
            _load_digits,
            "scikit-learn 8x8 handwritten digits in 8 bits (1500 train / 297 test)",
            False,
            200,
        ),
        DatasetInfo(
            "cifar10",
            (3, 32, 32),
            True,
            _load_cifar10,
            "CIFAR-10 from --data-dir (binary or python version)",
            True,
            5000,
        ),
        DatasetInfo(
            "imagenet32",
            (3, 32, 32),
            True,
            _imagenet_loader(32),
            "downsampled ImageNet 32x32 from --data-dir (npz batches or PNG folders)",
            False,
            10000,
        ),
        DatasetInfo(
            "imagenet64",
            (3, 64, 64),
            True,
            _imagenet_loader(64),
            "downsampled ImageNet 64x64 from --data-dir (npz batches or PNG folders)",
            False,
            10000,
        ),
    )
}
