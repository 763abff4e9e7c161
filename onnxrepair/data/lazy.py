"""Data larger than memory: image arrays that read their rows on demand.

:class:`LazyArray` stands where :class:`~onnxrepair.data.dataset.ArrayDataset` keeps ``x``: it has ``len``,
``shape``, ``ndim``, ``dtype`` and ``size``, and indexing it with an int, a slice, an index array or a boolean
mask returns a plain numpy array of just those rows. ``subset(idx)`` (what ``ArrayDataset.subset`` / ``limit`` /
``split`` call) returns another lazy view and reads nothing, so a repair or an evaluation that uses 5,000 rows of
a million-image folder decodes those 5,000 and no more. ``np.asarray(x)`` still works and reads every row of the
view (the methods that train on a whole subset do that, on the subset they were given).

Two sources:

* :class:`FolderSource` — an image folder: file names kept as one compact byte blob (not a million ``Path``
  objects), images decoded with Pillow by a bounded thread pool (Pillow's decoders release the GIL) into the
  batch array, and the most recently read rows kept in a bounded LRU cache (``cache_bytes``, default 64 MB;
  ``ONNXREPAIR_CACHE_MB`` overrides it). A file that cannot be decoded raises :class:`DataError` naming the file,
  when its row is first read (a header that Pillow cannot identify is refused earlier, at the folder scan).
* :class:`NpyMemberSource` — an uncompressed (stored) ``.npy`` member of an ``.npz``: rows read with ``os.pread``
  at their offsets in the zip file. Not ``np.memmap``: mapped pages that were read count towards the process's
  resident memory for as long as the map lives, so a full pass over a memory-mapped 150 MB array leaves 150 MB
  resident; ``pread`` leaves the caching to the kernel's page cache, outside the process. Compressed members
  cannot be read at an offset and are read whole by the loader (it says so in the dataset's notes).

A view may carry a per-batch ``transform`` (NHWC → NCHW, an added channel axis, a resize to the model's size),
applied to the rows it reads.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 64 << 20


def default_workers() -> int:
    """Decoding threads: up to 4, never more than the CPUs this process may use."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def default_cache_bytes() -> int:
    v = os.environ.get("ONNXREPAIR_CACHE_MB")
    if v:
        try:
            return max(0, int(float(v) * (1 << 20)))
        except ValueError:
            log.warning("ONNXREPAIR_CACHE_MB=%r is not a number; using %d MB", v, DEFAULT_CACHE_BYTES >> 20)
    return DEFAULT_CACHE_BYTES


class FileList:
    """Many relative file names in one byte blob with offsets (about 40 bytes a file, not a ``Path`` each)."""

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        enc = [os.fsencode(n) for n in names]
        self.root = Path(root)
        self.blob = b"".join(enc)
        self.offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in enc], out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Path:
        return self.root / os.fsdecode(self.blob[self.offsets[i] : self.offsets[i + 1]])


class Source:
    """Rows ``0..n-1`` of shape ``row_shape`` and ``dtype``; ``read(rows)`` returns them as one array."""

    n: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    reads: int = 0  # rows read from storage (decoded, for images): tests count them

    def read(self, rows: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class FolderSource(Source):
    """Images of an image folder, decoded on demand to ``(C, H, W)`` uint8 at ``size`` (W, H) in ``mode``."""

    def __init__(self, files: FileList, mode: str, size: tuple[int, int], *, workers: int | None = None,
                 cache_bytes: int | None = None) -> None:
        self.files = files
        self.mode = mode
        self.size = size
        self.n = len(files)
        c = 1 if mode == "L" else 3
        self.row_shape = (c, size[1], size[0])
        self.dtype = np.dtype(np.uint8)
        self.workers = workers or default_workers()
        row_bytes = int(np.prod(self.row_shape))
        cache = default_cache_bytes() if cache_bytes is None else cache_bytes
        self.cache_rows = cache // row_bytes  # the bound: rows, from bytes
        # one preallocated slab with reused slots, not an array per row: rows copied in by different threads would
        # sit in different malloc arenas, and the holes evicted rows leave there are not reused by the others
        # (measured: an evaluation's clean and perturbed passes held the cache twice over)
        self._slab: np.ndarray | None = None  # (cache_rows, *row_shape), pages touched only as slots fill
        self._cache: OrderedDict[int, int] = OrderedDict()  # row -> slot, least recently used first
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.reads = 0

    @property
    def cached(self) -> int:
        return len(self._cache)

    def _decode(self, i: int, out: np.ndarray) -> None:
        from PIL import Image

        f = self.files[int(i)]
        try:
            with Image.open(f) as im:
                im = im.convert(self.mode)
                if im.size != self.size:
                    im = im.resize(self.size, Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - any decoder failure is this file's fault: one line naming it
            raise DataError(f"{f}: cannot decode image ({type(e).__name__}: {e})") from None
        out[...] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        missing: list[int] = []
        with self._lock:
            for k, r in enumerate(rows):
                slot = self._cache.get(int(r))
                if slot is None:
                    missing.append(k)
                else:
                    self._cache.move_to_end(int(r))
                    out[k] = self._slab[slot]
        if missing:
            if len(missing) == 1 or self.workers == 1:
                for k in missing:
                    self._decode(rows[k], out[k])
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnxrepair-decode")
                # chunks, not one task per image: fewer futures, and an error stops at its chunk
                step = -(-len(missing) // (self.workers * 4))
                chunks = [missing[j : j + step] for j in range(0, len(missing), step)]
                futs = [self._pool.submit(self._decode_many, rows, ks, out) for ks in chunks]
                for fu in futs:
                    fu.result()  # re-raises the first DataError in order of rows
            self.reads += len(missing)
            if self.cache_rows:
                with self._lock:
                    for k in missing[-self.cache_rows :]:  # the latest rows of a batch larger than the cache
                        self._put(int(rows[k]), out[k])
        return out

    def _put(self, row: int, value: np.ndarray) -> None:
        """Cache ``value`` as ``row`` in a free slot, or in the least recently used one (caller holds the lock)."""
        if row in self._cache:
            self._cache.move_to_end(row)
            return
        if self._slab is None:
            self._slab = np.empty((self.cache_rows, *self.row_shape), dtype=self.dtype)
        if len(self._cache) < self.cache_rows:
            slot = len(self._cache)  # slots fill in order and are only reused after, so the next free one is this
        else:
            _, slot = self._cache.popitem(last=False)
        self._slab[slot] = value
        self._cache[row] = slot

    def _decode_many(self, rows: np.ndarray, ks: list[int], out: np.ndarray) -> None:
        for k in ks:
            self._decode(rows[k], out[k])

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


class NpyMemberSource(Source):
    """Rows of a C-ordered array stored uncompressed in a file at ``offset`` (an ``.npy`` member of an ``.npz``)."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = Path(path)
        self.offset = int(offset)
        self.n = int(shape[0])
        self.row_shape = tuple(int(s) for s in shape[1:])
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd: int | None = None
        self.reads = 0

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        buf = out.reshape(len(rows), -1).view(np.uint8)
        fd = self._file()
        k = 0
        while k < len(rows):  # runs of consecutive rows in one read each
            j = k + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            want = (j - k) * self.row_bytes
            got = os.preadv(fd, [memoryview(buf[k:j]).cast("B")], self.offset + int(rows[k]) * self.row_bytes)
            if got != want:
                raise DataError(f"{self.path}: truncated array (rows {int(rows[k])}..{int(rows[j - 1])} could not be read)")
            k = j
        self.reads += len(rows)
        return out

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


class LazyArray:
    """A read-only, array-like view of some rows of a :class:`Source` (see the module docstring)."""

    def __init__(self, source: Source, rows: np.ndarray | None = None, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 row_shape: tuple[int, ...] | None = None, dtype: np.dtype | None = None) -> None:
        self.source = source
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.transform = transform
        self._row_shape = tuple(row_shape) if row_shape is not None else source.row_shape
        self._dtype = np.dtype(dtype) if dtype is not None else source.dtype

    # --- what numpy code asks of an array
    def __len__(self) -> int:
        return self.source.n if self.rows is None else len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self._row_shape)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self._dtype.itemsize

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype}, source={type(self.source).__name__})"

    def _positions(self, key) -> np.ndarray | int:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for {n} rows")
            return i % n
        if isinstance(key, slice):
            return np.arange(n)[key]
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} rows")
            return np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"rows are indexed by integers, slices or masks, not {idx.dtype}")
        if idx.size and (idx.max() >= n or idx.min() < -n):
            raise IndexError(f"index out of bounds for {n} rows")
        return idx % n if idx.size else idx.astype(np.int64)

    def _base(self, pos: np.ndarray) -> np.ndarray:
        return pos if self.rows is None else self.rows[pos]

    def _read(self, pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        if not len(pos):
            return np.empty((0, *self._row_shape), dtype=self._dtype)
        raw = self.source.read(self._base(pos))
        return self.transform(raw) if self.transform is not None else raw

    def __getitem__(self, key) -> np.ndarray:
        rest = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        if key is Ellipsis:
            key, rest = slice(None), (Ellipsis, *rest)
        pos = self._positions(key)
        if isinstance(pos, int):
            out, lead = self._read(np.array([pos]))[0], 0
        else:
            shape = np.shape(pos)
            out, lead = self._read(pos), len(shape)
            if lead != 1:
                out = out.reshape(*shape, *self._row_shape)
        return out[(slice(None),) * lead + rest] if rest else out

    def __iter__(self) -> Iterator[np.ndarray]:
        for lo in range(0, len(self), 256):
            yield from self[lo : lo + 256]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every row of the view, read in chunks (the whole view becomes one array: use on subsets)."""
        if len(self) > 10_000:
            log.info("reading all %d rows of %s into memory", len(self), type(self.source).__name__)
        out = np.empty(self.shape, dtype=self._dtype)
        for lo in range(0, len(self), 1024):
            out[lo : lo + 1024] = self[lo : lo + 1024]
        return out if dtype is None else out.astype(dtype, copy=False)

    # --- views
    def subset(self, idx) -> "LazyArray":
        """The rows ``idx`` (int array, slice or mask) as another lazy view; nothing is read."""
        pos = self._positions(idx)
        if isinstance(pos, int):
            pos = np.array([pos])
        return LazyArray(self.source, self._base(np.asarray(pos, dtype=np.int64)), self.transform, self._row_shape, self._dtype)

    def with_transform(self, fn: Callable[[np.ndarray], np.ndarray], row_shape: tuple[int, ...], dtype: np.dtype | None = None) -> "LazyArray":
        """The same rows with ``fn`` applied to every batch read after the view's own transform."""
        inner = self.transform
        composed = fn if inner is None else (lambda b: fn(inner(b)))
        return LazyArray(self.source, self.rows, composed, row_shape, dtype if dtype is not None else self._dtype)


def take(x, idx):
    """``x[idx]`` for arrays, a lazy view for :class:`LazyArray` (what ``ArrayDataset.subset`` uses)."""
    return x.subset(idx) if isinstance(x, LazyArray) else x[idx]


def is_lazy(x) -> bool:
    return isinstance(x, LazyArray)
