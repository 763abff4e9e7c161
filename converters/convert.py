"""The two calls the rest of onnxrepair uses: :func:`convert` (ONNX -> trainable ``fx.GraphModule``)
and :func:`export_like` (an edited module -> ONNX with the original's interface).

Pipeline of :func:`convert`: load + check + inventory (:mod:`converters.load`) -> split off a non-standard
tail (below) -> onnx2torch with our extra converters (:mod:`converters.to_torch`, :mod:`converters.ops`) ->
fx passes (:mod:`converters.passes`: run-time Reshape targets folded to static ones, tf2onnx's
MatMul+Add / Mul+Add constants turned into ``nn.Linear`` / ``ChannelAffine`` parameters).

**Classifier tails (skl2onnx).** A scikit-learn classifier exported by skl2onnx ends in
``Softmax -> ArgMax -> ArrayFeatureExtractor(classes) -> Cast`` (the label) and ``ZipMap`` (ai.onnx.ml) of the
probabilities. Those ops have no torch meaning and nothing in them is worth repairing. We cut the graph
at the tensor that feeds the ZipMap (the probability tensor ``P``): the *core* is every node ``P`` depends on
(standard ops only; it becomes the GraphModule, whose output is ``P``), the *tail* is every other node, kept
as ONNX protobufs in :class:`OnnxTail` with the initializers it reads (e.g. ``classes``). On export the tail's
nodes are appended to the new core graph, reading the re-exported ``P``; the tail's internal names get a
prefix so they cannot clash with the exporter's names, and the graph outputs are restored to the original
ones (label + ZipMap), so the file stays a drop-in replacement. Repair therefore works on ``P``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from .errors import ModelError, one_line

from .load import DEFAULT_DOMAIN, LoadedModel, TensorSpec, graph_inputs, graph_outputs, inventory, normalise_domain, opset_map, read
from .onnx_passes import run_onnx_passes

if TYPE_CHECKING:  # torch is imported where it is used, so reading a model or its errors stays light
    import torch
    from torch import fx

    from .export import ExportResult

log = logging.getLogger(__name__)

TAIL_PREFIX = "onnxrepair_tail/"


@dataclass
class OnnxTail:
    """ONNX nodes kept out of torch and re-attached on export (see module docstring)."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    core_outputs: list[str]  # tensors the tail reads from the core (the probability tensor first)
    outputs: list[onnx.ValueInfoProto]  # the original model's graph outputs, in order
    opsets: dict[str, int]  # non-default domains the tail needs (e.g. ai.onnx.ml)
    core_values: list[onnx.ValueInfoProto] = field(default_factory=list)  # dtypes/shapes of core_outputs (the core model's outputs)
    default_opset: int = 17  # the original's ai.onnx opset, which the tail's standard nodes (ArgMax, Cast...) were written for
    ir_version: int = 8  # the original's: onnxruntime refuses IR versions newer than it knows

    @property
    def op_types(self) -> list[str]:
        return [n.op_type for n in self.nodes]

    def standalone(self) -> onnx.ModelProto:
        """The tail alone as a model (inputs ``core_outputs``, outputs the original's, in order): run after a torch
        core, it gives outputs that line up name by name with an exported file's (see ``onnxrepair.validate``)."""
        known = {v.name: v for v in self.core_values}
        inputs = [known.get(n) or helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in self.core_outputs]
        graph = helper.make_graph(list(self.nodes), "onnxrepair_tail", inputs, list(self.outputs), initializer=list(self.initializers))
        opsets = [helper.make_opsetid("", self.default_opset), *(helper.make_opsetid(d, v) for d, v in self.opsets.items())]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = self.ir_version
        return model

    def attach(self, core: onnx.ModelProto) -> onnx.ModelProto:
        """Append the tail to an exported core model whose outputs are ``core_outputs``."""
        model = onnx.ModelProto()
        model.CopyFrom(core)
        g = model.graph
        keep = set(self.core_outputs) | {i.name for i in g.input} | {o.name for o in self.outputs}

        def rn(name: str) -> str:
            return name if (not name or name in keep) else TAIL_PREFIX + name

        for n in self.nodes:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.name = rn(n.name) if n.name else ""
            m.input[:] = [rn(x) for x in n.input]
            m.output[:] = [rn(x) for x in n.output]
            g.node.append(m)
        for t in self.initializers:
            u = onnx.TensorProto()
            u.CopyFrom(t)
            u.name = rn(t.name)
            g.initializer.append(u)
        produced = {o for n in self.nodes for o in n.output}
        core_outs = {o.name: o for o in g.output}
        new_outs = [o if o.name in produced else core_outs.get(o.name, o) for o in self.outputs]
        del g.output[:]
        g.output.extend(new_outs)
        have = {normalise_domain(o.domain) for o in model.opset_import}
        for dom, ver in self.opsets.items():
            if dom not in have:
                model.opset_import.add(domain=dom, version=ver)
        return model


def split_tail(model: onnx.ModelProto) -> tuple[onnx.ModelProto, OnnxTail | None]:
    """Cut a ZipMap-style classifier tail off; return (core model, tail) or (model, None) when there is none."""
    g = model.graph
    nonstd = [n for n in g.node if normalise_domain(n.domain) != DEFAULT_DOMAIN]
    zipmaps = [n for n in nonstd if n.op_type == "ZipMap"]
    if not zipmaps:
        return model, None
    p = zipmaps[0].input[0]
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    core_idx: set[int] = set()
    stack = [p]
    while stack:
        t = stack.pop()
        i = producer.get(t)
        if i is None or i in core_idx:
            continue
        core_idx.add(i)
        stack.extend(g.node[i].input)
    if any(normalise_domain(g.node[i].domain) != DEFAULT_DOMAIN for i in core_idx):
        return model, None  # the probabilities are computed by ml ops: nothing standard to cut out
    core_nodes = [n for i, n in enumerate(g.node) if i in core_idx]
    tail_nodes = [n for i, n in enumerate(g.node) if i not in core_idx]
    core_tensors = {o for n in core_nodes for o in n.output}
    inits = {t.name: t for t in g.initializer}
    extra = []
    for n in tail_nodes:
        for x in n.input:
            if x in core_tensors and x != p and x not in extra:
                extra.append(x)
    for o in g.output:
        if o.name in core_tensors and o.name != p and o.name not in extra:
            extra.append(o.name)
    core_outputs = [p, *extra]
    vinfo = {v.name: v for v in [*g.value_info, *g.output]}
    outs = []
    for name in core_outputs:
        v = vinfo.get(name)
        outs.append(v if v is not None and v.type.tensor_type.elem_type else helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    used_core = {x for n in core_nodes for x in n.input}
    used_tail = {x for n in tail_nodes for x in n.input}
    core_graph = helper.make_graph(
        core_nodes, g.name or "core", [i for i in g.input if i.name not in inits], outs,
        initializer=[t for t in g.initializer if t.name in used_core],
        value_info=[v for v in g.value_info if v.name in core_tensors],
    )
    core = helper.make_model(core_graph, opset_imports=[o for o in model.opset_import if normalise_domain(o.domain) == DEFAULT_DOMAIN])
    core.ir_version = model.ir_version
    opsets = opset_map(model)
    tail_domains = {normalise_domain(n.domain) for n in tail_nodes} - {DEFAULT_DOMAIN}
    tail = OnnxTail(
        nodes=list(tail_nodes),
        initializers=[t for t in g.initializer if t.name in used_tail],
        core_outputs=core_outputs,
        outputs=list(g.output),
        opsets={d: opsets[d] for d in tail_domains if d in opsets},
        core_values=outs,
        default_opset=opsets.get(DEFAULT_DOMAIN, 17),
        ir_version=model.ir_version or 8,
    )
    return core, tail


def inline_constant_identities(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace ``Identity(initializer)`` by a copy of the initializer under the Identity's output name.

    The legacy torch exporter de-duplicates equal weights (e.g. the zero biases of freshly initialised,
    BN-folded convs) and re-creates them through Identity nodes; onnx2torch's Conv converter needs its
    weight and bias as initializers, and a repair needs each layer's own copy anyway.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_outs = {o.name for o in g.output}
    todo = [n for n in g.node if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in graph_outs]
    if not todo:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = list(g.node)
    drop = {i for i, n in enumerate(nodes) if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in graph_outs}
    keep = [n for i, n in enumerate(nodes) if i not in drop]
    new_inits = []
    for i, n in enumerate(nodes):
        if i in drop:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            new_inits.append(t)
    keep = [onnx.NodeProto.FromString(n.SerializeToString()) for n in keep]  # detach before clearing
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    return out, len(new_inits)


def example_inputs_for(specs: Sequence[TensorSpec], batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Seeded random inputs matching ``specs``: the leading symbolic dim is ``batch``, other symbolic dims 1."""
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        shape = [batch if i == 0 and not isinstance(d, int) else (d if isinstance(d, int) and d > 0 else 1) for i, d in enumerate(s.shape)]
        if shape and isinstance(s.shape[0], int) and s.shape[0] > 0:
            shape[0] = s.shape[0]  # a fixed batch stays fixed
        dt = s.dtype if s.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dt, np.floating):
            a = rng.random(shape).astype(dt)  # [0,1): the range most image/tabular fixtures expect
        elif dt == np.bool_:
            a = rng.random(shape) > 0.5
        else:
            a = np.zeros(shape, dtype=dt)
        import torch

        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    return out


@dataclass
class ConvertedModel:
    """An ONNX model as an editable, trainable GraphModule, plus what is needed to export it back."""

    gm: fx.GraphModule
    loaded: LoadedModel
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]  # outputs of ``gm`` (for a classifier tail: the probability tensor)
    tail: OnnxTail | None = None
    passes: list[str] = field(default_factory=list)  # every pass that changed something, ONNX-level ones first
    notes: list[str] = field(default_factory=list)  # what those passes changed, one line each

    @property
    def original_outputs(self) -> list[TensorSpec]:
        return graph_outputs(self.loaded.model)

    @property
    def dynamic_batch(self) -> bool:
        return all(not (s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0) for s in self.inputs)

    def example_inputs(self, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
        return example_inputs_for(self.inputs, batch, seed)


def convert(source: str | os.PathLike | LoadedModel, *, passes: bool = True) -> ConvertedModel:
    """Read (if given a path; pass :func:`converters.read`'s result to parse the file only once), fix what
    torch cannot take as is (:mod:`converters.onnx_passes`), split a classifier tail, convert with onnx2torch
    and run the fx passes. ``passes`` / ``notes`` of the result say what changed, ``topological_sort`` included."""
    from .passes import run_passes
    from .to_torch import to_torch

    loaded = source if isinstance(source, LoadedModel) else read(source)
    ran: list[str] = ["topological_sort"] if loaded.sorted_nodes else []
    notes: list[str] = list(loaded.notes)
    model, _ = inline_constant_identities(loaded.model)
    model, onnx_ran, onnx_notes = run_onnx_passes(model)
    ran += onnx_ran
    notes += onnx_notes
    core, tail = split_tail(model)
    core_loaded = loaded if (tail is None and model is loaded.model) else LoadedModel(
        path=loaded.path, model=core, sha256=loaded.sha256, opsets=opset_map(core), inventory=inventory(core), nodes_of=loaded.nodes_of)
    gm = to_torch(core_loaded)
    specs = graph_inputs(core)
    if passes:
        try:
            gm, fx_ran = run_passes(gm, lambda b: example_inputs_for(specs, b))
        except RuntimeError as e:
            raise ModelError(f"{loaded.path}: {e}") from e
        ran += fx_ran
    gm.eval()
    return ConvertedModel(gm=gm, loaded=loaded, inputs=specs, outputs=graph_outputs(core), tail=tail, passes=ran, notes=notes)


def _tool_version() -> str:
    """The version of the distribution converters ships in (read from its metadata, not by importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxrepair")
    except PackageNotFoundError:
        return "unknown"


def _fix_interface(model: onnx.ModelProto, converted: ConvertedModel) -> list[str]:
    """Keep the original's interface where the exporter drifted: refuse a changed dtype; restore the original's
    dimension names (an exporter names a dynamic batch ``batch``; the source said ``batch_size`` or ``N``), and
    say where a symbolic dim of the original came out fixed. Returns notes."""
    notes: list[str] = []
    want = {s.name: s for s in [*converted.inputs, *converted.outputs]}
    rename: dict[str, str] = {}
    for v in [*model.graph.input, *model.graph.output]:
        s = want.get(v.name)
        tt = v.type.tensor_type
        if s is None or not v.type.HasField("tensor_type"):
            continue
        if s.elem_type and tt.elem_type != s.elem_type:
            raise ModelError(f"export changed the dtype of {v.name!r}: {onnx.TensorProto.DataType.Name(tt.elem_type)} instead of {s.dtype_name}")
        if not tt.HasField("shape") or len(tt.shape.dim) != len(s.shape):
            continue
        for i, (d, orig) in enumerate(zip(tt.shape.dim, s.shape)):
            if isinstance(orig, int) and orig > 0:
                continue
            if d.HasField("dim_value"):
                notes.append(f"{v.name} dim {i}: symbolic {orig or '?'} in the original, fixed to {d.dim_value} in the export")
                continue
            if d.dim_param and d.dim_param != (orig or "") and v in model.graph.input:
                rename.setdefault(d.dim_param, orig or "")
            if orig:
                d.dim_param = orig
            else:
                d.ClearField("dim_param")
    if rename:  # the exporter's names inside the graph follow the inputs' (value_info carries them)
        for v in model.graph.value_info:
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param in rename:
                    if rename[d.dim_param]:
                        d.dim_param = rename[d.dim_param]
                    else:
                        d.ClearField("dim_param")
    return notes


def export_like(
    converted: ConvertedModel,
    module: torch.nn.Module | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    exporter: str = "auto",
    extra_metadata: dict[str, str] | None = None,
    *,
    opset: int | None = None,
    optimize: bool = True,
) -> ExportResult:
    """Export ``module`` (default: ``converted.gm``) with the original model's interface.

    Keeps input/output names and dtypes, their dimension names, a fixed batch fixed and a dynamic one dynamic,
    and the original's opset where the exporter can write it (``opset=`` asks for another one: legacy writes
    7..20, dynamo 18+); re-attaches a classifier tail; simplifies the graph (``optimize``; node counts in the
    result); records provenance in ``metadata_props``: ``onnxrepair.version``, ``onnxrepair.source_sha256``,
    ``onnxrepair.source_opset``, ``onnxrepair.exporter`` (+ ``extra_metadata``).
    """
    from .export import export_graph, get_metadata, set_metadata

    module = converted.gm if module is None else module
    if example_inputs is None:
        example_inputs = converted.example_inputs(batch=2 if converted.dynamic_batch else 1)
    original_opset = converted.loaded.opsets.get(DEFAULT_DOMAIN, 17)
    res = export_graph(
        module, list(example_inputs), [s.name for s in converted.inputs], [s.name for s in converted.outputs],
        min_opset=original_opset, opset=opset, dynamic_batch=converted.dynamic_batch, exporter=exporter, optimize=optimize,
    )
    model = res.model
    res.notes += _fix_interface(model, converted)
    if converted.tail is not None:
        model = converted.tail.attach(model)
    # keep the producer's own metadata, then add ours
    set_metadata(model, get_metadata(converted.loaded.model))
    props = {
        "onnxrepair.version": _tool_version(),
        "onnxrepair.source_sha256": converted.loaded.sha256,
        "onnxrepair.source_opset": str(original_opset),
        "onnxrepair.exporter": res.exporter,
    }
    if res.fallback_reason:
        props["onnxrepair.exporter_fallback_reason"] = res.fallback_reason[:500]
    if converted.tail is not None:
        props["onnxrepair.tail"] = ",".join(converted.tail.op_types)
    props.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    set_metadata(model, props)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelError(f"exported model fails the ONNX checker: {one_line(e)}") from e
    res.model = model
    if res.opset != original_opset:
        res.notes.append(f"exported at opset {res.opset}; the original was opset {original_opset}"
                         + (" (asked for)" if opset is not None else " (no exporter writes it)" if res.opset < original_opset else ""))
    return res


__all__ = ["ConvertedModel", "OnnxTail", "convert", "export_like", "split_tail", "example_inputs_for"]
