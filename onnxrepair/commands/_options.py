"""Options shared by every command that takes data: the input contract and data loading.

Use in a command::

    def cmd(..., layout: Optional[str] = _options.LAYOUT, scale: Optional[float] = _options.SCALE,
            mean: Optional[str] = _options.MEAN, std: Optional[str] = _options.STD,
            config: Optional[Path] = _options.CONFIG):
        contract = _options.build_contract(model, layout=layout, scale=scale, mean=mean, std=std, config=config)
        ds = _options.load_data(data_path, contract)   # also settles what was guessed, resizes to the model

Precedence: flags > ``--config`` TOML > the model's ``metadata_props`` (``onnxrepair.input_contract``) > a guess
from the model's input shape and the data (said in ``contract.notes``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import typer

from ..data.contract import InputContract, contract_from_metadata, finalize_contract, resolve_contract
from ..data.dataset import ArrayDataset
from ..data.loaders import load_dataset, resize_images
from ..errors import ModelError, UsageError

LAYOUT = typer.Option(None, "--layout", help="Model input layout: nchw | nhwc (| flat | tabular). Guessed from the model when unambiguous.")
SCALE = typer.Option(None, "--scale", help="Raw values are divided by S to reach [0, 1] (255 for 8-bit images). Guessed from the data's dtype/range.")
MEAN = typer.Option(None, "--mean", help="Per-channel mean applied after scaling, e.g. 0.4914,0.4822,0.4465.")
STD = typer.Option(None, "--std", help="Per-channel std applied after scaling, e.g. 0.247,0.243,0.261.")
LOG_JSON = typer.Option(None, "--log-json", help="Write progress as JSON lines here: one object per stage, task and training epoch (loss, calibration scores).")
CONFIG = typer.Option(None, "--config", help="TOML file with layout/scale/mean/std (top level or an \\[input] table).")


def model_input_shape(model: str | os.PathLike) -> tuple[tuple, object]:
    """(first input's shape, the ModelProto) of an ONNX file, read once through :func:`onnxrepair.io.read_model`
    (so Git LFS pointers, missing external data and truncated files get the converters' messages here too)."""
    from ..io import read_model

    info = read_model(model)
    if not info.inputs:
        raise ModelError(f"{model}: the model has no inputs")
    return tuple(info.inputs[0].shape), info.model


def build_contract(
    model: str | os.PathLike,
    *,
    layout: str | None = None,
    scale: float | None = None,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    config: str | os.PathLike | None = None,
    dataset: ArrayDataset | None = None,
) -> InputContract:
    """The input contract of ``model`` from flags, config, its metadata_props, or a guess.

    Without ``dataset`` the pixel scale (and, for 2-D inputs, flat-image vs tabular) stays provisional until
    :func:`load_data` (or :func:`onnxrepair.data.contract.finalize_contract`) sees the data.
    """
    shape, proto = model_input_shape(model)
    meta = contract_from_metadata(proto)
    c = resolve_contract(
        shape,
        dataset.x[:256] if dataset is not None else None,
        layout=layout.lower() if layout else None,
        scale=scale,
        mean=mean,
        std=std,
        config=str(config) if config is not None else None,
        metadata=meta,
    )
    if dataset is not None:
        finalize_contract(c, dataset.x[:256])
    return c


def load_data(
    path: str | os.PathLike | None,
    contract: InputContract | None = None,
    *,
    target: str | None = None,
    protected: str | Sequence[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """Load data for a model: any format :func:`load_dataset` reads; images resized to the contract's H×W
    when they differ (said in ``contract.notes``); a provisional contract is settled from the data."""
    if path is None:
        raise UsageError("no data given (--data)")
    prot = [protected] if isinstance(protected, str) else protected
    folder_size = None  # an image folder is decoded at the model's size (mixed sizes allowed, said in a note)
    if contract is not None and Path(path).is_dir() and contract.image_shape and contract.layout in ("nchw", "nhwc"):
        folder_size = tuple(int(v) for v in contract.image_shape[1:])
    ds = load_dataset(path, split=split, target=target, protected=prot, limit=limit, seed=seed, resize=folder_size,
                      encoding=contract.encoding if contract is not None else None)
    if contract is not None:
        adopt_data(contract, ds)
        finalize_contract(contract, ds.x[:256])
        if ds.x.ndim == 4 and contract.image_shape and contract.layout in ("nchw", "nhwc"):
            want = tuple(contract.image_shape[1:])
            if tuple(ds.x.shape[2:]) != want and ds.x.shape[1] == contract.image_shape[0]:
                contract.notes.append(f"images resized from {ds.x.shape[2]}x{ds.x.shape[3]} to the model's {want[0]}x{want[1]}")
                ds.x = resize_images(ds.x, want)
    return ds


def reporter(quiet: bool, log_json: Path | None, *inputs):
    """The command's :class:`~onnxrepair.progress.Reporter`: stderr progress unless ``quiet``; ``--log-json`` lines
    (never over an input)."""
    from ..distributed import env_rank
    from ..io import check_output_path
    from ..progress import SILENT, Reporter

    if log_json is not None:
        check_output_path(log_json, *inputs)
    if env_rank() != 0:  # under torchrun only rank 0 shows progress and writes the log
        return SILENT
    return Reporter(enabled=not quiet, log_json=str(log_json) if log_json is not None else None)


def adopt_data(contract: InputContract, ds: ArrayDataset) -> None:
    """What the loader decided becomes part of the contract: a CSV's column encoding (stored with a repaired model,
    so evaluation encodes the same way) and its notes; flat rows of pixels (a headerless MNIST CSV) become images
    when the model takes images of exactly that many values."""
    if ds.encoding is not None and contract.encoding is None:
        contract.encoding = ds.encoding
    contract.notes += [n for n in ds.notes if n not in contract.notes]
    if ds.x.ndim == 2 and contract.layout in ("nchw", "nhwc") and contract.image_shape and ds.x.shape[1] == int(np.prod(contract.image_shape)):
        ds.x = ds.x.reshape(len(ds.x), *contract.image_shape)
        if ds.x.size and float(ds.x.min()) >= 0 and float(ds.x.max()) <= 255 and np.all(ds.x == np.round(ds.x)) and float(ds.x.max()) > 1:
            ds.x = ds.x.astype(np.uint8)  # whole numbers 0-255: 8-bit pixels
        contract.notes.append(f"rows of {ds.x[0].size} values read as {'x'.join(map(str, contract.image_shape))} images (channel-first, row-major)")


def parse_severities(spec: str) -> list[int]:
    """'1-5' | '1,3,5' | '3' → sorted ints."""
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise UsageError(f"bad --severities {spec!r}; use e.g. 1-5 or 1,3,5") from None
    if not out or min(out) < 1:
        raise UsageError(f"bad --severities {spec!r}; severities start at 1")
    return sorted(out)


def parse_eps(spec: str | None) -> list[float]:
    from ..data.contract import eval_fraction

    if not spec:
        return []
    try:
        vals = [eval_fraction(v) for v in spec.split(",") if v.strip()]
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"bad epsilon list {spec!r}; use e.g. 2/255,8/255 or 0.5") from None
    if any(v < 0 for v in vals):
        raise UsageError("epsilons must be >= 0")
    return vals


__all__ = ["LOG_JSON", "LAYOUT", "SCALE", "MEAN", "STD", "CONFIG", "build_contract", "load_data", "parse_severities", "parse_eps", "Optional"]
