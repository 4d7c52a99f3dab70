"""Fashion-MNIST from the idx files of the Debian package ``dataset-fashion-mnist``, parsed with gzip + numpy.

No torchvision: it does not work on this machine, and the idx format is simple enough to read directly (with its
magic numbers and sizes checked). Parsed arrays are cached per process, so repeated loads are cheap.
The calibration slice that pruning methods look at is cut from the TRAINING set with a fixed seed, never from
the test set, so test accuracy stays an honest measure.

Example::

    >>> from fxprune.data import load_fashion_mnist, split_train, class_names
    >>> images, labels = load_fashion_mnist("train")        # (60000, 1, 28, 28) float32, (60000,) int64
    >>> train_x, train_y, calib_x, calib_y = split_train(images, labels, calib=1000)
    >>> test_x, test_y = load_fashion_mnist("test")
    >>> class_names[int(test_y[0])]
    'Ankle boot'
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .errors import ConfigError, DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "FXPRUNE_DATA_DIR"
MEAN, STD = 0.2860, 0.3530  # training-set pixel mean and std after scaling to [0, 1]

class_names = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049  # idx: 0x0803 = ubyte, 3 dims; 0x0801 = ubyte, 1 dim


def data_dir(path=None) -> Path:
    """The Fashion-MNIST folder: ``path`` if given, else $FXPRUNE_DATA_DIR, else the Debian package's folder."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def load_fashion_mnist(
    split: str = "train", data_dir: Optional[str] = None, normalize: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 and labels (N,) int64 of the ``"train"`` or ``"test"`` split.

    Pixels are scaled to [0, 1]; with ``normalize`` they are then standardised as (x - 0.2860) / 0.3530.
    """
    if split not in _FILES:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    folder = _resolve(data_dir)
    image_name, label_name = _FILES[split]
    images = _read_idx(_find(folder, image_name), _IMAGE_MAGIC)
    labels = _read_idx(_find(folder, label_name), _LABEL_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[1:] != (28, 28):
        raise DataError(f"{folder}: {split} images are {images.shape[1:]}, expected 28 x 28")
    if labels.size and labels.max() >= len(class_names):
        raise DataError(f"{folder}: {split} labels go up to {labels.max()}, expected 0..{len(class_names) - 1}")
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)  # astype copies: cache stays intact
    if normalize:
        x.sub_(MEAN).div_(STD)
    return x, torch.from_numpy(labels.astype(np.int64))


def split_train(
    images: torch.Tensor, labels: torch.Tensor, calib: int = 1000, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hold out ``calib`` random training samples for calibration: (train_x, train_y, calib_x, calib_y).

    Pass the TRAINING split: calibrating on test images would leak them into the pruning decisions.
    """
    n = len(images)
    if len(labels) != n:
        raise DataError(f"{n} images but {len(labels)} labels")
    if not isinstance(calib, int) or not 0 < calib < n:
        raise ConfigError(f"calib must be an integer in 1..{n - 1} for {n} samples, got {calib!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, kept = order[:calib], order[calib:].sort().values  # keep the training order otherwise unchanged
    return images[kept], labels[kept], images[held], labels[held]


def _resolve(path) -> Path:
    folder = data_dir(path)
    if not folder.is_dir():
        raise DataError(_missing(folder, "the folder does not exist"))
    return folder


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / (name + ".gz"), folder / name):
        if candidate.is_file():
            return candidate
    raise DataError(_missing(folder, f"{name}.gz is not there"))


def _missing(folder: Path, what: str) -> str:
    return (
        f"Fashion-MNIST not found in {folder}: {what}. Install it with `apt-get install -y dataset-fashion-mnist` "
        f"(files go to {DEFAULT_DIR}), or point ${ENV_VAR} / --data-dir at a folder holding the idx files."
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    st = path.stat()
    return _read_idx_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, magic)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int, magic: int) -> np.ndarray:
    # mtime and size are part of the key so a replaced file is read again rather than served stale.
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} cannot be read as {'gzip' if opener is gzip.open else 'idx'}: {e}") from e
    if len(raw) < 8:
        raise DataError(f"{path} is too short to be an idx file ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path} has magic number {found}, expected {magic}: not the idx file it is named after")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes but its header {shape} needs {expected}: truncated or corrupt")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    array.flags.writeable = False  # cached and shared between calls: nobody may edit it in place
    return array
