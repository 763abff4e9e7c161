"""Slices: which weights of a model matter for a property, as a boolean mask per parameter.

Used by the model-transformation framework (:mod:`onnxrepair.transform`): FMT marks the neurons most
sensitive to the protected attribute (:func:`topk_frequent` + :func:`neuron_mask`); DARE marks the synapses
that carry each class's evidence (NNSlicer-style backward contribution, conv channels included).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..graph import Split

SliceMask = dict[str, torch.Tensor]  # qualified parameter name -> bool tensor of its shape (True = tunable)


def neuron_mask(split: "Split", important: list[torch.Tensor]) -> SliceMask:
    """Weights between consecutive important neurons, plus weights from any input into important
    neurons of a layer fed by the model input (the first layer); biases of important neurons.

    ``important[l]`` is a bool vector over ``split.layers[l]``'s neurons.
    """
    mask: SliceMask = {}
    for li, layer in enumerate(split.layers):
        lin = split.prefix.get_submodule(layer.linear)
        out_imp = important[li].to(lin.weight.device)
        if layer.input_layer is not None:
            in_imp = important[layer.input_layer].to(lin.weight.device)
        else:
            in_imp = torch.ones(lin.in_features, dtype=torch.bool, device=lin.weight.device)
        mask[f"{layer.linear}.weight"] = out_imp[:, None] & in_imp[None, :]
        if lin.bias is not None:
            mask[f"{layer.linear}.bias"] = out_imp.clone()
    return mask


def slice_counts(w: int, top_ratio: float, keep_ratio: float, counts: str = "ceil") -> tuple[int, int]:
    """(neurons marked per row, neurons kept) for a layer of ``w`` neurons.

    ``"ceil"`` (the default): ``ceil(top_ratio·W)`` and ``ceil(keep_ratio·W)``, at least one each, so every
    layer of the prefix has a neuron in the slice. ``"artefact"``: what the FMT authors' code computes,
    ``int(top_ratio·W)`` marked and ``round(keep_ratio·W)`` kept (Python's rounding, half to even), which
    marks or keeps nothing in narrow layers (W = 4: 0 marked; W = 5: ``round(0.5)`` = 0 kept)."""
    if counts == "ceil":
        return min(w, max(1, math.ceil(top_ratio * w))), min(w, max(1, math.ceil(keep_ratio * w)))
    if counts == "artefact":
        return min(w, int(top_ratio * w)), min(w, round(keep_ratio * w))
    raise ValueError(f"slice counts must be ceil or artefact, not {counts!r}")


def topk_frequent(delta: torch.Tensor, top_ratio: float, keep_ratio: float, counts: str = "ceil") -> tuple[torch.Tensor, torch.Tensor]:
    """Per row mark the ``k`` largest entries of ``delta`` (N, W); keep the ``keep`` most frequently marked
    columns, (k, keep) from :func:`slice_counts` (default ``ceil(top_ratio·W)``, ``ceil(keep_ratio·W)``).
    Returns (bool keep mask (W,), counts (W,)).

    Only entries with ``delta > 0`` can be marked: a neuron that did not move for a row is not among
    that row's most sensitive ones, even when fewer than ``k`` neurons moved (dead ReLUs, rows the
    attribute does not reach). Otherwise ``topk`` would fill the quota with zero ties by index and
    the frequency ranking would favour low-index neurons."""
    n, w = delta.shape
    k, keep = slice_counts(w, top_ratio, keep_ratio, counts)
    top = delta.topk(k, dim=1)
    idx = top.indices[top.values > 0]
    marks = torch.bincount(idx.reshape(-1).cpu(), minlength=w)
    # stable order: most frequent first, lower index first on ties (reproducible)
    order = np.lexsort((np.arange(w), -marks.numpy()))[:keep]
    out = torch.zeros(w, dtype=torch.bool)
    out[torch.as_tensor(order, dtype=torch.long)] = True
    return out, marks


# --------------------------------------------------------------------------- NNSlicer-style synapse slice (DARE)
def _synapse_contribution(mod: nn.Module, a_in: torch.Tensor, dev_in: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
    """Σ over samples of |contribution| of each synapse to the class output, (C_out, C_in).

    A synapse i→o carries ``w_oi · Δa_i`` into neuron o, which moves the class output by ``∂z_c/∂y_o`` per unit:
    its first-order contribution is ``w_oi · Δa_i · ∂z_c/∂y_o`` (NNSlicer's backward propagation of
    contributions, linearised). For a conv the sum runs over kernel taps and output positions, so the
    synapse is the (out channel, in channel) pair. Absolute values are taken per sample before summing, so
    samples pushing in opposite directions do not cancel."""
    w = mod.weight.detach()
    if isinstance(mod, nn.Linear):
        dev = dev_in.reshape(len(dev_in), -1)
        g = g_out.reshape(len(g_out), -1)
        return (w[None] * g[:, :, None] * dev[:, None, :]).abs().sum(0)
    # Conv2d, groups == 1: per-sample weight gradient with Δa as the input, then times the weight
    cols = F.unfold(dev_in, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)  # (N, C_in·K, L)
    g = g_out.reshape(len(g_out), g_out.shape[1], -1)  # (N, C_out, L)
    per = torch.einsum("nol,nkl->nok", g, cols).reshape(len(g), w.shape[0], w.shape[1], -1)  # (N, C_out, C_in, K)
    return (per * w.reshape(1, w.shape[0], w.shape[1], -1)).sum(-1).abs().sum(0)


def sliceable_layers(gm: nn.Module, params: set[str] | None = None) -> list[tuple[str, nn.Module]]:
    """(module name, module) of every Linear and groups-1 Conv2d, optionally only those whose weight is in ``params``."""
    out = []
    for name, mod in gm.named_modules():
        ok = isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)
        if ok and (params is None or f"{name}.weight" in params):
            out.append((name, mod))
    return out


def class_contributions(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    x: torch.Tensor,
    y: torch.Tensor,
    logits: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 64,
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, int]]:
    """Per class c, per layer, the summed |synapse contribution| to the class output z_c over the samples of class c
    (``y == c``), with deviations measured from the mean layer input over *all* of ``x`` (NNSlicer's reference:
    the average activation). ``logits(x)`` returns the (N, classes) output the contributions are taken on.
    Returns ({class: {layer: (C_out, C_in) tensor}}, {class: samples used})."""
    names = [n for n, _ in layers]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(mod, inp, out):
            if out.requires_grad:
                out.retain_grad()
            seen[name] = (inp[0].detach(), out)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    was_training = model.training
    model.eval()
    try:
        # pass 1: mean layer input over every sample
        sums: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                logits(x[i : i + batch_size])
                for n in names:
                    sums[n] = sums.get(n, 0) + seen[n][0].sum(0)
        mean = {n: sums[n] / max(len(x), 1) for n in names}
        # pass 2: per class, gradients of z_c at every layer output
        contrib: dict[int, dict[str, torch.Tensor]] = {}
        counts: dict[int, int] = {}
        for c in torch.unique(y).tolist():
            xc = x[y == c]
            counts[int(c)] = int(len(xc))
            acc = {n: torch.zeros(m.weight.shape[:2], device=m.weight.device) for n, m in layers}
            for i in range(0, len(xc), batch_size):
                xb = xc[i : i + batch_size].detach().requires_grad_(True)  # so every layer output carries a graph
                with torch.enable_grad():
                    z = logits(xb)
                    z[:, int(c)].sum().backward()
                for n, m in layers:
                    a_in, out = seen[n]
                    if out.grad is None:  # layer does not reach the output
                        continue
                    acc[n] += _synapse_contribution(m, a_in, a_in - mean[n], out.grad.detach())
            contrib[int(c)] = acc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return contrib, counts


def merge_class_slices(contrib: dict[int, dict[str, torch.Tensor]], keep: float) -> dict[str, torch.Tensor]:
    """One (C_out, C_in) bool mask per layer from per-class contributions.

    Merge rule: each class's contributions are normalised to sum to 1 within each layer (every class weighs the
    same, whatever its sample count or logit scale), averaged over classes, and the ``ceil(keep · C_out · C_in)``
    synapses with the largest merged score are kept per layer (ties broken by index, reproducible)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    classes = sorted(contrib)
    out: dict[str, torch.Tensor] = {}
    for layer in contrib[classes[0]]:
        score = sum(contrib[c][layer] / contrib[c][layer].sum().clamp_min(1e-30) for c in classes) / len(classes)
        flat = score.flatten().cpu()
        k = min(flat.numel(), max(1, math.ceil(keep * flat.numel())))
        order = np.lexsort((np.arange(flat.numel()), -flat.double().numpy()))[:k]
        m = torch.zeros(flat.numel(), dtype=torch.bool)
        m[torch.as_tensor(order)] = True
        out[layer] = m.reshape(score.shape)
    return out


def synapse_mask(layers: list[tuple[str, nn.Module]], keep: dict[str, torch.Tensor]) -> SliceMask:
    """Parameter masks from (C_out, C_in) synapse masks: a conv's mask covers the whole kernel of a kept
    (out, in) pair; a bias is tunable when any synapse into its neuron/channel is kept."""
    mask: SliceMask = {}
    for name, mod in layers:
        k = keep[name].to(mod.weight.device)
        w = mod.weight
        mask[f"{name}.weight"] = k.reshape(*k.shape, *([1] * (w.ndim - 2))).expand_as(w).clone()
        if getattr(mod, "bias", None) is not None:
            mask[f"{name}.bias"] = k.any(1)
    return mask
