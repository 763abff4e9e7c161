"""What "perturbed" means for training and calibration: DeepPatch's blur set or names from the corruption
suite (:class:`PerturbSpec`), and per-sample random mixtures of them (DeepPatch, Wei et al. TOSEM 2023, §4.3:
each training image perturbed with probability 0.5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .blur import DEEPPATCH_SIGMAS, gaussian_blur


@dataclass(frozen=True)
class PerturbSpec:
    """What "perturbed" means: DeepPatch's blur set, or names from the corruption suite."""

    sigmas: tuple[float, ...] = DEEPPATCH_SIGMAS
    corruptions: tuple[str, ...] = ()  # empty: blur with ``sigmas``
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)

    @property
    def variants(self) -> list[tuple[str, float]]:
        """Every (kind, level) this spec draws from; kind "blur" has level sigma."""
        if not self.corruptions:
            return [("blur", float(s)) for s in self.sigmas]
        return [(c, float(s)) for c in self.corruptions for s in self.severities]

    @classmethod
    def resolve(cls, sigmas, corruptions, severities) -> "PerturbSpec":
        """Check names against the corruption suite (imported lazily); groups like "deeppatch" expand."""
        if not corruptions:
            return cls(tuple(float(s) for s in sigmas), (), tuple(severities))
        from ..errors import UsageError

        try:
            from . import corruptions as reg
        except ImportError as e:
            raise UsageError(f"--corruptions needs onnxrepair.perturb.corruptions, which is unavailable: {e}") from None
        names = tuple(reg.resolve_names(list(corruptions)))
        valid = set.intersection(*(set(reg.SEVERITIES[n]) for n in names))
        sev = tuple(s for s in severities if s in valid)
        if not sev:
            raise UsageError(f"severities {tuple(severities)} are not valid for {', '.join(names)}")
        return cls(tuple(sigmas), names, sev)


def apply_variant(x_unit: torch.Tensor, kind: str, level: float, seed: int = 0) -> torch.Tensor:
    if kind == "blur":
        return gaussian_blur(x_unit, level)
    from . import corruptions as reg

    return reg.apply(kind, x_unit, int(level), seed).to(x_unit.device, x_unit.dtype)


def perturb_mixture(x_unit: torch.Tensor, spec: PerturbSpec, prob: float, gen: np.random.Generator) -> torch.Tensor:
    """Perturb each sample independently with probability ``prob`` by a random variant of ``spec``."""
    n = x_unit.shape[0]
    chosen = gen.random(n) < prob
    if not chosen.any():
        return x_unit
    variants = spec.variants
    which = gen.integers(0, len(variants), size=n)
    out = x_unit.clone()
    for v in np.unique(which[chosen]):
        idx = torch.as_tensor(np.flatnonzero(chosen & (which == v)), device=x_unit.device)
        kind, level = variants[int(v)]
        out[idx] = apply_variant(x_unit[idx], kind, level, seed=int(gen.integers(1 << 30)))
    return out


def perturb_all(x_unit: torch.Tensor, spec: PerturbSpec, gen: np.random.Generator) -> torch.Tensor:
    """Every sample perturbed, each by a random variant (for validation / calibration copies)."""
    return perturb_mixture(x_unit, spec, 1.0, gen)
