"""Lazy data (onnxrepair.data.lazy): image folders and uncompressed .npz images read on demand.

The folders are made in tmp_path from the committed ``fixtures/data/mnist_small.npz`` (PNG, lossless, so the lazy
folder must give the npz's pixels exactly; JPEG, compared with Pillow decoding each file directly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxrepair.cli import main
from onnxrepair.data import lazy, loaders
from onnxrepair.data.contract import InputContract
from onnxrepair.data.dataset import ArrayDataset
from onnxrepair.data.loaders import load_dataset
from onnxrepair.errors import DataError
from onnxrepair.evaluate import evaluate_models

FIX = Path(__file__).resolve().parents[1] / "fixtures"
LENET = FIX / "models" / "torch_lenet_legacy11.onnx"


def _mnist(n: int = 200):
    with np.load(FIX / "data" / "mnist_small.npz") as z:
        x, y = z["x"][:n], z["y"][:n].astype(np.int64)
    return (x[:, None] if x.ndim == 3 else x), y


def _write_folder(root: Path, x: np.ndarray, y: np.ndarray, ext: str = "png") -> tuple[np.ndarray, np.ndarray]:
    """Images into root/<class>/NNNNN.ext; returns (x, y) in the folder's order (classes sorted, names sorted)."""
    from PIL import Image

    order = []
    for c in np.unique(y):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in np.flatnonzero(y == c):
            Image.fromarray(x[i, 0]).save(d / f"{i:05d}.{ext}", quality=90) if ext == "jpg" else Image.fromarray(x[i, 0]).save(d / f"{i:05d}.{ext}")
            order.append(i)
    order = np.array(order)
    return x[order], y[order]


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    x, y = _mnist()
    root = tmp_path_factory.mktemp("png")
    xs, ys = _write_folder(root, x, y)
    return root, xs, ys


def _source(ds: ArrayDataset) -> lazy.FolderSource:
    assert isinstance(ds.x, lazy.LazyArray)
    return ds.x.source


def test_png_folder_equals_the_arrays_and_the_accuracy(png_folder):
    root, xs, ys = png_folder
    ds = load_dataset(root)
    assert isinstance(ds.x, lazy.LazyArray) and ds.x.shape == xs.shape and ds.x.dtype == np.uint8
    assert _source(ds).reads == 0  # loading decodes nothing
    assert np.array_equal(ds.x, xs) and np.array_equal(ds.y, ys)
    c = InputContract(layout="nchw", scale=255.0)
    lazy_rep = evaluate_models([LENET], ds, c, blur=True, batch_size=64, provider="cpu")
    eager_rep = evaluate_models([LENET], ArrayDataset(x=xs, y=ys), c, blur=True, batch_size=64, provider="cpu")
    assert lazy_rep.models[0].clean == eager_rep.models[0].clean > 0.5
    assert lazy_rep.models[0].blur == eager_rep.models[0].blur


def test_jpeg_folder_equals_pillow(tmp_path):
    from PIL import Image

    x, y = _mnist(60)
    _write_folder(tmp_path, x, y, "jpg")
    ds = load_dataset(tmp_path)
    files = sorted(tmp_path.glob("*/*.jpg"), key=lambda p: (p.parent.name, p.name))
    want = np.stack([np.asarray(Image.open(f).convert("L"))[None] for f in files])
    assert np.array_equal(ds.x[:], want)
    assert np.array_equal(ds.x[[5, 2, 59]], want[[5, 2, 59]])  # any order, through the worker pool


def test_indexing_like_numpy(png_folder):
    root, xs, _ = png_folder
    x = load_dataset(root).x
    mask = np.zeros(len(xs), bool)
    mask[[3, 7, 150]] = True
    for key in (5, -1, slice(10, 20), slice(None, None, 37), np.array([4, 4, 0]), mask, np.array([[1, 2], [3, 4]])):
        assert np.array_equal(x[key], xs[key]), key
    assert np.array_equal(x[:5, 0], xs[:5, 0]) and np.array_equal(x[3, :, 2:4], xs[3, :, 2:4])
    assert np.array_equal(x[np.array([], dtype=np.int64)], xs[:0])
    with pytest.raises(IndexError):
        x[len(xs)]
    sub = x.subset(np.array([9, 1, 30]))
    assert np.array_equal(sub[1:], xs[[1, 30]]) and np.array_equal(sub.subset(slice(0, 1))[0], xs[9])


def test_cache_is_bounded(png_folder):
    root, xs, _ = png_folder
    row = int(np.prod(xs.shape[1:]))
    ds = loaders.load_image_folder(root, cache_bytes=10 * row, workers=2)
    src = _source(ds)
    assert src.cache_rows == 10
    for lo in range(0, len(xs), 32):
        ds.x[lo : lo + 32]
        assert src.cached <= 10
    assert src.reads == len(xs)
    assert np.array_equal(ds.x[-5:], xs[-5:])  # the most recent rows come from the cache: nothing decoded again
    assert src.reads == len(xs)
    assert np.array_equal(ds.x[-10:], xs[-10:]) and src.reads == len(xs)
    ds.x[:5]  # the first rows were evicted long ago
    assert src.reads == len(xs) + 5
    off = loaders.load_image_folder(root, cache_bytes=0)
    off.x[:3], off.x[:3]
    assert _source(off).cached == 0 and _source(off).reads == 6


def test_subsets_decode_only_their_rows(png_folder, monkeypatch):
    root, xs, ys = png_folder
    ds = load_dataset(root)
    src = _source(ds)
    seen: list[int] = []
    decode = src._decode
    monkeypatch.setattr(src, "_decode", lambda i, out: (seen.append(int(i)), decode(i, out)))
    rest, part = ds.split(0.2, seed=1)
    small = rest.limit(40, seed=2)
    assert not seen  # views read nothing
    assert np.array_equal(small.x, xs[small.x.rows]) and sorted(seen) == sorted(small.x.rows.tolist())
    seen.clear()
    rep = evaluate_models([LENET], part, InputContract(layout="nchw", scale=255.0), blur=False, limit=25, batch_size=8, provider="cpu")
    assert rep.n == 25 and seen and set(seen) <= set(part.x.rows.tolist()) and len(set(seen)) == 25


def test_limit_through_load_dataset_and_resize(png_folder):
    root, xs, _ = png_folder
    ds = load_dataset(root, limit=30, seed=3, resize=(14, 14))
    assert isinstance(ds.x, lazy.LazyArray) and ds.x.shape == (30, 1, 14, 14)
    assert _source(ds).reads == 0
    ds.x[:4]
    assert _source(ds).reads == 4
    r = loaders.resize_images(ds.x, (7, 9))  # a lazy array is resized lazily, per batch
    assert isinstance(r, lazy.LazyArray) and r.shape == (30, 1, 7, 9)
    assert np.array_equal(r[:3], loaders.resize_images(np.asarray(ds.x[:3]), (7, 9)))


def _corrupt_folder(tmp_path: Path) -> tuple[Path, Path]:
    x, y = _mnist(40)
    _write_folder(tmp_path / "d", x, y, "jpg")
    bad = sorted((tmp_path / "d").glob("*/*.jpg"))[20]  # in the middle
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header still reads: found when decoded
    return tmp_path / "d", bad


def test_truncated_jpeg_is_named_when_reached(tmp_path):
    root, bad = _corrupt_folder(tmp_path)
    ds = load_dataset(root)  # the scan reads headers only: the file passes
    ds.x[:5]
    with pytest.raises(DataError, match=f"{bad.name}: cannot decode image"):
        np.asarray(ds.x)


def test_truncated_jpeg_cli_exit_2_nothing_written(tmp_path, capsys):
    root, bad = _corrupt_folder(tmp_path)
    report = tmp_path / "r.json"
    rc = main(["evaluate", str(LENET), "--data", str(root), "--no-blur", "--batch-size", "8", "-q", "--provider", "cpu", "--report", str(report)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(bad) in err[0] and "cannot decode image" in err[0]
    assert not report.exists()


def test_npz_uncompressed_is_read_lazily(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "LAZY_NPZ_MIN_BYTES", 0)
    x, y = _mnist(100)
    nhwc = np.ascontiguousarray(np.repeat(x, 3, axis=1).transpose(0, 2, 3, 1))
    np.savez(tmp_path / "a.npz", x=nhwc, y=y)
    np.savez(tmp_path / "b.npz", x=x[:, 0], y=y)  # (N, H, W)
    np.savez_compressed(tmp_path / "c.npz", x=nhwc, y=y)
    a, b, c = (load_dataset(tmp_path / f"{k}.npz") for k in "abc")
    assert isinstance(a.x, lazy.LazyArray) and isinstance(a.x.source, lazy.NpyMemberSource)
    assert a.x.shape == (100, 3, 28, 28) and np.array_equal(a.x, nhwc.transpose(0, 3, 1, 2))
    idx = np.array([99, 3, 4, 5, 50])
    assert np.array_equal(a.x[idx], nhwc.transpose(0, 3, 1, 2)[idx]) and a.x.source.reads == 100 + 5
    assert isinstance(b.x, lazy.LazyArray) and np.array_equal(b.x, x)
    assert isinstance(c.x, np.ndarray) and np.array_equal(c.x, a.x) and any("compressed" in n and "read whole" in n for n in c.notes)
    s = a.limit(10, seed=0)
    before = a.x.source.reads
    np.asarray(s.x)
    assert a.x.source.reads == before + 10


def test_npz_below_the_threshold_is_an_array(tmp_path):
    x, y = _mnist(20)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    assert isinstance(load_dataset(tmp_path / "a.npz").x, np.ndarray)


def test_repair_with_limit_decodes_only_its_subset(png_folder, tmp_path, monkeypatch):
    """`repair --limit 60` on a lazy folder of 200 images decodes rows of that 60-image subset only (the contract is
    settled from the subset, the splits are views, the method trains on its part)."""
    root, xs, _ = png_folder
    decoded: list[int] = []
    orig = lazy.FolderSource._decode

    def counting(self, i, out):
        decoded.append(int(i))
        return orig(self, i, out)

    monkeypatch.setattr(lazy.FolderSource, "_decode", counting)
    out = tmp_path / "r.onnx"
    rc = main(["--threads", "1", "repair", str(LENET), "--method", "finetune-last", "--data", str(root), "--limit", "60", "--epochs", "1",
               "-o", str(out), "-q", "--provider", "cpu", "--device", "cpu", "--force"])
    assert rc == 0 and out.exists()
    rows = set(np.sort(np.random.default_rng(0).permutation(len(xs))[:60]).tolist())  # ArrayDataset.limit(60, seed=0)
    assert decoded and set(decoded) <= rows
