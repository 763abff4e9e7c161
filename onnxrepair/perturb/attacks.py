"""White-box adversarial attacks on unit-NCHW images, through the input contract.

Attacks run on ``ModelWithContract(converted_graph, contract)``: the input is the image in [0, 1] *before*
normalisation, so ε is in pixel units (8/255 means eight grey levels) and gradients flow through the
preprocessing. The adversarial images are then scored on onnxruntime by :mod:`onnxrepair.evaluate`.

Each attack follows one template (after torchattacks, Kim 2020): a class with a docstring giving the paper,
the distance, the arguments and the shapes; ``attack(x, y) -> x_adv``; the base class puts the model in eval
mode for the attack and restores its previous train/eval mode afterwards, and never accumulates parameter
gradients. ``ATTACKS`` is the registry; tests are parametrised over it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..nn import first_output, log_probs


class Attack:
    """Base: ``Attack(model, eps=..., **kw)(x, y)``.

    Shapes: x (N, C, H, W) float in [0, 1]; y (N,) int64 class indices; returns x_adv like x, in [0, 1].
    ``norm`` is "linf" or "l2": the distance ε is measured in.
    """

    name: ClassVar[str] = "attack"
    norm: ClassVar[str] = "linf"

    def __init__(self, model: nn.Module, eps: float, *, seed: int = 0, output_kind: str = "logits") -> None:
        if eps < 0:
            raise UsageError(f"{self.name}: eps must be >= 0, got {eps}")
        self.model = model
        self.eps = float(eps)
        self.seed = seed
        self.output_kind = output_kind  # "logits" | "probs": how the loss reads the model's output

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        modes = [(m, m.training) for m in self.model.modules()]  # a wrapper's flag need not match what it wraps
        self.model.eval()
        flags = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                x_adv = self.perturb(x.detach().clone(), y.to(x.device))
        finally:
            for p, f in zip(self.model.parameters(), flags):
                p.requires_grad_(f)
            for m, mode in modes:
                m.training = mode
        return x_adv.detach().clamp(0, 1)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        loss = F.nll_loss(log_probs(first_output(self.model(x)), self.output_kind), y)
        (g,) = torch.autograd.grad(loss, x)
        return g

    def _gen(self, x: torch.Tensor) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


class FGSM(Attack):
    """FGSM — Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.

    Distance: L∞. One step ``x + ε·sign(∇ₓ CE(f(x), y))``, clipped to [0, 1].
    Arguments: model (unit NCHW → logits), eps (pixel units, e.g. 8/255).
    Shapes: x (N, C, H, W) in [0, 1], y (N,) → x_adv (N, C, H, W).
    """

    name = "fgsm"
    norm = "linf"

    def perturb(self, x, y):
        return (x + self.eps * self._grad(x, y).sign()).clamp(0, 1)


class PGD(Attack):
    """PGD-L∞ — Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.

    Distance: L∞. Random start in the ε-ball, then ``steps`` signed-gradient steps of size ``alpha``
    (default 2.5·ε/steps), each projected back onto the ε-ball and [0, 1].
    Arguments: model, eps, steps (10), alpha (None → 2.5·ε/steps), random_start (True), seed.
    Shapes: x (N, C, H, W) in [0, 1], y (N,) → x_adv (N, C, H, W).
    """

    name = "pgd"
    norm = "linf"

    def __init__(self, model, eps, *, steps: int = 10, alpha: float | None = None, random_start: bool = True, seed: int = 0, output_kind: str = "logits",
                 start: torch.Tensor | None = None):
        super().__init__(model, eps, seed=seed, output_kind=output_kind)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / max(1, self.steps)
        self.random_start = random_start
        self.start = start  # uniform [0, 1) draws like x (``draw_start``); None: drawn here from ``seed``

    @staticmethod
    def draw_start(x: torch.Tensor, seed: int) -> torch.Tensor:
        """The uniform draws PGD(seed=seed) makes for its random start on ``x`` (drawn for a whole batch and then
        sliced, a part of the batch is attacked from the same starts as the whole)."""
        return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)).to(x)

    def perturb(self, x, y):
        x0 = x
        if self.random_start and self.eps > 0:
            u = self.start.to(x) if self.start is not None else self.draw_start(x, self.seed)
            x = (x0 + (2 * u - 1) * self.eps).clamp(0, 1)
        for _ in range(self.steps):
            x = x + self.alpha * self._grad(x, y).sign()
            x = torch.min(torch.max(x, x0 - self.eps), x0 + self.eps).clamp(0, 1)
        return x


def _l2(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1)))


class PGDL2(Attack):
    """PGD-L2 — Madry et al., ICLR 2018 (the L2 variant).

    Distance: L2 over all pixels of an image (pixel units in [0, 1]). Random start uniform in the ε-ball,
    then ``steps`` normalised-gradient steps of size ``alpha`` (default 2.5·ε/steps), each projected onto
    the ε-ball and [0, 1].
    Arguments: model, eps (e.g. 0.5), steps (10), alpha, random_start (True), seed.
    Shapes: x (N, C, H, W) in [0, 1], y (N,) → x_adv (N, C, H, W).
    """

    name = "pgdl2"
    norm = "l2"

    def __init__(self, model, eps, *, steps: int = 10, alpha: float | None = None, random_start: bool = True, seed: int = 0, output_kind: str = "logits"):
        super().__init__(model, eps, seed=seed, output_kind=output_kind)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / max(1, self.steps)
        self.random_start = random_start

    def _project(self, x0, x):
        d = x - x0
        n = _l2(d)
        d = d * torch.clamp(self.eps / n.clamp_min(1e-12), max=1.0)
        return (x0 + d).clamp(0, 1)

    def perturb(self, x, y):
        x0 = x
        if self.random_start and self.eps > 0:
            g = self._gen(x)
            d = torch.randn(x.shape, generator=g).to(x)
            r = torch.rand(x.shape[0], generator=g).to(x) ** (1.0 / x[0].numel())
            d = d / _l2(d).clamp_min(1e-12) * r.view(-1, 1, 1, 1) * self.eps
            x = self._project(x0, x0 + d)
        for _ in range(self.steps):
            g = self._grad(x, y)
            x = self._project(x0, x + self.alpha * g / _l2(g).clamp_min(1e-12))
        return x


class CW(Attack):
    """CW-L2 — Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017.

    Distance: L2. Minimises ``‖δ‖₂² + c·max(Z_y − max_{i≠y} Z_i, −κ)`` over ``w`` with
    ``x' = (tanh(w) + 1)/2`` using Adam (lr 0.01) for ``steps`` iterations (no binary search over c, as in
    torchattacks). Keeps, per image, the smallest-L2 misclassified x' found. CW has no budget of its own:
    with ``eps`` > 0, an adversarial image farther than ε (L2) counts as a failure and the clean image is
    returned, so accuracy "at ε" is comparable with PGD-L2; ``eps=0`` or None means unbounded.
    Arguments: model, eps, c (1.0), kappa (0.0), steps (50), lr (0.01).
    Shapes: x (N, C, H, W) in [0, 1], y (N,) → x_adv (N, C, H, W).
    """

    name = "cw"
    norm = "l2"

    def __init__(self, model, eps: float | None = None, *, c: float = 1.0, kappa: float = 0.0, steps: int = 50, lr: float = 0.01, seed: int = 0, output_kind: str = "logits"):
        super().__init__(model, eps or 0.0, seed=seed, output_kind=output_kind)
        self.c, self.kappa, self.steps, self.lr = float(c), float(kappa), int(steps), float(lr)

    def perturb(self, x, y):
        x0 = x
        w = torch.atanh((x0 * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6)).detach().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=self.lr)
        best = x0.clone()
        best_l2 = torch.full((x.shape[0],), float("inf"), device=x.device)
        for _ in range(self.steps):
            xa = (torch.tanh(w) + 1) / 2
            z = self.model(xa)
            onehot = F.one_hot(y, z.shape[1]).to(z.dtype)
            real = (z * onehot).sum(1)
            other = (z - 1e9 * onehot).amax(1)
            f = torch.clamp(real - other, min=-self.kappa)
            l2sq = (xa - x0).flatten(1).pow(2).sum(1)
            loss = l2sq.sum() + self.c * f.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                l2 = l2sq.sqrt()
                wrong = z.argmax(1) != y
                better = wrong & (l2 < best_l2)
                if self.eps > 0:
                    better &= l2 <= self.eps
                best_l2 = torch.where(better, l2, best_l2)
                best[better] = xa.detach()[better]
        return best


ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "pgdl2": PGDL2, "cw": CW}
ALIASES = {"pgd-linf": "pgd", "pgdlinf": "pgd", "pgd_linf": "pgd", "pgd-l2": "pgdl2", "pgd_l2": "pgdl2", "cwl2": "cw", "cw-l2": "cw"}


def resolve_attacks(spec: str | list[str] | None) -> list[str]:
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for it in (s.strip().lower() for s in items):
        if not it or it == "none":
            continue
        nm = ALIASES.get(it, it)
        if nm == "all":
            return list(ATTACKS)
        if nm not in ATTACKS:
            raise UsageError(f"unknown attack {it!r}; known: {', '.join(ATTACKS)}")
        if nm not in out:
            out.append(nm)
    return out


def make_attack(name: str, model: nn.Module, eps: float, *, steps: int | None = None, seed: int = 0) -> Attack:
    nm = ALIASES.get(name.lower(), name.lower())
    if nm not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    cls = ATTACKS[nm]
    kw = {"seed": seed}
    if steps is not None and nm != "fgsm":
        kw["steps"] = steps
    return cls(model, eps, **kw)
