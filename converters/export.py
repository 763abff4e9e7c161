"""(Edited) ``torch.fx.GraphModule`` -> ONNX, keeping the original's interface.

Under ``auto`` the exporter that can write the source model's opset goes first (legacy below 18, dynamo
from 18); where it fails the other runs and the result says which one did and why. The result is then
simplified with onnxscript's optimizer (constant folding, dead nodes), node counts before/after reported.
Input/output names and dtypes, dimension names and a fixed or dynamic batch are restored by
:func:`converters.convert.export_like`; provenance goes into ``metadata_props``.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import onnx
import torch

from .errors import ConverterUsageError, ModelError, one_line
from .io import save_model_atomic  # noqa: F401  (its old home; callers import it from here)

log = logging.getLogger(__name__)

TOOL_NAME = "onnxrepair"


LEGACY_OPSETS = range(7, 21)  # what torch's TorchScript exporter writes
DYNAMO_MIN_OPSET = 18  # the dynamo exporter writes 18 and newer


@dataclass
class ExportResult:
    model: onnx.ModelProto
    exporter: str  # "dynamo" | "legacy"
    opset: int
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    nodes_exported: int = 0  # as the exporter wrote it
    nodes_simplified: int = 0  # after the optimizer (== nodes_exported when it changed nothing or did not run)
    simplified_with: str | None = None  # the optimizer that ran, None when it did not

    @property
    def nodes(self) -> dict[str, int]:
        return {"exported": self.nodes_exported, "simplified": self.nodes_simplified}


def _main_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _dynamo_export(module, args, input_names, output_names, opset, dynamic_batch) -> onnx.ModelProto:
    dyn = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dyn = tuple({0: batch} for _ in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module,
            tuple(args),
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            dynamic_shapes=dyn,
            verbose=False,
            optimize=True,
        )
    return prog.model_proto


def _legacy_export(module, args, input_names, output_names, opset, dynamic_batch) -> onnx.ModelProto:
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(args),
            buf,
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def plan_export(exporter: str, opset: int | None, min_opset: int) -> list[tuple[str, int]]:
    """Which exporters to try, in order, and the opset each writes.

    ``opset`` given: exactly that opset, with the exporters that can write it (legacy 7..20, dynamo >= 18);
    none can -> :class:`ConverterUsageError`. ``opset`` None: keep ``min_opset`` (the source model's) where an
    exporter can, else the nearest it writes; under ``auto`` the exporter that keeps it goes first.
    """
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ConverterUsageError(f"unknown exporter {exporter!r}; choose auto, dynamo or legacy")
    names = ("dynamo", "legacy") if exporter == "auto" else (exporter,)
    if opset is not None:
        ok = [n for n in names if (opset in LEGACY_OPSETS if n == "legacy" else opset >= DYNAMO_MIN_OPSET)]
        if not ok:
            can = {"legacy": "7..20", "dynamo": f">= {DYNAMO_MIN_OPSET}"}
            raise ConverterUsageError(f"opset {opset} cannot be written by the {' or '.join(names)} exporter "
                                      f"({'; '.join(f'{n}: {can[n]}' for n in names)})")
        return [(n, opset) for n in ok]
    plan = []
    for n in names:
        plan.append((n, max(min_opset, DYNAMO_MIN_OPSET) if n == "dynamo" else min(max(min_opset, LEGACY_OPSETS.start), LEGACY_OPSETS.stop - 1)))
    if exporter == "auto":  # the one that writes the source's own opset first (legacy below 18)
        plan.sort(key=lambda p: p[1] != min_opset)
    return plan


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None, str | None]:
    """Constant folding and dead-node removal with onnxscript's optimizer (no fusion into custom-domain ops,
    so the file still runs on any onnxruntime). Returns (model, optimizer name or None, why it did not run)."""
    try:
        import onnxscript
        from onnxscript import optimizer

        out = optimizer.optimize(model, num_iterations=2, onnx_shape_inference=False)
    except Exception as e:  # noqa: BLE001 -- an optimizer failure must not lose a valid export
        return model, None, f"{type(e).__name__}: {one_line(e)}"
    return out, f"onnxscript.optimizer {getattr(onnxscript, '__version__', '')}".strip(), None


def export_graph(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    min_opset: int = 17,
    opset: int | None = None,
    dynamic_batch: bool = True,
    exporter: str = "auto",
    optimize: bool = True,
) -> ExportResult:
    """Export ``module`` with the given interface. ``exporter``: auto | dynamo | legacy; ``opset``: exactly this
    one (see :func:`plan_export`), else ``min_opset`` kept where possible. ``optimize``: run :func:`simplify`
    on the result; node counts before/after are in the result."""
    module = module.eval()
    from .switch import is_switch

    if is_switch(module):
        return _export_switch(module, example_inputs, input_names, output_names, min_opset=min_opset, opset=opset,
                              dynamic_batch=dynamic_batch, exporter=exporter, optimize=optimize)
    errors: list[str] = []
    for name, target in plan_export(exporter, opset, min_opset):
        fn = _dynamo_export if name == "dynamo" else _legacy_export
        try:
            with torch.no_grad():
                model = fn(module, list(example_inputs), input_names, output_names, target, dynamic_batch)
        except Exception as e:  # exporter failures are many and varied; keep the reason
            first = one_line(e)
            errors.append(f"{name}: {type(e).__name__}: {first}")
            log.info("%s exporter failed: %s", name, first)
            continue
        res = ExportResult(model=model, exporter=name, opset=_main_opset(model), fallback_reason="; ".join(errors) or None)
        res.nodes_exported = res.nodes_simplified = len(model.graph.node)
        if optimize:
            simpler, by, why = simplify(model)
            if by is not None:
                res.model, res.simplified_with, res.nodes_simplified = simpler, by, len(simpler.graph.node)
            else:
                res.notes.append(f"graph not simplified: {why}")
        return res
    raise ModelError("export to ONNX failed: " + " | ".join(errors))


def _export_switch(module, example_inputs, input_names, output_names, *, min_opset, opset, dynamic_batch, exporter,
                   optimize) -> ExportResult:
    """A per-sample switch (:mod:`converters.switch`): each part exported with a dynamic batch (the rows a branch
    gets vary), the head first, the others with the exporter and opset it got; composed into ``If`` nodes. A fixed
    batch is restored on the composed graph's inputs and outputs."""
    from .switch import export_switch

    def part(m, ex, ins, outs, like=None):
        return export_graph(m, ex, ins, outs, min_opset=min_opset, opset=like.opset if like else opset, dynamic_batch=True,
                            exporter=like.exporter if like else exporter, optimize=optimize)

    try:
        model, head = export_switch(module, example_inputs, input_names, output_names, part)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 -- composition failures are bugs or unsupported parts; keep the reason
        raise ModelError(f"export of the per-sample switch failed: {type(e).__name__}: {one_line(e)}") from e
    if not dynamic_batch:
        b = int(example_inputs[0].shape[0])
        for v in [*model.graph.input, *model.graph.output]:
            if v.type.tensor_type.HasField("shape") and len(v.type.tensor_type.shape.dim):
                v.type.tensor_type.shape.dim[0].dim_value = b
    res = ExportResult(model=model, exporter=head.exporter, opset=head.opset, fallback_reason=head.fallback_reason)
    res.nodes_exported = res.nodes_simplified = len(model.graph.node)
    res.simplified_with = head.simplified_with
    res.notes.append("per-sample switch: head, first and second parts exported separately and composed into If nodes")
    return res


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Set (replace) ``metadata_props`` entries."""
    existing = {p.key: p for p in model.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = str(v)
        else:
            model.metadata_props.add(key=k, value=str(v))


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
