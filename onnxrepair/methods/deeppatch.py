"""DeepPatch: filter patching with on-demand, per-sample division of labour.

Wei, Wang, Ashraf, Chan. "DeepPatch: Maintaining Deep Learning Model Programs to Retain Standard
Accuracy with Substantial Robustness Improvement." ACM TOSEM 32(6), art. 150, 2023.

1. Filter assessment (§4.2, :mod:`onnxrepair.localize.filters`): perfloss or featswap blame per conv channel.
2. Patching (§4.3, :mod:`onnxrepair.graph.patching`): for each conv with groups = 1, a unit producing the top
   k = floor(ratio * C_out) blamed channels replaces them; original weights frozen; units trained on clean
   data mixed with perturbed data (p = 0.5), SGD, best checkpoint on calib clean + perturbed.
3. Division of labour (§4.4): at the first patched conv, the fraction of replaced activations whose on/off
   state differs between the original and the patched path; below the boundary (midpoint of the clean and
   perturbed calibration means) -> patched path. Decided *per sample* (the published code votes per batch).

Gate choice (``gate=``). The published statistic barely separates clean from blurred inputs on BN-folded
exports. Calibration AUC, P(score(perturbed) > score(clean)), measured with
``bench/deeppatch.py``-style data (quick subsets, 2 repair epochs, lr 0.003):

=========  ============  ========  =====
dataset    disagreement  logistic  stats
=========  ============  ========  =====
MNIST-5k   0.935         0.986     0.997
CIFAR-10   0.595         0.942     0.979
=========  ============  ========  =====

so the default is ``stats``: a logistic classifier on [z, z^2] of per-channel log mean |x| and log mean
|spatial difference| of the first patched conv's output, trained on clean vs perturbed training images,
threshold set on calibration data so that ``gate_clean_rate`` (2 %) of clean inputs reach the patch. The
published ``disagreement`` gate and the ``logistic`` one stay available; ``info["gate"]["auc"]`` reports
all three on every run.

Training: units are deltas to the filters they replace (zero-initialised, so training starts from the
original model). Default lr 0.003: with BatchNorm folded into the convs there is no normalisation after a
unit, and the paper's 0.01 diverged on the MNIST bench (every epoch worse than the untouched model, so the
best checkpoint on calib clean + perturbed was the original). The checkpoint criterion is the paper's:
patched path, mean of calib clean and calib perturbed accuracy.

Deployment (issue 14, ``deploy=``, ``switch=``). Training runs on the patched graph of
:func:`~onnxrepair.graph.patching.insert_patches` (units as deltas, mixed in by a 1x1 conv, a mask per sample); its
export cost 2-3x the original on small CNNs (``bench/results/deeppatch_latency.md``, variant ``mix``). A routed
sample sees exactly the original convs with the blamed filters replaced, so the default deployment is a
:class:`~onnxrepair.graph.patching.PerSampleSwitch`: the gate, the untouched original model, and the original
architecture with the units folded into its conv weights (``folded_model``: no extra op at all), exported as ONNX
``If`` nodes. ``switch="overlay"`` (default) runs the original in the main graph on every row and, only when some
row is routed, the folded model on those rows inside the ``If`` (onnxruntime applies its NCHWc layout and fusions to
the main graph only, so this keeps the clean path as fast as the original file, bit for bit its outputs, and a
routed row costs both); ``"exclusive"`` runs each row through one side (a routed row costs one model, but both sides
run inside ``If`` branches at onnxruntime's unoptimised layout). The added cost no longer depends on how many
layers or filters are patched, only on the gate: ``gate="input"`` reads four fixed 3x3 filters (identity,
horizontal/vertical difference, Laplacian) of the model *input* at stride 2, a few microseconds, where the ``stats``
gate's reductions over the first patched conv's map cost 25-30 % of the file. ``max_latency_ratio``: the pipeline
measures the exported file against the original (onnxruntime, 1 thread, interleaved) and refuses it (exit 1,
nothing written) over the limit.

Memory (issue 19): the assessment's stacked passes (``assess_group`` ablations x ``assess_batch`` images at most)
and the calibration's capture batch are sized by the repair's memory budget (:mod:`onnxrepair.memory`) from the
model's measured per-sample activation cost; a split changes no result (the scores are sums over samples, the gate
reads per-sample reductions). Calibration keeps only per-sample reductions of the gate's inputs, never the maps, so
it does not grow with the width of the first patched conv times the number of calibration sets. Measured on the
half-width CIFAR ResNet-18 of issue 19 (stem assessed, 1,000 training images, 1 epoch, ``bench/memory_models.py``):
process peak 2.37 GB before, 1.79 GB after, same selected filters, gate AUCs and routing.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from ..errors import UsageError
from ..graph.patching import PREFIX, SWITCH_MODES, DivisionGate, InputGate, get_gate, insert_patches, set_routing, switch_model
from ..localize.filters import METHODS as ASSESS_METHODS
from ..localize.filters import assess_filters, conv_nodes
from ..memory import activation_cost
from ..nn import first_output
from ..perturb.blur import DEEPPATCH_SIGMAS
from ..perturb.mixture import PerturbSpec, apply_variant, perturb_all
from ..train import make_calib, split_calib, train_mixture
from . import MethodOutput, RepairInputs, register

log = logging.getLogger(__name__)

GATES = ("disagreement", "logistic", "stats", "input", "none")
DEPLOY = ("switch", "mix")


@dataclass
class DeepPatchConfig:
    assess: str = "featswap"  # filter assessment: featswap | perfloss | taylor (first-order featswap: ~3 passes per sample, for large models)
    ratio: float = 0.25  # fraction of each conv's filters replaced by the patching unit
    epochs: int = 20
    batch_size: int = 128  # the paper uses 256
    lr: float = 0.003  # the paper's 0.01 diverged on BN-folded exports (MNIST bench: best epoch = 0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    perturb_prob: float = 0.5  # probability a training image is perturbed
    sigmas: tuple[float, ...] = DEEPPATCH_SIGMAS  # Gaussian blur set (used when no --corruptions)
    corruptions: tuple[str, ...] = ()  # names from onnxrepair.perturb.corruptions instead of blur
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)  # with --corruptions
    exclude: tuple[str, ...] = ()  # conv node names or module paths not to patch
    assess_samples: int = 512  # sample budget for filter assessment
    assess_group: int = 16  # at most this many ablations stacked per pass (fewer when the memory budget says so)
    assess_batch: int = 128  # at most this many images per assessment pass (fewer when the memory budget says so)
    gate: str = "input"  # input (default: model-input filter statistics, cheapest) | stats (first patched conv) | disagreement (published) | logistic | none
    gate_samples: int = 2000  # training images for the logistic and stats gates
    gate_clean_rate: float = 0.02  # stats gate: fraction of clean calib inputs allowed onto the patch
    unit_bias: str = "auto"  # auto (bias where the conv has one, BN folded) | yes | no (as published)
    deploy: str = "switch"  # switch (per-sample If: original or folded model, stats/none gates) | mix (the training graph)
    switch: str = "overlay"  # overlay (original in the main graph, routed rows redone) | exclusive (each row runs one side)
    patience: int = 0  # > 0: stop training after this many epochs without a better calibration score (0: every epoch)
    assess_stable: int = 0  # > 0: stop a conv's assessment once its blamed set is unchanged over this many sample batches
    max_latency_ratio: float = 0.0  # > 0: the repaired file may cost at most this times the original (measured on the file by the pipeline)


def _variants(spec: PerturbSpec) -> list[tuple[str, float]]:
    return spec.variants


_STOP_AT_GATE = True  # the gate's training passes end at the gate (False: the whole model runs, as before issue 14; the repair-time bench flips it)


class _GateReached(Exception):
    """Raised by :func:`_reduced_pass`'s hook to end a forward at the gate when only the gate's inputs are wanted."""


@torch.no_grad()
def _reduced_pass(gm: fx.GraphModule, x_model: torch.Tensor, y: torch.Tensor | None, batch: int,
                  orig: nn.Module | None = None, igate: InputGate | None = None) -> dict[str, torch.Tensor]:
    """One pass over ``x_model`` in batches of ``batch``: what the gate reads, reduced per batch as it is produced
    (:meth:`DivisionGate.reduce`: O(N * C), never the (orig, delta) maps), and with labels ``y`` the per-sample
    correctness of this pass (``correct``) and of ``orig`` on the same inputs (``correct_orig``)."""
    gate = get_gate(gm)
    parts: dict[str, list[torch.Tensor]] = {}

    def keep(m: DivisionGate, inp, out) -> None:  # returns None: a hook's return value would replace the output
        for k, v in m.reduce(inp[0], inp[1]).items():
            parts.setdefault(k, []).append(v)
        if y is None and _STOP_AT_GATE:  # nothing after the gate is read: stop the forward here
            raise _GateReached

    h = gate.register_forward_hook(keep)
    try:
        for i in range(0, len(x_model), batch):
            xb = x_model[i : i + batch]
            if igate is not None:
                parts.setdefault("input", []).append(igate.reduce(xb))
            if y is None:
                try:
                    gm(xb)
                except _GateReached:
                    pass
                continue
            out = first_output(gm(xb))
            if y is not None:
                yb = y[i : i + batch]
                parts.setdefault("correct", []).append(out.argmax(1) == yb)
                if orig is not None:
                    parts.setdefault("correct_orig", []).append(first_output(orig(xb)).argmax(1) == yb)
    finally:
        h.remove()
    return {k: torch.cat(v) for k, v in parts.items()}


def _auc(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """P(score(pos) > score(neg)), ties counted half: how well a scalar separates two sets."""
    neg, pos = neg.flatten().double().cpu(), pos.flatten().double().cpu()
    if not len(neg) or not len(pos):
        return float("nan")
    allv = torch.cat([neg, pos])
    ranks = torch.empty_like(allv)
    order = allv.argsort()
    ranks[order] = torch.arange(1, len(allv) + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inv = torch.unique(allv, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
    cnts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnts)[inv]
    r_pos = ranks[len(neg) :].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _balanced_logistic(z: torch.Tensor, n_clean: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression, clean (the first ``n_clean`` rows, 0) vs perturbed (the rest, 1),
    each class weighted to half the loss so the boundary does not follow the class sizes. Returns (w, b)."""
    n_pert = len(z) - n_clean
    t = torch.cat([torch.zeros(n_clean), torch.ones(n_pert)]).to(z.device)
    w_cls = torch.where(t > 0, 0.5 / n_pert, 0.5 / n_clean)
    w = torch.zeros(z.shape[1], device=z.device, requires_grad=True)
    b = torch.zeros((), device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    @torch.enable_grad()
    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, t, reduction="none") * w_cls).sum() + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _fit_logistic(gate: DivisionGate, f_clean: torch.Tensor, f_pert: torch.Tensor, seed: int, steps: int = 300) -> None:
    """Logistic regression clean(0) vs perturbed(1) on standardised gate features (balanced classes)."""
    torch.manual_seed(seed)
    f = torch.cat([f_clean, f_pert]).float()
    mu, sd = f.mean(0), f.std(0).clamp_min(1e-6)
    w, b = _balanced_logistic((f - mu) / sd, len(f_clean), steps)
    gate.feat_mean.copy_(mu)
    gate.feat_std.copy_(sd)
    gate.weight.copy_(w)
    gate.bias.copy_(b)


def _fit_stats(gate: DivisionGate, f_clean: torch.Tensor, f_pert: torch.Tensor, steps: int = 200) -> None:
    """Logistic regression clean(0) vs perturbed(1) on [z, z^2] of the standardised activation statistics.

    ``f_*`` are :func:`stats_features` of first-patched-conv outputs (reduced per batch as they were produced).
    The squared terms let one linear score flag a departure from the clean statistics in either direction (blur
    lowers the spatial-difference energy, noise raises it).
    """
    f = torch.cat([f_clean.float(), f_pert.float()])
    gate.stats_mean.copy_(f.mean(0))
    gate.stats_std.copy_(f.std(0).clamp_min(1e-6))
    z = gate.standardised_stats(f)
    w, b = _balanced_logistic(z, len(f_clean), steps)
    gate.stats_weight.copy_(w)
    gate.stats_bias.copy_(b)


def _fit_input(gate: InputGate, f_clean: torch.Tensor, f_pert: torch.Tensor, steps: int = 200) -> None:
    """:func:`_fit_stats` for the input gate's features."""
    f = torch.cat([f_clean.float(), f_pert.float()])
    gate.stats_mean.copy_(f.mean(0))
    gate.stats_std.copy_(f.std(0).clamp_min(1e-6))
    w, b = _balanced_logistic(gate.standardised_stats(f), len(f_clean), steps)
    gate.stats_weight.copy_(w)
    gate.stats_bias.copy_(b)


def _calibrate(gm: fx.GraphModule, inputs: RepairInputs, cfg: DeepPatchConfig, spec: PerturbSpec, train, calib, calib_data,
               layers, batch: int) -> tuple[dict, dict, dict, list]:
    """Fit and calibrate the gate (every kind, so the report compares them; the configured one routes) and measure
    routing and accuracy on the calibration sets (clean + each perturbation). Returns (gate info, routing, accuracy,
    variants). Every pass runs in batches of ``batch`` and keeps only :meth:`DivisionGate.reduce`'s per-sample
    numbers; each perturbed set is made when its pass runs and dropped after it."""
    dev, contract = inputs.device, inputs.contract
    gate = get_gate(gm)
    variants = _variants(spec)
    unit = contract.to_unit(calib_data.x).to(dev)
    orig = inputs.model.to(dev).eval()
    nhwc = contract.layout == "nhwc"
    igate = InputGate(int(calib.clean.shape[-1 if nhwc else 1]), nhwc=nhwc).to(dev)
    set_routing(gm, "patched")
    red: dict[str, dict[str, torch.Tensor]] = {"clean": _reduced_pass(gm, calib.clean, calib.y, batch, orig, igate)}
    for i, (k, lvl) in enumerate(variants):
        x = contract.to_model(apply_variant(unit, k, lvl, seed=inputs.seed + i))
        red[f"{k}:{lvl:g}"] = _reduced_pass(gm, x, calib.y, batch, orig, igate)
        del x
    del unit
    pert_names = [n for n in red if n != "clean"]

    def cat_pert(key: str) -> torch.Tensor:
        return torch.cat([red[n][key] for n in pert_names])

    s_clean, s_pert_all = red["clean"]["features"][:, 0], cat_pert("features")[:, 0]
    m_clean, m_pert = float(s_clean.mean()), float(s_pert_all.mean())
    auc_stat = _auc(s_clean, s_pert_all)
    gate.boundary.fill_((m_clean + m_pert) / 2)
    gate.sign.fill_(1.0 if m_pert <= m_clean else -1.0)  # published: perturbed below the boundary
    gate.kind = "disagreement"
    gate_info: dict = {
        "layer": layers[0].layer,
        "statistic": "fraction of replaced activations whose on/off state differs (original vs patched)",
        "mean_clean": m_clean,
        "mean_perturbed": m_pert,
        "boundary": float(gate.boundary),
        "patched_when": "below" if float(gate.sign) > 0 else "above",
        "auc_statistic": auc_stat,
        "kind": cfg.gate,
    }

    # AUC = P(score(perturbed) > score(clean)) on calib (the fitted gates learn from training images, never calib)
    def calib_scores(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "input":
            return igate.score_features(red["clean"]["input"]), torch.cat([igate.score_features(red[n]["input"]) for n in pert_names])
        gate.kind = kind
        return gate.score_reduced(red["clean"]), torch.cat([gate.score_reduced(red[n]) for n in pert_names])

    g_data = train.limit(cfg.gate_samples, seed=inputs.seed + 3)
    gen = np.random.default_rng(inputs.seed + 5)
    g_unit = contract.to_unit(g_data.x).to(dev)
    g_pert = contract.to_model(perturb_all(g_unit, spec, gen))
    r_clean = _reduced_pass(gm, contract.to_model(g_unit), None, batch, igate=igate)
    del g_unit
    r_pert = _reduced_pass(gm, g_pert, None, batch, igate=igate)
    del g_pert
    _fit_input(igate, r_clean["input"], r_pert["input"])
    sci, spi = calib_scores("input")
    auc_input = _auc(sci, spi)
    thr_input = float(torch.quantile(sci.double().cpu(), 1.0 - cfg.gate_clean_rate))
    igate.stats_bias.sub_(thr_input)
    igate.freeze()
    _fit_logistic(gate, r_clean["features"], r_pert["features"], inputs.seed)
    auc_logistic = _auc(*calib_scores("logistic"))
    _fit_stats(gate, r_clean["stats"], r_pert["stats"])
    sc, sp = calib_scores("stats")
    auc_stats = _auc(sc, sp)
    # threshold: at most gate_clean_rate of clean calib inputs above it
    thr = float(torch.quantile(sc.double().cpu(), 1.0 - cfg.gate_clean_rate))
    gate.stats_bias.sub_(thr)
    gate_info["auc"] = {"disagreement": _auc(*calib_scores("disagreement")), "logistic": auc_logistic, "stats": auc_stats,
                        "input": auc_input}
    gate_info["trained_on"] = f"{len(g_data)} training images, clean vs perturbed"
    gate.kind = cfg.gate if cfg.gate in ("logistic", "stats") else "disagreement"
    if cfg.gate == "logistic":
        gate_info.update(features="gate statistic + per-channel mean |activation| of the first patched conv", auc_logistic=auc_logistic)
    elif cfg.gate == "input":
        gate_info.update(features="[z, z^2] of per-channel log mean |x|, |dx|, |dy|, |Laplacian| of the model input",
                         clean_rate_target=cfg.gate_clean_rate, auc_input=auc_input, threshold=thr_input)
    elif cfg.gate == "stats":
        gate_info.update(features="[z, z^2] of per-channel log mean |x| and log mean |spatial difference| of the first patched conv",
                         clean_rate_target=cfg.gate_clean_rate, auc_stats=auc_stats, threshold=thr)
    set_routing(gm, "patched" if cfg.gate == "none" else "gate")
    route_rate: dict[str, float] = {}
    acc_sets: dict[str, dict[str, float]] = {}
    for name, r in red.items():
        if cfg.gate == "none":
            route = torch.ones_like(r["correct"])
        elif cfg.gate == "input":
            route = igate.route_features(r["input"])
        else:
            route = gate.score_reduced(r) > 0
        route_rate[name] = float(route.float().mean())
        repaired = torch.where(route, r["correct"], r["correct_orig"])  # a routed sample takes exactly one path
        acc_sets[name] = {"original": float(r["correct_orig"].float().mean()), "repaired": float(repaired.float().mean()),
                          "patched_path": float(r["correct"].float().mean())}
    routing = {"clean": route_rate["clean"], "perturbed": {n: route_rate[n] for n in pert_names},
               "perturbed_mean": float(np.mean([route_rate[n] for n in pert_names]))}
    acc = {f"{who}_clean": acc_sets["clean"][who] for who in ("original", "repaired", "patched_path")}
    acc.update({f"{who}_perturbed": float(np.mean([acc_sets[n][who] for n in pert_names])) for who in ("original", "repaired", "patched_path")})
    return gate_info, routing, acc, variants, igate


@register(
    "deeppatch",
    config=DeepPatchConfig,
    task="robustness",
    summary="patch blamed conv filters; route each input to the original or patched filters",
    needs="labelled images",
    paper="Wei et al., DeepPatch, ACM TOSEM 32(6) 2023",
)
def deeppatch(inputs: RepairInputs, cfg: DeepPatchConfig) -> MethodOutput:
    if cfg.assess not in ASSESS_METHODS:
        raise UsageError(f"--assess must be one of {', '.join(ASSESS_METHODS)}, not {cfg.assess!r}")
    if cfg.gate not in GATES:
        raise UsageError(f"--gate must be one of {', '.join(GATES)}, not {cfg.gate!r}")
    if cfg.deploy not in DEPLOY:
        raise UsageError(f"--deploy must be one of {', '.join(DEPLOY)}, not {cfg.deploy!r}")
    if cfg.gate == "input" and cfg.deploy != "switch":
        raise UsageError("--gate input runs only in the deployment switch (--deploy switch): the training graph has no place for it")
    if cfg.switch not in SWITCH_MODES:
        raise UsageError(f"--switch must be one of {', '.join(SWITCH_MODES)}, not {cfg.switch!r}")
    if cfg.max_latency_ratio < 0:
        raise UsageError(f"--max-latency-ratio must be > 0 (or 0: no limit), not {cfg.max_latency_ratio}")
    if not 0 < cfg.ratio <= 1:
        raise UsageError(f"--ratio must be in (0, 1], not {cfg.ratio}")
    if not inputs.contract.is_image:
        raise UsageError("deeppatch repairs image models (convolutions); this model's input contract is tabular")
    if inputs.train.y is None:
        raise UsageError("deeppatch needs labelled training images")
    spec = PerturbSpec.resolve(cfg.sigmas, cfg.corruptions, cfg.severities)
    dev, contract = inputs.device, inputs.contract
    t0 = time.perf_counter()
    gm: fx.GraphModule = copy.deepcopy(inputs.model).to(dev).eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    train, calib_data = split_calib(inputs.train, inputs.calib, inputs.seed)
    calib = make_calib(calib_data, contract, spec, dev, inputs.seed)

    # ---- 1. filter assessment on a sample budget of the calibration data
    skipped: list[dict] = []
    candidates: list[str] = []
    for node, conv in conv_nodes(gm):
        k = int(np.floor(cfg.ratio * conv.out_channels))
        if node.name in cfg.exclude or str(node.target) in cfg.exclude:
            skipped.append({"layer": node.name, "reason": "excluded by the user"})
        elif conv.groups != 1:
            kind = "depthwise" if conv.groups == conv.in_channels else f"grouped (groups={conv.groups})"
            skipped.append({"layer": node.name, "reason": f"{kind} convolution: a unit with groups=1 would not mirror it"})
        elif k == 0:
            skipped.append({"layer": node.name, "reason": f"{conv.out_channels} channels * ratio {cfg.ratio} < 1"})
        else:
            candidates.append(node.name)
    if not candidates:
        raise UsageError("deeppatch found no patchable convolution (groups=1, not excluded) in this model")
    n_assess = min(cfg.assess_samples, len(calib.y))

    # ---- memory: what one sample costs, measured on the original model; each stage's passes are sized from it
    # (stacking is a speed trick: the split never changes a result) and the repair stops here, before any work,
    # when a stage cannot run within the budget even one sample at a time.
    mem = inputs.memory
    cost = mem.cost if mem.cost is not None else activation_cost(gm, calib.clean[:2])
    cut = max(cost.nodes.get(name, 0) for name in candidates)
    # one stacked ablation of one image through the suffix: its activations, the stacked cut and the repeated skips
    assess_item = cost.peak_live + 2 * cut
    capture_item = cost.peak_live + cut  # a forward of the patched model (units and gate on the first patched conv)
    train_item = cost.saved + cost.peak_live  # what autograd may keep per image, plus the live activations
    mem.require({
        "deeppatch assessment": (int(mem.margin * (assess_item + 2 * cut)), "one ablation of one image"),
        "deeppatch training": (int(mem.margin * cfg.batch_size * train_item),
                               f"a training batch of {cfg.batch_size}; a smaller --batch-size needs less"),
        "deeppatch calibration": (int(mem.margin * capture_item), "one image"),
    })
    stacked = mem.fit("deeppatch assessment", assess_item, cfg.assess_group * cfg.assess_batch, fixed=2 * cut * min(cfg.assess_batch, n_assess),
                      what="stacked image")
    a_batch = max(1, min(cfg.assess_batch, n_assess, stacked))
    a_group = max(1, min(cfg.assess_group, stacked // a_batch))
    convs = dict((n.name, c) for n, c in conv_nodes(gm))
    if all(int(np.floor(cfg.ratio * convs[name].out_channels)) == convs[name].out_channels for name in candidates):
        scores = {}  # every filter is patched (ratio 1): no ranking can change the plan, so none is computed
    else:
        with mem.stage("method.assess"), inputs.progress.task(f"assess filters ({cfg.assess})", total=(1 if cfg.assess == "taylor" else len(candidates)) * -(-n_assess // a_batch)) as advance:
            scores = assess_filters(
                gm, calib.clean[:n_assess], calib.perturbed[:n_assess], calib.y[:n_assess], method=cfg.assess,
                output_kind=inputs.output_kind, layers=candidates, group=a_group, batch_size=a_batch, progress=advance,
                stable=cfg.assess_stable, top_k=lambda c: int(np.floor(cfg.ratio * c)),
            )
    t_assess = time.perf_counter() - t0
    plan = {name: scores[name].top(int(np.floor(cfg.ratio * len(scores[name].acc_score)))) if scores
            else list(range(convs[name].out_channels)) for name in candidates}

    # ---- 2. patching units, trained with the gate forced to the patched path
    gm, layers = insert_patches(gm, plan, bias=cfg.unit_bias)
    gate = get_gate(gm)
    unit_params = [p for n, p in gm.named_parameters() if n.startswith(PREFIX)]
    for p in unit_params:
        p.requires_grad_(True)
    set_routing(gm, "patched")
    cap = mem.fit("deeppatch calibration", capture_item, 512, what="image")  # capture / evaluation batch
    t_train0 = time.perf_counter()
    with mem.stage("method.train"):
        result = train_mixture(
            gm, unit_params, train, calib, contract, inputs.output_kind, spec=spec, epochs=cfg.epochs,
            batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            perturb_prob=cfg.perturb_prob, device=dev, seed=inputs.seed, progress=inputs.progress,
            state_filter=lambda k: k.startswith(PREFIX), eval_batch=cap, patience=cfg.patience,
        )
    for p in gm.parameters():
        p.requires_grad_(False)

    # ---- 3. per-sample division of labour, calibrated on clean and perturbed calibration data
    # One pass per set; a hook on the gate reduces its inputs per batch to what the gate kinds read (a few numbers
    # per channel), so memory stays flat in the model's width and the number of sets. A routed sample sees exactly
    # the original or exactly the patched path, so the gated model's accuracy follows from the per-sample
    # correctness of both paths without another pass.
    t_train = time.perf_counter() - t_train0
    t_cal0 = time.perf_counter()
    with mem.stage("method.calibrate"):
        info_cal = _calibrate(gm, inputs, cfg, spec, train, calib, calib_data, layers, cap)
    gate_info, routing, acc, variants, igate = info_cal
    t_cal = time.perf_counter() - t_cal0

    deploy: dict = {"form": "mix", "reason": "asked for (--deploy mix)"}
    trained = gm
    if cfg.deploy == "switch" and cfg.gate in ("stats", "none", "input"):
        gm, how = switch_model(inputs.model.to(dev).eval(), trained, layers, calib.clean[:4], igate if cfg.gate == "input" else None,
                               cfg.switch)
        deploy = {"form": "switch", "mode": cfg.switch, "original_side": how}
    elif cfg.deploy == "switch":
        deploy = {"form": "mix", "reason": f"the {cfg.gate} gate reads the unit's output, which the switch does not compute"}
    params_added = sum(p.numel() for n, p in trained.named_parameters() if n.startswith(PREFIX))
    gate_params = {"logistic": sum(b.numel() for n, b in gate.named_buffers() if n in ("weight", "bias", "feat_mean", "feat_std")),
                   "stats": sum(b.numel() for n, b in gate.named_buffers() if n.startswith("stats_")),
                   "input": sum(b.numel() for n, b in igate.named_buffers() if n.startswith("folded_"))}.get(cfg.gate, 2)
    info = {
        "assess": cfg.assess,
        "ratio": cfg.ratio,
        "perturbations": [f"{k}:{lvl:g}" for k, lvl in variants],
        "layers_patched": [
            {"layer": l.layer, "module": l.target, "unit": l.unit, "c_out": l.c_out, "k": len(l.channels), "channels": l.channels, "params": l.params}
            for l in layers
        ],
        "layers_skipped": skipped,
        "ranking": {name: {"base_acc_perturbed": s.base_acc, "samples": s.n_samples, "top": s.summary(8)} for name, s in scores.items()},
        "gate": gate_info,
        "routing_calib": routing,
        "calib_accuracy": acc,
        "params_added": int(params_added),
        "gate_params": int(gate_params),
        "params_original": int(sum(p.numel() for n, p in trained.named_parameters() if not n.startswith(PREFIX))),
        "deploy": deploy,
        "latency_limit": cfg.max_latency_ratio or None,
        "best_epoch": result.best_epoch,
        "stopped_at_epoch": result.stopped_at,
        "history": result.history,
        "seconds": {"assess": round(t_assess, 2), "train": round(t_train, 2), "calibrate": round(t_cal, 2), "total": round(time.perf_counter() - t0, 2)},
        "calib_samples": len(calib.y),
        # how the budget split the passes (the results do not depend on it); per-stage figures are in the report's "memory"
        "passes": {"assess_batch": a_batch, "assess_group": a_group, "capture_batch": cap, "budget_mb": round(mem.limit / 2**20, 1)},
    }
    gate_txt = "no gate: every input takes the patch" if cfg.gate == "none" else f"{cfg.gate} gate, calibration AUC {gate_info['auc'][cfg.gate]:.3f}"
    summary = [
        f"routed to the patch (calibration data): clean {100 * routing['clean']:.1f}%, perturbed {100 * routing['perturbed_mean']:.1f}% ({gate_txt})",
        f"layers patched: {len(layers)}, skipped: {len(skipped)}, patch parameters trained: {int(params_added):,}; best epoch {result.best_epoch} of {cfg.epochs}",
    ]
    return MethodOutput(model=gm.eval(), info=info, summary=summary)
