"""(Edited) ``torch.fx.GraphModule`` -> ONNX, keeping the original's interface.

The dynamo exporter is tried first; where it fails the legacy TorchScript exporter runs and the
result says which one did. Input/output names, dtypes, the dynamic batch dimension and an opset no
older than the original's are kept; provenance goes into ``metadata_props``.
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

log = logging.getLogger(__name__)

TOOL_NAME = "onnxrepair"


@dataclass
class ExportResult:
    model: onnx.ModelProto
    exporter: str  # "dynamo" | "legacy"
    opset: int
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)


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
            opset_version=max(opset, 18),
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
            opset_version=min(max(opset, 7), 20),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def export_graph(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    min_opset: int = 17,
    dynamic_batch: bool = True,
    exporter: str = "auto",
) -> ExportResult:
    """Export ``module`` with the given interface. ``exporter``: auto (dynamo, then legacy) | dynamo | legacy."""
    module = module.eval()
    errors: list[str] = []
    order = {"auto": ("dynamo", "legacy"), "dynamo": ("dynamo",), "legacy": ("legacy",)}[exporter]
    for name in order:
        fn = _dynamo_export if name == "dynamo" else _legacy_export
        try:
            with torch.no_grad():
                model = fn(module, list(example_inputs), input_names, output_names, min_opset, dynamic_batch)
        except Exception as e:  # exporter failures are many and varied; keep the reason
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            errors.append(f"{name}: {type(e).__name__}: {first}")
            log.info("%s exporter failed: %s", name, first)
            continue
        return ExportResult(model=model, exporter=name, opset=_main_opset(model), fallback_reason="; ".join(errors) or None)
    from onnxrepair.errors import ModelError

    raise ModelError("export to ONNX failed: " + " | ".join(errors))


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


def save_model(model: onnx.ModelProto, path: str | os.PathLike, data_name: str | None = None) -> Path:
    """Serialise ``model`` to ``path``; past protobuf's 2 GB limit the weights go to one external file
    ``data_name`` (default ``<name>.data``) beside it."""
    path = Path(path)
    if model.ByteSize() > 2**31 - 1:
        onnx.save_model(model, str(path), save_as_external_data=True, location=data_name or path.name + ".data")
    else:
        onnx.save_model(model, str(path))
    return path


def save_model_atomic(model: onnx.ModelProto, dest: str | os.PathLike) -> Path:
    """Serialise ``model`` to a temporary file beside ``dest`` and rename it into place."""
    from onnxrepair.io import atomic_path

    dest = Path(dest)
    with atomic_path(dest) as tmp:
        save_model(model, tmp, data_name=dest.name + ".data")
    return dest
