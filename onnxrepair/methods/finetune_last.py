"""``finetune-last``: the fine-tuning baseline restricted to the last ``last_layers`` parameterised modules (the
classifier head), with the same data, optimiser and checkpoint rule as :mod:`.finetune`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from . import MethodOutput, RepairInputs, register
from .finetune import FinetuneConfig, run_finetune


@dataclass
class FinetuneLastConfig(FinetuneConfig):
    last_layers: int = 1  # how many of the last parameterised modules (in graph order) are trained


@register("finetune-last", config=FinetuneLastConfig, task="robustness", needs="labelled images",
          summary="baseline: fine-tune only the last layer(s) on clean + perturbed data")
def finetune_last(inputs: RepairInputs, cfg: FinetuneLastConfig) -> MethodOutput:
    if cfg.last_layers < 1:
        raise UsageError("--last-layers must be at least 1")
    return run_finetune(inputs, cfg, cfg.last_layers)
