"""A simple fairness baseline that FMT is compared against: ``counterfactual-finetune`` fine-tunes the whole
classifier with labels (FMT needs none) on the training rows plus their counterfactual copies (protected
attribute flipped, same label), so the protected attribute loses its influence.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ..data.protected import flip_protected, require_protected_labels
from ..train import fit_rows
from . import MethodOutput, RepairInputs, register


@dataclass
class FairFinetuneConfig:
    """Settings of the fairness fine-tuning baselines (Adam on every weight, the last epoch kept)."""

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 128


@register(
    "counterfactual-finetune",
    config=FairFinetuneConfig,
    task="fairness",
    summary="baseline: fine-tune on training rows + copies with the protected attribute flipped",
    needs="tabular training features and labels + --protected column",
)
def counterfactual_finetune(inputs: RepairInputs, config: FairFinetuneConfig) -> MethodOutput:
    spec = require_protected_labels(inputs.protected, inputs.train, "counterfactual-finetune")
    x = np.asarray(inputs.train.x, dtype=np.float32)
    y = np.asarray(inputs.train.y)
    col = x[:, spec.index]
    keep = np.isclose(col, spec.privileged) | np.isclose(col, spec.unprivileged)
    _, flipped = flip_protected(x, spec)
    xa = np.concatenate([x, flipped])
    ya = np.concatenate([y, y[keep]])
    model = fit_rows(copy.deepcopy(inputs.model), xa, ya, np.ones(len(ya)), epochs=config.epochs, lr=config.lr,
                     batch_size=config.batch_size, output_kind=inputs.output_kind, device=inputs.device, seed=inputs.seed,
                     progress=inputs.progress)
    return MethodOutput(model, {"rows": int(len(x)), "counterfactual_rows": int(keep.sum()), "epochs": config.epochs, "lr": config.lr, "labels_used": True})
