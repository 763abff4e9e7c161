"""Checks that data fits a model, each failing with one clear line (DataError, exit 2)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import DataError
from .contract import InputContract
from .dataset import ArrayDataset


def check_finite(ds: ArrayDataset, chunk: int = 4096) -> None:
    if ds.x.dtype.kind != "f":
        return
    for i in range(0, len(ds), chunk):
        bad = ~np.isfinite(ds.x[i : i + chunk])
        if bad.any():
            row = i + int(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))[0])
            raise DataError(f"data {ds.name or ''} holds NaN or infinite values (first at row {row})".replace("  ", " "))


def check_labels(ds: ArrayDataset, num_outputs: int | None) -> None:
    if ds.y is None:
        raise DataError(f"data {ds.name} has no labels; accuracy needs labels")
    if len(ds.y) and int(ds.y.min()) < 0:
        raise DataError(f"labels must be >= 0, found {int(ds.y.min())}")
    if num_outputs and num_outputs > 1 and len(ds.y) and int(ds.y.max()) >= num_outputs:
        raise DataError(f"label {int(ds.y.max())} is outside the model's output range 0..{num_outputs - 1} ({num_outputs} classes)")


def check_input_fits(ds: ArrayDataset, contract: InputContract, model_shape: Sequence, model_name: str = "model") -> None:
    """The model input produced by ``contract`` from one sample must match the model's declared input shape."""
    if len(ds) == 0:
        raise DataError("the dataset is empty")
    sample = contract.to_model(contract.to_unit(ds.x[:1]))
    got = tuple(sample.shape)
    want = tuple(model_shape)
    ok = len(got) == len(want) and all(not isinstance(w, int) or w <= 0 or w == g for g, w in zip(got[1:], want[1:]))
    if not ok:
        raw = f"rows of {ds.x.shape[1]} features" if ds.x.ndim == 2 else "x".join(map(str, ds.x.shape[1:])) + " (channel-first)"
        wanted = "[" + ",".join(str(w) if isinstance(w, int) and w > 0 else "N" if i == 0 else "?" for i, w in enumerate(want)) + "]"
        raise DataError(
            f"data does not fit {model_name}: samples are {raw}, which under layout "
            f"{contract.layout} ({contract.source}) gives input [N,{','.join(map(str, got[1:]))}], but the model takes {wanted}"
            + ("; try --layout nchw|nhwc or a resize" if len(want) == 4 else "")
        )


def check_all(ds: ArrayDataset, contract: InputContract, model_shape: Sequence, num_outputs: int | None, model_name: str = "model") -> None:
    check_input_fits(ds, contract, model_shape, model_name)
    check_finite(ds)
    check_labels(ds, num_outputs)


__all__ = ["check_finite", "check_labels", "check_input_fits", "check_all", "torch"]
