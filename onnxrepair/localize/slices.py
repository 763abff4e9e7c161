"""Slices: which weights of a model matter for a property, as a boolean mask per parameter.

Used by the model-transformation framework (:mod:`onnxrepair.transform`): FMT marks the neurons most
sensitive to the protected attribute (:func:`topk_frequent` + :func:`neuron_mask`); DARE marks the synapses
that carry each class's evidence (NNSlicer-style backward contribution, conv channels included).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

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




def topk_frequent(delta: torch.Tensor, top_ratio: float, keep_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row mark the ``ceil(top_ratio·W)`` largest entries of ``delta`` (N, W); keep the
    ``ceil(keep_ratio·W)`` most frequently marked columns. Returns (bool keep mask (W,), counts (W,)).

    Only entries with ``delta > 0`` can be marked: a neuron that did not move for a row is not among
    that row's most sensitive ones, even when fewer than ``k`` neurons moved (dead ReLUs, rows the
    attribute does not reach). Otherwise ``topk`` would fill the quota with zero ties by index and
    the frequency ranking would favour low-index neurons."""
    n, w = delta.shape
    k = min(w, max(1, math.ceil(top_ratio * w)))
    keep = min(w, max(1, math.ceil(keep_ratio * w)))
    top = delta.topk(k, dim=1)
    idx = top.indices[top.values > 0]
    counts = torch.bincount(idx.reshape(-1).cpu(), minlength=w)
    # stable order: most frequent first, lower index first on ties (reproducible)
    order = np.lexsort((np.arange(w), -counts.numpy()))[:keep]
    out = torch.zeros(w, dtype=torch.bool)
    out[torch.as_tensor(order)] = True
    return out, counts
