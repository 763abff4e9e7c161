"""Passes on the ONNX graph, run before onnx2torch sees it, for constructs whose meaning is fixed once the
model's static shapes are known. Each returns ``(model, notes)``: a copy when it changed something and
one note per change (empty: nothing to do). The topological sort lives in :func:`converters.load.read`,
because the checker needs it before anything else runs.

* :func:`explicit_auto_pad` -- Conv / MaxPool / AveragePool with ``auto_pad`` SAME_UPPER / SAME_LOWER (older
  tf2onnx, keras2onnx, CNTK exports). The padding SAME means depends only on the input's spatial size; where
  shape inference knows it, the pass writes the explicit ``pads`` (ONNX spec: total = max(0, (ceil(in/s)-1)*s +
  (k-1)*d + 1 - in), the odd pixel at the end for UPPER, at the start for LOWER). Unknown sizes are left for
  the converter to refuse.
* :func:`fold_shape_inputs` -- an input that must be a constant for torch (Reduce* ``axes``, Resize
  ``scales``/``sizes``, Split ``split``) but is computed at run time *from shapes only* (``Shape``/``Size`` of a
  tensor, then arithmetic): evaluated on onnx's reference evaluator at two values of every symbolic dim; when
  both agree the tensor is a constant of the model and becomes an initializer. An input computed from a
  tensor's values is genuinely dynamic and left for the converter to refuse, naming the node.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

_POOLS = {"Conv", "MaxPool", "AveragePool", "LpPool"}
_SHAPE_ONLY = {"Shape", "Size"}  # ops whose output depends on their input's shape, never its values
# (op, index of the input torch needs as a constant); Reduce* axes became an input at opset 18 (ReduceSum at 13)
_CONST_INPUTS = {
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ReduceMean",
                           "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd")},
    "Resize": (1, 2, 3),
    "Split": (1,),
}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    out = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = v.type.tensor_type
        if v.type.HasField("tensor_type") and tt.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for t in model.graph.initializer:
        out[t.name] = list(t.dims)
    return out


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def same_pads(auto_pad: str, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX ``pads`` ([begins..., ends...]) equivalent to ``auto_pad`` SAME_UPPER / SAME_LOWER."""
    begins, ends = [], []
    for n, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def explicit_auto_pad(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Rewrite SAME_UPPER / SAME_LOWER ``auto_pad`` into explicit ``pads`` where the spatial size is known."""
    todo = [i for i, n in enumerate(model.graph.node) if n.op_type in _POOLS
            and _attrs(n).get("auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER", "SAME_UPPER", "SAME_LOWER")]
    if not todo:
        return model, []
    shapes = _shapes(model)
    out = _copy(model)
    notes = []
    for i in todo:
        node = out.graph.node[i]
        a = _attrs(node)
        mode = a["auto_pad"].decode() if isinstance(a["auto_pad"], bytes) else a["auto_pad"]
        x = shapes.get(node.input[0])
        kernel = a.get("kernel_shape")
        if kernel is None and node.op_type == "Conv" and len(node.input) > 1:
            w = shapes.get(node.input[1])
            kernel = w[2:] if w else None
        if not x or kernel is None or any(not isinstance(v, int) or v <= 0 for v in x[2:]) or len(x) - 2 != len(kernel):
            log.info("%s %r: auto_pad %s left as is (input spatial size unknown)", node.op_type, node.name, mode)
            continue
        r = len(kernel)
        pads = same_pads(mode, x[2:], list(kernel), list(a.get("strides", [1] * r)), list(a.get("dilations", [1] * r)))
        keep = [att for att in node.attribute if att.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend([*keep, helper.make_attribute("pads", pads)])
        notes.append(f"{node.op_type} {node.name or i}: auto_pad {mode} -> pads {pads}")
    return (out, notes) if notes else (model, [])


def _data_dependent(name: str, producer: dict, inputs: set[str], memo: dict) -> bool:
    """True when ``name``'s value depends on a graph input's values (not only on shapes)."""
    stack = [name]
    order = []
    while stack:  # iterative post-order: graphs can be deep
        t = stack.pop()
        if t in memo or t in order:
            continue
        order.append(t)
        n = producer.get(t)
        if n is not None and n.op_type not in _SHAPE_ONLY:
            stack.extend(x for x in n.input if x)
    for t in reversed(order):
        n = producer.get(t)
        if n is None:
            memo[t] = t in inputs
        elif n.op_type in _SHAPE_ONLY:
            memo[t] = False
        else:
            memo[t] = any(memo.get(x, False) for x in n.input if x)
    return memo[name]


def _evaluate(model: onnx.ModelProto, name: str, producer: dict, dim: int) -> np.ndarray:
    """Evaluate ``name`` from the nodes it needs, feeding zeros whose symbolic dims are ``dim``."""
    from onnx.reference import ReferenceEvaluator

    need, stack = set(), [name]
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or id(n) in need:
            continue
        need.add(id(n))
        stack.extend(x for x in n.input if x)
    nodes = [n for n in model.graph.node if id(n) in need]
    used = {x for n in nodes for x in n.input}
    inits = [t for t in model.graph.initializer if t.name in used]
    init_names = {t.name for t in inits}
    ins = [v for v in model.graph.input if v.name in used and v.name not in init_names]
    g = helper.make_graph(nodes, "fold", ins, [helper.make_value_info(name, onnx.TypeProto())], initializer=inits)
    sub = helper.make_model(g, opset_imports=list(model.opset_import))
    feeds = {}
    for v in ins:
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in tt.shape.dim]
        feeds[v.name] = np.zeros(shape, dtype=helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return np.asarray(ReferenceEvaluator(sub).run([name], feeds)[0])


def fold_shape_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Turn run-time-computed Reduce axes / Resize scales, sizes / Split sizes that depend on shapes alone
    (and do not change with the symbolic dims) into initializers."""
    g = model.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    wanted = []
    for n in g.node:
        for idx in _CONST_INPUTS.get(n.op_type, ()):
            if idx < len(n.input) and n.input[idx] and n.input[idx] not in consts and n.input[idx] not in wanted:
                wanted.append(n.input[idx])
    if not wanted:
        return model, []
    producer = {o: n for n in g.node for o in n.output}
    inputs = {v.name for v in g.input} - {t.name for t in g.initializer}
    memo: dict[str, bool] = {}
    values = {}
    for name in wanted:
        if name not in producer or _data_dependent(name, producer, inputs, memo):
            continue
        try:
            a, b = _evaluate(model, name, producer, 2), _evaluate(model, name, producer, 3)
        except Exception as e:  # noqa: BLE001 -- an op the reference evaluator lacks: leave it for the converter
            log.info("fold_shape_inputs: could not evaluate %r: %s", name, e)
            continue
        if a.shape == b.shape and np.array_equal(a, b):
            values[name] = a
    if not values:
        return model, []
    out = _copy(model)
    g = out.graph
    keep = [n for n in g.node if not (set(n.output) & set(values))]
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in values.items())
    # drop what only fed the folded tensors
    needed = {o.name for o in g.output}
    live = []
    for n in reversed(keep):
        if set(n.output) & needed or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            live.append(n)
            needed |= set(n.input)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    needed |= {x for s in sub.node for x in s.input}
    live.reverse()
    live = [onnx.NodeProto.FromString(n.SerializeToString()) for n in live]
    del g.node[:]
    g.node.extend(live)
    notes = [f"{k}: computed from shapes at run time, folded to {v.tolist()}" for k, v in values.items()]
    return out, notes


def run_onnx_passes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """All ONNX-level passes; returns (model, names of the passes that changed something, their notes)."""
    ran, notes = [], []
    for name, fn in (("explicit_auto_pad", explicit_auto_pad), ("fold_shape_inputs", fold_shape_inputs)):
        model, n = fn(model)
        if n:
            ran.append(name)
            notes.extend(n)
    return model, ran, notes


__all__ = ["explicit_auto_pad", "fold_shape_inputs", "run_onnx_passes", "same_pads"]
