"""Edits of a converted model's fx graph. Each edit returns ``(graph_module, modified)`` like a torch.fx pass,
leaves the graph linted and recompiled, and never touches ONNX.

* :func:`insert_after` — run a new submodule on a node's output and let every former user read its result.
* :func:`replace_region` — replace a single-entry single-exit region (``entry`` exclusive, ``exit`` inclusive)
  by one new submodule that maps the entry's value to the exit's value (ArchRepair's block replacement).
"""

from __future__ import annotations

from torch import fx, nn

from .split import ancestors


def _unique_name(gm: fx.GraphModule, name: str) -> str:
    base, i = name, 1
    while hasattr(gm, name):
        name = f"{base}_{i}"
        i += 1
    return name


def insert_after(gm: fx.GraphModule, node_name: str, module: nn.Module, name: str) -> tuple[fx.GraphModule, bool]:
    """``y = node(...)`` becomes ``y' = module(y)`` and every former user of ``y`` reads ``y'``."""
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    target = _unique_name(gm, name)
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    gm.graph.lint()
    gm.recompile()
    return gm, True


def region_nodes(gm: fx.GraphModule, entry: str, exit: str) -> list[fx.Node]:
    """Nodes strictly after ``entry`` up to and including ``exit`` that lie on a path entry -> exit, in graph
    order; raises ValueError when the region is not single-entry single-exit (something inside reads another
    computed value from outside, or something outside reads a value from inside other than ``exit``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if entry not in nodes or exit not in nodes:
        raise ValueError(f"no such node: {entry if entry not in nodes else exit}")
    e, x = nodes[entry], nodes[exit]
    anc_x = ancestors(x)
    anc_e = ancestors(e)
    if e not in anc_x:
        raise ValueError(f"{entry} does not reach {exit}")
    inside = [n for n in gm.graph.nodes if n in anc_x and n not in anc_e]
    inside_set = set(inside)
    for n in inside:
        for a in n.all_input_nodes:
            if a not in inside_set and a is not e and a.op not in ("get_attr",):
                raise ValueError(f"region {entry} -> {exit} is not single-entry: {n.name} reads {a.name}")
        if n is not x and any(u not in inside_set for u in n.users):
            raise ValueError(f"region {entry} -> {exit} is not single-exit: {n.name} is read outside it")
    return inside


def replace_region(gm: fx.GraphModule, entry: str, exit: str, module: nn.Module, name: str) -> tuple[fx.GraphModule, bool]:
    """Replace the region ``entry -> exit`` (see :func:`region_nodes`) by ``module(entry value)``; the old
    region's nodes are removed and submodules nobody calls any more are deleted."""
    inside = region_nodes(gm, entry, exit)
    nodes = {n.name: n for n in gm.graph.nodes}
    e, x = nodes[entry], nodes[exit]
    target = _unique_name(gm, name)
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(x):
        new = gm.graph.call_module(target, (e,))
    x.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    for n in reversed(inside):
        gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm, True
