"""Read an ONNX file safely: clear errors for every way a file can be wrong, checker, shape
inference and an op inventory resolved to the op-set version each node really uses."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import defs

from onnxrepair.errors import ModelError, UsageError

LFS_MAGIC = b"version https://git-lfs.github.com/spec"
DEFAULT_DOMAIN = "ai.onnx"


@dataclass(frozen=True, order=True)
class OpKey:
    domain: str
    op_type: str
    version: int

    def __str__(self) -> str:
        return f"{self.domain}::{self.op_type}-{self.version}"


@dataclass
class LoadedModel:
    path: Path
    model: onnx.ModelProto
    sha256: str
    opsets: dict[str, int]
    inventory: list[OpKey] = field(default_factory=list)

    @property
    def op_histogram(self) -> Counter:
        return Counter(str(k) for k in self.inventory)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def normalise_domain(domain: str) -> str:
    return DEFAULT_DOMAIN if domain in ("", "ai.onnx") else domain


def opset_map(model: onnx.ModelProto) -> dict[str, int]:
    return {normalise_domain(o.domain): o.version for o in model.opset_import}


def resolve_version(domain: str, op_type: str, opset: int) -> int:
    """The since_version of the schema a node of this op-set really runs (e.g. Conv at opset 17 -> 11)."""
    try:
        schema = defs.get_schema(op_type, opset, "" if domain == DEFAULT_DOMAIN else domain)
        return int(schema.since_version)
    except Exception:  # custom domain or unknown op: the import version is all we know
        return int(opset)


def _iter_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def inventory(model: onnx.ModelProto) -> list[OpKey]:
    opsets = opset_map(model)
    out = []
    for node in _iter_nodes(model.graph):
        dom = normalise_domain(node.domain)
        out.append(OpKey(dom, node.op_type, resolve_version(dom, node.op_type, opsets.get(dom, 1))))
    return out


def load_model(path: str | os.PathLike, *, check: bool = True, infer_shapes: bool = True) -> LoadedModel:
    """Load ``path`` with external data, run the checker and shape inference, take the inventory.

    Raises :class:`UsageError` (exit 2) for a missing path and :class:`ModelError` (exit 3) for a file
    that is not a readable, valid ONNX model.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory, expected an .onnx file")
    size = p.stat().st_size
    if size == 0:
        raise ModelError(f"{p}: empty file, not an ONNX model")
    with open(p, "rb") as f:
        head = f.read(256)
    if head.startswith(LFS_MAGIC):
        raise ModelError(f"{p}: is a Git LFS pointer, not the model; run `git lfs pull` to fetch the real file")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except FileNotFoundError as e:
        raise ModelError(f"{p}: external data file missing: {e.filename or e}") from e
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelError(f"{p}: not a readable ONNX model (truncated or not ONNX): {type(e).__name__}") from e
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{p}: not an ONNX model (no graph found in the file)")
    if check:
        try:
            # a path lets the checker handle >2 GB models with external data
            onnx.checker.check_model(str(p) if size > 2**31 else model, full_check=False)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{p}: fails the ONNX checker: {msg}") from e
    if infer_shapes:
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # inference is advisory: some producers' graphs defeat it
            pass
    return LoadedModel(path=p, model=model, sha256=sha256_file(p), opsets=opset_map(model), inventory=inventory(model))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    elem_type: int  # onnx.TensorProto data type
    shape: tuple  # ints for fixed dims, strings for symbolic ones, None for unknown

    @property
    def dtype(self):
        import numpy as np

        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type)) if self.elem_type else None

    @property
    def dtype_name(self) -> str:
        return onnx.TensorProto.DataType.Name(self.elem_type) if self.elem_type else "UNKNOWN"


def _spec(v: onnx.ValueInfoProto) -> TensorSpec:
    tt = v.type.tensor_type
    dims = []
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return TensorSpec(v.name, tt.elem_type, tuple(dims))


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Real inputs: graph inputs that are not initializers (old exporters list weights as inputs)."""
    inits = {i.name for i in model.graph.initializer}
    return [_spec(v) for v in model.graph.input if v.name not in inits]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(v) for v in model.graph.output]


_PASS_THROUGH = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"})


def output_source_op(model: onnx.ModelProto, index: int = 0) -> str | None:
    """The op type that computes graph output ``index``, looking through identities, reshapes and
    casts (``Sigmoid`` for a ``Sigmoid -> Reshape`` tail); ``None`` when no node computes it."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = model.graph.output[index].name
    while name in producer and producer[name].op_type in _PASS_THROUGH and producer[name].input:
        name = producer[name].input[0]
    return producer[name].op_type if name in producer else None
