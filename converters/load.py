"""Read an ONNX file once: clear errors for every way a file can be wrong, the checker, shape inference, an
op inventory resolved to the op-set version each node really uses, and the model's interface.

:func:`read` is the one entry point (``load_model`` is its old name): it parses the file once and returns a
:class:`LoadedModel` holding the proto and everything a caller asks of a model's interface (inputs/outputs with
symbolic dim names and dtypes, ``metadata_props``, opset, producer, the op computing the first output,
external data). Nodes that are not in topological order (onnxruntime runs such graphs, the ONNX checker
refuses them) are sorted before the check, and ``sorted_nodes`` says how many moved.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import defs

from .errors import ConverterUsageError, ModelError, one_line

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
    """A model read from disk (see :func:`read`); pass it to ``convert`` so the file is not parsed again."""

    path: Path
    model: onnx.ModelProto  # nodes in topological order, shapes inferred, external data loaded
    sha256: str
    opsets: dict[str, int]
    inventory: list[OpKey] = field(default_factory=list)
    sorted_nodes: int = 0  # nodes the topological sort moved (0: the file was already in order)
    external_data: list[str] = field(default_factory=list)  # files the weights were read from, relative to the model
    nodes_of: dict[OpKey, list[str]] = field(default_factory=dict)  # node names per op, for messages

    @property
    def op_histogram(self) -> Counter:
        return Counter(str(k) for k in self.inventory)

    @property
    def inputs(self) -> list["TensorSpec"]:
        return graph_inputs(self.model)

    @property
    def outputs(self) -> list["TensorSpec"]:
        return graph_outputs(self.model)

    @property
    def metadata(self) -> dict[str, str]:
        return {p.key: p.value for p in self.model.metadata_props}

    @property
    def producer(self) -> str:
        return f"{self.model.producer_name} {self.model.producer_version}".strip()

    @property
    def opset(self) -> int:
        """The default-domain (ai.onnx) opset."""
        return int(self.opsets.get(DEFAULT_DOMAIN, 0))

    @property
    def ir_version(self) -> int:
        return int(self.model.ir_version)

    @property
    def output_source_op(self) -> str | None:
        """The op computing the first output (see :func:`output_source_op`)."""
        return output_source_op(self.model) if self.model.graph.output else None

    @property
    def notes(self) -> list[str]:
        out = []
        if self.sorted_nodes:
            out.append(f"nodes were not in topological order: sorted ({self.sorted_nodes} moved)")
        return out


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


def _subgraphs(node: onnx.NodeProto):
    """The graphs a node holds in its attributes (an If's branches, a Loop's or Scan's body)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _iter_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for g in _subgraphs(node):
            yield from _iter_nodes(g)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for g in _subgraphs(node):
            yield from _graphs(g)


def weight_count(model: onnx.ModelProto) -> int:
    """Elements of the stored weights: initializers and Constant tensors, in the main graph and in every subgraph
    (an ``If`` branch's weights count as the file holds them; a tensor shared by name is counted once)."""
    seen: set[str] = set()
    total = 0
    for g in _graphs(model.graph):
        tensors = [(t.name, t) for t in g.initializer]
        tensors += [(n.output[0], a.t) for n in g.node if n.op_type == "Constant" for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
        for name, t in tensors:
            if name in seen:
                continue
            seen.add(name)
            n = 1
            for d in t.dims:
                n *= int(d)
            total += n
    return total


def inventory(model: onnx.ModelProto) -> list[OpKey]:
    return [k for k, _ in _inventory_nodes(model)]


def _inventory_nodes(model: onnx.ModelProto) -> list[tuple[OpKey, str]]:
    opsets = opset_map(model)
    out = []
    for node in _iter_nodes(model.graph):
        dom = normalise_domain(node.domain)
        out.append((OpKey(dom, node.op_type, resolve_version(dom, node.op_type, opsets.get(dom, 1))), node.name))
    return out


def topological_sort(graph: onnx.GraphProto, outer: set[str] | frozenset = frozenset()) -> int:
    """Sort ``graph``'s nodes (and its subgraphs') so every node follows its inputs' producers; return how
    many nodes changed position. Stable: nodes already in order keep it. Names produced nowhere (graph inputs,
    initializers, outer-scope names of a subgraph) count as available; a cycle or a missing producer leaves
    the rest in file order, for the checker to report."""
    known = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    known |= {t.name for t in graph.sparse_initializer}
    nodes = list(graph.node)
    produced_by: dict[str, int] = {o: i for i, n in enumerate(nodes) for o in n.output}
    moved = 0
    for n in nodes:  # subgraphs first: their outer scope is everything this graph can see
        for g in _subgraphs(n):
            moved += topological_sort(g, known | set(produced_by))

    def needs(n: onnx.NodeProto) -> set[str]:
        names = {x for x in n.input}
        for g in _subgraphs(n):  # a subgraph's reads from this scope are inputs too
            names |= {x for sub in _iter_nodes(g) for x in sub.input}
        return {x for x in names if x in produced_by}

    deps = [needs(n) for n in nodes]
    done: set[str] = set()
    order: list[int] = []
    placed = [False] * len(nodes)
    progress = True
    while progress and len(order) < len(nodes):
        progress = False
        for i, n in enumerate(nodes):
            if not placed[i] and all(d in done for d in deps[i]):
                placed[i] = True
                order.append(i)
                done.update(n.output)
                progress = True
    order += [i for i in range(len(nodes)) if not placed[i]]
    if order == list(range(len(nodes))):
        return moved
    moved += sum(1 for pos, i in enumerate(order) if pos != i)
    copies = [onnx.NodeProto.FromString(nodes[i].SerializeToString()) for i in order]
    del graph.node[:]
    graph.node.extend(copies)
    return moved


def _external_locations(model: onnx.ModelProto) -> list[str]:
    from onnx.external_data_helper import _get_all_tensors

    out: list[str] = []
    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if loc and loc not in out:
                out.append(loc)
    return out


def read(path: str | os.PathLike, *, check: bool = True, infer_shapes: bool = True) -> LoadedModel:
    """Parse ``path`` once: external data, topological order, checker, shape inference, inventory, interface.

    Raises :class:`ConverterUsageError` (exit 2) for a missing path or a directory and :class:`ModelError`
    (exit 3) for a file that is not a readable, valid ONNX model (empty, a Git LFS pointer, truncated, external
    data missing, rejected by the checker), each as one complete line.
    """
    p = Path(path)
    if not p.exists():
        raise ConverterUsageError(f"{p}: no such file")
    if p.is_dir():
        raise ConverterUsageError(f"{p}: is a directory, expected an .onnx file")
    size = p.stat().st_size
    if size == 0:
        raise ModelError(f"{p}: empty file, not an ONNX model")
    with open(p, "rb") as f:
        head = f.read(256)
    if head.startswith(LFS_MAGIC):
        raise ModelError(f"{p}: is a Git LFS pointer, not the model; run `git lfs pull` to fetch the real file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelError(f"{p}: not a readable ONNX model (truncated or not ONNX): {type(e).__name__}") from e
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{p}: not an ONNX model (no graph found in the file)")
    external = _external_locations(model)
    if external:
        missing = [loc for loc in external if not (p.parent / loc).exists()]
        if missing:
            raise ModelError(f"{p}: external data file missing: {', '.join(missing)} (expected beside the model, in {p.parent})")
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(p.parent))
        except Exception as e:
            raise ModelError(f"{p}: external data could not be read ({', '.join(external)}): {one_line(e)}") from e
    moved = topological_sort(model.graph)
    if check:
        try:
            # a path lets the checker handle models past protobuf's 2 GB limit, weights in external files included
            # (an unsorted one can only be checked in memory, where it was sorted)
            onnx.checker.check_model(str(p) if (size > 2**31 or external) and not moved else model, full_check=False)
        except Exception as e:
            raise ModelError(f"{p}: fails the ONNX checker{' (after sorting its nodes)' if moved else ''}: {checker_line(e)}") from e
    if infer_shapes:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # inference is advisory: some producers' graphs defeat it
            inferred = model
        if inferred is not model:
            # the interface stays as the file declares it (inference invents dim names such as unk__1);
            # inferred types fill in only outputs the file left untyped
            for mine, theirs in zip(inferred.graph.output, model.graph.output):
                if theirs.type.tensor_type.elem_type or theirs.type.WhichOneof("value") not in (None, "tensor_type"):
                    mine.CopyFrom(theirs)
            model = inferred
    inv = _inventory_nodes(model)
    nodes_of: dict[OpKey, list[str]] = {}
    for k, name in inv:
        nodes_of.setdefault(k, []).append(name)
    return LoadedModel(path=p, model=model, sha256=sha256_file(p), opsets=opset_map(model), inventory=[k for k, _ in inv],
                       sorted_nodes=moved, external_data=external, nodes_of=nodes_of)


load_model = read  # the name callers used before ``read`` returned the whole interface


def checker_line(e: BaseException, limit: int = 600) -> str:
    """The ONNX checker's message as one complete line: its lines joined (it breaks sentences across
    lines, e.g. around a node's dump), whitespace collapsed, and only then shortened, with a marker."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 40].rstrip() + f" ... ({len(text)} characters; --debug shows all)"


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
