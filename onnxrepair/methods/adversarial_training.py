"""PGD adversarial training, a robustness peer users compare against, as full fine-tuning (same optimiser,
epochs and best-checkpoint rule as :mod:`.finetune`).

**adversarial-training** — Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant
to Adversarial Attacks", ICLR 2018.

* Eq. (2.1) saddle point ``min_θ E max_{‖δ‖∞ ≤ ε} L(θ, x + δ, y)``; the inner max by PGD-L∞ (random start
  in the ε-ball, ``steps`` signed-gradient steps of ``step_size``, projection onto the ε-ball and [0, 1]),
  crafted on the fly for every batch on the converted graph through the input contract, so ε is in pixel
  units (8/255, 7 steps of 2/255 as in the paper's CIFAR setting).
* The outer loss is ``clean_weight·CE(x) + (1 − clean_weight)·CE(x_adv)``; ``clean_weight`` 0 is Madry's pure
  objective, the default 0.5 the common mixed variant (Goodfellow et al. 2015), which keeps more clean
  accuracy — what a repair's retention contract asks for.
* The examples come from :class:`onnxrepair.perturb.attacks.PGD` (the evaluator's attack), seeded afresh per
  batch and told the model's output kind, so its loss is right for Softmax outputs too; it crafts in eval mode,
  restores the train/eval mode, and never touches parameter gradients.
* Checkpoint choice on calibration data: clean accuracy + PGD accuracy (same attack, fixed seed) on a
  ``calib_attack_size`` subset.
* ``attack`` (``pgd`` by default, everything above) also takes ``fgsm`` (one signed step of ``eps``: Goodfellow et
  al.'s FGSM adversarial training) and ``cw`` (CW-L2 of :class:`onnxrepair.perturb.attacks.CW`: ``eps`` is then an
  L2 budget, 0 = unbounded, and ``steps`` its Adam iterations) — the "adversarial fine-tuning on each attack's
  examples" peers of DARE (Zhang et al., ASE 2022 / TOSEM 2023). Crafting and checkpoint choice use that attack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..data.contract import ModelWithContract
from ..nn import first_output, log_probs
from ..perturb.attacks import CW, FGSM, PGD
from ..train import SGDSettings, accuracy, fit_all_weights, peer_info, require_labelled_images, split_calib, trainable_copy
from . import MethodOutput, RepairInputs, register

MADRY_PAPER = "Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018"


@dataclass
class AdversarialTrainingConfig(SGDSettings):
    eps: float = 8 / 255  # L∞ budget in pixel units of the [0, 1] image
    steps: int = 7
    step_size: float = 2 / 255
    clean_weight: float = 0.5  # loss = w·CE(clean) + (1-w)·CE(adversarial); 0 is Madry's pure objective
    calib_attack_size: int = 256  # calib images attacked for the checkpoint choice
    attack: str = "pgd"  # pgd (Madry) | fgsm | cw (eps = L2 budget, 0 unbounded; steps = its iterations)



@register("adversarial-training", config=AdversarialTrainingConfig, task="robustness", needs="labelled images",
          paper=MADRY_PAPER, summary="peer: fine-tune all weights on PGD-Linf examples crafted on the fly (Madry et al.)")
def adversarial_training(inputs: RepairInputs, cfg: AdversarialTrainingConfig) -> MethodOutput:
    require_labelled_images(inputs.train, inputs.contract, "adversarial-training")
    if cfg.eps < 0 or cfg.steps < 1 or cfg.step_size <= 0:
        raise UsageError("adversarial-training needs --eps >= 0, --steps >= 1 and --step-size > 0")
    if cfg.attack not in ("pgd", "fgsm", "cw"):
        raise UsageError(f"--attack must be pgd, fgsm or cw, not {cfg.attack!r}")
    if not 0.0 <= cfg.clean_weight <= 1.0:
        raise UsageError("--clean-weight must be in [0, 1]")
    dev, contract, kind = inputs.device, inputs.contract, inputs.output_kind
    model, params, names = trainable_copy(inputs.model, inputs.device)
    train, calib_data = split_calib(inputs.train, inputs.calib, inputs.seed)
    calib_clean = contract.to_model(contract.to_unit(calib_data.x)).to(dev)
    calib_y = torch.as_tensor(calib_data.y, device=dev)
    sub = calib_data.limit(cfg.calib_attack_size, seed=inputs.seed)
    sub_unit = contract.to_unit(sub.x).to(dev)
    sub_y = torch.as_tensor(sub.y, device=dev)

    wrapped = ModelWithContract(model, contract)

    def attack(unit: torch.Tensor, y: torch.Tensor, seed: int, start: torch.Tensor | None = None) -> torch.Tensor:
        if cfg.attack == "fgsm":
            return FGSM(wrapped, cfg.eps, seed=seed, output_kind=kind)(unit, y)
        if cfg.attack == "cw":
            return CW(wrapped, cfg.eps, steps=cfg.steps, seed=seed, output_kind=kind)(unit, y)
        return PGD(wrapped, cfg.eps, steps=cfg.steps, alpha=cfg.step_size, seed=seed, output_kind=kind, start=start)(unit, y)

    def with_start(unit: torch.Tensor, step: int) -> torch.Tensor:
        """PGD's random start (fresh per batch) drawn on the whole global batch, stacked as (N, 2, C, H, W), so a
        distributed rank attacks its own rows from the very starts one process would use."""
        return torch.stack([unit, PGD.draw_start(unit, inputs.seed * 1_000_003 + step)], dim=1)

    def batch_loss(x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        unit, start = (x[:, 0], x[:, 1]) if cfg.attack == "pgd" else (x, None)
        adv = attack(unit, y, inputs.seed * 1_000_003 + step, start)  # FGSM and CW draw nothing: per-row attacks
        n = len(y)
        w = cfg.clean_weight
        if w == 0:
            return F.nll_loss(log_probs(first_output(model(contract.to_model(adv))), kind), y)
        lp = log_probs(first_output(model(contract.to_model(torch.cat([unit, adv])))), kind)
        return w * F.nll_loss(lp[:n], y) + (1 - w) * F.nll_loss(lp[n:], y)

    def score() -> dict[str, float]:
        clean = accuracy(model, calib_clean, calib_y)
        adv = torch.cat([attack(sub_unit[i : i + 256], sub_y[i : i + 256], inputs.seed + i) for i in range(0, len(sub_y), 256)])
        rob = accuracy(model, contract.to_model(adv), sub_y)
        return {"calib_clean": clean, f"calib_{cfg.attack}": rob, "mixed": (clean + rob) / 2}

    best_epoch, history = fit_all_weights(
        model, params, train, batch_loss, score, contract=contract, device=dev, seed=inputs.seed,
        progress=inputs.progress, augment=with_start if cfg.attack == "pgd" else None, **cfg.sgd_kwargs(),
    )
    info = peer_info(names, params, best_epoch, history, f"calib_{cfg.attack}", attack={
        "name": {"pgd": "pgd-linf", "fgsm": "fgsm", "cw": "cw-l2"}[cfg.attack], "eps": cfg.eps, "steps": cfg.steps, "step_size": cfg.step_size,
        "clean_weight": cfg.clean_weight, "calib_attacked": len(sub_y)})
    return MethodOutput(model=model, info=info)
