"""DARE: robustness repair from the model's own training history (Zhang et al., "A Post-Training Framework for
Improving the Performance of Deep Learning Models via Model Transformation", ACM TOSEM 2023; robustness instance
first as "Toward Improving the Robustness of Deep Learning Models via Model Transformation", ASE 2022, artefact
"DARE"). The robustness instance of the framework in :mod:`onnxrepair.transform`; FMT is the fairness one.

* **Cut** (:func:`default_cut`): the last feature map before global pooling for a CNN (the last node whose output
  still has a spatial extent > 1), the penultimate Linear's neurons for an MLP; ``--cut-layer`` names another node.
* **Mining** (:class:`HistoryTargets`, :func:`mine`): for each pool input, start from the final model's probability of
  the true class; scan the checkpoints in epoch order (``scan="later-half"``: the last ⌈n/2⌉ of n, the artefact's
  epochs 100-199 of 200; ``scan="all"``); accept checkpoint k when its true-class probability beats the running best
  and, when the final model is wrong, it predicts the true class; the running best becomes that probability and
  the target becomes checkpoint k's activation at the cut. Because an accepted checkpoint must beat the running best,
  the *last* accepted checkpoint (the artefact) is also the *most confident* one (the issue's wording): the two
  rules coincide and no choice is needed. Inputs never accepted are dropped. The history is the pipeline's
  :class:`onnxrepair.extras.ModelSequence`: one checkpoint converted at a time, as the final model's graph holding
  its weights, so the cut node means the same in every checkpoint whatever exported it; activations are computed
  only for the inputs a checkpoint wins.
* **Slice** (:class:`NNSlicerSlice`, :func:`onnxrepair.localize.slices.class_contributions`): per class c, on up to
  ``slice_samples`` pool inputs of class c (all classes get the same cap, drawn at random with the seed — the artefact
  used one sample per class), the contribution of each synapse of every Linear and groups-1 Conv2d of the prefix to
  the class output z_c is ``|w · Δa · ∂z_c/∂y|`` (Δa = input activation minus its mean over the slice samples),
  summed over kernel taps and positions for a conv, so a conv synapse is an (out, in) channel pair. Merge: each
  class's scores are normalised to sum 1 per layer and averaged over classes; the top ``keep`` (95 %) synapses per
  layer are kept (:func:`~onnxrepair.localize.slices.merge_class_slices`). A conv mask covers the kernel of a kept
  pair; a bias moves when any synapse into its unit is kept; normalisation parameters stay frozen.
* **Tuning**: masked MSE of the prefix's cut activation to the target, Adam, weights outside the slice restored after
  *every step* (``restore="step"``), suffix untouched. The published lr 1e-5 moved nothing on small models
  (``METHODS.md``), so lr and steps are chosen on a validation split of the pool (the pipeline's calibration rows):
  for every lr in ``lrs`` the classifier is scored before tuning and after each epoch on ``select_size`` validation
  images by the mean of clean accuracy and ``select_attack`` accuracy (ε = ``eps``), white-box (crafted on each epoch's
  classifier) or, with ``select_protocol="transfer"``, on examples crafted once on the original model (the paper's
  evaluation protocol; cheaper too); an epoch losing more
  than ``select_max_drop`` points of clean accuracy there is not eligible; the best (lr, epoch) wins, epoch 0 (the
  original) included, so tuning that only hurts on the validation rows changes nothing.
* **Grid** (optional): ``--cut-layer default,NODE`` and ``--slice-keep 0.95,0.5`` make the cut and the slice share
  grid dimensions next to the lr: every (cut, share, lr) cell is tuned and scored per epoch on the same validation
  images (the same transfer examples), mining runs once per cut, and the best (cell, epoch) wins, ties to the
  earlier cell (so list the published defaults first). The defaults are the published single cut and 95 % share.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import fx, nn

from ..data.contract import InputContract, ModelWithContract
from ..errors import UsageError, ValidationFailed
from ..graph import linear_layers, resolve_node, split_at
from ..localize.slices import class_contributions, merge_class_slices, sliceable_layers, synapse_mask
from ..nn import first_output
from ..perturb.attacks import make_attack
from ..train import budget_rows, split_calib
from ..transform import RegressionData, TransformContext, TuningConfig, run_transform
from . import MethodOutput, RepairInputs, register

PAPER = ("Zhang et al., A Post-Training Framework for Improving the Performance of DL Models via Model Transformation, "
         "ACM TOSEM 2023; Toward Improving the Robustness of DL Models via Model Transformation (DARE), ASE 2022")


class Checkpoints(Protocol):
    """What DARE reads from a training history: :class:`onnxrepair.extras.ModelSequence`, whose ``load(i)`` is the
    final model's graph holding checkpoint i's weights."""

    names: list[str]

    def __len__(self) -> int: ...

    def load(self, i: int) -> nn.Module: ...


# --------------------------------------------------------------------------- the cut
def default_cut(gm: fx.GraphModule, example: torch.Tensor) -> str:
    """The last node whose output has a spatial extent > 1 (a CNN's last feature map before global pooling /
    flattening); for a model without one (an MLP) the penultimate Linear's neuron node."""
    from torch.fx.passes.shape_prop import ShapeProp

    probe = copy.deepcopy(gm).eval()
    with torch.no_grad():
        ShapeProp(probe).propagate(example)
    last = None
    for n in probe.graph.nodes:
        meta = n.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if n.op in ("call_module", "call_function", "call_method") and shape is not None and len(shape) >= 3:
            if math.prod(int(s) for s in shape[2:]) > 1:
                last = n.name
    if last is not None:
        return last
    layers = linear_layers(gm)
    if len(layers) < 2:
        raise UsageError("dare found no feature map and fewer than 2 Linear layers to cut at; name one with --cut-layer")
    return layers[-2][1].name


def grid_cuts(gm: fx.GraphModule, spec: str, example: torch.Tensor) -> list[str]:
    """The cuts ``--cut-layer`` names: "" is the default cut (:func:`default_cut`); a comma-separated list is a grid,
    where "default" stands for the default cut; duplicates are dropped, order kept (ties go to the earlier)."""
    names = [s.strip() for s in spec.split(",") if s.strip()] or ["default"]
    out: list[str] = []
    for n in names:
        c = default_cut(gm, example) if n == "default" else resolve_node(gm, n)
        if c not in out:
            out.append(c)
    return out


# --------------------------------------------------------------------------- mining
def scan_indices(n: int, scan: str) -> list[int]:
    """Checkpoint indices scanned, in epoch order: the later half (the artefact) or all."""
    if scan == "later-half":
        return list(range(n // 2, n))
    if scan == "all":
        return list(range(n))
    raise UsageError(f"--scan must be later-half or all, not {scan!r}")


@dataclass
class MiningState:
    """Per pool input: the running best true-class probability and the checkpoint that set it (-1: the final model)."""

    best: torch.Tensor  # (N,)
    final_correct: torch.Tensor  # (N,) bool
    source: torch.Tensor  # (N,) long, -1 = never accepted
    target: torch.Tensor | None = None  # (N, *cut) once anything was accepted
    accepted_per_checkpoint: dict[int, int] = field(default_factory=dict)

    @classmethod
    def start(cls, p_true_final: torch.Tensor, final_correct: torch.Tensor) -> "MiningState":
        return cls(p_true_final.clone(), final_correct.clone(), torch.full_like(p_true_final, -1, dtype=torch.long))

    def step(self, k: int, p_true: torch.Tensor, predicts_true: torch.Tensor, activation) -> torch.Tensor:
        """Offer checkpoint ``k``: accept where its true-class probability beats the running best and (where the
        final model is wrong) it predicts the true class. ``activation(idx)`` gives its cut activation for the
        accepted inputs only. Returns the bool acceptance mask."""
        accept = (p_true > self.best) & (self.final_correct | predicts_true)
        self.accepted_per_checkpoint[k] = int(accept.sum())
        if accept.any():
            idx = accept.nonzero().flatten()
            act = activation(idx)
            if self.target is None:
                self.target = torch.zeros((len(self.best), *act.shape[1:]), dtype=act.dtype, device=act.device)
            self.target[idx] = act
            self.best = torch.where(accept, p_true, self.best)
            self.source[accept] = k
        return accept


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor, kind: str, batch_size: int = 512) -> torch.Tensor:
    out = torch.cat([first_output(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])
    return out if kind == "probs" else torch.softmax(out, dim=1)


@torch.no_grad()
def _activations(prefix: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([first_output(prefix(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def mine(ctx: TransformContext, history: Checkpoints, scan: str) -> tuple[MiningState, list[int], dict[str, Any]]:
    """Run the mining over ``history`` for ``ctx.x_train`` / ``ctx.y_train`` (module doc). The final model's weights
    are never changed: each checkpoint is its own graph, loaded and dropped in turn."""
    x, y = ctx.x_train, ctx.y_train.to(ctx.device)
    model, kind = ctx.split.model, ctx.output_kind
    p = _probs(model, x, kind)
    state = MiningState.start(p.gather(1, y[:, None])[:, 0], p.argmax(1) == y)
    order = scan_indices(len(history), scan)
    for k in order:  # one checkpoint in memory at a time
        ckpt = history.load(k).to(ctx.device).eval()  # the final graph holding checkpoint k's weights
        prefix = split_at(ckpt, ctx.split.cut).prefix
        pk = _probs(ckpt, x, kind)
        state.step(k, pk.gather(1, y[:, None])[:, 0], pk.argmax(1) == y, lambda idx: _activations(prefix, x[idx]))
        del ckpt, prefix
    return state, order, {"scanned": [history.names[k] for k in order]}


class HistoryTargets:
    """DARE's target strategy: mined checkpoint activations (module doc). The result is cached, so the lr search
    mines once."""

    name = "dare-history"

    def __init__(self, history: Checkpoints, scan: str = "later-half") -> None:
        self.history, self.scan = history, scan
        self._cache: RegressionData | None = None

    def make(self, ctx: TransformContext) -> RegressionData:
        if self._cache is not None:
            return self._cache
        if ctx.y_train is None:
            raise UsageError("dare needs labelled pool inputs (the true class decides acceptance)")
        state, order, info = mine(ctx, self.history, self.scan)
        keep = state.source >= 0
        n, acc = len(state.source), int(keep.sum())
        hist = Counter(self.history.names[int(k)] for k in state.source[keep].tolist())
        info.update({
            "pool": n, "accepted": acc, "dropped": n - acc,
            "final_correct": int(state.final_correct.sum()),
            "accepted_where_final_wrong": int((keep & ~state.final_correct).sum()),
            "target_epochs": {nm: hist.get(nm, 0) for nm in info["scanned"]},
            "accepted_per_checkpoint": {self.history.names[k]: v for k, v in state.accepted_per_checkpoint.items()},
            "winner_rule": "most confident accepted (= last accepted under the running-best rule)",
        })
        if acc == 0:
            raise ValidationFailed(
                f"dare: no pool input was accepted: none of the {len(order)} scanned checkpoints ({', '.join(info['scanned'])}) "
                f"gives any of the {n} inputs a higher true-class probability than the final model; nothing to tune toward "
                f"(try --scan all, or a history with earlier epochs); no model written")
        self._cache = RegressionData(ctx.x_train[keep], state.target[keep], info)
        return self._cache


class NNSlicerSlice:
    """DARE's slice (module doc); cached like the targets."""

    name = "dare-nnslicer"
    batch_size = 64  # images per contribution pass (a memory budget may lower it; the sums do not depend on it)

    def __init__(self, keep: float = 0.95, samples_per_class: int = 64, batch_size: int = batch_size) -> None:
        if not 0 < keep <= 1:
            raise UsageError(f"--slice-keep must be in (0, 1], got {keep}")
        self.keep, self.samples_per_class, self.batch_size = keep, samples_per_class, batch_size
        self._cache = None

    def mask(self, ctx: TransformContext):
        if self._cache is not None:
            return self._cache
        params = {n for n, _ in ctx.split.prefix.named_parameters()}
        layers = sliceable_layers(ctx.split.model, params)
        if not layers:
            raise UsageError(f"no Linear or Conv2d layer before the cut {ctx.split.cut!r}; choose a later --cut-layer")
        g = torch.Generator().manual_seed(ctx.seed)
        y = ctx.y_train.cpu()
        idx = []
        for c in torch.unique(y).tolist():
            ic = (y == c).nonzero().flatten()
            idx.append(ic[torch.randperm(len(ic), generator=g)[: self.samples_per_class]])
        sel = torch.cat(idx).sort().values.to(ctx.device)
        xs, ys = ctx.x_train[sel], ctx.y_train.to(ctx.device)[sel]
        contrib, counts = class_contributions(ctx.split.model, layers, xs, ys, lambda xb: first_output(ctx.split.model(xb)),
                                              batch_size=self.batch_size)
        keep = merge_class_slices(contrib, self.keep)
        mask = synapse_mask(layers, keep)
        info = {"keep": self.keep, "samples_per_class": counts, "merge": "per-class scores normalised per layer, averaged, top keep per layer",
                "layers": [{"layer": n, "synapses": int(keep[n].numel()), "kept": int(keep[n].sum()),
                            "weights_tunable": int(mask[f"{n}.weight"].sum()), "weights": int(m.weight.numel())} for n, m in layers]}
        self._cache = (mask, info)
        return self._cache


# --------------------------------------------------------------------------- lr / steps choice
class RobustSelector:
    """Scores the classifier on validation images: −(clean accuracy + attack accuracy)/2 (lower is better), not
    eligible when clean accuracy dropped more than ``max_drop`` points against the original.

    Without ``fixed`` the attack is crafted on the classifier being scored (white-box, each epoch); with ``fixed``
    (examples crafted once on the original model by :meth:`craft`) every epoch is scored on those same images — the
    paper's transfer protocol."""

    name = "dare-validation-clean+attack"

    def __init__(self, unit: torch.Tensor, y: torch.Tensor, contract: InputContract, attack: str, eps: float, seed: int, kind: str,
                 fixed: torch.Tensor | None = None, chunk: int = 0) -> None:
        self.unit, self.y, self.contract, self.attack, self.eps, self.seed, self.kind = unit, y, contract, attack, eps, seed, kind
        self.base: float | None = None
        self.max_drop = 0.0
        self.fixed = fixed
        self.chunk = chunk  # images per crafting pass (a memory budget's choice; 0: all at once)

    def craft(self, model: nn.Module) -> torch.Tensor:
        """``attack`` examples of the validation images crafted on ``model`` (unit pixel space)."""
        atk = make_attack(self.attack, ModelWithContract(model, self.contract), self.eps, seed=self.seed)
        atk.output_kind = self.kind
        n = len(self.unit)
        if not 0 < self.chunk < n:
            return atk(self.unit, self.y)
        # crafted in parts (autograd holds one part's activations): every image's attack is its own, and PGD's random
        # start is drawn for the whole set and sliced, so the examples are those of one pass
        start = atk.draw_start(self.unit, self.seed) if getattr(atk, "random_start", False) and hasattr(atk, "start") else None
        parts = []
        for lo in range(0, n, self.chunk):
            if start is not None:
                atk.start = start[lo : lo + self.chunk]
            parts.append(atk(self.unit[lo : lo + self.chunk], self.y[lo : lo + self.chunk]))
        return torch.cat(parts)

    @torch.no_grad()
    def _acc(self, model: nn.Module, unit: torch.Tensor) -> float:
        out = first_output(model(self.contract.to_model(unit)))
        return float((out.argmax(1) == self.y).float().mean())

    def score(self, ctx: TransformContext, epoch: int):
        model = ctx.split.model
        clean = self._acc(model, self.unit)
        adv = self._acc(model, self.fixed if self.fixed is not None else self.craft(model))
        if self.base is None or epoch == 0:
            self.base = clean
        drop = 100.0 * (self.base - clean)
        value = -(clean + adv) / 2
        return (value if drop <= self.max_drop + 1e-9 else None), {"val_clean": clean, f"val_{self.attack}": adv}


@dataclass
class DareConfig:
    history: str = ""  # checkpoints: a directory, a glob or a comma-separated list of ONNX files (resolved by the pipeline)
    history_order: str = "natural"  # natural (by the number in the name) | given | mtime
    cut_layer: str = ""  # fx node or module name ending the prefix; "" = last feature map before global pooling / penultimate dense;
    # a comma-separated list is a grid of candidates chosen on the validation split ("default" names the default cut)
    scan: str = "later-half"  # later-half (the artefact) | all
    slice_keep: tuple[float, ...] = (0.95,)  # share of synapses per layer kept in the slice; several: a grid chosen on validation
    slice_samples: int = 64  # pool inputs per class for the slice
    lrs: tuple[float, ...] = (1e-5, 1e-4, 1e-3)  # Adam learning rates tried; 1e-5 is the published one
    epochs: int = 10  # tuning epochs per lr (each scored on the validation split)
    batch_size: int = 64
    select_attack: str = "fgsm"  # attack used on the validation split to choose lr and steps
    select_protocol: str = "whitebox"  # whitebox: crafted on each tuned epoch | transfer: crafted once on the original
    eps: float = 8 / 255  # its budget (pixel units of the [0, 1] image)
    select_size: int = 256  # validation images scored per epoch
    select_max_drop: float = 0.0  # clean-accuracy points an epoch may lose on the validation images


_SPEC = dict(config=DareConfig, task="robustness", needs="labelled images (the pool to mine) + --history checkpoints",
             paper=PAPER, summary="DARE: tune a sliced prefix toward activations mined from the training history")


@register("dare", extra_inputs={"history": "models"}, **_SPEC)
def dare(inputs: RepairInputs, cfg: DareConfig) -> MethodOutput:
    history = inputs.extras.get("history")
    if history is None:
        raise UsageError("dare needs the model's training history: --history DIR|GLOB|A.onnx,B.onnx")
    if len(history) == 0:
        raise UsageError("dare: the training history is empty")
    if inputs.train.y is None:
        raise UsageError("dare needs labelled pool inputs (--data with labels)")
    if not cfg.lrs or any(lr <= 0 for lr in cfg.lrs) or cfg.epochs < 1:
        raise UsageError("dare needs --lrs of positive learning rates and --epochs >= 1")
    if cfg.select_protocol not in ("whitebox", "transfer"):
        raise UsageError(f"--select-protocol must be whitebox or transfer, not {cfg.select_protocol!r}")
    dev, contract = inputs.device, inputs.contract
    pool, val = split_calib(inputs.train, inputs.calib, inputs.seed)
    val = val.limit(cfg.select_size, seed=inputs.seed)
    x = contract.to_model(contract.to_unit(pool.x)).to(dev)
    y = torch.as_tensor(pool.y, dtype=torch.long)
    cuts = grid_cuts(inputs.model, cfg.cut_layer, x[:2].cpu())
    keeps = tuple(cfg.slice_keep)
    if not keeps or any(not 0 < k <= 1 for k in keeps):
        raise UsageError(f"--slice-keep must be shares in (0, 1], got {cfg.slice_keep}")
    runs = []
    best = None
    val_unit, val_y = contract.to_unit(val.x).to(dev), torch.as_tensor(val.y, dtype=torch.long, device=dev)
    # crafting the selection attack back-propagates through the whole model: no more images a pass than a training batch
    chunk = budget_rows(inputs.memory, "dare selection attack", 1, cfg.batch_size)
    # the slice's contribution passes keep every layer output's gradient beside autograd's saved tensors: twice a pass
    slice_batch = budget_rows(inputs.memory, "dare slice", 2, NNSlicerSlice.batch_size)
    make_selector = lambda fixed=None: RobustSelector(val_unit, val_y, contract, cfg.select_attack, cfg.eps, inputs.seed,  # noqa: E731
                                                      inputs.output_kind, fixed, chunk)
    fixed = None  # the transfer protocol's examples: crafted once on the original, shared by every grid cell
    if cfg.select_protocol == "transfer":
        fixed = make_selector().craft(copy.deepcopy(inputs.model).to(dev).eval())
    for cut in cuts:  # grid cut x slice share x lr, every cell scored per epoch on the same validation images
        targets = HistoryTargets(history, cfg.scan)  # mined once per cut (the targets are activations at the cut)
        for keep in keeps:
            slicer = NNSlicerSlice(keep, cfg.slice_samples, slice_batch or NNSlicerSlice.batch_size)  # one per (cut, share), shared by the lrs
            for lr in cfg.lrs:
                selector = make_selector(fixed)
                selector.max_drop = cfg.select_max_drop
                res = run_transform(inputs.model, cut=cut, targets=targets, slicer=slicer,
                                    tuning=TuningConfig(cfg.epochs, lr, cfg.batch_size, "step"), x_train=x, y_train=y, device=dev,
                                    seed=inputs.seed, output_kind=inputs.output_kind, extras={"history": history}, selector=selector,
                                    progress=inputs.progress)
                sel = res.info["selection"]
                scores = {e["epoch"]: e["score"] for e in sel["epochs"]}
                chosen = sel["selected_epoch"]
                value = scores.get(chosen)
                runs.append({"cut": cut, "slice_keep": keep, "lr": lr, "selected_epoch": chosen, "score": value,
                             "accepted": res.info["targets"]["accepted"],
                             "tunable_weights": res.info["slice"]["tunable_weights"], "curve": sel["epochs"], "loss": res.info["tuning"]})
                if value is not None and (best is None or value < best[0] - 1e-12):  # lower is better; ties keep the earlier cell
                    best = (value, lr, res)
    if best is None:  # no epoch of any lr eligible: the original weights (epoch 0 is always eligible, so rare)
        best = (None, cfg.lrs[0], res)
    _, lr, res = best
    n_batches = -(-res.info["targets"]["samples"] // cfg.batch_size)
    chosen = res.info["selection"]["selected_epoch"]
    info = dict(res.info)
    info["choice"] = {"on": f"{len(val)} validation images of the pool (calibration split), score = (clean + {cfg.select_protocol} "
                            f"{cfg.select_attack} accuracy at eps {cfg.eps:.4g}) / 2, clean drop <= {cfg.select_max_drop} points",
                      "cut": res.info["cut"], "slice_keep": res.info["slice"]["keep"], "lr": lr, "epoch": chosen, "steps": chosen * n_batches, "batch_size": cfg.batch_size, "select_attack_chunk": chunk or None, "slice_batch": slice_batch or None, "runs": runs}
    info["mining"] = {k: info["targets"][k] for k in ("pool", "accepted", "dropped", "target_epochs")}
    info["history"] = {"checkpoints": list(history.names), "skipped": list(getattr(history, "skipped", []))}
    info["params_added"] = 0
    m, sl = info["mining"], info["slice"]
    summary = [
        f"history: {len(history)} checkpoints, scanned {len(info['targets']['scanned'])} ({cfg.scan})"
        + "".join(f"; skipped {s['checkpoint']} ({s['reason']})" for s in info["history"]["skipped"]),
        f"mined {m['pool']} pool inputs: {m['accepted']} accepted, {m['dropped']} dropped; targets from "
        + ", ".join(f"{k} {v}" for k, v in m["target_epochs"].items() if v),
        f"cut at {info['cut']} {tuple(info['cut_shape'])}; slice {sl['tunable_weights']}/{sl['prefix_weights']} prefix weights",
        f"lr {lr:g}, {info['choice']['steps']} steps (epoch {chosen} of {cfg.epochs})"
        + (f", cut {info['cut']}, slice share {sl['keep']:g} ({len(runs)} grid cells)" if len(runs) > len(cfg.lrs) else "")
        + f" chosen on {len(val)} validation images"
        + (" — the original weights kept" if chosen == 0 else ""),
    ]
    return MethodOutput(res.model.cpu().eval(), info, summary)
