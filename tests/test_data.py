import gzip
import os

import numpy as np
import pytest
import torch

from fxprune import data
from fxprune.data import class_names, data_dir, load_fashion_mnist, split_train
from fxprune.errors import ConfigError, DataError

REAL = os.path.isfile(os.path.join(data.DEFAULT_DIR, "train-images-idx3-ubyte.gz"))
needs_real = pytest.mark.skipif(not REAL, reason="apt-get install -y dataset-fashion-mnist")


def write_idx(path, array, magic=None):
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_set(folder, n_train=5, n_test=3, value=255):
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.full((n, 28, 28), value))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


@needs_real
def test_real_files():
    x, y = load_fashion_mnist("train", normalize=False)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    assert abs(x.mean().item() - 0.2860) < 1e-3
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    xt, yt = load_fashion_mnist("test")
    assert xt.shape == (10000, 1, 28, 28) and torch.equal(torch.bincount(yt), torch.full((10,), 1000))
    assert len(class_names) == 10


@needs_real
def test_real_normalized_and_cached():
    before = data._read_idx_cached.cache_info().hits
    x, _ = load_fashion_mnist("train")
    assert abs(x.mean().item()) < 2e-3 and abs(x.std().item() - 1.0) < 2e-3
    x[0].zero_()  # editing a returned tensor must not reach the cache
    again, _ = load_fashion_mnist("train")
    assert again[0].abs().sum() > 0
    assert data._read_idx_cached.cache_info().hits >= before + 2


def test_env_var_and_explicit_dir(tmp_path, monkeypatch):
    env_dir, arg_dir = fake_set(tmp_path / "env", n_train=5), fake_set(tmp_path / "arg", n_train=7)
    monkeypatch.setenv("FXPRUNE_DATA_DIR", str(env_dir))
    assert data_dir() == env_dir
    x, y = load_fashion_mnist("train", normalize=False)
    assert x.shape == (5, 1, 28, 28) and torch.all(x == 1.0) and y.tolist() == [0, 1, 2, 3, 4]
    x, _ = load_fashion_mnist("train")
    assert torch.allclose(x, torch.full_like(x, (1.0 - 0.2860) / 0.3530))
    assert load_fashion_mnist("train", data_dir=arg_dir)[0].shape[0] == 7  # argument beats the env var
    assert load_fashion_mnist("test")[0].shape[0] == 3
    monkeypatch.delenv("FXPRUNE_DATA_DIR")
    assert str(data_dir()) == "/usr/share/datasets/fashion-mnist"


def test_missing_folder_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_fashion_mnist("train", data_dir=missing)
    msg = str(info.value)
    assert str(missing) in msg and "apt-get install -y dataset-fashion-mnist" in msg
    assert "FXPRUNE_DATA_DIR" in msg and "--data-dir" in msg


def test_missing_file_message(tmp_path):
    folder = fake_set(tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz") as info:
        load_fashion_mnist("test", data_dir=folder)
    assert str(folder) in str(info.value)


def test_malformed_files(tmp_path):
    folder = fake_set(tmp_path / "d")
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28)), magic=2049)
    with pytest.raises(DataError, match="magic"):
        load_fashion_mnist("train", data_dir=folder)

    fake_set(folder)
    path = folder / "train-labels-idx1-ubyte.gz"
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-2])
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist("train", data_dir=folder)

    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="gzip"):
        load_fashion_mnist("train", data_dir=folder)

    fake_set(folder, n_train=5)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(4))
    with pytest.raises(DataError, match="5 images but 4 labels"):
        load_fashion_mnist("train", data_dir=folder)


def test_bad_split_name(tmp_path):
    with pytest.raises(ConfigError):
        load_fashion_mnist("val", data_dir=fake_set(tmp_path / "d"))


def test_split_train_disjoint_and_sized():
    n = 500
    images, labels = torch.arange(n).float().view(n, 1), torch.arange(n) % 10
    tx, ty, cx, cy = split_train(images, labels, calib=120, seed=3)
    assert len(tx) == len(ty) == 380 and len(cx) == len(cy) == 120
    train_ids, calib_ids = set(tx.view(-1).long().tolist()), set(cx.view(-1).long().tolist())
    assert not train_ids & calib_ids and len(train_ids | calib_ids) == n
    assert torch.equal(cy, cx.view(-1).long() % 10)  # labels travel with their images
    again = split_train(images, labels, calib=120, seed=3)
    assert torch.equal(again[2], cx)  # fixed seed: the same held-out slice every time
    assert not torch.equal(split_train(images, labels, calib=120, seed=4)[2], cx)
    for bad in (0, n, -1):
        with pytest.raises(ConfigError):
            split_train(images, labels, calib=bad)
    with pytest.raises(DataError):
        split_train(images, labels[:-1])


@needs_real
def test_split_real_training_set():
    tx, ty, cx, cy = split_train(*load_fashion_mnist("train"))
    assert len(tx) == 59000 and len(cx) == 1000 and len(ty) == 59000 and len(cy) == 1000
