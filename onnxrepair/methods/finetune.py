"""Fine-tuning baselines for robustness repair, the peers DeepPatch is compared with (Wei et al.,
TOSEM 2023, §5.2 "fine-tuning"): the same clean+perturbed training mixture, optimiser, epochs and
best-checkpoint rule as :mod:`.deeppatch`; they differ only in which weights move.

* ``finetune`` — every weight.
* ``finetune-last`` (:mod:`.finetune_last`) — only the last ``last_layers`` parameterised modules.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from ..errors import UsageError
from ..perturb.blur import DEEPPATCH_SIGMAS
from . import MethodOutput, RepairInputs, register
from ..perturb.mixture import PerturbSpec
from ..train import SGDSettings, accuracy, make_calib, split_calib, train_mixture


@dataclass
class FinetuneConfig(SGDSettings):
    perturb_prob: float = 0.5
    sigmas: tuple[float, ...] = DEEPPATCH_SIGMAS
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)


def _param_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning parameters directly, in the order the fx graph calls them (fallback: definition order)."""
    mods = dict(model.named_modules())
    order: list[str] = []
    graph = getattr(model, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and node.target not in order:
                order.append(str(node.target))
    else:
        order = list(mods)
    return [(n, mods[n]) for n in order if any(True for _ in mods[n].parameters(recurse=False))]


def run_finetune(inputs: RepairInputs, cfg: FinetuneConfig, last: int | None) -> MethodOutput:
    """Fine-tune every parameterised module (``last=None``) or the last ``last`` of them, in graph order."""
    if inputs.train.y is None:
        raise UsageError("fine-tuning needs labelled training data")
    spec = PerturbSpec.resolve(cfg.sigmas, cfg.corruptions, cfg.severities)
    dev = inputs.device
    model = copy.deepcopy(inputs.model).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pmods = _param_modules(model)
    chosen = pmods if last is None else pmods[-last:]
    if not chosen:
        raise UsageError("the model has no trainable parameters")
    names = {n for n, _ in chosen}
    params = []
    for _, m in chosen:
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
            params.append(p)
    train, calib_data = split_calib(inputs.train, inputs.calib, inputs.seed)
    calib = make_calib(calib_data, inputs.contract, spec, dev, inputs.seed)
    result = train_mixture(
        model, params, train, calib, inputs.contract, inputs.output_kind, spec=spec, perturb_prob=cfg.perturb_prob,
        device=dev, seed=inputs.seed, progress=inputs.progress, **cfg.sgd_kwargs(),
    )
    for p in model.parameters():
        p.requires_grad_(False)
    orig = inputs.model.to(dev).eval()
    info = {
        "layers_trained": sorted(names),
        "params_trained": int(sum(p.numel() for p in params)),
        "best_epoch": result.best_epoch,
        "calib_accuracy": {
            "original_clean": accuracy(orig, calib.clean, calib.y),
            "original_perturbed": accuracy(orig, calib.perturbed, calib.y),
            "repaired_clean": accuracy(model, calib.clean, calib.y),
            "repaired_perturbed": accuracy(model, calib.perturbed, calib.y),
        },
        "history": result.history,
        "params_added": 0,
    }
    return MethodOutput(model=model.eval(), info=info)


@register("finetune", config=FinetuneConfig, task="robustness", needs="labelled images",
          summary="baseline: fine-tune all weights on clean + perturbed data")
def finetune(inputs: RepairInputs, cfg: FinetuneConfig) -> MethodOutput:
    return run_finetune(inputs, cfg, None)
