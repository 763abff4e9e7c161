"""Small torch helpers shared by methods: output kind, log-probabilities, device choice."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when a kernel really runs on it, else the CPU; ``cpu``; ``cuda`` / ``cuda:N``."""
    from .errors import UsageError

    if name == "auto":
        return torch.device("cuda") if _cuda_runs() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device works here (onnxrepair doctor says why)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _cuda_runs() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return True
    except Exception:  # a listed GPU whose kernels fail is not a device to train on
        return False


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
