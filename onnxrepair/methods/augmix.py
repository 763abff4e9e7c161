"""AugMix, a robustness peer users compare against, as full fine-tuning.

It moves every weight, with the optimiser, epochs and best-checkpoint rule of the fine-tuning baselines
(:mod:`.finetune`: SGD, lr 0.003, momentum 0.9, weight decay 5e-4; the epoch-0 original competes too), so a
comparison with DeepPatch / ``finetune`` differs only in the training signal.

**augmix** — Hendrycks, Mu, Cubuk, Zoph, Gilmer, Lakshminarayanan, "AugMix: A Simple Data Processing Method
to Improve Robustness and Uncertainty", ICLR 2020.

* Algorithm 1 (AugMix): ``width`` chains (3); chain i applies ``d`` ∈ U{1..3} ops (``depth`` −1) drawn
  uniformly from the op list, each at a severity drawn in 1..``max_severity``; chain weights
  w ~ Dirichlet(α,…,α), skip weight m ~ Beta(α, α), α = 1; ``x_augmix = m·x + (1 − m)·Σᵢ wᵢ·chainᵢ(x)``
  (a convex combination, so it stays in [0, 1]). Per image: its own w, m, depth; the op and severity of a
  (chain, step) are drawn per image and applied group-wise.
* Eq. (1) Jensen–Shannon consistency: ``L = CE(p_clean, y) + λ·JS(p_clean; p_aug1; p_aug2)``,
  ``JS = ⅓ Σ KL(p_k ‖ M)``, ``M = ⅓ Σ p_k``, λ = 12; the three views go through the model in one batch,
  as in the authors' code.
* Ops (``AUGMIX_OPS``; all on unit NCHW images). The paper keeps the ops disjoint from the CIFAR-10-C
  corruptions used for evaluation, so it drops brightness, contrast, colour and sharpness. Here:
  ``autocontrast``, ``equalize``, ``posterize``, ``solarize`` — PIL's ops re-written in torch below — and
  ``rotate``, ``shear``, ``translate`` from :mod:`onnxrepair.perturb.corruptions` (DeepPatch's spatial
  transforms, severity s = ``max · s/5``). Available but off by default: ``zoom``, ``dp_brightness``,
  ``dp_contrast`` (the last two overlap CIFAR-10-C ``brightness``/``contrast``). CIFAR-10-C names are refused.
  When the evaluation set is the DeepPatch group instead, drop the spatial ops with ``--ops``.
* Checkpoint choice on calibration data: clean + DeepPatch blur (or ``--corruptions``), as ``finetune``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..nn import first_output, log_probs
from ..perturb.augment import DEFAULT_AUGMIX_OPS, augmix, resolve_ops
from ..perturb.blur import DEEPPATCH_SIGMAS
from ..perturb.mixture import PerturbSpec
from ..train import (SGDSettings, calib_score, fit_all_weights, make_calib, micro_rows, peer_info, require_labelled_images, split_calib,
                     trainable_copy)
from . import MethodOutput, RepairInputs, register

AUGMIX_PAPER = "Hendrycks et al., AugMix: A Simple Data Processing Method to Improve Robustness and Uncertainty, ICLR 2020"


def jsd_loss(*logps: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence of K distributions given as log-probabilities (N, classes), batch mean:
    ``(1/K) Σ_k KL(p_k ‖ M)``, M the mean distribution (AugMix Eq. 1). Exactly 0 for identical inputs."""
    k = len(logps)
    log_m = torch.logsumexp(torch.stack(logps), dim=0) - math.log(k)
    return sum(F.kl_div(log_m, lp, reduction="batchmean", log_target=True) for lp in logps) / k


@dataclass
class AugMixConfig(SGDSettings):
    jsd_lambda: float = 12.0  # λ of the Jensen–Shannon consistency term (0: AugMix data, plain CE)
    width: int = 3  # augmentation chains mixed per view
    depth: int = -1  # ops per chain; -1: uniform in 1..3
    alpha: float = 1.0  # Dirichlet / Beta concentration
    max_severity: int = 3  # op severity drawn in 1..max_severity (1..5)
    ops: tuple[str, ...] = DEFAULT_AUGMIX_OPS
    sigmas: tuple[float, ...] = DEEPPATCH_SIGMAS  # checkpoint choice: calib clean + these blurs (or corruptions)
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)



@register("augmix", config=AugMixConfig, task="robustness", needs="labelled images", paper=AUGMIX_PAPER,
          summary="peer: fine-tune all weights on AugMix views with the Jensen-Shannon consistency loss")
def augmix_method(inputs: RepairInputs, cfg: AugMixConfig) -> MethodOutput:
    require_labelled_images(inputs.train, inputs.contract, "augmix")
    ops = resolve_ops(cfg.ops)
    if cfg.width < 1:
        raise UsageError("--width must be at least 1")
    spec = PerturbSpec.resolve(cfg.sigmas, cfg.corruptions, cfg.severities)
    dev, contract, kind = inputs.device, inputs.contract, inputs.output_kind
    model, params, names = trainable_copy(inputs.model, inputs.device)
    train, calib_data = split_calib(inputs.train, inputs.calib, inputs.seed)
    calib = make_calib(calib_data, contract, spec, dev, inputs.seed)
    gen = np.random.default_rng(inputs.seed)

    def view(unit: torch.Tensor) -> torch.Tensor:
        return augmix(unit, gen, ops, width=cfg.width, depth=cfg.depth, alpha=cfg.alpha, max_severity=cfg.max_severity)

    def views(unit: torch.Tensor, step: int) -> torch.Tensor:
        """The batch's random views, drawn on the whole (global) batch: (N, C, H, W) or (N, 3, C, H, W)."""
        if cfg.jsd_lambda == 0:  # AugMix data only: one view, plain cross-entropy
            return view(unit)
        return torch.stack([unit, view(unit), view(unit)], dim=1)

    def batch_loss(x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        n = len(y)
        if cfg.jsd_lambda == 0:
            return F.nll_loss(log_probs(first_output(model(contract.to_model(x))), kind), y)
        allx = x.transpose(0, 1).reshape(3 * n, *x.shape[2:])  # clean, view 1, view 2 (this rank's rows)
        lp = log_probs(first_output(model(contract.to_model(allx))), kind)
        lp_clean, lp1, lp2 = lp[:n], lp[n : 2 * n], lp[2 * n :]
        return F.nll_loss(lp_clean, y) + cfg.jsd_lambda * jsd_loss(lp_clean, lp1, lp2)

    def score() -> dict[str, float]:
        return calib_score(model, calib)

    # the three views triple what a step holds: the budget splits the step into parts of at most a fine-tuning batch's
    # worth (the same update to float rounding; train_loop's micro_batch)
    micro = micro_rows(inputs.memory, "augmix training", 1 if cfg.jsd_lambda == 0 else 3, cfg.batch_size)
    best_epoch, history = fit_all_weights(
        model, params, train, batch_loss, score, contract=contract, device=dev, seed=inputs.seed,
        progress=inputs.progress, augment=views, micro_batch=micro, **cfg.sgd_kwargs(),
    )
    info = peer_info(names, params, best_epoch, history, "calib_perturbed", augmix={
        "ops": list(ops), "width": cfg.width, "depth": cfg.depth, "alpha": cfg.alpha,
        "max_severity": cfg.max_severity, "jsd_lambda": cfg.jsd_lambda})
    info["micro_batch"] = micro or None
    info["calib_perturbation"] = [f"{k} {v:g}" for k, v in spec.variants]
    return MethodOutput(model=model, info=info)


