"""``onnxrepair inspect MODEL.onnx [--json]``: what the model is and what a repair could reach.

Reports inputs/outputs (shapes, dtypes), opsets, producer, an op histogram, the parameter count, conversion
readiness (a trial conversion to torch, no export: every refused op and node listed together; ``--ops-only``
checks only that each op has a converter, and says so) and the repair sites: conv layers (filters,
groups, kernel), dense layers (Gemm, or MatMul by a constant), and residual blocks (an Add whose two inputs
come from different paths that fork from one tensor).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import typer
from onnx import numpy_helper


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _ancestors(name: str, producer: dict, nodes, limit: int = 10_000) -> set[int]:
    seen: set[int] = set()
    stack = [name]
    while stack and len(seen) < limit:
        i = producer.get(stack.pop())
        if i is None or i in seen:
            continue
        seen.add(i)
        stack.extend(nodes[i].input)
    return seen


def repair_sites(model: onnx.ModelProto) -> dict:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
    shape_of = {t.name: list(t.dims) for t in g.initializer}
    for n in consts.values():
        v = _attr(n, "value")
        if v is not None:
            shape_of[n.output[0]] = list(v.dims)
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    convs, dense, residual = [], [], []
    for i, n in enumerate(g.node):
        if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 and n.input[1] in shape_of:
            w = shape_of[n.input[1]]
            groups = int(_attr(n, "group", 1))
            filters = w[0] if n.op_type == "Conv" else w[1] * groups
            convs.append({"node": n.name or f"{n.op_type}_{i}", "op": n.op_type, "filters": int(filters), "in_channels": int(w[1] * groups if n.op_type == "Conv" else w[0]),
                          "groups": groups, "kernel": [int(k) for k in w[2:]], "patchable": groups == 1})
        elif n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] in shape_of:
            w = shape_of[n.input[1]]
            out_f, in_f = (w[0], w[1]) if int(_attr(n, "transB", 0)) else (w[1], w[0])
            dense.append({"node": n.name or f"Gemm_{i}", "op": "Gemm", "in_features": int(in_f), "out_features": int(out_f)})
        elif n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in shape_of and len(shape_of[n.input[1]]) == 2:
            w = shape_of[n.input[1]]
            dense.append({"node": n.name or f"MatMul_{i}", "op": "MatMul", "in_features": int(w[0]), "out_features": int(w[1])})
        elif n.op_type in ("Add", "Sum") and len(n.input) == 2 and all(x in producer for x in n.input):
            a, b = n.input
            anc_a, anc_b = _ancestors(a, producer, g.node), _ancestors(b, producer, g.node)
            # a residual join: both sides computed, forking from a common tensor, at least one side has a
            # conv/dense layer the other lacks; the shortcut is the side with fewer ops since the fork
            if not anc_a or not anc_b:
                continue
            only_a, only_b = anc_a - anc_b, anc_b - anc_a
            has_conv = any(g.node[j].op_type in ("Conv", "Gemm", "MatMul") for j in only_a | only_b)
            if has_conv and (anc_a & anc_b or producer[a] in anc_b or producer[b] in anc_a):
                body = only_b if len(only_b) >= len(only_a) else only_a
                residual.append({"node": n.name or f"Add_{i}", "inputs": [a, b],
                                 "body_ops": int(len(body)), "body_convs": int(sum(g.node[j].op_type == "Conv" for j in body)),
                                 "shortcut_ops": int(len(only_a if body is only_b else only_b))})
    return {"conv": convs, "dense": dense, "residual_blocks": residual}


def _readiness(loaded, trial: bool) -> dict:
    """Whether the model converts: a real trial conversion (``convert``, no export) unless ``trial`` is off,
    then only the op-level check (every op has a registered converter), and the report says which."""
    import time

    from converters.convert import split_tail
    from converters.errors import ConverterError, UnsupportedOpsError
    from converters.load import inventory
    from converters.to_torch import unsupported_ops

    _, tail = split_tail(loaded.model)
    out = {"checked": "trial conversion" if trial else "op-level only (every op has a converter; attributes and shapes not tried)",
           "ready": False, "unsupported_ops": [], "error": "", "passes": [], "notes": [],
           "onnx_tail": tail.op_types if tail else [],
           "note": ("classifier tail kept as ONNX; repair works on " + tail.core_outputs[0]) if tail else ""}
    if not trial:
        core, _ = split_tail(loaded.model)
        missing = unsupported_ops(inventory(core))
        out.update(ready=not missing, unsupported_ops=[str(k) for k in missing])
        return out
    from converters import convert

    t = time.perf_counter()
    try:
        converted = convert(loaded)
    except UnsupportedOpsError as e:
        out.update(unsupported_ops=[f"{d}::{op}-{v}" for d, op, v in e.ops], error=str(e))
    except ConverterError as e:
        out["error"] = str(e)
    else:
        out.update(ready=True, passes=converted.passes, notes=converted.notes)
    out["seconds"] = round(time.perf_counter() - t, 3)
    return out


def describe(path: Path, trial: bool = True) -> dict:
    from converters import read

    loaded = read(path)
    m = loaded.model
    n_params = 0
    for t in m.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            n_params += int(np.prod(t.dims)) if t.dims else 1
    for n in m.graph.node:
        if n.op_type == "Constant":
            v = _attr(n, "value")
            if v is not None and v.data_type == onnx.TensorProto.FLOAT and len(v.dims) >= 1 and int(np.prod(v.dims)) > 1:
                n_params += int(np.prod(v.dims))
    hist = Counter(f"{k.op_type}" if k.domain == "ai.onnx" else f"{k.domain}::{k.op_type}" for k in loaded.inventory)

    def spec(s):
        return {"name": s.name, "dtype": s.dtype_name, "shape": [d if d is not None else "?" for d in s.shape]}

    return {
        "model": str(path),
        "sha256": loaded.sha256,
        "producer": loaded.producer,
        "ir_version": loaded.ir_version,
        "opsets": loaded.opsets,
        "inputs": [spec(s) for s in loaded.inputs],
        "outputs": [spec(s) for s in loaded.outputs],
        "output_source_op": loaded.output_source_op,
        "metadata": loaded.metadata,
        "external_data": loaded.external_data,
        "sorted_nodes": loaded.sorted_nodes,
        "op_histogram": dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": n_params,
        "conversion": _readiness(loaded, trial),
        "repair_sites": repair_sites(m),
    }


def inspect(
    model: Path = typer.Argument(..., help="The ONNX model to inspect."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    ops_only: bool = typer.Option(False, "--ops-only", help="Skip the trial conversion: check only that every op has a converter (faster, weaker)."),
) -> None:
    """Inputs/outputs, opset, producer, op histogram, parameter count, conversion readiness (a trial conversion), repair sites."""
    info = describe(model, trial=not ops_only)
    if json_out:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console(file=sys.stdout, width=max(Console().width, 120))
    con.print(f"[bold]{info['model']}[/]  producer: {info['producer'] or '?'}  opsets: {info['opsets']}  parameters: {info['parameters']:,}")
    if info["sorted_nodes"]:
        con.print(f"nodes were not in topological order: sorted ({info['sorted_nodes']} moved)")
    io_t = Table(title="interface")
    for c in ("kind", "name", "dtype", "shape"):
        io_t.add_column(c)
    for kind in ("inputs", "outputs"):
        for s in info[kind]:
            io_t.add_row(kind[:-1], s["name"], s["dtype"], str(s["shape"]))
    con.print(io_t)
    con.print("ops: " + ", ".join(f"{k}×{v}" for k, v in info["op_histogram"].items()))
    conv = info["conversion"]
    how = f"({conv['checked']})"
    if conv["ready"]:
        extra = [conv["note"]] if conv["note"] else []
        extra += [f"passes: {', '.join(conv['passes'])}"] if conv["passes"] else []
        con.print(f"[green]conversion: ready[/] {escape(how)}" + (f"; {escape('; '.join(extra))}" if extra else ""))
    elif conv["unsupported_ops"] and not conv["error"]:
        con.print(f"[red]conversion: unsupported ops: {escape(', '.join(conv['unsupported_ops']))}[/] {escape(how)}")
    else:
        con.print(f"[red]conversion: fails[/] {escape(how)}: {escape(conv['error'])}")
    sites = info["repair_sites"]
    t = Table(title="repair sites")
    for c in ("kind", "node", "detail"):
        t.add_column(c)
    for c in sites["conv"]:
        t.add_row("conv", c["node"], f"{c['filters']} filters, in {c['in_channels']}, groups {c['groups']}, kernel {c['kernel']}")
    for d in sites["dense"]:
        t.add_row("dense", d["node"], f"{d['in_features']} -> {d['out_features']} ({d['op']})")
    for r in sites["residual_blocks"]:
        t.add_row("residual", r["node"], f"body {r['body_ops']} ops ({r['body_convs']} conv), shortcut {r['shortcut_ops']} ops")
    con.print(t)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
