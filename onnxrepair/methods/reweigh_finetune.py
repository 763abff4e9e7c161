"""A simple fairness baseline that FMT is compared against: ``reweigh-finetune``.

Kamiran & Calders, "Data preprocessing techniques for classification without discrimination", KAIS 33(1),
2012: each (group g, label y) cell gets weight w(g, y) = P(g)·P(y) / P(g, y), making group and label
independent in the weighted data; then the whole classifier is fine-tuned with the weighted cross-entropy.
"""

from __future__ import annotations

import copy

import numpy as np

from ..data.protected import require_protected_labels
from ..train import fit_rows
from . import MethodOutput, RepairInputs, register
from .counterfactual_finetune import FairFinetuneConfig


def kamiran_calders_weights(group: np.ndarray, y: np.ndarray) -> np.ndarray:
    """w_i = P(g_i) P(y_i) / P(g_i, y_i) (empirical); cells that are empty get no rows, so no weight."""
    group, y = np.asarray(group), np.asarray(y)
    w = np.zeros(len(y), dtype=np.float64)
    n = len(y)
    for g in np.unique(group):
        for c in np.unique(y):
            cell = (group == g) & (y == c)
            if cell.any():
                w[cell] = (np.mean(group == g) * np.mean(y == c)) / (cell.sum() / n)
    return w


@register(
    "reweigh-finetune",
    config=FairFinetuneConfig,
    task="fairness",
    summary="baseline: Kamiran-Calders reweighing by (group, label), then weighted fine-tuning",
    needs="tabular training features and labels + --protected column",
    paper="Kamiran & Calders, Data preprocessing techniques for classification without discrimination, KAIS 2012",
)
def reweigh_finetune(inputs: RepairInputs, config: FairFinetuneConfig) -> MethodOutput:
    spec = require_protected_labels(inputs.protected, inputs.train, "reweigh-finetune")
    x = np.asarray(inputs.train.x, dtype=np.float32)
    y = np.asarray(inputs.train.y)
    col = x[:, spec.index]
    group = np.where(np.isclose(col, spec.privileged), 1, np.where(np.isclose(col, spec.unprivileged), 0, -1))
    w = kamiran_calders_weights(group, y)
    cells = {f"g{g}_y{c}": float(w[(group == g) & (y == c)][0]) for g in np.unique(group) for c in np.unique(y) if ((group == g) & (y == c)).any()}
    model = fit_rows(copy.deepcopy(inputs.model), x, y, w, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                     output_kind=inputs.output_kind, device=inputs.device, seed=inputs.seed, progress=inputs.progress)
    return MethodOutput(model, {"weights": cells, "epochs": config.epochs, "lr": config.lr, "labels_used": True})
