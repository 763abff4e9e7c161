"""Writing ONNX files atomically: a temporary file beside the destination, renamed into place only when
the write succeeded, so a crash or Ctrl-C never leaves half a model at the destination."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot serialise a message of 2 GB or more


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it over ``dest`` only if the block succeeds."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent if str(dest.parent) else ".")
    os.close(fd)
    tmp_p = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_p, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like any file the user writes
    try:
        yield tmp_p
        os.replace(tmp_p, dest)
    finally:
        if tmp_p.exists():
            tmp_p.unlink()


def write_model(model: onnx.ModelProto, path: str | os.PathLike, data_name: str | None = None) -> None:
    """Write ``model`` to ``path`` (not atomically: for a caller that holds its own :func:`atomic_path`).

    Past protobuf's 2 GB limit the weights go to one external file ``data_name`` (default ``<path name>.data``)
    beside it; onnx then leaves ``model``'s tensors pointing at that file instead of holding their bytes.
    """
    path = Path(path)
    if model.ByteSize() > PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, location=data_name or path.name + ".data")
    else:
        onnx.save_model(model, str(path))


def save_model_atomic(model: onnx.ModelProto, dest: str | os.PathLike) -> Path:
    """Serialise ``model`` to a temporary file beside ``dest`` and rename it into place; external weights (see
    :func:`write_model`) are named after ``dest`` and written before the rename, so the model file never
    points at missing data."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        write_model(model, tmp, data_name=dest.name + ".data")
    return dest


__all__ = ["atomic_path", "save_model_atomic", "write_model"]
