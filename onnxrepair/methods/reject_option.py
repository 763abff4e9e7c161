"""A fairness peer FMT is compared against: ``reject-option`` classification, post-processing on the model's scores.

Kamiran, Karim & Zhang, "Decision Theory for Discrimination-Aware Classification", ICDM 2012. A classifier's
decisions close to its decision boundary are the least certain; in a *critical band* ``|p − θ| <= w`` around the
classification threshold θ (p = the model's probability of the favourable class) the deprived group gets the
favourable outcome and the favoured group the unfavourable one; outside the band the decision is ``p > θ``.

θ and w are chosen on labelled rows the pipeline holds out of training (its calibration split; the training rows
when it has none), the way AIF360's ``RejectOptionClassification`` searches them: over a grid, the pair with the
lowest mean relative change of |SPD|, AAOD and |EOD| among those losing at most ``max_drop`` accuracy points there
against the original decisions (θ = the model's own threshold, w = 0: the original is always a candidate, so the
method never does worse on those rows than no repair). ``--threshold`` / ``--margin`` fix either instead.

Which group is *deprived* (gets the favourable outcome in the band): ``direction="auto"`` (the default) takes the
group with the lower rate of favourable predictions on the selection rows — Kamiran et al.'s deprived group, and
right whichever way a data set codes its label (the FMT artefact's COMPAS favourable label is *reoffending*, so
its privileged group predicts it less); ``"unprivileged"`` always boosts the unprivileged value.

The repaired model is a drop-in ONNX: the original graph, then graph ops that read the protected column from the
same input, compute p from the first output, and rewrite that output so the standard reading (argmax; one column:
logit > 0 or probability > 0.5) gives the new decision — per row the two values of a two-column output are put in
the order of the decision (their values kept), a single column has its sign / side of 0.5 set. Only binary
classifiers (one or two output columns) are supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.protected import ProtectedSpec, require_tabular_protected
from ..errors import UsageError
from ..metrics import fairness_report, relative_change
from ..nn import first_output
from . import MethodOutput, RepairInputs, register

PAPER = "Kamiran, Karim & Zhang, Decision Theory for Discrimination-Aware Classification, ICDM 2012"
SELECTION_METRICS = ("abs_spd", "aaod", "abs_eod")


def _rows(out: torch.Tensor) -> torch.Tensor:
    """(N, C) view of a classifier output: (N,) becomes (N, 1); (N, C) as it is. No reshape by ``len()`` (a traced
    constant would fix the batch) and no Reshape op (its ``allowzero`` attribute breaks exports below opset 14)."""
    if out.ndim == 1:
        return out.unsqueeze(1)
    if out.ndim != 2:
        raise UsageError(f"reject-option post-processes (N, classes) outputs; this model's first output has shape {tuple(out.shape)}")
    return out


def favourable_score(out: torch.Tensor, kind: str, favourable: int = 1) -> torch.Tensor:
    """P(favourable class) per row from the first output: two columns (softmax of logits, or the probability as is),
    or one column (sigmoid of a logit, or P(class 1) as is)."""
    out = _rows(out)
    if out.shape[1] == 1:
        q = out[:, 0] if kind == "probs" else torch.sigmoid(out[:, 0])
        return q if favourable == 1 else 1 - q
    if out.shape[1] != 2:
        raise UsageError(f"reject-option post-processes binary classifiers (1 or 2 output columns); this model has {out.shape[1]}")
    p = out if kind == "probs" else torch.softmax(out, dim=1)
    return p[:, favourable]


def encode_decision(out: torch.Tensor, fav: torch.Tensor, kind: str, favourable: int = 1) -> torch.Tensor:
    """``out`` rewritten so the standard reading of it is the favourable class where ``fav`` and the other one
    elsewhere, in ``out``'s shape and dtype. Two columns: the larger value goes to the decided class (the
    pair of values is kept, only ordered); one column: the value's side of the boundary is set."""
    o = _rows(out)
    if o.shape[1] == 1:
        cls1 = fav if favourable == 1 else ~fav
        v = o[:, 0]
        if kind == "probs":  # reading: q > 0.5 is class 1
            hi = torch.maximum(v, 1 - v)
            hi = hi + (hi <= 0.5).to(v.dtype) * 1e-6
            new = torch.where(cls1, hi, torch.minimum(v, 1 - v))
        else:  # reading: logit > 0 is class 1
            new = torch.where(cls1, v.abs() + (v == 0).to(v.dtype) * 1e-6, -v.abs())
        return new if out.ndim == 1 else new.unsqueeze(1)
    hi, lo = o.max(dim=1).values, o.min(dim=1).values
    lo = lo - (hi == lo).to(o.dtype) * 1e-6  # a tie would make argmax pick column 0 whatever the decision
    first = torch.where(fav, hi, lo) if favourable == 0 else torch.where(fav, lo, hi)
    second = torch.where(fav, lo, hi) if favourable == 0 else torch.where(fav, hi, lo)
    return torch.stack([first, second], dim=1)


class RejectOption(nn.Module):
    """The original model followed by the reject-option decision rule, as graph ops (exported with the model)."""

    def __init__(self, model: nn.Module, index: int, boosted: float, demoted: float, threshold: float, margin: float,
                 kind: str, favourable: int = 1) -> None:
        super().__init__()
        self.model, self.index, self.kind, self.favourable = model, index, kind, favourable
        self.boosted, self.demoted, self.threshold, self.margin = float(boosted), float(demoted), float(threshold), float(margin)

    def forward(self, x: torch.Tensor):
        res = self.model(x)
        out = first_output(res)
        p = favourable_score(out, self.kind, self.favourable)
        col = x[:, self.index]
        band = (p - self.threshold).abs() <= self.margin
        fav = p > self.threshold
        # logical ops, not Where on booleans (onnxruntime has no bool Where kernel)
        fav = (fav | (band & ((col - self.boosted).abs() < 1e-6))) & ~(band & ((col - self.demoted).abs() < 1e-6))
        new = encode_decision(out, fav, self.kind, self.favourable)
        if isinstance(res, (tuple, list)):
            return (new, *res[1:])
        return new


def decide(p: np.ndarray, col: np.ndarray, boosted: float, demoted: float, threshold: float, margin: float) -> np.ndarray:
    """The rule of :class:`RejectOption` in numpy (1 = favourable), for the search."""
    band = np.abs(p - threshold) <= margin
    fav = p > threshold
    fav = np.where(band & np.isclose(col, boosted), True, fav)
    return np.where(band & np.isclose(col, demoted), False, fav)


@dataclass
class RejectOptionConfig:
    favourable: int = 1  # the favourable class (1 in onnxrepair's encodings)
    direction: str = "auto"  # auto: the group with fewer favourable predictions on the selection rows is boosted | unprivileged
    threshold: float = -1.0  # θ; < 0: chosen on the selection rows from the grid
    margin: float = -1.0  # band half-width w; < 0: chosen on the selection rows from the grid
    thresholds: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(2, 19))  # θ grid 0.10..0.90
    margins: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(0, 31))  # w grid 0..0.30
    max_drop: float = 0.4  # accuracy points (θ, w) may lose on the selection rows against the original decisions
    objective: str = "mean"  # mean relative change of |SPD|, AAOD, |EOD| | spd | aaod | eod


def _score_rows(inputs: RepairInputs, favourable: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(scores, labels, protected column, which rows) of the selection rows."""
    spec = inputs.protected
    for name, ds in (("calib", inputs.calib), ("train", inputs.train)):
        if ds is None or ds.y is None or not len(ds):
            continue
        x = np.asarray(ds.x, dtype=np.float32)
        col = x[:, spec.index]
        if not (np.isclose(col, spec.privileged).any() and np.isclose(col, spec.unprivileged).any()):
            continue
        with torch.no_grad():
            xt = torch.as_tensor(x, device=inputs.device)
            p = torch.cat([favourable_score(first_output(inputs.model(xt[i : i + 8192])), inputs.output_kind, favourable)
                           for i in range(0, len(xt), 8192)])
        return p.cpu().numpy().astype(np.float64), np.asarray(ds.y), col, name
    raise UsageError("reject-option chooses its band on labelled rows holding both groups: give --val rows with the --target column")


def search(p: np.ndarray, y: np.ndarray, col: np.ndarray, spec: ProtectedSpec, boosted: float, demoted: float, base_threshold: float,
           cfg: RejectOptionConfig) -> dict[str, Any]:
    """The grid search of the module doc: returns the chosen (θ, w) and the figures of every candidate."""
    if cfg.objective not in ("mean", "spd", "aaod", "eod"):
        raise UsageError(f"--objective must be mean, spd, aaod or eod, not {cfg.objective!r}")
    keys = {"mean": SELECTION_METRICS, "spd": ("abs_spd",), "aaod": ("aaod",), "eod": ("abs_eod",)}[cfg.objective]

    def metrics(th: float, w: float) -> dict[str, float]:
        pred = decide(p, col, boosted, demoted, th, w).astype(int)
        pred = pred if cfg.favourable == 1 else 1 - pred
        rep = fairness_report(y, pred, col, spec.privileged, spec.unprivileged, cfg.favourable)
        return {k: float(rep[k]) for k in ("accuracy", *SELECTION_METRICS)}

    base = metrics(base_threshold, 0.0)
    ths = (cfg.threshold,) if cfg.threshold >= 0 else tuple(dict.fromkeys((base_threshold, *cfg.thresholds)))
    ws = (cfg.margin,) if cfg.margin >= 0 else tuple(cfg.margins)
    best, rows = None, 0
    for th in ths:
        for w in ws:
            m = metrics(th, w)
            rows += 1
            drop = 100.0 * (base["accuracy"] - m["accuracy"])
            rel = [relative_change(base[k], m[k]) for k in keys if base[k] > 0]
            score = float(np.mean(rel)) if rel else 0.0
            if drop > cfg.max_drop + 1e-9 and not (cfg.threshold >= 0 and cfg.margin >= 0):
                continue
            # lower score first; then the smaller accuracy drop, the narrower band, θ nearest the model's own
            key = (round(score, 12), round(drop, 12), w, abs(th - base_threshold))
            if best is None or key < best[0]:
                best = (key, th, w, m, drop)
    assert best is not None  # (base_threshold, 0) is always eligible
    _, th, w, m, drop = best
    return {"threshold": th, "margin": w, "before": base, "after": m, "accuracy_drop_points": drop, "candidates": rows}


@register(
    "reject-option",
    config=RejectOptionConfig,
    task="fairness",
    summary="peer: reject-option classification (Kamiran 2012) — in a band around the threshold the deprived group gets the favourable outcome; graph ops on the output",
    needs="tabular model + --protected column (a model input) + labelled calibration rows (--val) to choose the band",
    paper=PAPER,
)
def reject_option(inputs: RepairInputs, config: RejectOptionConfig) -> MethodOutput:
    spec = require_tabular_protected(inputs.protected, inputs.train, "reject-option")
    if config.favourable not in (0, 1):
        raise UsageError(f"--favourable must be 0 or 1, not {config.favourable}")
    if config.direction not in ("auto", "unprivileged"):
        raise UsageError(f"--direction must be auto or unprivileged, not {config.direction!r}")
    if config.max_drop < 0:
        raise UsageError(f"--max-drop must be >= 0 points, got {config.max_drop}")
    if config.threshold >= 1 or config.margin >= 1:
        raise UsageError("--threshold and --margin are probabilities below 1")
    p, y, col, rows = _score_rows(inputs, config.favourable)
    base_threshold = 0.5  # the standard reading of the output (argmax; logit > 0; probability > 0.5)
    fav0 = p > base_threshold
    rates = {g: float(fav0[np.isclose(col, v)].mean()) for g, v in (("privileged", spec.privileged), ("unprivileged", spec.unprivileged))}
    boost_priv = config.direction == "auto" and rates["privileged"] < rates["unprivileged"]
    boosted, demoted = (spec.privileged, spec.unprivileged) if boost_priv else (spec.unprivileged, spec.privileged)
    found = search(p, y, col, spec, boosted, demoted, base_threshold, config)
    model = RejectOption(inputs.model, spec.index, boosted, demoted, found["threshold"], found["margin"], inputs.output_kind, config.favourable)
    info = {"threshold": found["threshold"], "margin": found["margin"], "boosted_group": "privileged" if boost_priv else "unprivileged",
            "favourable_rates": rates, "selection_rows": rows, "selection_before": found["before"], "selection_after": found["after"],
            "accuracy_drop_points_on_selection": found["accuracy_drop_points"], "candidates": found["candidates"],
            "labels_used": True, "protected": {"column": spec.column, "index": spec.index}}
    summary = [f"band |p - {found['threshold']:.2f}| <= {found['margin']:.2f}: {info['boosted_group']} group favourable, the other unfavourable "
               f"(chosen on the {rows} rows among {found['candidates']} candidates; accuracy there {found['before']['accuracy']:.3f} -> "
               f"{found['after']['accuracy']:.3f}, |SPD| {found['before']['abs_spd']:.3f} -> {found['after']['abs_spd']:.3f})"]
    return MethodOutput(model.eval(), info, summary)
