"""Filesystem helpers: outputs are written atomically and never over the input model."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from converters.io import atomic_path  # noqa: F401  (one atomic writer for models and reports)

from .errors import UsageError


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an output path that would overwrite one of the inputs."""
    out_p = Path(out)
    for inp in inputs:
        if inp is None:
            continue
        in_p = Path(inp)
        if out_p.resolve() == in_p.resolve() or (out_p.exists() and in_p.exists() and os.path.samefile(out_p, in_p)):
            raise UsageError(f"output path {out_p} is the input model; choose another path (the input is never overwritten)")
    if out_p.exists() and out_p.is_dir():
        raise UsageError(f"output path {out_p} is a directory")
    parent = out_p.parent if str(out_p.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"output directory {parent} does not exist")
    return out_p


@contextlib.contextmanager
def removed_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """Remove ``path`` if the block fails and the file was not there before it: the external-data file a model past
    2 GB writes beside its temporary file (``write_model``'s ``data_name``), which no atomic rename covers."""
    path = Path(path)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.exists():
            path.unlink()
        raise


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(dest: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(dest, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_READ_CACHE: dict[tuple, Any] = {}


def read_model(path: str | os.PathLike):
    """:func:`converters.read` once per file version: a command that builds the contract and then repairs parses
    the model one time, not once per step (keyed by path, size and mtime, so an edited file is read again)."""
    import converters

    p = Path(path)
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return converters.read(p)  # the converters' own message for a missing or unreadable path
    if key not in _READ_CACHE:
        if len(_READ_CACHE) >= 4:
            _READ_CACHE.pop(next(iter(_READ_CACHE)))
        _READ_CACHE[key] = converters.read(p)
    return _READ_CACHE[key]
