"""Loaders, contract resolution and data checks on small fixtures made in tmp_path."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import onnx
import pytest
import torch

from onnxrepair.data.checks import check_all
from onnxrepair.data.contract import (
    METADATA_KEY,
    InputContract,
    contract_from_metadata,
    contract_to_metadata,
    finalize_contract,
    guess_layout,
    resolve_contract,
)
from onnxrepair.data.loaders import load_dataset, read_idx
from onnxrepair.errors import DataError, UsageError


def _imgs(n=6, c=3, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def test_npz_nchw_nhwc_nhw(tmp_path):
    x = _imgs()
    y = np.arange(6) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "b.npz", x=x.transpose(0, 2, 3, 1), y=y)
    np.savez(tmp_path / "c.npz", x=x[:, 0], y=y)
    a, b, c = (load_dataset(tmp_path / f"{k}.npz") for k in "abc")
    assert a.x.shape == (6, 3, 8, 8) and np.array_equal(a.x, x) and a.y.dtype == np.int64
    assert np.array_equal(b.x, x)  # NHWC transposed back
    assert c.x.shape == (6, 1, 8, 8) and np.array_equal(c.x[:, 0], x[:, 0])


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "nox.npz", z=np.zeros(3))
    with pytest.raises(DataError, match="no 'x'"):
        load_dataset(tmp_path / "nox.npz")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3, 4, 4)), y=np.zeros(0))
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "empty.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(tmp_path / "junk.npz")
    (tmp_path / "x.weird").write_bytes(b"1")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset(tmp_path / "x.weird")
    with pytest.raises(UsageError, match="no such"):
        load_dataset(tmp_path / "missing.npz")


@pytest.mark.parametrize("gray", [False, True])
def test_image_folder(tmp_path, gray):
    from PIL import Image

    x = _imgs(4, 1 if gray else 3)
    for i, cls in enumerate(["cat", "airplane"]):  # sorted: airplane=0, cat=1
        (tmp_path / cls).mkdir()
        for j in range(2):
            a = x[2 * i + j]
            im = Image.fromarray(a[0] if gray else a.transpose(1, 2, 0))
            im.save(tmp_path / cls / f"{j:04d}.png")
    ds = load_dataset(tmp_path)
    assert ds.classes == ["airplane", "cat"]
    assert ds.x.shape == (4, 1 if gray else 3, 8, 8) and ds.x.dtype == np.uint8
    assert list(ds.y) == [0, 0, 1, 1]
    assert np.array_equal(ds.x[2:], x[:2])  # cat images (written first) come after airplane
    r = load_dataset(tmp_path, resize=(16, 12))
    assert r.x.shape[2:] == (16, 12)


def test_image_folder_split_and_errors(tmp_path):
    from PIL import Image

    (tmp_path / "test" / "a").mkdir(parents=True)
    Image.fromarray(_imgs(1)[0].transpose(1, 2, 0)).save(tmp_path / "test" / "a" / "0.jpg")
    assert len(load_dataset(tmp_path, split="test")) == 1
    (tmp_path / "bad" / "k").mkdir(parents=True)
    (tmp_path / "bad" / "k" / "0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable image"):  # found from the header, before decoding anything
        load_dataset(tmp_path / "bad")


def _cifar_batch(path, x, y, key="labels"):
    with open(path, "wb") as f:
        pickle.dump({b"data": x.reshape(len(x), -1), key.encode(): list(map(int, y))}, f)


def test_cifar_batches(tmp_path):
    x = _imgs(5, 3, 32, 32)
    y = np.array([0, 1, 2, 3, 9])
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    _cifar_batch(d / "test_batch", x, y)
    _cifar_batch(d / "data_batch_1", x[:2], y[:2])
    _cifar_batch(d / "data_batch_2", x[2:], y[2:])
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    te = load_dataset(d)
    assert np.array_equal(te.x, x) and list(te.y) == list(y) and te.classes[9] == "c9"
    tr = load_dataset(d, split="train")
    assert np.array_equal(tr.x, x)
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    _cifar_batch(c100 / "test", x, y, key="fine_labels")
    with open(c100 / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"x"] * 100}, f)
    assert list(load_dataset(c100).y) == list(y)


def test_cifar_refuses_code_in_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "c"
    d.mkdir()
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataError, match="refusing"):
        load_dataset(d)


def _write_idx(path, arr, gz=False):
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    x = _imgs(7, 1, 28, 28)[:, 0]
    y = np.arange(7) % 10
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", x, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", y, gz)
    ds = load_dataset(tmp_path / f"t10k-images-idx3-ubyte{sfx}")
    assert ds.x.shape == (7, 1, 28, 28) and np.array_equal(ds.x[:, 0], x) and list(ds.y) == list(y)
    assert len(load_dataset(tmp_path)) == 7  # the folder works too
    (tmp_path / "trunc-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 9, 28, 28) + b"\0" * 10)
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "trunc-images-idx3-ubyte")


def test_limit_is_deterministic(tmp_path):
    np.savez(tmp_path / "a.npz", x=_imgs(20), y=np.arange(20) % 2)
    a = load_dataset(tmp_path / "a.npz", limit=5, seed=3)
    b = load_dataset(tmp_path / "a.npz", limit=5, seed=3)
    assert len(a) == 5 and np.array_equal(a.x, b.x)


# ----------------------------------------------------------------------------- contract


def test_guess_layout():
    assert guess_layout([None, 3, 32, 32])[0] == "nchw"
    assert guess_layout(["N", 32, 32, 3])[0] == "nhwc"
    assert guess_layout([1, 3, 8, 3])[0] is None  # ambiguous
    assert guess_layout([None, 784], (1, 28, 28))[0] == "flat"
    assert guess_layout([None, 10])[0] == "tabular"
    with pytest.raises(UsageError, match="--layout"):
        resolve_contract([1, 3, 8, 3])


def test_resolve_precedence_and_guess(tmp_path):
    sample = _imgs(2)
    c = resolve_contract([None, 3, 8, 8], sample)
    assert c.layout == "nchw" and c.scale == 255 and c.source == "guessed" and any("guessed" in n for n in c.notes)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[input]\nlayout = "nhwc"\nscale = 255\nmean = [0.5, 0.5, 0.5]\nstd = "0.25,0.25,0.25"\n')
    c = resolve_contract([None, 8, 8, 3], sample, config=str(cfg), std="0.5,0.5,0.5")
    assert c.layout == "nhwc" and c.mean == (0.5,) * 3 and c.std == (0.5,) * 3 and c.source == "flags+config"
    bad = tmp_path / "bad.toml"
    bad.write_text("layot = 'nchw'\n")
    with pytest.raises(UsageError, match="unknown input-contract keys"):
        resolve_contract([None, 3, 8, 8], sample, config=str(bad))
    with pytest.raises(UsageError, match="channels"):
        resolve_contract([None, 3, 8, 8], sample, mean="0.5,0.5")


def test_metadata_roundtrip_and_finalize():
    m = onnx.ModelProto()
    c = InputContract(layout="nhwc", scale=255.0, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0), image_shape=(3, 8, 8))
    contract_to_metadata(m, c)
    contract_to_metadata(m, c)  # replaces, does not duplicate
    assert [p.key for p in m.metadata_props] == [METADATA_KEY]
    back = contract_from_metadata(m)
    assert back.layout == "nhwc" and back.mean == c.mean and back.source == "metadata"
    # metadata is used when no flags are given; flags override it
    r = resolve_contract([None, 8, 8, 3], None, metadata=back)
    assert r.layout == "nhwc" and r.scale == 255 and r.std == c.std
    # provisional contract (no data yet) settles its scale from the data
    p = resolve_contract([None, 3, 8, 8], None)
    assert p.scale == 1.0 and "scale" in p.guessed
    finalize_contract(p, _imgs(2))
    assert p.scale == 255.0


def test_to_model_layouts():
    u = torch.rand(2, 3, 4, 5)
    c = InputContract(layout="nhwc", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = c.to_model(u)
    assert out.shape == (2, 4, 5, 3) and torch.allclose(out.permute(0, 3, 1, 2), (u - 0.5) / 0.5)


def test_checks():
    from onnxrepair.data.dataset import ArrayDataset

    ds = ArrayDataset(x=_imgs(4), y=np.array([0, 1, 2, 3]))
    c = InputContract(layout="nchw", scale=255.0)
    check_all(ds, c, [None, 3, 8, 8], 4)
    with pytest.raises(DataError, match=r"gives input \[N,3,8,8\].*takes \[N,3,16,16\]"):
        check_all(ds, c, [None, 3, 16, 16], 4)
    with pytest.raises(DataError, match="outside the model's output range"):
        check_all(ds, c, [None, 3, 8, 8], 3)
    bad = ArrayDataset(x=np.full((2, 3, 8, 8), np.nan, dtype=np.float32), y=np.array([0, 1]))
    with pytest.raises(DataError, match="NaN"):
        check_all(bad, c, [None, 3, 8, 8], 4)
