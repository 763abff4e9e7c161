"""The repair pipeline: ONNX in, validated ONNX out, with a report of what changed.

    prepare: load + convert (converters), contract, data checks, splits, protected attribute, extra inputs
    run:     the method (onnxrepair.methods.<name>) on the prepared inputs
    export:  like the original (converters), contract and config in the metadata
    judge:   fidelity check of the exported file against the repaired torch graph (onnxrepair.validate; a
             split-off classifier tail runs after it) -> before/after evaluation of both *files* on
             onnxruntime -> accuracy-retention contract -> atomic write of the model and the report.

The benches call the same stages, so a benchmark measures what a user runs.

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
from . import distributed
from . import methods as method_registry
from .data.contract import METADATA_KEY, InputContract
from .data.dataset import ArrayDataset
from .errors import DataError, UsageError, ValidationFailed
from .io import atomic_path, check_output_path, read_model, removed_on_failure, write_json_atomic
from .memory import Memory, activation_cost, format_size
from .data.protected import ProtectedSpec
from .methods import MethodOutput, RepairInputs
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
    summary: list[str] = field(default_factory=list)  # the method's own lines (MethodOutput.summarise)
    environment: dict[str, Any] = field(default_factory=dict)  # device, provider really used, GPU, versions
    export: dict[str, Any] = field(default_factory=dict)  # opset kept, node counts, conversion passes, notes
    memory: dict[str, Any] = field(default_factory=dict)  # budget, peak resident memory per stage, how passes were sized
    distributed: dict[str, Any] = field(default_factory=lambda: {"world_size": 1})  # torchrun: ranks, backend, samples per rank
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

    tol = Tolerance()  # the same default as `roundtrip`; atol scaled by max(1, max|ref|); argmax agreement must be 100 %
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
        "tf32": res.tf32,  # the torch side ran with TF32 off (validate._full_fp32)
    }


@dataclass
class Prepared:
    """Stage 1's result: the converted model, the resolved contract and splits, the method and its config, and
    the extra inputs it declared, loaded. ``inputs`` is exactly what the method receives."""

    model_path: Path
    converted: Any  # converters.Converted
    spec: Any  # methods.MethodSpec
    config: Any
    contract: InputContract
    train: ArrayDataset
    calib: ArrayDataset | None
    heldout: ArrayDataset
    inputs: RepairInputs
    protected: ProtectedSpec | None
    timings: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)
    memory: Memory | None = None  # the budget and the per-stage meter (also ``inputs.memory``)


def prepare(
    model_path: str | os.PathLike,
    method: str,
    train: ArrayDataset,
    *,
    val: ArrayDataset | None = None,
    splits: tuple[ArrayDataset, ArrayDataset | None, ArrayDataset] | None = None,
    contract: InputContract | None = None,
    config: Any = None,
    options: dict[str, str] | None = None,
    protected: str | None = None,
    privileged: float | None = None,
    unprivileged: float | None = None,
    device: str = "auto",
    seed: int = 0,
    max_memory: int | str | None = None,
    progress: Reporter = SILENT,
) -> Prepared:
    """Stage 1: convert the model (parsed once), resolve the input contract, check the data fits, split it into
    train / calibration / held-out (``splits`` gives them explicitly, as the benches do), resolve the protected
    attribute, and load the method's declared extra inputs. ``max_memory`` (bytes or "4GB"; None: a safe share of
    what is available, said in the log) is the budget the method sizes its passes by; the per-sample activation cost
    of the model is measured here, once."""
    import converters

    t0 = time.perf_counter()
    spec = method_registry.get(method)
    cfg = config if config is not None else method_registry.make_config(spec, options or {})
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = pick_device(device)
    mem = Memory(max_memory, dev)  # said in the log when the method starts (errors before it stay one line)
    with mem.stage("convert"):
        loaded = read_model(model_path)  # the one parse of the file (shared with the CLI's contract step)
        converted = converters.convert(loaded)
    timings = {"convert": time.perf_counter() - t0}
    with mem.stage("prepare"):
        return _prepare_rest(model_path, method, spec, cfg, loaded, converted, train, val, splits, contract, protected, privileged,
                             unprivileged, dev, seed, progress, mem, timings, t0)


def _prepare_rest(model_path, method, spec, cfg, loaded, converted, train, val, splits, contract, protected, privileged, unprivileged,
                  dev, seed, progress, mem: Memory, timings, t0) -> Prepared:
    if contract is None:
        from .data.contract import contract_from_metadata, finalize_contract, resolve_contract

        contract = resolve_contract(converted.inputs[0].shape, train.x[:256], metadata=contract_from_metadata(loaded.model))
        finalize_contract(contract, train.x[:256])
    method_registry.check_inputs(spec, contract.is_image)
    _check_data_fits(train, converted, contract)
    if val is not None:
        _check_data_fits(val, converted, contract)
    tr, calib, heldout = splits if splits is not None else split_data(train, val, seed)
    if len(heldout) == 0 or len(tr) == 0:
        raise DataError(f"not enough data to split into train/calibration/held-out ({len(train)} rows)")

    pspec: ProtectedSpec | None = None
    if spec.task == "fairness":
        if not protected:
            raise UsageError(f"method {method!r} needs --protected COLUMN")
        from .data.tabular import resolve_protected

        pspec = resolve_protected(train, protected, privileged=privileged, unprivileged=unprivileged)

    gm = converted.gm
    kind = _output_kind(gm, contract, tr, dev, loaded.output_source_op)
    extras = _load_extras(spec, cfg, gm, contract, tr)
    mem.cost = _activation_cost(gm, contract, tr, dev)
    inputs = RepairInputs(model=gm, contract=contract, train=tr, calib=calib, output_kind=kind, device=dev, seed=seed,
                          progress=progress, protected=pspec, extras=extras, memory=mem)
    return Prepared(Path(model_path), converted, spec, cfg, contract, tr, calib, heldout, inputs, pspec, timings, t0, memory=mem)


def _activation_cost(gm, contract: InputContract, data: ArrayDataset, device: torch.device):
    """The model's per-sample activation memory (:func:`onnxrepair.memory.activation_cost`) on two training rows;
    None (and the budget sizes nothing) when the graph cannot be interpreted node by node."""
    try:
        x = contract.to_model(contract.to_unit(data.x[:2])).to(device)
        return activation_cost(gm.to(device).eval(), x)
    except Exception as e:  # noqa: BLE001 - a measurement must not stop a repair
        log.warning("could not measure the model's activation memory (%s: %s); passes keep their configured sizes", type(e).__name__, e)
        return None


def _preflight(prep: Prepared) -> None:
    """Before the method starts: a method that trains with ``batch_size`` must fit one training batch in the budget
    (activations autograd keeps, plus gradients and momentum of every weight at most), or the repair stops here,
    having written nothing, with the budget that would work."""
    mem, cfg = prep.memory, prep.config
    bs = getattr(cfg, "batch_size", None)
    if mem is None or mem.cost is None or not isinstance(bs, int) or bs < 1:
        return
    params = sum(p.numel() * p.element_size() for p in prep.inputs.model.parameters())
    per = mem.cost.saved + mem.cost.peak_live
    mem.require({f"{prep.spec.name} training": (int(mem.margin * bs * per) + 3 * params,
                                                 f"a training batch of {bs}; a smaller --batch-size needs less")})


def _load_extras(spec, cfg, gm, contract: InputContract, train: ArrayDataset) -> dict[str, Any]:
    """What the method declared in ``extra_inputs``: for kind "models", the named ONNX checkpoints checked against
    the final model and handed over as a lazily converted :class:`onnxrepair.extras.ModelSequence`."""
    from .extras import resolve_models

    out: dict[str, Any] = {}
    for fld, kind in spec.extra_inputs:
        value = getattr(cfg, fld, "")
        opt = "--" + fld.replace("_", "-")
        if not value:
            raise UsageError(f"method {spec.name!r} needs {opt} (a directory, a glob or a comma-separated list of .onnx files)")
        if kind == "models":
            probe = contract.to_model(contract.to_unit(train.x[:4])).to("cpu")
            out[fld] = resolve_models(str(value), final=gm.to("cpu").eval(), probe=probe,
                                      order=getattr(cfg, f"{fld}_order", "natural"), what=opt)
    return out


def run(prep: Prepared) -> MethodOutput:
    """Stage 2: the method, on the prepared inputs; the held-out split never reaches it."""
    t = time.perf_counter()
    prep.inputs.progress.stage(f"repair with {prep.spec.name}", f"{prep.model_path.name} on {len(prep.train)} training rows ({prep.inputs.device.type})")
    if prep.memory is not None:
        budget = f"memory budget {format_size(prep.memory.limit)} ({prep.memory.source})"
        prep.inputs.progress.log(budget)
        log.info(budget)
    _preflight(prep)
    with _stage(prep, "method"):
        result = prep.spec.fn(prep.inputs, prep.config)
    result.model.eval()
    prep.timings["method"] = time.perf_counter() - t
    return result


def export(prep: Prepared, result: MethodOutput, exporter: str = "auto", opset: int | None = None):
    """Stage 3: the repaired graph as an ONNX model shaped like the original (names, dtypes, dynamic batch, the
    classifier tail), its input contract and the method's config in the metadata."""
    from converters import export_like

    t = time.perf_counter()
    contract, cfg = prep.contract, prep.config
    from .runtime import example_batch  # onnxruntime loads on first use, not with this module

    example = contract.to_model(contract.to_unit(prep.train.x[: example_batch(prep.converted.inputs[0].shape)])).to("cpu")  # a fixed batch stays fixed
    meta = {
        "onnxrepair.method": prep.spec.name,
        "onnxrepair.config": _json(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}),
        METADATA_KEY: contract.to_json(),
    }
    dev = prep.inputs.device
    with _stage(prep, "export"):
        exported = export_like(prep.converted, result.model.to("cpu"), [example], extra_metadata=meta, exporter=exporter, opset=opset)
    result.model.to(dev)
    prep.timings["export"] = time.perf_counter() - t
    return exported


def judge(
    prep: Prepared,
    result: MethodOutput,
    exported,
    *,
    output: str | os.PathLike,
    max_accuracy_drop: float = 0.5,
    force: bool = False,
    eval_corruptions: tuple[str, ...] | None = None,
    provider: str = "auto",
    report_path: str | os.PathLike | None = None,
    progress: Reporter = SILENT,
    scale_out: dict[str, Any] | None = None,
) -> RepairResult:
    """Stage 4: write the exported file to a temporary path, check it against the repaired graph, evaluate the
    original and repaired *files* on the held-out split on onnxruntime, apply the retention contract, and rename
    the file into place only when both hold (or ``force`` overrides retention). The report is written either way."""
    from converters.io import write_model
    from converters import weight_count

    from .doctor import environment

    out_path = check_output_path(output, prep.model_path)
    if report_path is not None:
        check_output_path(report_path, prep.model_path)
    timings, spec, heldout, contract = prep.timings, prep.spec, prep.heldout, prep.contract
    repaired = result.model
    dev = prep.inputs.device
    with removed_on_failure(out_path.parent / (out_path.name + ".data")), atomic_path(out_path) as tmp:  # nothing left on failure
        write_model(exported.model, tmp, data_name=out_path.name + ".data")
        t = time.perf_counter()
        progress.stage("validation", "the exported file against the repaired graph on onnxruntime")
        with _stage(prep, "validate"):
            fidelity = _validate_export(str(tmp), repaired, prep.converted.tail, contract, heldout, dev)
        timings["validate"] = time.perf_counter() - t

        t = time.perf_counter()
        progress.stage("evaluation", f"original and repaired files on {len(heldout)} held-out rows")
        with _stage(prep, "evaluate"):
            before, after = _evaluate(spec.task, str(prep.model_path), str(tmp), heldout, contract, prep.protected,
                                      eval_corruptions or _train_corruptions(prep.config), provider, prep.inputs.seed, progress,
                                      batch_size=_eval_batch(prep))
            timings["evaluate"] = time.perf_counter() - t
            lat: dict[str, Any] = {}
            if contract.is_image:
                x64 = contract.to_model(contract.to_unit(heldout.x[:64])).numpy()
                from .runtime import latency_comparison  # a fixed-batch model runs in chunks of its batch; latency_ms["notes"] says so

                lat = latency_comparison(str(prep.model_path), str(tmp), x64, provider)

        retention = retention_check(float(before["accuracy"]), float(after["accuracy"]), max_accuracy_drop, len(heldout))
        limit = (result.info or {}).get("latency_limit")  # a method's own latency constraint, checked on the file
        latency_ok = True
        if limit and contract.is_image:
            from .runtime import interleaved_ratio

            measured = interleaved_ratio(str(prep.model_path), str(tmp), x64)
            latency_ok = max(measured.values()) <= float(limit)
            lat["limit"] = {"max_ratio": float(limit), "measured_interleaved_1_thread": measured, "passed": latency_ok}
        ok = fidelity["passed"] and ((retention["passed"] and latency_ok) or force)
        retention["forced"] = bool(force and not retention["passed"])
        cfg = prep.config
        res = RepairResult(
            method=spec.name, task=spec.task, input_path=str(prep.model_path), output_path=str(out_path) if ok else None, written=ok,
            exporter=exported.exporter, retention=retention, before=before, after=after, fidelity=fidelity, info=result.info,
            splits={"train": len(prep.train), "calib": len(prep.calib) if prep.calib is not None else 0, "heldout": len(heldout)},
            timings_s=timings, latency_ms=lat, output_kind=prep.inputs.output_kind,
            provider=fidelity["reference_provider"], contract=dataclasses.asdict(contract),
            config=dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}, summary=result.summarise(),
            environment=environment(dev, fidelity["reference_provider"]),
            export={"exporter": exported.exporter, "opset": exported.opset, "source_opset": prep.converted.loaded.opset,
                    "nodes": exported.nodes, "simplified_with": exported.simplified_with,
                    "weights": {"original": weight_count(prep.converted.loaded.model), "repaired": weight_count(exported.model)},
                    "conversion_passes": [str(p) for p in prep.converted.passes],
                    "notes": list(prep.converted.notes) + list(exported.notes)},
            memory=prep.memory.report() if prep.memory is not None else {},
            distributed=scale_out or {"world_size": 1},
        )
        res.timings_s["total"] = time.perf_counter() - prep.t0
        if report_path is not None:
            write_json_atomic(report_path, res.to_dict())
        if not fidelity["passed"]:
            raise ValidationFailed(
                f"exported model disagrees with the repaired graph ({fidelity['reason']}; max abs diff {fidelity['max_abs']:.2e}, "
                f"needed atol {fidelity['required_atol']:.2e}, argmax agreement {fidelity['argmax_agreement']:.3f}); nothing written"
            )
        if not ok and not latency_ok and retention["passed"]:
            m = lat["limit"]["measured_interleaved_1_thread"]
            raise ValidationFailed(
                f"the repaired file is {max(m.values()):.2f}x the original's latency on onnxruntime ("
                + ", ".join(f"{k} {v:.2f}x" for k, v in m.items()) + f", 1 thread, interleaved), over --max-latency-ratio "
                f"{float(limit):g}; no model written (use --force to write it anyway)"
            )
        if not ok:
            r = retention
            raise ValidationFailed(
                f"clean accuracy dropped {r['drop_points']:.2f} points on {len(heldout)} held-out rows ({r['accuracy_before']:.4f} -> "
                f"{r['accuracy_after']:.4f}), over the --max-accuracy-drop limit of {max_accuracy_drop} points; no model written "
                "(use --force to write it anyway)"
            )
    return res


def retention_check(acc_before: float, acc_after: float, limit_points: float, rows: int) -> dict[str, Any]:
    """The accuracy-retention contract: accuracies are fractions, the drop and its limit are *points* (0.5 = half a
    percentage point)."""
    drop = (acc_before - acc_after) * 100.0
    return {"accuracy_before": acc_before, "accuracy_after": acc_after, "drop_points": drop, "limit_points": limit_points,
            "passed": drop <= limit_points + 1e-9, "forced": False, "heldout_rows": rows}


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
    max_memory: int | str | None = None,
    progress: Reporter = SILENT,
    opset: int | None = None,
) -> RepairResult | None:
    """Repair ``model_path`` with ``method`` and write the result to ``output``: :func:`prepare`, :func:`run`,
    :func:`export`, :func:`judge`. Launched by torchrun, every process trains its share of each batch
    (:mod:`onnxrepair.distributed`) and only rank 0 exports, judges and writes; the others return None.
    ``max_memory``: the memory budget (see :func:`prepare`); a stage that cannot fit in it even one sample at a time
    raises :class:`onnxrepair.memory.MemoryBudgetError` (exit 2) before any
    training, and nothing is written.

    Raises :class:`ValidationFailed` (exit 1) when the exported file disagrees with the repaired graph,
    or when clean accuracy on the held-out split drops by more than ``max_accuracy_drop`` points
    (unless ``force``); no model is written then, the report still is.
    """
    check_output_path(output, model_path)  # before any work: a bad output path costs nothing
    if report_path is not None:
        check_output_path(report_path, model_path)
    with distributed.session(pick_device(device)) as dev:  # under torchrun: join the group (gloo / NCCL)
        prep = prepare(model_path, method, train, val=val, contract=contract, config=config, options=options, protected=protected,
                       privileged=privileged, unprivileged=unprivileged, device=str(dev), seed=seed, max_memory=max_memory,
                       progress=progress)
        result = run(prep)
        scale_out = distributed.summary()  # a collective, so also the point where every rank has finished training
        if not distributed.is_main():
            # rank 0 alone exports, judges and writes. The others go now rather than wait at a barrier through the
            # evaluation: a barrier held longer than the group's timeout would fail, and torchrun would then stop
            # rank 0 mid-write; torchrun waits for rank 0 and reports its failure either way.
            return None
        progress.stage("export")
        exported = export(prep, result, opset=opset)
        return judge(prep, result, exported, output=output, max_accuracy_drop=max_accuracy_drop, force=force,
                     eval_corruptions=eval_corruptions, provider=provider, report_path=report_path, progress=progress,
                     scale_out=scale_out)


def _train_corruptions(cfg: Any) -> tuple[str, ...]:
    return tuple(getattr(cfg, "corruptions", ()) or ())


def _stage(prep: Prepared, name: str):
    import contextlib

    return prep.memory.stage(name) if prep.memory is not None else contextlib.nullcontext()


def _eval_batch(prep: Prepared, want: int = 256) -> int:
    """The evaluator's batch within the budget: two onnxruntime sessions each holding about one forward's activations
    per image, plus the image and its perturbed copy. The evaluator seeds its corruption noise per batch, so a budget
    that lowers this below ``want`` changes which noise each image gets (said in the log)."""
    mem = prep.memory
    if mem is None or mem.cost is None:
        return want
    n = mem.fit("evaluate", 2 * mem.cost.peak_live + 4 * mem.cost.input, want, what="image")
    if n < want:
        log.warning("evaluation batch %d instead of %d to stay within the memory budget; corruption noise is seeded per "
                    "batch, so figures differ slightly from an evaluation at batch %d", n, want, want)
    return n


def _evaluate(task, before_path, after_path, heldout, contract, pspec, corruptions, provider, seed, progress, batch_size: int = 256):
    if task == "fairness":
        from .fairness import evaluate_fairness

        res = evaluate_fairness([before_path, after_path], heldout, pspec, provider=provider, seed=seed)
        return res[0], res[1]
    from .evaluate import evaluate_models

    images = heldout.x.ndim == 4  # corruptions and blur are defined on images; tabular data gets clean accuracy
    rep = evaluate_models([before_path, after_path], heldout, contract, corruptions=list(corruptions) if images else [], blur=images,
                          provider=provider, seed=seed, progress=progress, batch_size=batch_size)
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
