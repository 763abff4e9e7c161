"""A fairness peer FMT is compared against: ``drop-attribute`` ("fairness through unawareness"), retrain-free.

The FMT paper's peer drops the protected attribute from the model's input. Retraining is not what a user of an
ONNX file can do here, so this is the retrain-free version: the model is kept and its protected input column is set
to one value (the privileged one by default) for every row, as graph ops in front of the original graph
(``x · keep + value · onehot``), so the repaired file keeps the interface and its predictions no longer depend on
that column. What remains of the group differences comes from features correlated with the attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.protected import require_tabular_protected
from ..errors import UsageError
from . import MethodOutput, RepairInputs, register


class SetColumn(nn.Module):
    """``model(x)`` with column ``index`` of ``x`` replaced by ``value`` (graph ops: Mul + Add with constants)."""

    def __init__(self, model: nn.Module, n_features: int, index: int, value: float) -> None:
        super().__init__()
        self.model = model
        keep = torch.ones(n_features)
        keep[index] = 0.0
        self.register_buffer("keep", keep)
        self.register_buffer("fill", (1.0 - keep) * float(value))
        self.index, self.value = index, float(value)

    def forward(self, x: torch.Tensor):
        return self.model(x * self.keep.to(x.dtype) + self.fill.to(x.dtype))


@dataclass
class DropAttributeConfig:
    value: str = "privileged"  # the value every row gets: privileged | unprivileged


@register(
    "drop-attribute",
    config=DropAttributeConfig,
    task="fairness",
    summary="peer: drop the protected attribute without retraining — its input column set to the privileged value (graph ops in front)",
    needs="tabular model + --protected column (a model input); no labels",
    paper="the FMT paper's 'dropping the attribute' peer (Zhang et al., TOSEM 2023), retrain-free",
)
def drop_attribute(inputs: RepairInputs, config: DropAttributeConfig) -> MethodOutput:
    spec = require_tabular_protected(inputs.protected, inputs.train, "drop-attribute")
    if config.value not in ("privileged", "unprivileged"):
        raise UsageError(f"--value must be privileged or unprivileged, not {config.value!r}")
    value = spec.privileged if config.value == "privileged" else spec.unprivileged
    model = SetColumn(inputs.model, inputs.train.x.shape[1], spec.index, value)
    info = {"column": spec.column, "index": spec.index, "value": value, "labels_used": False}
    return MethodOutput(model.eval(), info, [f"input column {spec.column!r} (index {spec.index}) set to {value:g} for every row"])
