"""Cut a converted model (a ``torch.fx.GraphModule``) at one node into a prefix and a suffix.

This is the one splitter every method uses: DeepPatch's filter assessment runs the prefix once and the suffix
once per stacked ablation; the model-transformation framework (FMT, DARE) tunes the prefix as a regression
model; ArchRepair caches what is frozen before a block.

* ``prefix``: the model inputs -> the cut activation. It holds only the cut's *ancestors*, so nothing after
  the cut is computed.
* ``suffix``: ``(cut activation, *carried)`` -> the model outputs. ``carried`` are the values computed in the
  prefix that the rest of the graph still reads besides the cut (a residual skip crossing the cut, or a model
  input read again later); they are computed once by :meth:`Split.run_prefix`, never recomputed.

Both are GraphModules built on the *same* submodules and parameters as ``model`` (fx copies references), so
tuning the prefix edits the classifier in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import UsageError

_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.ReLU6, nn.Hardtanh)
_ACT_FUNCS = {torch.relu, torch.nn.functional.relu, torch.sigmoid, torch.tanh, torch.nn.functional.leaky_relu,
              torch.nn.functional.gelu, torch.nn.functional.elu, torch.nn.functional.silu}


@dataclass
class Layer:
    """A hidden layer of the prefix: the Linear that computes it and the node that holds its neurons."""

    linear: str  # module target of the nn.Linear (qualified name)
    node: str  # fx node with the layer's neuron values (the activation after the Linear, else the Linear)
    width: int
    input_layer: int | None  # index of the previous Layer feeding this Linear directly, None = fed by the input/other


@dataclass
class Split:
    model: fx.GraphModule  # the whole classifier (the caller's copy)
    prefix: fx.GraphModule  # model inputs -> cut activation; shares parameters with ``model``
    suffix: fx.GraphModule  # (cut activation, *carried) -> model outputs; shares parameters
    cut: str  # fx node name of the cut
    carried: list[str] = field(default_factory=list)  # prefix values (besides the cut) the suffix reads, in order
    layers: list[Layer] = field(default_factory=list)  # Linear layers inside the prefix, in graph order
    _carrier: fx.GraphModule | None = None  # model inputs -> (cut, *carried), when ``carried`` is not empty

    @property
    def suffix_takes_inputs(self) -> bool:
        """True when something after the cut reads more than the cut (a skip across it, or a model input)."""
        return bool(self.carried)

    def run_prefix(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, ...]]:
        """(cut activation, carried values) for a batch of model inputs; the prefix runs once."""
        if self._carrier is None:
            return self.prefix(*inputs), ()
        out = self._carrier(*inputs)
        return out[0], tuple(out[1:])

    def run_suffix(self, cut_value: torch.Tensor, carried: tuple[Any, ...] = (), repeat: int = 1) -> Any:
        """The model outputs from a cut activation. ``cut_value`` may hold ``repeat`` stacked copies of the batch
        (batch ``repeat * n``): carried batch-sized float tensors are then tiled ``repeat`` times to match."""
        if repeat > 1 and carried:
            n = cut_value.shape[0] // repeat
            carried = tuple(
                v.repeat(repeat, *([1] * (v.ndim - 1)))
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim >= 1 and v.shape[0] == n else v
                for v in carried
            )
        return self.suffix(cut_value, *carried)


def is_activation(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), _ACTIVATIONS)
    return n.op == "call_function" and n.target in _ACT_FUNCS


def _is_linear(gm: fx.GraphModule, n: fx.Node) -> bool:
    return n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Linear)


def cut_candidates(gm: fx.GraphModule) -> list[str]:
    """Every node that can be a cut: computed nodes (not inputs, outputs or constants)."""
    return [n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]


def linear_layers(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(linear node, neuron node) per Linear in graph order; the neuron node is the activation right after the
    Linear when it is its only user, else the Linear itself."""
    out = []
    for n in gm.graph.nodes:
        if _is_linear(gm, n):
            users = list(n.users)
            neuron = users[0] if len(users) == 1 and is_activation(gm, users[0]) else n
            out.append((n, neuron))
    return out


def resolve_node(gm: fx.GraphModule, name: str, what: str = "cut layer") -> str:
    """Node name for ``name`` (a node name or a module target), or a UsageError listing the valid ones."""
    names = cut_candidates(gm)
    if name in names:
        return name
    by_target = [n.name for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == name]
    if by_target:
        return by_target[0]
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    raise UsageError(f"{what} {name!r} does not exist; valid: {', '.join(names)} (or module names: {', '.join(targets)})")


def ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def split_at(model: fx.GraphModule, cut: str) -> Split:
    """Split ``model`` at node ``cut`` (a node name or module target) into prefix and suffix (module doc)."""
    cut = resolve_node(model, cut)
    nodes = {n.name: n for n in model.graph.nodes}
    cut_node = nodes[cut]
    anc = ancestors(cut_node)
    placeholders = [n for n in model.graph.nodes if n.op == "placeholder"]
    in_prefix = anc | set(placeholders)

    # prefix: the cut's ancestors (every placeholder kept, so it takes the model's inputs)
    pg = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in model.graph.nodes:
        if n in in_prefix:
            env[n] = pg.node_copy(n, lambda a: env[a])
    pg.output(env[cut_node])
    prefix = fx.GraphModule(model, pg, class_name="Prefix")

    # what the rest of the graph reads from the prefix, besides the cut; constants are re-read, not carried
    rest = [n for n in model.graph.nodes if n not in in_prefix]
    carried_nodes: list[fx.Node] = []
    for n in model.graph.nodes:
        if n in in_prefix and n is not cut_node and n.op != "get_attr" and any(u not in in_prefix for u in n.users):
            carried_nodes.append(n)

    sg = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {cut_node: sg.placeholder("cut_activation")}
    for n in carried_nodes:
        senv[n] = sg.placeholder(f"carried_{n.name}")
    for n in model.graph.nodes:  # constants the rest reads
        if n in in_prefix and n.op == "get_attr" and any(u not in in_prefix for u in n.users):
            senv[n] = sg.node_copy(n, lambda a: senv[a])
    for n in rest:
        senv[n] = sg.node_copy(n, lambda a: senv[a])
    suffix = fx.GraphModule(model, sg, class_name="Suffix")
    suffix.graph.eliminate_dead_code()
    suffix.delete_all_unused_submodules()
    suffix.recompile()

    carrier = None
    if carried_nodes:
        cg = fx.Graph()
        cenv: dict[fx.Node, fx.Node] = {}
        for n in model.graph.nodes:
            if n in in_prefix:
                cenv[n] = cg.node_copy(n, lambda a: cenv[a])
        cg.output((cenv[cut_node], *[cenv[n] for n in carried_nodes]))
        carrier = fx.GraphModule(model, cg, class_name="PrefixCarrier")

    layers: list[Layer] = []
    neuron_to_idx: dict[fx.Node, int] = {}
    for lin, neuron in linear_layers(model):
        if lin not in anc:
            continue
        if neuron not in anc:  # the cut falls between a Linear and its activation
            neuron = lin
        src = lin.args[0] if lin.args else None
        layers.append(Layer(str(lin.target), neuron.name, int(model.get_submodule(str(lin.target)).out_features),
                            neuron_to_idx.get(src)))
        neuron_to_idx[neuron] = len(layers) - 1
    return Split(model, prefix, suffix, cut, [n.name for n in carried_nodes], layers, carrier)
