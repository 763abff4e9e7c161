"""Small torch helpers shared by methods: output kind, log-probabilities, device choice."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def looks_like_probabilities(out: torch.Tensor, tol: float = 1e-3) -> bool:
    """True when every row is non-negative and sums to 1 (a model that ends in Softmax)."""
    if out.ndim != 2 or out.numel() == 0:
        return False
    return bool((out >= -tol).all() and torch.allclose(out.sum(1), torch.ones(len(out), device=out.device), atol=tol))


def log_probs(out: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, C) log-probabilities. ``kind`` is "probs" (the model ends in Softmax, or in a Sigmoid for one
    column) or "logits". A single column is a binary classifier's class-1 score and becomes two
    columns: log(1 - p), log(p) for a probability; log σ(-z), log σ(z) for a logit z."""
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        col = out.reshape(-1, 1)
        if kind == "probs":
            p = col.clamp(1e-12, 1 - 1e-7)
            return torch.cat([torch.log1p(-p), torch.log(p)], dim=1)
        return torch.cat([F.logsigmoid(-col), F.logsigmoid(col)], dim=1)
    if kind == "probs":
        return torch.log(out.clamp_min(1e-12))
    return F.log_softmax(out, dim=1)


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out
