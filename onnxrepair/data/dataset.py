"""Datasets of *raw* values.

Images are kept channel-first in their stored dtype (uint8 for 8-bit images: a 50,000-image
CIFAR set is 150 MB, never float32 twice); batches become float only when they are used.
Tabular rows are float32 feature matrices in the model's feature order.

``x`` is a numpy array or, for image folders and uncompressed ``.npz`` images, a
:class:`~onnxrepair.data.lazy.LazyArray` that reads rows on demand: indexing it gives numpy arrays of just
those rows, and ``subset`` / ``limit`` / ``split`` give lazy views that read nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from .lazy import take


@dataclass
class ArrayDataset:
    x: np.ndarray  # raw: (N, C, H, W) images or (N, F) rows; or a LazyArray of images (onnxrepair.data.lazy)
    y: np.ndarray | None = None  # (N,) int64 class indices
    classes: list[str] | None = None
    columns: list[str] | None = None  # tabular feature names, in model order
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # per-row side columns (e.g. protected attributes)
    name: str = ""
    encoding: dict | None = None  # CSV: how raw columns became features (onnxrepair.data.tabular.plan_encoding)
    notes: list[str] = field(default_factory=list)  # what the loader decided (headerless, one-hot, dropped columns)

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self.x):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_classes(self) -> int | None:
        if self.classes is not None:
            return len(self.classes)
        return int(self.y.max()) + 1 if self.y is not None and len(self.y) else None

    def subset(self, idx: np.ndarray | slice) -> "ArrayDataset":
        return replace(
            self,
            x=take(self.x, idx),  # a lazy x stays lazy: the rows are read when used
            y=None if self.y is None else self.y[idx],
            extra={k: v[idx] for k, v in self.extra.items()},
        )

    def limit(self, n: int | None, seed: int = 0) -> "ArrayDataset":
        """A class-stratified random subset of at most ``n`` rows (all rows if n is None)."""
        if n is None or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.permutation(len(self))[:n])
        return self.subset(idx)

    def split(self, fraction: float, seed: int = 0) -> tuple["ArrayDataset", "ArrayDataset"]:
        """Stratified split: (rest, part) where ``part`` holds ``fraction`` of each class."""
        rng = np.random.default_rng(seed)
        n = len(self)
        if self.y is None:
            perm = rng.permutation(n)
            k = int(round(n * fraction))
            return self.subset(np.sort(perm[k:])), self.subset(np.sort(perm[:k]))
        part = []
        for c in np.unique(self.y):
            idx = np.flatnonzero(self.y == c)
            rng.shuffle(idx)
            part.append(idx[: int(round(len(idx) * fraction))])
        part_idx = np.sort(np.concatenate(part)) if part else np.array([], dtype=np.int64)
        mask = np.ones(n, dtype=bool)
        mask[part_idx] = False
        return self.subset(np.flatnonzero(mask)), self.subset(part_idx)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for i in range(0, len(self), batch_size):
            idx = order[i : i + batch_size]
            yield self.x[idx], (None if self.y is None else self.y[idx])
