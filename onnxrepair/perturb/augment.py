"""Augmentation ops for training-time views (AugMix, Hendrycks et al., ICLR 2020, Algorithm 1), on unit NCHW
images in torch. The ops are kept disjoint from the CIFAR-10-C corruptions used for evaluation
(:mod:`.corruptions`): PIL's autocontrast / equalize / posterize / solarize re-written in torch, plus
DeepPatch's spatial transforms; :func:`augmix` mixes ``width`` random chains of them per image.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import UsageError



def _levels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → integer grey levels 0..255 (as PIL sees an 8-bit image)."""
    return (x.clamp(0, 1) * 255).round().long()


def autocontrast(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast``: stretch each channel's min..max to 0..1 (flat channels unchanged)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x).clamp(0, 1)


def equalize(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` per channel: lut[i] = (cdf_before(i) + step//2) // step,
    step = (pixels − count of the last non-empty bin) // 255; step 0 leaves the channel unchanged."""
    n, c, h, w = x.shape
    q = _levels(x).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    last = (torch.arange(256, device=x.device) * (hist > 0)).argmax(1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    cdf_before = hist.cumsum(1) - hist
    lut = ((cdf_before + step // 2) // step.clamp_min(1)).clamp(0, 255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device).expand_as(lut))
    return (lut.gather(1, q).view(n, c, h, w).to(x.dtype) / 255.0)


POSTERIZE_BITS = {1: 6, 2: 5, 3: 4, 4: 3, 5: 2}
SOLARIZE_THRESHOLD = {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5}


def posterize(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """PIL ``ImageOps.posterize``: keep the top ``POSTERIZE_BITS[severity]`` bits of each 8-bit level."""
    shift = 8 - POSTERIZE_BITS[severity]
    return ((_levels(x) >> shift) << shift).to(x.dtype) / 255.0


def solarize(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """PIL ``ImageOps.solarize``: invert every pixel at or above ``SOLARIZE_THRESHOLD[severity]``."""
    t = SOLARIZE_THRESHOLD[severity]
    return torch.where(x >= t, 1.0 - x, x)


def _from_corruptions(name: str) -> Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]:
    from . import corruptions as reg

    fn = reg.CORRUPTIONS[name]

    def op(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            return fn(x, severity, g).to(x.device, x.dtype)

    op.__name__ = name
    return op


AUGMIX_OPS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "autocontrast": autocontrast,
    "equalize": equalize,
    "posterize": posterize,
    "solarize": solarize,
    **{n: _from_corruptions(n) for n in ("rotate", "shear", "translate", "zoom", "dp_brightness", "dp_contrast")},
}
DEFAULT_AUGMIX_OPS: tuple[str, ...] = ("autocontrast", "equalize", "posterize", "solarize", "rotate", "shear", "translate")


def resolve_ops(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    from . import corruptions as reg

    out: list[str] = []
    for nm in (s.strip() for s in names):
        if not nm:
            continue
        if nm in reg.CIFAR10C:
            raise UsageError(f"augmix op {nm!r} is an evaluation corruption (CIFAR-10-C); AugMix keeps them apart. Ops: {', '.join(AUGMIX_OPS)}")
        if nm not in AUGMIX_OPS:
            raise UsageError(f"unknown augmix op {nm!r}; known: {', '.join(AUGMIX_OPS)}")
        if nm not in out:
            out.append(nm)
    if not out:
        raise UsageError("augmix needs at least one op (--ops)")
    return tuple(out)


def augmix(
    x: torch.Tensor,
    gen: np.random.Generator,
    ops: tuple[str, ...] = DEFAULT_AUGMIX_OPS,
    *,
    width: int = 3,
    depth: int = -1,
    alpha: float = 1.0,
    max_severity: int = 3,
) -> torch.Tensor:
    """One AugMix view of a unit-NCHW batch (Algorithm 1); same ``gen`` state → same images; stays in [0, 1]."""
    if x.ndim != 4:
        raise UsageError(f"augmix needs image batches (N, C, H, W); got shape {tuple(x.shape)}")
    n = x.shape[0]
    max_severity = int(min(max(max_severity, 1), 5))
    w = torch.as_tensor(gen.dirichlet([alpha] * width, size=n), dtype=x.dtype, device=x.device)  # (N, width)
    m = torch.as_tensor(gen.beta(alpha, alpha, size=n), dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
    depths = gen.integers(1, 4, size=(n, width)) if depth <= 0 else np.full((n, width), int(depth))
    mix = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(width):
            xi = x.clone()
            for step in range(int(depths[:, i].max())):
                active = depths[:, i] > step
                which = gen.integers(0, len(ops), size=n)
                sev = gen.integers(1, max_severity + 1, size=n)
                for o in np.unique(which[active]):
                    for s in np.unique(sev[active & (which == o)]):
                        idx = torch.as_tensor(np.flatnonzero(active & (which == o) & (sev == s)), device=x.device)
                        g = torch.Generator().manual_seed(int(gen.integers(1 << 62)))
                        xi[idx] = AUGMIX_OPS[ops[int(o)]](xi[idx], int(s), g)
            mix += w[:, i].view(-1, 1, 1, 1) * xi
        return (m * x + (1 - m) * mix).clamp(0, 1)
