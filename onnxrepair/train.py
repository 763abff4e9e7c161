"""The training loop every method shares (:func:`fit`: SGD with best-checkpoint choice on calibration data),
the clean+perturbed training mixture, batched accuracy, and the pieces the full fine-tuning peers share.

DeepPatch (Wei et al., TOSEM 2023, §4.3) trains on training images perturbed with probability 0.5
(Gaussian blur, sigma in {0.5..3}) and keeps the checkpoint that is best on clean + perturbed
validation data. The baselines (``finetune``, ``finetune-last``) reuse the very same loop so that
the comparison differs only in *which* parameters move.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed
from .data.contract import InputContract
from .data.dataset import ArrayDataset
from .nn import first_output, log_probs
from .perturb.mixture import PerturbSpec, perturb_all, perturb_mixture
from .progress import SILENT, Reporter

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: nn.Module, x_model: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    outs = [first_output(model(x_model[i : i + batch_size])) for i in range(0, len(x_model), batch_size)]
    return torch.cat(outs).argmax(1)


@torch.no_grad()
def accuracy(model: nn.Module, x_model: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    if len(y) == 0:
        return float("nan")
    return float((predict(model, x_model, batch_size) == y).float().mean())


@dataclass
class CalibSet:
    """Calibration data already in model space: clean and one perturbed copy of each image."""

    clean: torch.Tensor
    perturbed: torch.Tensor
    y: torch.Tensor
    variant_of: list[tuple[str, float]] = field(default_factory=list)  # per perturbed copy (by sample)


def make_calib(data: ArrayDataset, contract: InputContract, spec: PerturbSpec, device: torch.device, seed: int, limit: int | None = None) -> CalibSet:
    data = data.limit(limit, seed=seed) if limit else data
    gen = np.random.default_rng(seed + 17)
    unit = contract.to_unit(data.x).to(device)
    pert = perturb_all(unit, spec, gen)
    return CalibSet(contract.to_model(unit), contract.to_model(pert), torch.as_tensor(data.y, device=device))


def split_calib(inputs_train: ArrayDataset, calib: ArrayDataset | None, seed: int, fraction: float = 0.1) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, calib): the given calibration set, or a stratified slice of the training data."""
    if calib is not None and len(calib):
        return inputs_train, calib
    return inputs_train.split(fraction, seed=seed)


@dataclass
class SGDSettings:
    """The optimiser settings the fine-tuning baselines and peers share, so a bench compares methods, not
    settings. lr 0.003 as DeepPatch: the paper's 0.01 diverged on BN-folded convs."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 5e-4
    train_mode: bool = False  # True: BatchNorm statistics update and dropout is active while training
    max_clean_drop: float = 100.0  # checkpoint choice: an epoch losing more calib clean-accuracy points than this is not eligible

    def sgd_kwargs(self) -> dict:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "train_mode": self.train_mode, "max_clean_drop": self.max_clean_drop}


@dataclass
class TrainResult:
    best_epoch: int  # the epoch whose weights the model holds (0 = the original)
    best_score: float | None
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    eligible: bool = True  # False when a score was given and no epoch qualified (the original was kept)
    stopped_at: int | None = None  # the epoch after which ``patience`` stopped training, None when it ran every epoch


Batch = Any
Score = Callable[[int], "tuple[float | None, dict[str, Any]]"]  # epoch -> (value, higher is better; None = not eligible), info


def _take_rows(batch: Batch, lo: int, hi: int) -> Batch:
    """Rows ``lo:hi`` of a batch: a tensor, or a tuple/list of them (other members are passed as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take_rows(b, lo, hi) if isinstance(b, torch.Tensor) else b for b in batch)
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into micro-batches")


def budget_rows(memory, stage: str, passes: int, want: int) -> int:
    """Rows (at most ``want``) one pass of ``stage`` may hold when each row costs ``passes`` times the model's measured
    per-sample training activations (autograd's saved tensors plus the live ones): ``memory.fit``; 0 (size nothing)
    when there is no budget or no activation cost to go by."""
    cost = getattr(memory, "cost", None)
    if memory is None or cost is None:
        return 0
    return memory.fit(stage, passes * (cost.saved + cost.peak_live), want, what="image")


def micro_rows(memory, stage: str, views: int, batch_size: int) -> int:
    """Rows per training pass for a step whose every row goes through the model ``views`` times (AugMix: clean and two
    views): at most what fits ``memory``'s pass, and never more rows than hold what one fine-tuning batch of
    ``batch_size`` holds (``batch_size // views``); 0 (no split) for one view or without an activation cost."""
    return 0 if views <= 1 else budget_rows(memory, stage, views, max(1, batch_size // views))


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[int], Iterable[Batch]],
    step_loss: Callable[[Batch, int], torch.Tensor],
    *,
    epochs: int,
    n_batches: int,
    score: Score | None = None,
    keep: str = "best",
    train_mode: bool = False,
    state_keys: Callable[[str], bool] | None = None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    after_epoch: Callable[[], None] | None = None,
    batch_len: Callable[[Batch], int] = lambda b: len(b[-1]),
    prepare: Callable[[Batch, int], Batch] | None = None,
    batch_weight: Callable[[Batch], float] | None = None,
    progress: Reporter = SILENT,
    label: str = "train",
    patience: int = 0,
    micro_batch: int = 0,
) -> TrainResult:
    """The one training loop every method and baseline runs.

    ``batches(epoch)`` yields the batches of epoch 1, 2, ... (each caller keeps its own shuffling, so results
    stay reproducible); ``step_loss(batch, step)`` returns the loss to minimise. ``before_step`` runs between
    ``backward`` and the optimiser step (e.g. masking gradients), ``after_step`` / ``after_epoch`` after them
    (e.g. restoring weights outside a slice).

    Checkpoint choice: with ``score``, epoch 0 (the model as given) and every epoch after ``after_epoch`` are
    scored; ``keep="best"`` ends holding the state-dict entries (``state_keys``; default all) of the highest
    eligible score — ties keep the earlier epoch, and when no epoch is eligible, the original — and
    ``keep="last"`` the last epoch's. ``train_mode`` puts the model in train mode while stepping (full
    fine-tuning); otherwise it stays in eval mode so frozen BatchNorm statistics and disabled dropout stay.
    The model is in eval mode afterwards. ``patience`` > 0 (with ``score`` and ``keep="best"``): stop after that many
    epochs in a row without a better score (the checkpoint kept is the one a full run would keep whenever the best
    epoch comes before the stop).

    Under torchrun (:mod:`onnxrepair.distributed`) each rank draws the same global batch, ``prepare(batch, step)``
    (the batch's randomness: perturbation, augmented views, attack starts) runs on the whole of it on every rank,
    then each rank takes its slice (:func:`onnxrepair.distributed.shard`) for ``step_loss``, and the gradients of
    the optimiser's parameters are all-reduced weighted by ``batch_weight(slice)`` (default ``batch_len``; a
    weighted mean loss passes its slice's total row weight), so that a step equals the single-process step on the
    whole batch. ``step_loss`` must be a mean over the slice's samples (or rows' weights) for that to hold. The
    optimiser's parameters start from rank 0's values; the epoch score is rank 0's, so every rank keeps the same
    checkpoint. Without a process group, ``prepare`` just runs before ``step_loss``.

    ``micro_batch`` > 0 (a memory budget's choice, :func:`micro_rows`): ``step_loss`` runs on parts of at most that many
    rows of this rank's batch, each part's mean weighted by its share and back-propagated before the next part runs,
    so autograd holds one part's activations at a time and the step is the whole batch's to float rounding. Not in
    ``train_mode``, where BatchNorm's batch statistics would change with the split.
    """
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be best or last, not {keep!r}")
    keys = [k for k in model.state_dict() if state_keys is None or state_keys(k)]

    def snapshot() -> dict[str, torch.Tensor]:
        sd = model.state_dict()
        return {k: sd[k].detach().clone() for k in keys}

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "value": None, "state": None}
    original = None

    dist_on = distributed.active()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    weight_of = batch_weight or batch_len
    if dist_on:  # every rank starts from rank 0's weights (and the same shapes, or this raises)
        distributed.broadcast_(params)
        distributed.count(0, loops=1)

    def consider(epoch: int, row: dict[str, Any]) -> None:
        value, info = score(epoch)
        value = distributed.agree(value)  # rank 0's verdict: every rank keeps the same checkpoint
        row.update(info)
        row["score"] = value
        if value is not None and (best["value"] is None or value > best["value"]):
            best.update(epoch=epoch, value=value, state=snapshot() if keep == "best" else None)

    model.eval()
    if score is not None:
        original = snapshot() if keep == "best" else None
        row: dict[str, Any] = {"epoch": 0}
        consider(0, row)
        history.append(row)
    step = 0
    stopped = None
    # a caller's no_grad() must not silently turn training into a no-op
    with torch.enable_grad(), progress.task(label, total=epochs * n_batches) as advance:
        for epoch in range(1, epochs + 1):
            model.train(train_mode)
            total, count = 0.0, 0
            for batch in batches(epoch):
                if prepare is not None:
                    batch = prepare(batch, step)
                n = batch_len(batch)  # the global batch
                local = distributed.shard(batch) if dist_on else batch
                optimizer.zero_grad(set_to_none=True)
                m = batch_len(local)
                if micro_batch <= 0 or train_mode or m <= micro_batch:
                    loss = step_loss(local, step)
                    loss.backward()
                else:  # parts of the batch, each back-propagated alone; their weighted means add up to the batch's
                    loss = torch.zeros(())
                    for lo in range(0, m, micro_batch):
                        hi = min(lo + micro_batch, m)
                        part = step_loss(_take_rows(local, lo, hi), step) * ((hi - lo) / m)
                        part.backward()
                        loss = loss + part.detach()
                share = 1.0
                if dist_on:
                    share = distributed.sync_grads(params, weight_of(local))
                    distributed.count(batch_len(local), steps=1)
                if before_step is not None:
                    before_step()
                optimizer.step()
                if dist_on and train_mode:  # BatchNorm running statistics, updated per slice, kept identical
                    distributed.average_(model.buffers())
                if after_step is not None:
                    after_step()
                total += float(loss.detach()) * share * n  # summed over ranks: the loss over the whole batch
                count += n
                step += 1
                advance()
            if after_epoch is not None:
                after_epoch()
            if dist_on:
                total = distributed.all_sum(total)[0]
            model.eval()
            row = {"epoch": epoch, "loss": total / max(count, 1)}
            if score is not None:
                consider(epoch, row)
            history.append(row)
            progress.epoch(epoch, epochs, loss=row["loss"], **{k: v for k, v in row.items()
                                                               if k not in ("epoch", "loss") and isinstance(v, float)})
            if patience > 0 and score is not None and keep == "best" and epoch - (best["epoch"] or 0) >= patience and epoch < epochs:
                stopped = epoch
                break
    if score is not None and keep == "best":
        state = best["state"] if best["state"] is not None else original
        model.load_state_dict(state, strict=False)
    model.eval()
    chosen = best["epoch"] if (score is not None and keep == "best") else epochs
    return TrainResult(best_epoch=chosen if chosen is not None else 0, best_score=best["value"], history=history, steps=step,
                       eligible=best["epoch"] is not None, stopped_at=stopped)


def fit(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    train: ArrayDataset,
    batch_loss: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    score: Callable[[], dict[str, float]],
    *,
    contract: InputContract,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    device: torch.device,
    seed: int,
    train_mode: bool = False,
    progress: Reporter = SILENT,
    state_filter: Callable[[str], bool] | None = None,
    augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    max_clean_drop: float = 100.0,
    patience: int = 0,
    micro_batch: int = 0,
) -> TrainResult:
    """:func:`train_loop` with SGD over labelled images: ``batch_loss(x, y, step)``; ``model`` ends holding
    the checkpoint with the best ``score()["mixed"]`` (epoch 0, the original, competes too), in eval mode.
    ``state_filter`` limits which state-dict entries are checkpointed (the trainable ones). An epoch whose
    ``score()["calib_clean"]`` is more than ``max_clean_drop`` points below epoch 0's is not eligible (the
    retention limit applied to the checkpoint choice, so peers can be compared at no clean cost); epoch 0 always is.

    ``x`` is the unit batch, or ``augment(x_unit, step)`` when given: the batch's randomness (perturbed copies,
    views, attack starts, stacked along dim 1 if several), drawn on the whole global batch so that every rank of a
    distributed run slices the same draws (``batch_loss`` sees this rank's rows)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def batches(epoch: int):
        for xb, yb in train.batches(batch_size, shuffle=True, seed=seed * 1000 + epoch):
            yield contract.to_unit(xb).to(device), torch.as_tensor(yb, device=device)

    base: dict[str, float] = {}

    def scored(epoch: int) -> tuple[float | None, dict[str, Any]]:
        s = score()
        if epoch == 0 and "calib_clean" in s:
            base["clean"] = s["calib_clean"]
        if "clean" in base and 100.0 * (base["clean"] - s["calib_clean"]) > max_clean_drop + 1e-9:
            return None, dict(s)  # over the clean-accuracy budget: not eligible
        return s["mixed"], dict(s)

    prepare = None if augment is None else (lambda b, step: (augment(b[0], step), b[1]))
    res = train_loop(model, opt, batches, lambda b, step: batch_loss(b[0], b[1], step), epochs=epochs,
                     n_batches=(len(train) + batch_size - 1) // batch_size, score=scored, keep="best",
                     train_mode=train_mode, state_keys=state_filter, prepare=prepare, progress=progress,
                     patience=patience, micro_batch=micro_batch)
    for row in res.history:  # the history speaks of the calibration score's own keys
        row.pop("score", None)
    return res


def train_mixture(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    train: ArrayDataset,
    calib: CalibSet,
    contract: InputContract,
    output_kind: str,
    *,
    spec: PerturbSpec,
    perturb_prob: float,
    eval_batch: int = 512,
    **kw,
) -> TrainResult:
    """:func:`fit` with cross-entropy on clean+perturbed data (each image perturbed with ``perturb_prob``)
    and the best checkpoint on calib clean+perturbed accuracy (scored in batches of ``eval_batch``, which a
    memory budget may lower; accuracy does not depend on it)."""
    gen = np.random.default_rng(kw["seed"])

    def mix(unit: torch.Tensor, step: int) -> torch.Tensor:  # on the global batch: every rank draws the same
        return perturb_mixture(unit, spec, perturb_prob, gen)

    def batch_loss(x_unit: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        out = first_output(model(contract.to_model(x_unit)))
        return torch.nn.functional.nll_loss(log_probs(out, output_kind), y)

    return fit(model, params, train, batch_loss, lambda: calib_score(model, calib, eval_batch), contract=contract, augment=mix, **kw)


def calib_score(model: nn.Module, calib: CalibSet, batch_size: int = 512) -> dict[str, float]:
    clean = accuracy(model, calib.clean, calib.y, batch_size)
    pert = accuracy(model, calib.perturbed, calib.y, batch_size)
    return {"calib_clean": clean, "calib_perturbed": pert, "mixed": (clean + pert) / 2}


def module_nodes(gm: torch.fx.GraphModule) -> Iterable[tuple[torch.fx.Node, nn.Module]]:
    mods = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            yield node, mods[node.target]


# --------------------------------------------------------------------------- full fine-tuning peers


def require_labelled_images(train: ArrayDataset, contract: InputContract, method: str) -> None:
    from .errors import UsageError

    if train.y is None:
        raise UsageError(f"{method} needs labelled training data")
    if not contract.is_image:
        raise UsageError(f"{method} needs image data; the input contract is {contract.layout!r}")


def trainable_copy(model: nn.Module, device: torch.device) -> tuple[nn.Module, list[nn.Parameter], list[str]]:
    """A copy of ``model`` on ``device`` in eval mode with every parameter trainable, the parameters, and the
    names of the modules that own them."""
    from .errors import UsageError

    model = copy.deepcopy(model).to(device).eval()
    params = list(model.parameters())
    if not params:
        raise UsageError("the model has no trainable parameters")
    for p in params:
        p.requires_grad_(True)
    names = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()})
    return model, params, names


def fit_all_weights(model: nn.Module, params: list[nn.Parameter], train: ArrayDataset, batch_loss, score, **kw) -> tuple[int, list[dict]]:
    """:func:`fit`, then every weight frozen again; returns (best epoch, history)."""
    res = fit(model, params, train, batch_loss, score, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    return res.best_epoch, res.history


def peer_info(names, params, best_epoch: int, history: list[dict], perturbed_key: str, **extra) -> dict:
    """What a full fine-tuning peer reports: what it trained, the chosen epoch, and calib accuracy before
    (epoch 0) and after."""
    orig, final = history[0], history[best_epoch]
    return {
        "layers_trained": names,
        "params_trained": int(sum(p.numel() for p in params)),
        **extra,
        "best_epoch": best_epoch,
        "calib_accuracy": {
            "original_clean": orig["calib_clean"],
            "original_perturbed": orig[perturbed_key],
            "repaired_clean": final["calib_clean"],
            "repaired_perturbed": final[perturbed_key],
        },
        "history": history,
        "params_added": 0,
    }


def fit_rows(model: nn.Module, x: np.ndarray, y: np.ndarray, w: np.ndarray, *, epochs: int, lr: float, batch_size: int,
             output_kind: str, device: torch.device, seed: int, progress: Reporter = SILENT, label: str = "fine-tuning") -> nn.Module:
    """:func:`train_loop` over labelled feature rows: Adam on every trainable weight, train mode, the cross-entropy
    weighted per row by ``w`` (the fairness baselines); the last epoch is kept. Returns the model on the CPU."""
    model = model.to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    xt = torch.as_tensor(x, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y, dtype=torch.int64, device=device)
    wt = torch.as_tensor(w, dtype=torch.float32, device=device)
    gen = torch.Generator().manual_seed(seed)

    def batches(epoch: int):
        order = torch.randperm(len(xt), generator=gen).to(device)
        for i in range(0, len(xt), batch_size):
            yield order[i : i + batch_size]

    def step_loss(idx: torch.Tensor, step: int) -> torch.Tensor:
        lp = log_probs(first_output(model(xt[idx])), output_kind)
        nll = -lp.gather(1, yt[idx, None]).squeeze(1)
        return (nll * wt[idx]).sum() / wt[idx].sum().clamp_min(1e-12)

    # the loss is a weighted mean: a distributed slice counts by its rows' total weight, not its row count
    train_loop(model, opt, batches, step_loss, epochs=epochs, n_batches=-(-len(xt) // batch_size), keep="last",
               train_mode=True, batch_len=len, batch_weight=lambda idx: float(wt[idx].sum()), progress=progress, label=label)
    return model.cpu().eval()
