"""Read datasets from local files into :class:`ArrayDataset` (raw values, channel-first).

``load_dataset(path)`` dispatches on what ``path`` is:

* ``*.npz`` with ``x``/``y`` (also ``x_test``/``y_test``, ``images``/``labels``); NHWC arrays are
  transposed to channel-first when the channel axis is unambiguous (last axis in {1, 3, 4}, axis 1 not);
  (N, H, W) gets a channel axis; (N, F) stays rows. Images stored uncompressed (``np.savez``) are read lazily,
  rows at their offsets in the file; a compressed member (``np.savez_compressed``) cannot be read at an offset
  and is read whole (the dataset's notes say so);
* an image folder ``root/<class>/*.jpg|jpeg|png|bmp`` (classes sorted by name), decoded with Pillow on demand
  (:class:`onnxrepair.data.lazy.LazyArray`: a bounded thread pool and a bounded cache, so memory does not grow
  with the number of files; the scan reads each file's header only);
* CIFAR-10/100 python batches (a batch file, or the extracted ``cifar-10-batches-py`` /
  ``cifar-100-python`` folder; ``split`` picks train or test) — read with a restricted unpickler that only
  rebuilds numpy arrays, so a hostile pickle cannot run code;
* MNIST IDX files (``*-images-idx3-ubyte[.gz]`` with their ``*-labels-idx1-ubyte[.gz]`` beside them,
  or a folder holding them);
* ``*.csv`` / ``*.csv.gz`` → :func:`onnxrepair.data.tabular.load_csv` (tabular data; headerless files take the
  last column as the label; text columns are one-hot encoded).

``resize=(H, W)`` resizes images to the model's spatial size (Pillow bilinear for files, torch bilinear
for arrays); the dtype stays what it was (uint8 stays uint8).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import struct
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, UsageError
from .dataset import ArrayDataset
from .lazy import FileList

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_dataset(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    resize: tuple[int, int] | None = None,
    target: str | None = None,
    protected: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    encoding: dict | None = None,
) -> ArrayDataset:
    """Load ``path`` (see the module docstring). ``split`` ("train"/"test") picks a part where the source has
    several; ``limit`` keeps a random stratified subset of that many rows; ``encoding`` (CSV) is the column
    encoding a repaired model stored (:func:`onnxrepair.data.tabular.plan_encoding`), applied instead of a new one."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory")
    name = p.name.lower()
    try:
        if p.is_file() and name.endswith((".csv", ".csv.gz")):
            ds = _load_csv(p, target, protected, encoding)
        elif p.is_file() and name.endswith(".npz"):
            ds = load_npz(p)
        elif _is_idx(p):
            ds = load_idx(p, split=split)
        elif _is_cifar(p):
            ds = load_cifar(p, split=split)
        elif p.is_dir():
            root = p / split if split and (p / split).is_dir() else p
            ds = load_image_folder(root, resize=resize)
            resize = None
        else:
            raise DataError(f"{p}: unknown data format; expected .npz, .csv, an image folder root/<class>/*.jpg, CIFAR python batches or MNIST IDX files")
    except (DataError, UsageError):
        raise
    except zipfile.BadZipFile as e:  # a damaged or truncated .npz is bad data, not an internal error
        raise DataError(f"{p}: not a readable .npz (damaged or truncated zip archive: {e})") from e
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, struct.error, KeyError, zlib.error) as e:
        raise DataError(f"{p}: cannot read the data: {type(e).__name__}: {e}") from e
    if len(ds) == 0:
        raise DataError(f"{p}: the dataset is empty")
    if resize is not None and ds.x.ndim == 4 and tuple(ds.x.shape[2:]) != tuple(resize):
        ds.x = resize_images(ds.x, resize)
    return ds.limit(limit, seed=seed)


# ----------------------------------------------------------------------------- npz


def to_channel_first(x: np.ndarray) -> tuple[np.ndarray, str]:
    """(N,H,W,C) → (N,C,H,W) when the channel axis is unambiguous; (N,H,W) → (N,1,H,W). A lazy array gets the
    change as a per-batch transform of a lazy view."""
    from .lazy import LazyArray

    lazy = isinstance(x, LazyArray)
    if x.ndim == 3:
        if lazy:
            return x.with_transform(lambda b: b[:, None], (1, *x.shape[1:])), "added a channel axis to (N, H, W) images"
        return x[:, None], "added a channel axis to (N, H, W) images"
    if x.ndim == 4:
        first, last = x.shape[1] in (1, 3, 4), x.shape[3] in (1, 3, 4)
        if last and not first:
            note = f"transposed NHWC {tuple(x.shape)} to channel-first"
            if lazy:
                return x.with_transform(lambda b: np.ascontiguousarray(b.transpose(0, 3, 1, 2)), (x.shape[3], x.shape[1], x.shape[2])), note
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), note
        if first and last and x.shape[1] != x.shape[3]:
            log.warning("image array %s could be NCHW or NHWC; read as channel-first (N, C, H, W)", tuple(x.shape))
    return x, ""


def load_npz(path: Path) -> ArrayDataset:
    notes: list[str] = []
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        for kx, ky in (("x", "y"), ("x_test", "y_test"), ("images", "labels"), ("X", "y"), ("data", "labels")):
            if kx in keys:
                x = _lazy_member(path, kx, notes)
                if x is None:
                    x = z[kx]
                y = z[ky] if ky in keys else None
                classes = [str(c) for c in z["classes"]] if "classes" in keys else None
                break
        else:
            raise DataError(f"{path}: no 'x' array in the .npz (found: {', '.join(sorted(keys)) or 'nothing'})")
    x, note = to_channel_first(x)
    if note:
        log.info("%s: %s", path, note)
    return ArrayDataset(x=x, y=_labels(y, path), classes=classes, name=path.stem, notes=notes)


LAZY_NPZ_MIN_BYTES = 16 << 20  # smaller image arrays are read whole: nothing to save


def _lazy_member(path: Path, key: str, notes: list[str]):
    """``key`` of the .npz as a :class:`LazyArray` reading rows at their offsets, when it is an image array (3-D or
    more) of at least ``LAZY_NPZ_MIN_BYTES`` stored uncompressed in C order; else None (the caller reads it whole,
    and a compressed member gets a note saying so)."""
    from numpy.lib import format as npformat

    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(key + ".npy")
        except KeyError:
            return None
        with zf.open(info) as f:
            read_header = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}.get(npformat.read_magic(f))
            if read_header is None:  # a .npy format this reader does not place (3.0: utf-8 field names): read whole
                return None
            shape, fortran, dtype = read_header(f)
            header_len = f.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(shape) < 3 or nbytes < LAZY_NPZ_MIN_BYTES or dtype.hasobject:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            notes.append(f"{path.name}: '{key}' is compressed ({nbytes / 2**20:.0f} MB unpacked), so it is read whole; "
                         "store it with np.savez (uncompressed) to have it read lazily")
            return None
        if fortran:
            return None
        with open(path, "rb") as raw:  # the member's data start: after its local file header (whose extra field can
            raw.seek(info.header_offset)  # differ from the central directory's) and the .npy header
            local = raw.read(30)
            if local[:4] != b"PK\x03\x04":
                raise DataError(f"{path}: damaged zip archive (no local header for {key}.npy)")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name_len + extra_len + header_len
    from .lazy import LazyArray, NpyMemberSource

    return LazyArray(NpyMemberSource(path, offset, tuple(shape), dtype))


def _labels(y: np.ndarray | None, path) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = y.argmax(axis=1)
    y = y.reshape(-1)
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{path}: labels are not whole numbers")
    elif y.dtype.kind not in "iub":
        raise DataError(f"{path}: labels have dtype {y.dtype}, expected integers")
    return y.astype(np.int64)


# ----------------------------------------------------------------------------- image folder


def scan_image_folder(root: Path) -> tuple[list[str], FileList, np.ndarray, Counter]:
    """(classes, files, labels, Counter of (width, height, mode)) of ``root/<class>/*``, reading only image headers
    (one open per file; memory per file: its name in a compact :class:`~onnxrepair.data.lazy.FileList` and its
    label). Refuses what is not an image folder: files that are not images (hidden files aside), images lying in
    ``root`` itself, empty class folders, files Pillow cannot identify from their header. A file whose header reads
    but whose data is damaged (a truncated JPEG) is found when it is decoded."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = sorted(f.name for f in root.iterdir() if f.is_file() and not f.name.startswith("."))
    if not classes:
        extra = f" (found {len(loose)} file(s) in it, e.g. {loose[0]}; put them in root/<class>/)" if loose else ""
        raise DataError(f"{root}: no class folders (expected root/<class>/*.jpg|png){extra}")
    loose_imgs = [f for f in loose if Path(f).suffix.lower() in IMAGE_EXTS]
    if loose_imgs:
        raise DataError(f"{root}: {len(loose_imgs)} image(s) lie beside the class folders (e.g. {loose_imgs[0]}); "
                        "an image folder holds images only inside root/<class>/")
    names: list[str] = []
    labels: list[int] = []
    sizes: Counter = Counter()
    for i, c in enumerate(classes):
        with os.scandir(root / c) as it:
            entries = sorted((e.name, e.is_dir()) for e in it if not e.name.startswith("."))
        others = [n for n, is_dir in entries if is_dir or Path(n).suffix.lower() not in IMAGE_EXTS]
        if others:
            raise DataError(f"{root / c}: {len(others)} entr{'y is' if len(others) == 1 else 'ies are'} not image files (e.g. {others[0]}); "
                            f"an image folder holds only {', '.join(IMAGE_EXTS)} files in root/<class>/")
        if not entries:
            raise DataError(f"{root / c}: class folder {c!r} holds no images")
        for n, _ in entries:
            f = root / c / n
            try:
                with Image.open(f) as im:  # reads the header only
                    sizes[(im.size[0], im.size[1], im.mode)] += 1
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{f}: not a readable image ({type(e).__name__})") from None
            names.append(f"{c}/{n}")
            labels.append(i)
    return classes, FileList(root, names), np.array(labels, dtype=np.int64), sizes


def load_image_folder(root: Path, *, resize: tuple[int, int] | None = None, mode: str | None = None,
                      workers: int | None = None, cache_bytes: int | None = None) -> ArrayDataset:
    """``root/<class>/*.jpg|png``: classes sorted by name; images decoded on demand (a
    :class:`~onnxrepair.data.lazy.LazyArray` of uint8, ``workers`` decoding threads, a cache of ``cache_bytes``;
    see :mod:`onnxrepair.data.lazy`).

    ``mode`` "L" or "RGB"; by default grayscale only when every image is grayscale. Images of different sizes
    need ``resize``; sizes are checked from the headers before anything is decoded. ``ds.notes`` says which
    class folders and how many images were found.
    """
    from .lazy import FolderSource, LazyArray

    classes, files, y, sizes = scan_image_folder(root)
    per_class = np.bincount(y, minlength=len(classes))
    shown = ", ".join(f"{c} ({per_class[i]})" for i, c in enumerate(classes[:12])) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")
    dims = Counter({(w, h): 0 for w, h, _ in sizes})
    for (w, h, _), k in sizes.items():
        dims[(w, h)] += k
    if len(dims) > 1 and resize is None:
        common = ", ".join(f"{w}x{h} ({k})" for (w, h), k in dims.most_common(4))
        raise DataError(f"{root}: images of {len(dims)} sizes ({common}); they need resizing to the model's input size")
    gray = all(m in ("L", "1", "I;16", "I") for _, _, m in sizes)
    mode = mode or ("L" if gray else "RGB")
    size = None if resize is None else (int(resize[1]), int(resize[0]))  # PIL takes (W, H)
    w, h = size or next(iter(dims))
    x = LazyArray(FolderSource(files, mode, (w, h), workers=workers, cache_bytes=cache_bytes))
    sz = ", ".join(f"{ww}x{hh}" for ww, hh in dims)
    notes = [f"image folder {root}: {len(classes)} class folder(s): {shown}; {len(files)} images of {sz} ({mode})"]
    if size is not None and any(d != size for d in dims):
        notes.append(f"images resized to the model's {h}x{w}")
    if len(classes) == 1:
        notes.append(f"only one class folder in {root}: is this the folder above the class folders?")
    return ArrayDataset(x=x, y=y, classes=classes, name=root.name, notes=notes)


# ----------------------------------------------------------------------------- CIFAR python batches


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickled dicts of numpy arrays and lists: allow exactly that."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _is_cifar(p: Path) -> bool:
    if p.is_file():
        return p.name.startswith(("data_batch", "test_batch")) or p.name in ("train", "test")
    return p.is_dir() and (any(p.glob("data_batch_*")) or (p / "test_batch").exists() or ((p / "meta").exists() and (p / "test").exists()))


def load_cifar(p: Path, split: str | None = None) -> ArrayDataset:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``, ``test``, ``meta``)."""
    split = split or "test"
    if split not in ("train", "test"):
        raise UsageError(f"split must be train or test for CIFAR, got {split!r}")
    if p.is_file():
        files, folder = [p], p.parent
    elif (p / "test_batch").exists() or any(p.glob("data_batch_*")):
        files = [p / "test_batch"] if split == "test" else sorted(p.glob("data_batch_*"))
        folder = p
    else:
        files, folder = [p / split], p
    xs, ys = [], []
    for f in files:
        d = _unpickle(f)
        data = np.asarray(d["data"], dtype=np.uint8)
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64))
    classes = None
    for meta, key in (("batches.meta", "label_names"), ("meta", "fine_label_names")):
        if (folder / meta).exists():
            m = _unpickle(folder / meta)
            if key in m:
                classes = [c.decode() if isinstance(c, bytes) else str(c) for c in m[key]]
                break
    x = np.concatenate(xs)
    if classes is None and len(x) and int(np.concatenate(ys).max()) < 10:
        classes = CIFAR10_CLASSES
    return ArrayDataset(x=x, y=np.concatenate(ys), classes=classes, name=f"cifar-{split}")


# ----------------------------------------------------------------------------- MNIST IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _is_idx(p: Path) -> bool:
    if p.is_dir():
        return any("idx3" in f.name for f in p.iterdir())
    return "idx" in p.name and "ubyte" in p.name


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (plain or gzip) as a numpy array."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    dt = np.dtype(_IDX_DTYPES[raw[2]])
    n = int(np.prod(dims)) if dims else 0
    body = raw[4 + 4 * ndim :]
    if len(body) < n * dt.itemsize:
        raise DataError(f"{path}: truncated IDX file ({len(body)} bytes, header says {n * dt.itemsize})")
    return np.frombuffer(body, dtype=dt, count=n).reshape(dims).astype(dt.newbyteorder("="))


def load_idx(p: Path, split: str | None = None) -> ArrayDataset:
    if p.is_dir():
        cands = sorted(f for f in p.iterdir() if "idx3" in f.name)
        if split:
            tag = "t10k" if split == "test" else "train"
            cands = [f for f in cands if f.name.startswith(tag)] or cands
        elif len(cands) > 1:
            cands = [f for f in cands if f.name.startswith("t10k")] or cands  # test set by default
        images = cands[0]
    else:
        images = p
    if "idx1" in images.name:
        raise DataError(f"{images}: this is a labels file; give the images file (idx3)")
    labels = images.with_name(images.name.replace("images", "labels").replace("idx3", "idx1"))
    x = read_idx(images)
    y = read_idx(labels).astype(np.int64) if labels.exists() else None
    if y is None:
        log.warning("%s: no labels file %s", images, labels.name)
    x, _ = to_channel_first(x) if x.ndim == 3 else (x, "")
    return ArrayDataset(x=x, y=y, name=images.name.split(".")[0])


# ----------------------------------------------------------------------------- CSV (tabular)


def _load_csv(p: Path, target: str | None, protected: Sequence[str] | None, encoding: dict | None = None) -> ArrayDataset:
    try:
        from . import tabular  # owned by the fairness work
    except ImportError:
        raise UsageError(f"{p}: CSV data needs onnxrepair.data.tabular, which is not available") from None
    return tabular.load_csv(p, target=target, protected=list(protected) if protected else None, encoding=encoding)


# ----------------------------------------------------------------------------- helpers


def resize_images(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of channel-first images to ``size`` (H, W), keeping the dtype (batched). A lazy array gets
    a lazy view that resizes each batch it reads."""
    from .lazy import LazyArray

    if isinstance(x, LazyArray):
        return x.with_transform(lambda b: resize_images(b, size), (x.shape[1], int(size[0]), int(size[1])))
    import torch
    import torch.nn.functional as F

    out = np.empty((x.shape[0], x.shape[1], int(size[0]), int(size[1])), dtype=x.dtype)
    for i in range(0, len(x), 1024):
        t = torch.from_numpy(np.ascontiguousarray(x[i : i + 1024])).float()
        r = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        if x.dtype == np.uint8:
            r = r.round().clamp(0, 255)
        out[i : i + 1024] = r.numpy().astype(x.dtype)
    return out
