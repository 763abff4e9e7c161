"""The model-transformation post-training framework (Zhang et al., "A Post-Training Framework for
Improving the Performance of Deep Learning Models via Model Transformation", ACM TOSEM 2023).

A classifier ``f = g ∘ h`` is cut at a hidden layer L: the *prefix* ``h`` (input -> layer-L
activation) becomes an isomorphic regression model trained with MSE toward per-sample target
activations, ``min_θ Σ_i ||h_θ(x_i) − t_i||²`` (the paper's regression objective), where only a
*slice* of θ may move. Afterwards the tuned prefix weights are synchronised back into the classifier;
the suffix ``g`` and the architecture are never changed.

Two things differ between instances of the framework and are pluggable strategies here:

* :class:`TargetStrategy` — which inputs and which target activations (FMT: counterfactual pairs,
  target = the more confident member's activation; DARE: training-history checkpoints);
* :class:`SliceStrategy` — which weights may move, as a boolean mask per parameter (FMT: neurons most
  sensitive to the protected attribute; DARE: NNSlicer-style backward relevance).

A third, optional strategy, :class:`CheckpointSelector`, scores the whole classifier before tuning and
after every epoch (once the weights outside the slice are back) on data the tuning never sees; the
best eligible epoch is what is returned, epoch 0 (the original) included, so a pass that only makes the
model worse on that data changes nothing. Without a selector the last epoch is returned (the paper).

Everything else — cut choice, fx graph splitting, masked tuning with restoration, synchronisation —
lives here once. A pass returns what it did in ``info`` (cut, layers, mask size, loss history).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import fx, nn

from .errors import UsageError
from .graph import Split, cut_candidates, linear_layers, split_at
from .localize.slices import SliceMask
from .progress import SILENT, Reporter
from .train import train_loop

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the cut
def default_cut(gm: fx.GraphModule) -> str:
    """The neurons of Linear number max(1, n − 2) of n: the paper's choice for its 64-32-16-8-4-2 MLP
    (prefix = first four layers, 8-d output), generalised to leave two layers in the suffix."""
    layers = linear_layers(gm)
    if len(layers) < 2:
        raise UsageError(
            f"the model has {len(layers)} Linear layer(s); the transformation needs a hidden layer: "
            f"name one with --cut-layer (nodes: {', '.join(cut_candidates(gm)) or 'none'})"
        )
    return layers[max(1, len(layers) - 2) - 1][1].name


def split_model(model: fx.GraphModule, cut: str | None = None) -> Split:
    """:func:`onnxrepair.graph.split_at` at ``cut``, or at :func:`default_cut` when empty."""
    return split_at(model, cut or default_cut(model))


# --------------------------------------------------------------------------- strategies
@dataclass
class TransformContext:
    """What a strategy may look at: the split model, the training inputs (features only) and settings."""

    split: Split
    x_train: torch.Tensor  # (N, F) on ``device``; labels are deliberately absent (FMT needs none)
    device: torch.device
    seed: int = 0
    output_kind: str = "logits"
    protected: Any = None  # ProtectedSpec for fairness instances
    y_train: torch.Tensor | None = None  # for instances that need labels (DARE)
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. DARE's checkpoints


@runtime_checkable
class CheckpointSelector(Protocol):
    """Scores the classifier ``ctx.split.model`` as it stands; lower is better, ``None`` = not eligible
    (e.g. over an accuracy budget). Called before tuning (epoch 0) and after each epoch."""

    name: str

    def score(self, ctx: TransformContext, epoch: int) -> tuple[float | None, dict[str, Any]]: ...


@dataclass
class RegressionData:
    x: torch.Tensor  # (M, F) prefix inputs
    target: torch.Tensor  # (M, *cut shape) target activations
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TargetStrategy(Protocol):
    name: str

    def make(self, ctx: TransformContext) -> RegressionData: ...


@runtime_checkable
class SliceStrategy(Protocol):
    name: str

    def mask(self, ctx: TransformContext) -> tuple[SliceMask, dict[str, Any]]: ...


class FullSlice:
    """Every prefix weight is tunable (the no-slicing ablation)."""

    name = "full"

    def mask(self, ctx: TransformContext) -> tuple[SliceMask, dict[str, Any]]:
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in ctx.split.prefix.named_parameters()}, {}


# --------------------------------------------------------------------------- tuning
@dataclass
class TuningConfig:
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 128
    restore: str = "epoch"  # "step" | "epoch": when weights outside the slice are put back


def tune_prefix(
    prefix: fx.GraphModule,
    data: RegressionData,
    mask: SliceMask,
    cfg: TuningConfig,
    *,
    device: torch.device,
    seed: int = 0,
    progress: Reporter = SILENT,
    checkpoint: Any = None,
) -> dict[str, Any]:
    """MSE-tune ``prefix`` toward ``data.target`` with Adam; weights outside ``mask`` end bit-identical.
    Runs :func:`onnxrepair.train.train_loop`.

    ``restore="step"`` also zeroes their gradients, so they never move; ``"epoch"`` (the paper's FMT
    setting) lets them drift within an epoch and puts them back at its end. The prefix stays in eval
    mode: normalisation statistics are part of the frozen model, not of the regression.

    ``checkpoint`` (``epoch -> (score | None, info)``, lower is better) is called before the first epoch
    and after each one; the tunable weights of the best eligible epoch are put back at the end (the original
    ones when none is eligible).
    """
    if cfg.restore not in ("step", "epoch"):
        raise UsageError(f"--restore must be step or epoch, not {cfg.restore!r}")
    params = dict(prefix.named_parameters())
    unknown = sorted(set(mask) - set(params))
    if unknown:
        raise ValueError(f"slice mask names parameters the prefix lacks: {', '.join(unknown)}")
    for n, m in mask.items():
        if m.shape != params[n].shape:
            raise ValueError(f"slice mask for {n} has shape {tuple(m.shape)}, parameter has {tuple(params[n].shape)}")
    tunable = {n: p for n, p in params.items() if n in mask and bool(mask[n].any())}
    original = {n: p.detach().clone() for n, p in params.items()}
    masks = {n: mask[n].to(p.device) for n, p in tunable.items()}
    if not tunable or cfg.epochs <= 0 or len(data.x) == 0:
        return {"loss": [], "tunable_weights": 0, "steps": 0}
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in tunable)
    opt = torch.optim.Adam(tunable.values(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    x, t = data.x.to(device), data.target.to(device)
    was_training = prefix.training

    def restore() -> None:
        with torch.no_grad():
            for n, p in tunable.items():
                p.copy_(torch.where(masks[n], p, original[n]))

    def mask_grads() -> None:
        for n, p in tunable.items():
            if p.grad is not None:
                p.grad.mul_(masks[n])

    def batches(epoch: int):
        order = torch.randperm(len(x), generator=gen).to(device)
        for i in range(0, len(x), cfg.batch_size):
            yield order[i : i + cfg.batch_size]

    def step_loss(idx: torch.Tensor, step: int) -> torch.Tensor:
        out = prefix(x[idx])
        out = out[0] if isinstance(out, (tuple, list)) else out
        return torch.nn.functional.mse_loss(out, t[idx])

    score = None
    if checkpoint is not None:
        def score(epoch: int) -> tuple[float | None, dict[str, Any]]:
            value, info = checkpoint(epoch)
            return (None if value is None else -value), {"selection_score": value, **info}

    step_mode = cfg.restore == "step"
    try:
        res = train_loop(prefix, opt, batches, step_loss, epochs=cfg.epochs, n_batches=-(-len(x) // cfg.batch_size),
                         score=score, keep="best" if checkpoint is not None else "last",
                         state_keys=lambda k: k in tunable, before_step=mask_grads if step_mode else None,
                         after_step=restore if step_mode else None, after_epoch=restore,
                         batch_len=len, progress=progress, label="tuning prefix (MSE)")
    finally:
        restore()
        for n, p in params.items():
            p.requires_grad_(flags[n])
        prefix.train(was_training)
    changed = sum(int((params[n] != original[n]).sum()) for n in tunable)
    out = {"loss": [r["loss"] for r in res.history if "loss" in r], "tunable_weights": int(sum(int(m.sum()) for m in masks.values())),
           "changed_weights": changed, "steps": res.steps}
    if checkpoint is not None:
        epochs = []
        for r in res.history:
            row = {k: v for k, v in r.items() if k not in ("loss", "score", "selection_score")}
            epochs.append({"epoch": r["epoch"], "score": r["selection_score"], **{k: v for k, v in row.items() if k != "epoch"}})
        out["selection"] = {"selected_epoch": res.best_epoch, "eligible": res.eligible, "epochs": epochs}
    return out


def synchronise(model: nn.Module, prefix: nn.Module) -> list[str]:
    """Write the prefix's parameters and buffers into ``model`` by qualified name (the paper's
    synchronisation). Returns the names that were separate tensors and had to be copied."""
    copied = []
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for n, t in list(prefix.named_parameters()) + list(prefix.named_buffers()):
            dst = targets.get(n)
            if dst is None:
                raise ValueError(f"prefix tensor {n} has no counterpart in the classifier")
            if dst.data_ptr() != t.data_ptr():
                dst.copy_(t)
                copied.append(n)
    return copied


@dataclass
class TransformResult:
    model: fx.GraphModule
    info: dict[str, Any]


def run_transform(
    model: nn.Module,
    *,
    cut: str | None,
    targets: TargetStrategy,
    slicer: SliceStrategy,
    tuning: TuningConfig,
    x_train: torch.Tensor,
    device: torch.device,
    seed: int = 0,
    output_kind: str = "logits",
    protected: Any = None,
    y_train: torch.Tensor | None = None,
    extras: dict[str, Any] | None = None,
    selector: CheckpointSelector | None = None,
    progress: Reporter = SILENT,
) -> TransformResult:
    """Copy ``model``, split it, build targets and the slice, tune the prefix, synchronise.

    The input ``model`` is never modified. Targets are computed *before* any tuning, from the
    original weights. With a ``selector`` the best epoch on its data is kept (see the module doc).
    """
    if not isinstance(model, fx.GraphModule):
        raise UsageError("the transformation framework needs a torch.fx.GraphModule (a converted ONNX model)")
    work = copy.deepcopy(model).to(device).eval()
    split = split_model(work, cut)
    ctx = TransformContext(split, x_train.to(device), device, seed, output_kind, protected, y_train, extras or {})
    torch.manual_seed(seed)
    data = targets.make(ctx)
    mask, slice_info = slicer.mask(ctx)
    suffix_before = {n: p.detach().clone() for n, p in split.suffix.named_parameters()}
    prefix_names = {n for n, _ in split.prefix.named_parameters()}
    suffix_before = {n: t for n, t in suffix_before.items() if n not in prefix_names}
    checkpoint = None
    if selector is not None:
        def checkpoint(epoch: int) -> tuple[float | None, dict[str, Any]]:
            with torch.no_grad():
                return selector.score(ctx, epoch)
    hist = tune_prefix(split.prefix, data, mask, tuning, device=device, seed=seed, progress=progress, checkpoint=checkpoint)
    copied = synchronise(work, split.prefix)
    suffix_after = dict(split.suffix.named_parameters())
    if any(not torch.equal(suffix_before[n], suffix_after[n]) for n in suffix_before):  # framework invariant
        raise RuntimeError("suffix weights changed during prefix tuning")
    n_prefix = sum(p.numel() for p in split.prefix.parameters())
    info = {
        "framework": "model-transformation (Zhang et al., TOSEM 2023)",
        "cut": split.cut,
        "cut_shape": list(data.target.shape[1:]),
        "prefix_layers": [lay.linear for lay in split.layers],
        "suffix_parameters": sorted(suffix_before),
        "targets": {"strategy": targets.name, "samples": int(len(data.x)), **data.info},
        "slice": {"strategy": slicer.name, "tunable_weights": hist.get("tunable_weights", 0), "prefix_weights": int(n_prefix), **slice_info},
        "tuning": {"epochs": tuning.epochs, "lr": tuning.lr, "batch_size": tuning.batch_size, "restore": tuning.restore,
                   "steps": hist.get("steps", 0), "changed_weights": hist.get("changed_weights", 0),
                   "loss_first": hist["loss"][0] if hist["loss"] else None, "loss_last": hist["loss"][-1] if hist["loss"] else None},
        "synchronised_copies": copied,
    }
    if "selection" in hist:
        info["selection"] = {"strategy": selector.name, **hist["selection"]}
    return TransformResult(work, info)
