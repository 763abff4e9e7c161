"""Blocks of a converted model (ArchRepair's unit of repair) and which of them to blame for failures.

Qi, Wang, Guo, Chen, Juefei-Xu, Zhang, Ma, Zhao. "ArchRepair: Block-Level Architecture-Oriented Repairing for
Deep Neural Networks." ACM TOSEM 2023 (arXiv 2111.13330), §3.1 "vulnerable block localisation".

**Finding blocks** (:func:`find_blocks`), on the onnx2torch fx graph. Both torch exporters fold BatchNorm into
the convs by default, so nothing here relies on a BN node being present.

* *residual*: an Add whose two operands are both computed from the model input (not a constant bias). The
  block is the single-entry single-exit region from the latest node that dominates both operand paths to the
  join; the activation right after the join is included when the Add is its only reader. "Dominates" is tested
  directly: for each common ancestor, latest first, :func:`onnxrepair.graph.edit.region_nodes` must accept the
  region (nothing inside reads another outside value, nothing outside reads an inside value but the exit).
* *stage* (only when the model has no residual block, i.e. a plain CNN): a maximal chain of conv / BatchNorm /
  per-channel affine / activation nodes, each the only reader of the previous one, holding at least one conv;
  poolings, reshapes and dense layers end a stage and are not part of it.

Each block gets its entry/exit nodes, input/output shapes from one forward pass of an example input, and its
parameter count. Blocks whose entry or exit is not a 4-D (N, C, H, W) tensor are dropped.

**Localisation** (:func:`score_blocks`). The paper combines neuron status in forward passes with weight gradients
in backward passes but gives no formula. Two scores, both over the *failing* inputs (misclassified clean and
corrupted training images):

* ``gradient`` (default; the paper's supplementary study picks the block "which has the greatest gradients"):
  ``G(b) = mean over the block's weight elements w of |dL/dw|``, L the mean cross-entropy over all failures
  (one gradient of the mean loss, accumulated over batches, then averaged in absolute value).
* ``spectrum``: ``S(b) * G(b)``. ``S(b)`` is the mean Ochiai suspiciousness of the block's output neurons
  (one neuron per output channel; a neuron is *active* on an input when its spatial mean exceeds that
  channel's mean over the failing and passing inputs together):
  ``ochiai(n) = a_f / sqrt(N_f * (a_f + a_p))`` with ``a_f``/``a_p`` the failing/passing inputs that activate
  n and ``N_f`` the number of failing inputs. Passing inputs are correctly classified clean training images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import UsageError
from ..graph.capture import capture
from ..graph.edit import region_nodes
from ..graph.split import ancestors, is_activation
from ..nn import first_output, log_probs

SCORES = ("gradient", "spectrum")

_STAGE_MODULES = (nn.Conv2d, nn.BatchNorm2d)


@dataclass
class Block:
    name: str  # the join node (residual) or "stage<k>_<first conv>" (stage)
    kind: str  # "residual" | "stage"
    entry: str  # fx node whose value enters the block (exclusive)
    exit: str  # fx node whose value leaves it (inclusive)
    nodes: list[str]  # the region's nodes, graph order
    convs: list[str]  # conv nodes inside
    params: int
    in_shape: list[int] = field(default_factory=list)  # (C, H, W), batch left out
    out_shape: list[int] = field(default_factory=list)
    join: str | None = None  # residual: the Add node
    stride: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mod(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(n.target)) if n.op == "call_module" else None


def is_conv(gm: fx.GraphModule, n: fx.Node) -> bool:
    return isinstance(_mod(gm, n), nn.Conv2d)


def _is_add(gm: fx.GraphModule, n: fx.Node) -> bool:
    import operator

    if n.op == "call_function":
        return n.target in (operator.add, torch.add)
    if n.op == "call_method":
        return n.target == "add"
    m = _mod(gm, n)
    return m is not None and getattr(m, "math_op_function", None) is torch.add


def _is_stage_op(gm: fx.GraphModule, n: fx.Node) -> bool:
    if is_activation(gm, n):
        return True
    m = _mod(gm, n)
    if m is None:
        return False
    return isinstance(m, _STAGE_MODULES) or type(m).__name__ == "ChannelAffine"


def _data_dependent(n: fx.Node, placeholders: set[fx.Node]) -> bool:
    return bool(ancestors(n) & placeholders)


def _params(gm: fx.GraphModule, nodes: list[fx.Node]) -> int:
    seen: set[int] = set()
    total = 0
    for n in nodes:
        m = _mod(gm, n)
        if m is None:
            continue
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _residual_blocks(gm: fx.GraphModule) -> list[Block]:
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out: list[Block] = []
    for n in gm.graph.nodes:
        if not _is_add(gm, n) or len(n.all_input_nodes) != 2:
            continue
        a, b = n.all_input_nodes
        if not (_data_dependent(a, placeholders) and _data_dependent(b, placeholders)):
            continue  # a bias or constant added, not a join of two paths
        exit = n
        users = list(n.users)
        if len(users) == 1 and is_activation(gm, users[0]):
            exit = users[0]
        common = sorted(ancestors(a) & ancestors(b), key=order.__getitem__, reverse=True)
        for e in common:
            if e.op == "get_attr":
                continue
            try:
                inside = region_nodes(gm, e.name, exit.name)
            except ValueError:
                continue
            convs = [m for m in inside if is_conv(gm, m)]
            if not convs:
                break  # the two paths join without a conv between: not a block
            out.append(Block(n.name, "residual", e.name, exit.name, [m.name for m in inside], [c.name for c in convs],
                             _params(gm, inside), join=n.name))
            break
    # an outer region that contains a found block entirely (a join of joins) is kept; identical regions are not
    uniq: dict[tuple[str, str], Block] = {}
    for blk in out:
        uniq.setdefault((blk.entry, blk.exit), blk)
    return list(uniq.values())


def _stages(gm: fx.GraphModule) -> list[Block]:
    out: list[Block] = []
    taken: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n in taken or not is_conv(gm, n):
            continue
        chain = [n]
        cur = n
        while True:
            users = list(cur.users)
            if len(users) != 1 or not _is_stage_op(gm, users[0]) or len(users[0].all_input_nodes) != 1:
                break
            cur = users[0]
            chain.append(cur)
        taken.update(chain)
        entry = n.all_input_nodes[0]
        try:
            inside = region_nodes(gm, entry.name, chain[-1].name)
        except ValueError:
            continue
        convs = [m for m in inside if is_conv(gm, m)]
        out.append(Block(f"stage{len(out) + 1}_{n.name}", "stage", entry.name, chain[-1].name, [m.name for m in inside],
                         [c.name for c in convs], _params(gm, inside)))
    # a conv right after a stage (no pooling between) continues it: merge chains that touch
    merged: list[Block] = []
    for blk in out:
        if merged and merged[-1].exit == blk.entry:
            prev = merged[-1]
            merged[-1] = Block(prev.name, "stage", prev.entry, blk.exit, prev.nodes + blk.nodes, prev.convs + blk.convs,
                               prev.params + blk.params)
        else:
            merged.append(blk)
    return merged


@torch.no_grad()
def find_blocks(gm: fx.GraphModule, example: torch.Tensor | None = None) -> list[Block]:
    """Residual blocks, or conv stages when there are none (module doc); with ``example`` (a model-space
    batch), shapes are filled in and blocks that do not map 4-D to 4-D tensors are dropped."""
    blocks = _residual_blocks(gm) or _stages(gm)
    if example is None or not blocks:
        return blocks
    names = sorted({b.entry for b in blocks} | {b.exit for b in blocks})
    vals = capture(gm, names, example[:2])
    kept = []
    for b in blocks:
        vi, vo = vals[b.entry], vals[b.exit]
        if not (isinstance(vi, torch.Tensor) and isinstance(vo, torch.Tensor) and vi.ndim == 4 and vo.ndim == 4):
            continue
        b.in_shape, b.out_shape = list(vi.shape[1:]), list(vo.shape[1:])
        b.stride = max(1, int(round(vi.shape[2] / vo.shape[2])))
        kept.append(b)
    return kept


def why_no_blocks(gm: fx.GraphModule) -> str:
    convs = [n.name for n in gm.graph.nodes if is_conv(gm, n)]
    if not convs:
        return "the model has no convolution, so neither a residual block nor a conv stage exists"
    return (f"no residual join (an Add of two computed paths) and no single-entry single-exit conv stage with 4-D "
            f"input and output was found among its {len(convs)} conv(s)")


def pick_block(blocks: list[Block], name: str, gm: fx.GraphModule) -> Block:
    """The block called ``name`` (or whose nodes include it), else a UsageError listing the blocks."""
    if not blocks:
        raise UsageError(f"ArchRepair needs a block to repair: {why_no_blocks(gm)}")
    for b in blocks:
        if b.name == name:
            return b
    for b in blocks:
        if name in b.nodes:
            return b
    raise UsageError(f"block {name!r} does not exist; blocks: {', '.join(b.name for b in blocks)}")


# --------------------------------------------------------------------------- localisation


@dataclass
class BlockScore:
    block: str
    score: float
    gradient: float
    spectrum: float | None = None


def block_weights(gm: fx.GraphModule, block: Block) -> list[nn.Parameter]:
    nodes = {n.name: n for n in gm.graph.nodes}
    seen: dict[int, nn.Parameter] = {}
    for name in block.nodes:
        m = _mod(gm, nodes[name])
        if m is not None:
            for p in m.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def gradient_scores(gm: fx.GraphModule, blocks: list[Block], x_fail: torch.Tensor, y_fail: torch.Tensor, output_kind: str,
                    batch_size: int = 256) -> list[float]:
    """Mean |dL/dW| over each block's weights, L the mean cross-entropy over ``x_fail`` (module doc)."""
    params = {id(p): p for b in blocks for p in block_weights(gm, b)}
    req = {k: p.requires_grad for k, p in params.items()}
    grads = {k: torch.zeros_like(p) for k, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for i in range(0, len(x_fail), batch_size):
                xb, yb = x_fail[i : i + batch_size], y_fail[i : i + batch_size]
                loss = torch.nn.functional.nll_loss(log_probs(first_output(gm(xb)), output_kind), yb, reduction="sum") / len(x_fail)
                gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for k, g in zip(params, gs):
                    if g is not None:
                        grads[k] += g
    finally:
        for k, p in params.items():
            p.requires_grad_(req[k])
    out = []
    for b in blocks:
        ps = block_weights(gm, b)
        n = sum(p.numel() for p in ps)
        out.append(float(sum(grads[id(p)].abs().sum() for p in ps) / n) if n else 0.0)
    return out


@torch.no_grad()
def spectrum_scores(gm: fx.GraphModule, blocks: list[Block], x_fail: torch.Tensor, x_pass: torch.Tensor) -> list[float]:
    """Mean Ochiai suspiciousness of each block's output channels (module doc)."""
    names = sorted({b.exit for b in blocks})
    chan_mean = lambda _n, v: v.mean(dim=tuple(range(2, v.ndim))) if v.ndim > 2 else v  # noqa: E731
    f = capture(gm, names, x_fail, reduce=chan_mean)
    p = capture(gm, names, x_pass, reduce=chan_mean) if len(x_pass) else {k: v[:0] for k, v in f.items()}
    out = []
    n_f = max(len(x_fail), 1)
    for b in blocks:
        vf, vp = f[b.exit], p[b.exit]
        thr = torch.cat([vf, vp]).mean(0, keepdim=True)
        a_f = (vf > thr).sum(0).float()
        a_p = (vp > thr).sum(0).float()
        ochiai = a_f / torch.sqrt(n_f * (a_f + a_p)).clamp_min(1e-12)
        out.append(float(ochiai.mean()))
    return out


def score_blocks(gm: fx.GraphModule, blocks: list[Block], x_fail: torch.Tensor, y_fail: torch.Tensor, x_pass: torch.Tensor,
                 output_kind: str, how: str = "gradient", batch_size: int = 256) -> list[BlockScore]:
    """Every block scored on the failures, highest (most to blame) first; the gradients in passes of ``batch_size``
    (a memory budget's choice: the score does not depend on it)."""
    if how not in SCORES:
        raise UsageError(f"block score must be one of {', '.join(SCORES)}, not {how!r}")
    if not len(x_fail):
        return [BlockScore(b.name, 0.0, 0.0) for b in blocks]
    grads = gradient_scores(gm, blocks, x_fail, y_fail, output_kind, batch_size)
    spec = spectrum_scores(gm, blocks, x_fail, x_pass) if how == "spectrum" else [None] * len(blocks)
    rows = []
    for b, g, s in zip(blocks, grads, spec):
        score = g if how == "gradient" else g * float(s)
        rows.append(BlockScore(b.name, score if math.isfinite(score) else 0.0, g, s))
    return sorted(rows, key=lambda r: -r.score)
