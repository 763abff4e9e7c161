"""Filter assessment: which convolution output channels ("filters") to blame for errors on perturbed data.

DeepPatch (Wei, Wang, Ashraf, Chan, TOSEM 32(6) 2023, §4.2) scores every filter two ways:

* **perfloss** — zero the channel and measure accuracy on perturbed validation images;
  ``score = acc_base - acc_masked``. The lowest scores (masking hurts least, or helps) are blamed first.
* **featswap** — on perturbed images, replace the channel by the map the *clean* version of the same
  image produces; ``score = acc_swapped - acc_base``. The largest recovery is blamed first.

* **taylor** (not in the paper; for large models) — featswap to first order: the loss change from swapping channel
  ``c`` is estimated as ``-sum_{h,w} dL/dA_c * (A_c(clean) - A_c(perturbed))`` from one clean forward, one perturbed
  forward and one backward per sample, for every filter of every conv at once. Its cost is about three model passes
  per sample whatever the width, where featswap's grows with (filters x suffix): measured on a CIFAR ResNet-18 it is
  the difference between seconds and hours (``bench/deeppatch_scale.py``). It has no accuracy score (``acc_score`` is
  zero): filters are ranked by the estimated loss recovery alone.

A naive implementation runs the whole model once per filter. Here, per convolution, the *prefix* of the
fx graph runs once per sample chunk (:func:`onnxrepair.graph.split_at`) and the tensors the rest of the graph
needs (the conv output and any skip connections) are kept; only the *suffix* runs per ablation, and ``group`` ablations are stacked along
the batch dimension in one pass. Accuracy on a few hundred images ties often, so the loss change breaks ties
(same direction as the accuracy score); both are kept in :class:`LayerScores`.

``group`` and ``batch_size`` only say how much runs at once (DeepPatch sizes them from its memory budget): the
scores are sums over samples, the same for any split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

from ..graph import split_at
from ..nn import first_output, log_probs

log = logging.getLogger(__name__)

METHODS = ("perfloss", "featswap", "taylor")


@dataclass
class LayerScores:
    layer: str  # fx node name of the conv
    target: str  # submodule path
    method: str
    acc_score: np.ndarray  # (C_out,) perfloss: base - masked; featswap: swapped - base (accuracy, 0..1)
    loss_score: np.ndarray  # (C_out,) same direction as acc_score, from the mean NLL
    base_acc: float
    base_loss: float
    n_samples: int

    @property
    def order(self) -> np.ndarray:
        """Channel indices, most blamed first."""
        if self.method == "perfloss":  # smallest harm from masking first
            return np.lexsort((self.loss_score, self.acc_score))
        if self.method == "taylor":  # largest estimated loss recovery first (stable: ties keep channel order)
            return np.argsort(-self.loss_score, kind="stable")
        return np.lexsort((-self.loss_score, -self.acc_score))  # featswap: largest recovery first

    def top(self, k: int) -> list[int]:
        return [int(i) for i in self.order[:k]]

    def summary(self, n: int = 8) -> list[dict[str, Any]]:
        return [
            {"channel": int(c), "acc_score": round(float(self.acc_score[c]), 5), "loss_score": round(float(self.loss_score[c]), 5)}
            for c in self.order[:n]
        ]


def conv_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, nn.Conv2d]]:
    mods = dict(gm.named_modules())
    return [(n, mods[n.target]) for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], nn.Conv2d)]


def _acc_loss(out: torch.Tensor, y: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample correctness and NLL."""
    correct = (out.argmax(1) == y).float()
    nll = torch.nn.functional.nll_loss(log_probs(out, kind), y, reduction="none")
    return correct, nll


@torch.no_grad()
def assess_filters(
    gm: fx.GraphModule,
    x_clean: torch.Tensor,
    x_perturbed: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str = "featswap",
    output_kind: str = "logits",
    layers: Sequence[str] | None = None,
    group: int = 16,
    batch_size: int = 128,
    progress: Callable[[], None] | None = None,
    stable: int = 0,
    top_k: Callable[[int], int] | None = None,
) -> dict[str, LayerScores]:
    """Score every output channel of every ``nn.Conv2d`` (or of the named ``layers``).

    ``x_clean`` / ``x_perturbed`` are model inputs for the same images (paired, for featswap) and ``y``
    their labels. Returns ``{node name: LayerScores}``.

    ``stable`` > 0 with ``top_k`` (C_out -> how many filters get blamed): a conv's assessment stops once its blamed
    set (the top ``top_k(C_out)`` of the running scores) has come out the same after ``stable`` batches of samples in a
    row; ``LayerScores.n_samples`` says how many it used. The scores are then those of the first samples only.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    gm.eval()
    if method == "taylor":
        return _assess_taylor(gm, x_clean, x_perturbed, y, output_kind, layers, batch_size, progress)
    result: dict[str, LayerScores] = {}
    for node, conv in conv_nodes(gm):
        if layers is not None and node.name not in layers and node.target not in layers:
            continue
        split = split_at(gm, node.name)
        c_out = conv.out_channels
        acc_sum = np.zeros(c_out)
        loss_sum = np.zeros(c_out)
        base_acc = base_loss = 0.0
        n_total = 0
        last_top: frozenset | None = None
        same = 0
        for i in range(0, len(y), batch_size):
            xp, yb = x_perturbed[i : i + batch_size], y[i : i + batch_size]
            n = len(yb)
            o_pert, carried = split.run_prefix(xp)
            o_clean = split.prefix(x_clean[i : i + batch_size]) if method == "featswap" else None
            c0, l0 = _acc_loss(first_output(split.run_suffix(o_pert, carried)), yb, output_kind)
            # sums in float64 of float32 per-sample values: exact in practice, so how the samples are split into
            # batches (the memory budget's choice) does not move a score
            base_acc += float(c0.sum())
            base_loss += float(l0.double().sum())
            for g0 in range(0, c_out, group):
                chans = list(range(g0, min(g0 + group, c_out)))
                g = len(chans)
                stacked = o_pert.unsqueeze(0).repeat(g, 1, 1, 1, 1)  # (g, n, C, H, W)
                ar = torch.arange(g, device=o_pert.device)
                ch = torch.as_tensor(chans, device=o_pert.device)
                if method == "perfloss":
                    stacked[ar, :, ch] = 0.0
                else:
                    stacked[ar, :, ch] = o_clean[:, ch].permute(1, 0, 2, 3)
                out = first_output(split.run_suffix(stacked.reshape(g * n, *o_pert.shape[1:]), carried, repeat=g))
                c, l = _acc_loss(out, yb.repeat(g), output_kind)
                acc_sum[chans] += c.view(g, n).sum(1).cpu().numpy()
                loss_sum[chans] += l.double().view(g, n).sum(1).cpu().numpy()
            n_total += n
            if progress is not None:
                progress()
            if stable > 0 and top_k is not None and i + batch_size < len(y):
                top = frozenset(_scores(method, acc_sum, loss_sum, base_acc, base_loss, n_total, node, conv).top(top_k(c_out)))
                same = same + 1 if top == last_top else 0
                last_top = top
                if same >= stable:
                    break
        result[node.name] = _scores(method, acc_sum, loss_sum, base_acc, base_loss, n_total, node, conv)
    return result


def _assess_taylor(gm: fx.GraphModule, x_clean: torch.Tensor, x_perturbed: torch.Tensor, y: torch.Tensor, output_kind: str,
                   layers: Sequence[str] | None, batch_size: int, progress: Callable[[], None] | None) -> dict[str, LayerScores]:
    """First-order featswap for every selected conv at once (see the module docstring): per batch, the conv outputs
    of a clean forward, then a perturbed forward whose conv outputs keep their gradient, one backward of the summed
    NLL; channel ``c``'s score sums ``-(dL/dA_c * (A_c(clean) - A_c(perturbed)))`` over samples and positions."""
    convs = [(n, c) for n, c in conv_nodes(gm) if layers is None or n.name in layers or n.target in layers]
    if len({id(c) for _, c in convs}) != len(convs):
        raise ValueError("taylor assessment hooks each conv module once; this graph calls one conv module at two nodes")
    sums = {n.name: np.zeros(c.out_channels) for n, c in convs}
    base_acc = base_loss = 0.0
    n_total = 0
    grads_wanted = [p.requires_grad for p in gm.parameters()]
    for p in gm.parameters():
        p.requires_grad_(False)
    try:
        for i in range(0, len(y), batch_size):
            yb = y[i : i + batch_size]
            maps: dict[str, list[torch.Tensor]] = {n.name: [] for n, _ in convs}
            hooks = [c.register_forward_hook(lambda m, inp, out, k=n.name: maps[k].append(out)) for n, c in convs]
            try:
                with torch.no_grad():
                    gm(x_clean[i : i + batch_size])
                with torch.enable_grad():
                    xp = x_perturbed[i : i + batch_size].detach().clone().requires_grad_(True)  # grads flow through frozen weights
                    out = first_output(gm(xp))
                    for v in maps.values():
                        v[1].retain_grad()
                    correct, nll = _acc_loss(out, yb, output_kind)
                    nll.sum().backward()
            finally:
                for h in hooks:
                    h.remove()
            with torch.no_grad():
                for k, (clean_map, pert_map) in maps.items():
                    sums[k] += (-(pert_map.grad * (clean_map - pert_map)).sum((0, 2, 3))).double().cpu().numpy()
            base_acc += float(correct.sum())
            base_loss += float(nll.detach().double().sum())
            n_total += len(yb)
            if progress is not None:
                progress()
    finally:
        for p, w in zip(gm.parameters(), grads_wanted):
            p.requires_grad_(w)
    return {n.name: LayerScores(n.name, str(n.target), "taylor", np.zeros(c.out_channels), sums[n.name] / n_total,
                                base_acc / n_total, base_loss / n_total, n_total) for n, c in convs}


def _scores(method: str, acc_sum: np.ndarray, loss_sum: np.ndarray, base_acc: float, base_loss: float, n_total: int,
            node: fx.Node, conv: nn.Conv2d) -> LayerScores:
    """Scores from the running sums over ``n_total`` samples."""
    acc_m, loss_m = acc_sum / n_total, loss_sum / n_total
    b_acc, b_loss = base_acc / n_total, base_loss / n_total
    if method == "perfloss":
        acc_score, loss_score = b_acc - acc_m, loss_m - b_loss  # harm done by masking
    else:
        acc_score, loss_score = acc_m - b_acc, b_loss - loss_m  # recovery from the clean map
    return LayerScores(node.name, str(node.target), method, acc_score, loss_score, b_acc, b_loss, n_total)
