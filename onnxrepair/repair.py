"""The repair pipeline: ONNX in, validated ONNX out, with a report of what changed.

    load + convert (converters) -> split data -> method (onnxrepair.methods.<name>)
    -> export like the original (converters) -> fidelity check of the exported file against the
    repaired torch graph (onnxrepair.validate; a split-off classifier tail runs after it)
    -> before/after evaluation of both *files* on onnxruntime
    -> accuracy-retention contract -> atomic write of the model and the report.

The held-out split used for the retention contract and the report is never shown to the method:
the method trains on ``train`` and calibrates / picks checkpoints on ``calib``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from . import methods as method_registry
from .data.contract import METADATA_KEY, InputContract
from .data.dataset import ArrayDataset
from .errors import DataError, UsageError, ValidationFailed
from .io import atomic_path, check_output_path, write_json_atomic
from .methods import ProtectedSpec, RepairInputs
from .nn import first_output, looks_like_probabilities, pick_device
from .progress import SILENT, Reporter

log = logging.getLogger(__name__)


@dataclass
class RepairResult:
    method: str
    task: str
    input_path: str
    output_path: str | None  # None when no model was written
    written: bool
    exporter: str
    retention: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    fidelity: dict[str, Any]
    info: dict[str, Any]
    splits: dict[str, int]
    timings_s: dict[str, float]
    latency_ms: dict[str, Any] = field(default_factory=dict)
    provider: str = "cpu"
    contract: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    output_kind: str = "logits"  # how the methods read the model's first output: "logits" or "probs"
    version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_data(train: ArrayDataset, val: ArrayDataset | None, seed: int, heldout_fraction: float = 0.2) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
    """(train, calib, heldout). With ``val``: val is halved into calib and held-out. Without: the
    training data gives up ``heldout_fraction`` for held-out and 10 % of the rest for calibration."""
    if val is not None:
        calib, heldout = val.split(0.5, seed=seed)
        return train, calib, heldout
    rest, heldout = train.split(heldout_fraction, seed=seed)
    tr, calib = rest.split(0.1, seed=seed + 1)
    return tr, calib, heldout


def _output_kind(model: torch.nn.Module, contract: InputContract, data: ArrayDataset, device: torch.device, source_op: str | None = None) -> str:
    """"probs" or "logits" for the methods. Several columns: probabilities when every row sums to 1.
    One column: the graph decides (``source_op``: what computes the ONNX output; a Sigmoid gives
    P(class 1)), since a logit column can hold values in [0, 1] too."""
    x = contract.to_model(contract.to_unit(data.x[:64]).to(device))
    with torch.no_grad():
        out = first_output(model.to(device)(x))
    if out.reshape(len(out), -1).shape[1] == 1:
        return "probs" if source_op == "Sigmoid" else "logits"
    return "probs" if looks_like_probabilities(out) else "logits"


def _validate_export(path: str, module: torch.nn.Module, tail, contract: InputContract, data: ArrayDataset, device: torch.device) -> dict[str, Any]:
    """The exported file against the repaired torch module (plus the re-attached classifier tail, so label and
    ZipMap are compared name by name) on up to 64 held-out rows, at batch 1 and at the larger batch."""
    from .validate import Tolerance, validate  # onnxruntime loads on first use, not on import

    tol = Tolerance(atol=1e-4, rtol=1e-4)  # atol scaled by max(1, max|ref|); argmax agreement must be 100 %
    xs = contract.to_model(contract.to_unit(data.x[:64])).cpu().numpy()
    batches = (1, len(xs)) if len(xs) > 1 else (1,)
    try:
        res = validate(path, module.to("cpu").eval(), inputs=xs, batches=batches, tail=tail, tolerance=tol)
    finally:
        module.to(device)
    worst = res.worst
    return {
        "passed": res.passed, "reason": res.reason, "max_abs": worst["max_abs"], "required_atol": worst["required_atol"],
        "argmax_agreement": worst["argmax_agreement"], "tolerance": dataclasses.asdict(tol), "batches": res.batches,
        "reference_provider": res.reference_provider, "comparisons": [dataclasses.asdict(c) for c in res.comparisons],
    }


def repair(
    model_path: str | os.PathLike,
    method: str,
    train: ArrayDataset,
    *,
    output: str | os.PathLike,
    val: ArrayDataset | None = None,
    contract: InputContract | None = None,
    config: Any = None,
    options: dict[str, str] | None = None,
    max_accuracy_drop: float = 0.5,
    force: bool = False,
    protected: str | None = None,
    privileged: float | None = None,
    unprivileged: float | None = None,
    eval_corruptions: tuple[str, ...] | None = None,
    provider: str = "auto",
    device: str = "auto",
    seed: int = 0,
    report_path: str | os.PathLike | None = None,
    progress: Reporter = SILENT,
) -> RepairResult:
    """Repair ``model_path`` with ``method`` and write the result to ``output``.

    Raises :class:`ValidationFailed` (exit 1) when the exported file disagrees with the repaired graph,
    or when clean accuracy on the held-out split drops by more than ``max_accuracy_drop`` points
    (unless ``force``); no model is written then, the report still is.
    """
    import converters
    from converters import export_like
    from converters.load import output_source_op

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = method_registry.get(method)
    out_path = check_output_path(output, model_path)
    if report_path is not None:
        check_output_path(report_path, model_path)
    cfg = config if config is not None else method_registry.make_config(spec, options or {})
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = pick_device(device)

    converted = converters.convert(model_path)
    timings["convert"] = time.perf_counter() - t0
    if contract is None:
        from .data.contract import contract_from_metadata, finalize_contract, resolve_contract

        contract = resolve_contract(converted.inputs[0].shape, train.x[:256], metadata=contract_from_metadata(converted.loaded.model))
        finalize_contract(contract, train.x[:256])
    method_registry.check_inputs(spec, contract.is_image)
    _check_data_fits(train, converted, contract)
    if val is not None:
        _check_data_fits(val, converted, contract)

    tr, calib, heldout = split_data(train, val, seed)
    if len(heldout) == 0 or len(tr) == 0:
        raise DataError(f"not enough data to split into train/calibration/held-out ({len(train)} rows)")

    pspec: ProtectedSpec | None = None
    if spec.task == "fairness":
        if not protected:
            raise UsageError(f"method {method!r} needs --protected COLUMN")
        from .data.tabular import resolve_protected

        pspec = resolve_protected(train, protected, privileged=privileged, unprivileged=unprivileged)

    gm = converted.gm
    kind = _output_kind(gm, contract, tr, dev, output_source_op(converted.loaded.model))
    inputs = RepairInputs(model=gm, contract=contract, train=tr, calib=calib, output_kind=kind, device=dev, seed=seed, progress=progress, protected=pspec)

    t = time.perf_counter()
    progress.stage(f"repair with {method}", f"{Path(model_path).name} on {len(tr)} training rows ({dev.type})")
    result = spec.fn(inputs, cfg)
    timings["method"] = time.perf_counter() - t
    repaired = result.model.eval()

    t = time.perf_counter()
    progress.stage("export")
    from .runtime import example_batch  # onnxruntime loads on first use, not with this module

    example = contract.to_model(contract.to_unit(tr.x[: example_batch(converted.inputs[0].shape)])).to("cpu")  # a fixed batch stays fixed
    meta = {
        "onnxrepair.method": method,
        "onnxrepair.config": _json(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}),
        METADATA_KEY: contract.to_json(),
    }
    exported = export_like(converted, repaired.to("cpu"), [example], extra_metadata=meta)
    repaired.to(dev)
    timings["export"] = time.perf_counter() - t

    with atomic_path(out_path) as tmp:
        import onnx

        onnx.save_model(exported.model, str(tmp))
        t = time.perf_counter()
        progress.stage("validation", "the exported file against the repaired graph on onnxruntime")
        fidelity = _validate_export(str(tmp), repaired, converted.tail, contract, heldout, dev)
        timings["validate"] = time.perf_counter() - t

        t = time.perf_counter()
        progress.stage("evaluation", f"original and repaired files on {len(heldout)} held-out rows")
        before, after = _evaluate(spec.task, str(model_path), str(tmp), heldout, contract, pspec, eval_corruptions or _train_corruptions(cfg), provider, seed, progress)
        timings["evaluate"] = time.perf_counter() - t
        lat: dict[str, Any] = {}
        if contract.is_image:
            x64 = contract.to_model(contract.to_unit(heldout.x[:64])).numpy()
            from .runtime import latency_comparison  # a fixed-batch model runs in chunks of its batch; latency_ms["notes"] says so

            lat = latency_comparison(str(model_path), str(tmp), x64, provider)

        acc_b, acc_a = float(before["accuracy"]), float(after["accuracy"])
        drop = (acc_b - acc_a) * 100.0
        retention = {"accuracy_before": acc_b, "accuracy_after": acc_a, "drop_points": drop, "limit_points": max_accuracy_drop, "passed": drop <= max_accuracy_drop + 1e-9, "forced": False, "heldout_rows": len(heldout)}
        ok = fidelity["passed"] and (retention["passed"] or force)
        retention["forced"] = bool(force and not retention["passed"])
        res = RepairResult(
            method=method, task=spec.task, input_path=str(model_path), output_path=str(out_path) if ok else None, written=ok,
            exporter=exported.exporter, retention=retention, before=before, after=after, fidelity=fidelity, info=result.info,
            splits={"train": len(tr), "calib": len(calib), "heldout": len(heldout)}, timings_s=timings, latency_ms=lat, output_kind=kind,
            provider=fidelity["reference_provider"], contract=dataclasses.asdict(contract),
            config=dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {},
        )
        res.timings_s["total"] = time.perf_counter() - t0
        if report_path is not None:
            write_json_atomic(report_path, res.to_dict())
        if not fidelity["passed"]:
            raise ValidationFailed(
                f"exported model disagrees with the repaired graph ({fidelity['reason']}; max abs diff {fidelity['max_abs']:.2e}, "
                f"needed atol {fidelity['required_atol']:.2e}, argmax agreement {fidelity['argmax_agreement']:.3f}); nothing written"
            )
        if not ok:
            raise ValidationFailed(
                f"clean accuracy dropped {drop:.2f} points on {len(heldout)} held-out rows ({acc_b:.4f} -> {acc_a:.4f}), over the "
                f"--max-accuracy-drop limit of {max_accuracy_drop} points; no model written (use --force to write it anyway)"
            )
    return res


def _train_corruptions(cfg: Any) -> tuple[str, ...]:
    return tuple(getattr(cfg, "corruptions", ()) or ())


def _evaluate(task, before_path, after_path, heldout, contract, pspec, corruptions, provider, seed, progress):
    if task == "fairness":
        from .fairness import evaluate_fairness

        res = evaluate_fairness([before_path, after_path], heldout, pspec, provider=provider, seed=seed)
        return res[0], res[1]
    from .evaluate import evaluate_models

    images = heldout.x.ndim == 4  # corruptions and blur are defined on images; tabular data gets clean accuracy
    rep = evaluate_models([before_path, after_path], heldout, contract, corruptions=list(corruptions) if images else [], blur=images, provider=provider, seed=seed, progress=progress)
    models = rep.to_dict()["models"]
    for m in models:  # the retention contract and the table speak of "accuracy"; keep the evaluator's keys too
        m["accuracy"] = m["clean"]
    return models[0], models[1]


def _check_data_fits(data: ArrayDataset, converted, contract: InputContract) -> None:
    from .data.checks import check_all

    out = converted.outputs[0].shape
    n_out = out[-1] if len(out) >= 2 and isinstance(out[-1], int) and out[-1] > 0 else None
    check_all(data, contract, converted.inputs[0].shape, n_out, model_name=str(converted.loaded.path.name))


def _json(d: dict) -> str:
    import json

    return json.dumps(d, default=str)
