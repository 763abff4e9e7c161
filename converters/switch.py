"""Export of a per-sample switch between two sub-models as ONNX ``If`` nodes.

A module that exports this way has a method ``switch_parts()`` returning three modules (a protocol, so the
converters need not know who builds it):

* ``head(*inputs) -> (route, *carried)``: ``route`` is a bool (N,) tensor, ``carried`` tensors with the batch first;
* ``first(*carried) -> outputs``: the rows where ``route`` is False;
* ``second(*inputs) -> outputs``: the rows where ``route`` is True;
* optionally ``switch_mode``: ``"exclusive"`` (below) or ``"overlay"`` (:func:`compose`).

Each part is exported on its own (same exporter and opset, dynamic batch) and the parts are composed::

    route, carried = head(inputs)
    If  no row routed:  first(carried)                      # the whole batch, nothing gathered
    elif every row:     second(inputs)
    else:               Gather the rows of each side, run first and second on them, Concat,
                        Gather back into the input order (positions from CumSum of the route)

The ``If`` is what makes a batch that routes nothing cost ``head`` + ``first`` and no more, and it keeps every
sub-model off empty tensors (onnxruntime refuses e.g. a ``Reshape`` to ``[0, -1]``). The weights live once, in the
main graph; each branch reads them from the outer scope.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import onnx
import onnx.numpy_helper
import torch
from onnx import TensorProto, helper

INT64 = TensorProto.INT64


def is_switch(module: torch.nn.Module) -> bool:
    return callable(getattr(module, "switch_parts", None))


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


class _Namer:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, base: str) -> str:
        self.n += 1
        return f"switch/{base}_{self.n}"


def _gather_rows(m: list[onnx.NodeProto], names, rows: str, label: str, new) -> list[str]:
    """Append to ``m`` a Gather of the batch rows ``rows`` from each tensor in ``names``; the new tensors' names."""
    out = []
    for name in names:
        sel = new(label)
        m.append(helper.make_node("Gather", [name, rows], [sel], axis=0))
        out.append(sel)
    return out


def _instance(piece: onnx.GraphProto, tag: str, inputs: dict[str, str], shared: dict[str, str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """``piece``'s nodes with every value renamed into ``tag`` (graph inputs mapped by ``inputs``, initializers by
    ``shared``); returns (nodes, names of the piece's outputs)."""
    def rn(name: str) -> str:
        if not name:
            return name
        if name in inputs:
            return inputs[name]
        if name in shared:
            return shared[name]
        return f"{tag}/{name}"

    nodes = []
    for n in piece.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        del m.input[:]
        m.input.extend(rn(i) for i in n.input)
        del m.output[:]
        m.output.extend(rn(o) for o in n.output)
        if m.name:
            m.name = f"{tag}/{m.name}"
        for a in m.attribute:  # nested graphs (an If or Loop inside a part): rename what they read from outside
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _rename_subgraph(g, rn)
        nodes.append(m)
    return nodes, [rn(o.name) for o in piece.output]


def _rename_subgraph(g: onnx.GraphProto, rn: Callable[[str], str]) -> None:
    local = {v.name for v in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    for n in g.node:
        for k, i in enumerate(n.input):
            if i and i not in local:
                n.input[k] = rn(i)
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _rename_subgraph(sg, lambda s, _l=local: s if s in _l else rn(s))
    for o in g.output:
        if o.name not in local:
            o.name = rn(o.name)


def _value_info(name: str, like: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """``like``'s element type and rank under ``name`` (dims left unnamed: a branch's batch is its own)."""
    tt = like.type.tensor_type
    return helper.make_tensor_value_info(name, tt.elem_type, [None] * len(tt.shape.dim) if tt.HasField("shape") else None)


def compose(head: onnx.ModelProto, first: onnx.ModelProto, second: onnx.ModelProto, input_names: Sequence[str],
            output_names: Sequence[str], mode: str = "exclusive") -> onnx.ModelProto:
    """The switch model from its three exported parts (module docstring). ``mode="overlay"``: ``first`` runs in the
    main graph on the whole batch, and one ``If`` (any row routed) runs ``second`` on the routed rows and writes them
    over ``first``'s (ScatterND). onnxruntime optimises only the main graph's layout (NCHWc convs, fusions), so
    overlay keeps the common path -- nothing routed -- exactly as fast as the original; a routed row costs both."""
    if mode not in ("exclusive", "overlay"):
        raise ValueError(f"mode must be exclusive or overlay, not {mode!r}")
    for part, what in ((head, "head"), (first, "first"), (second, "second")):
        if part.functions:
            raise ValueError(f"the {what} part has local functions; inline them before composing")
    new = _Namer()
    initializers: list[onnx.TensorProto] = []
    shared: dict[str, dict[str, str]] = {}
    by_content: dict[tuple, str] = {}  # the second side is mostly the first's weights: store each tensor once
    for tag, part in (("head", head), ("first", first), ("second", second)):
        shared[tag] = {}
        for t in part.graph.initializer:
            arr = onnx.numpy_helper.to_array(t)
            key = (t.data_type, tuple(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest())
            if key in by_content:
                shared[tag][t.name] = by_content[key]
                continue
            c = onnx.numpy_helper.from_array(arr, f"{tag}/{t.name}")
            by_content[key] = shared[tag][t.name] = c.name
            initializers.append(c)

    x_names = list(input_names)
    h_in = {v.name: x for v, x in zip(head.graph.input, x_names)}
    h_nodes, h_out = _instance(head.graph, "head", h_in, shared["head"])
    route, carried = h_out[0], h_out[1:]
    if len(carried) != len(first.graph.input):
        raise ValueError(f"head gives {len(carried)} carried tensors, first takes {len(first.graph.input)}")
    outs_like = list(first.graph.output)
    if mode == "overlay":
        return _overlay(head, first, second, x_names, output_names, h_nodes, route, carried, initializers, shared, outs_like, new)

    def branch(name: str, nodes: list[onnx.NodeProto], outs: list[str]) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [_value_info(o, like) for o, like in zip(outs, outs_like)])

    # no row routed: first on the whole batch
    f_nodes, f_out = _instance(first.graph, "first_all", {v.name: c for v, c in zip(first.graph.input, carried)}, shared["first"])
    g_none = branch("none_routed", f_nodes, f_out)
    # every row routed: second on the whole batch
    s_nodes, s_out = _instance(second.graph, "second_all", {v.name: x for v, x in zip(second.graph.input, x_names)}, shared["second"])
    g_all = branch("all_routed", s_nodes, s_out)

    # some of each: gather, run both, put the rows back in order
    m: list[onnx.NodeProto] = []
    const = lambda name, vals: helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_v", INT64, [len(vals)], vals))  # noqa: E731
    minus1, one = new("minus1"), new("one")
    m += [const(minus1, [-1]), helper.make_node("Constant", [], [one], value=helper.make_tensor(one + "_v", INT64, [], [1]))]
    not_route, nz_o, nz_r, io, ir = new("not_route"), new("nz_o"), new("nz_r"), new("idx_o"), new("idx_r")
    m += [helper.make_node("Not", [route], [not_route]),
          helper.make_node("NonZero", [not_route], [nz_o]), helper.make_node("Reshape", [nz_o, minus1], [io]),
          helper.make_node("NonZero", [route], [nz_r]), helper.make_node("Reshape", [nz_r, minus1], [ir])]
    c_sel = _gather_rows(m, carried, io, "first_rows", new)
    x_sel = _gather_rows(m, x_names, ir, "second_rows", new)
    fm_nodes, fm_out = _instance(first.graph, "first_rows", {v.name: c for v, c in zip(first.graph.input, c_sel)}, shared["first"])
    sm_nodes, sm_out = _instance(second.graph, "second_rows", {v.name: c for v, c in zip(second.graph.input, x_sel)}, shared["second"])
    m += fm_nodes + sm_nodes
    # position of row i in Concat(first rows, second rows): routed rows after the n_o others, in order
    r64, c_r, nr64, c_o, n_o, pr, po, pos = (new(s) for s in ("r64", "cum_r", "o64", "cum_o", "n_o", "pos_r", "pos_o", "pos"))
    zero_axis = new("axis0")
    m += [helper.make_node("Cast", [route], [r64], to=INT64), helper.make_node("Cast", [not_route], [nr64], to=INT64),
          helper.make_node("Constant", [], [zero_axis], value=helper.make_tensor(zero_axis + "_v", INT64, [], [0])),
          helper.make_node("CumSum", [r64, zero_axis], [c_r]), helper.make_node("CumSum", [nr64, zero_axis], [c_o]),
          helper.make_node("ReduceSum", [nr64], [n_o], keepdims=0)]
    t1, t2 = new("t"), new("t")
    m += [helper.make_node("Add", [c_r, n_o], [t1]), helper.make_node("Sub", [t1, one], [pr]),
          helper.make_node("Sub", [c_o, one], [po]), helper.make_node("Where", [route, pr, po], [pos])]
    mixed_out = []
    for a, b in zip(fm_out, sm_out):
        cat, o = new("cat"), new("mixed_out")
        m += [helper.make_node("Concat", [a, b], [cat], axis=0), helper.make_node("Gather", [cat, pos], [o], axis=0)]
        mixed_out.append(o)
    g_mixed = branch("some_routed", m, mixed_out)

    # conditions, in the main graph
    r64m, n_r, n_all, none, every = new("route_i64"), new("n_routed"), new("n_rows"), new("none_routed"), new("all_routed")
    shape = new("route_shape")
    zero = new("zero")
    main = [*h_nodes,
            helper.make_node("Cast", [route], [r64m], to=INT64),
            helper.make_node("ReduceSum", [r64m], [n_r], keepdims=0),
            helper.make_node("Size", [route], [n_all]),
            helper.make_node("Constant", [], [zero], value=helper.make_tensor(zero + "_v", INT64, [], [0])),
            helper.make_node("Equal", [n_r, zero], [none]),
            helper.make_node("Equal", [n_r, n_all], [every])]
    inner_out = [new("inner_out") for _ in output_names]
    inner = helper.make_node("If", [every], inner_out, then_branch=g_all, else_branch=g_mixed, name="switch/any_not_routed")
    g_some = branch("some_or_all_routed", [inner], inner_out)
    main.append(helper.make_node("If", [none], list(output_names), then_branch=g_none, else_branch=g_some, name="switch/any_routed"))

    return _model(head, first, second, main, output_names, outs_like, initializers)


def _overlay(head, first, second, x_names, output_names, h_nodes, route, carried, initializers, shared, outs_like, new) -> onnx.ModelProto:
    f_nodes, f_out = _instance(first.graph, "first", {v.name: c for v, c in zip(first.graph.input, carried)}, shared["first"])
    m: list[onnx.NodeProto] = []
    minus1 = new("minus1")
    nz, ir, ir2 = new("nz_r"), new("idx_r"), new("idx_r_col")
    m += [helper.make_node("Constant", [], [minus1], value=helper.make_tensor(minus1 + "_v", INT64, [2], [-1, 1])),
          helper.make_node("NonZero", [route], [nz]), helper.make_node("Reshape", [nz, minus1], [ir2])]
    one_d = new("minus1_1d")
    m += [helper.make_node("Constant", [], [one_d], value=helper.make_tensor(one_d + "_v", INT64, [1], [-1])),
          helper.make_node("Reshape", [nz, one_d], [ir])]
    x_sel = _gather_rows(m, x_names, ir, "routed_rows", new)
    s_nodes, s_out = _instance(second.graph, "second_rows", {v.name: c for v, c in zip(second.graph.input, x_sel)}, shared["second"])
    m += s_nodes
    routed_out = []
    for a, b in zip(f_out, s_out):
        o = new("overlaid")
        m.append(helper.make_node("ScatterND", [a, ir2, b], [o]))
        routed_out.append(o)
    g_some = helper.make_graph(m, "some_routed", [], [_value_info(o, like) for o, like in zip(routed_out, outs_like)])
    ident = [new("first_out") for _ in output_names]
    g_none = helper.make_graph([helper.make_node("Identity", [a], [o]) for a, o in zip(f_out, ident)], "none_routed", [],
                               [_value_info(o, like) for o, like in zip(ident, outs_like)])
    r64, n_r, zero, anyr = new("route_i64"), new("n_routed"), new("zero"), new("any_routed")
    main = [*h_nodes, *f_nodes,
            helper.make_node("Cast", [route], [r64], to=INT64),
            helper.make_node("ReduceSum", [r64], [n_r], keepdims=0),
            helper.make_node("Constant", [], [zero], value=helper.make_tensor(zero + "_v", INT64, [], [0])),
            helper.make_node("Greater", [n_r, zero], [anyr]),
            helper.make_node("If", [anyr], list(output_names), then_branch=g_some, else_branch=g_none, name="switch/any_routed")]
    return _model(head, first, second, main, output_names, outs_like, initializers)


def _model(head, first, second, main, output_names, outs_like, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(main, head.graph.name or "switch", [*head.graph.input],
                              [_value_info(o, like) for o, like in zip(output_names, outs_like)], initializers)
    opsets: dict[str, int] = {}
    for part in (head, first, second):
        for o in part.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name=head.producer_name, producer_version=head.producer_version)
    model.ir_version = max(head.ir_version, first.ir_version, second.ir_version)
    return model


def export_switch(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], input_names: Sequence[str],
                  output_names: Sequence[str], export_part: Callable) -> tuple[onnx.ModelProto, object]:
    """Export the parts with ``export_part(module, examples, in_names, out_names, exporter=None) -> ExportResult``
    (the head first; the other two with the exporter and opset the head got) and compose them."""
    head, first, second = module.switch_parts()
    with torch.no_grad():
        h = _as_tuple(head(*example_inputs))
    carried = list(h[1:])
    res_h = export_part(head, list(example_inputs), list(input_names), ["route", *[f"carried{i}" for i in range(len(carried))]])
    res_f = export_part(first, carried, [f"carried{i}" for i in range(len(carried))], list(output_names), res_h)
    res_s = export_part(second, list(example_inputs), list(input_names), list(output_names), res_h)
    mode = getattr(module, "switch_mode", "exclusive")
    return compose(res_h.model, res_f.model, res_s.model, input_names, output_names, mode), res_h
