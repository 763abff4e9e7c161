"""``onnxrepair roundtrip MODEL.onnx -o OUT.onnx``: convert, export without edits, validate against the original.

Exit 0 when the re-exported file matches the original within tolerance, 1 when it does not (or CUDA was
required and did not run), 2 for usage errors, 3 for unreadable/unsupported models. Nothing is written on
failure to convert or export; the output is written atomically and never over the input.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer


def roundtrip(
    model: Path = typer.Argument(..., help="The ONNX model to round-trip."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the re-exported model."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    provider: str = typer.Option("auto", "--provider", help="auto | cpu | cuda (for the re-exported model)."),
    require_provider: str = typer.Option(None, "--require-provider", help="Fail (exit 1) unless this provider really ran, e.g. cuda."),
    exporter: str = typer.Option("auto", "--exporter", help="auto (dynamo, then legacy) | dynamo | legacy."),
    atol: float = typer.Option(1e-5, "--atol", help="Absolute tolerance, relative to each output's scale."),
    rtol: float = typer.Option(1e-4, "--rtol", help="Relative tolerance."),
    batch: int = typer.Option(8, "--batch", help="The larger batch size to validate at (batch 1 always runs)."),
    opset: int = typer.Option(None, "--opset", help="Opset to write (legacy exporter 7..20, dynamo 18+); default: the original's where an exporter can write it."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Simplify the exported graph (constant folding, dead nodes) before validation."),
) -> None:
    """Convert to torch, export back without edits and validate on onnxruntime."""
    from converters import convert, export_like, read
    from converters.io import save_model_atomic
    from onnxrepair.errors import UsageError, ValidationFailed
    from onnxrepair.io import check_output_path
    from onnxrepair.validate import Tolerance, print_table, validate

    if exporter not in ("auto", "dynamo", "legacy"):
        raise UsageError(f"unknown exporter {exporter!r}; choose auto, dynamo or legacy")
    if opset is not None:
        from converters.export import plan_export

        plan_export(exporter, opset, opset)  # an opset no chosen exporter writes is a usage error, before any work
    if provider not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown provider {provider!r}; choose auto, cpu or cuda")
    if batch < 2:
        raise UsageError("--batch must be at least 2")
    check_output_path(output, model)
    times = {}
    t0 = time.perf_counter()
    loaded = read(model)
    times["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    converted = convert(loaded)
    times["convert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = export_like(converted, exporter=exporter, opset=opset, optimize=optimize, extra_metadata={"onnxrepair.action": "roundtrip (no edits)"})
    times["export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = validate(model, res.model.SerializeToString(), batches=(1, batch), provider=provider,
                      require_provider=require_provider, tolerance=Tolerance(atol=atol, rtol=rtol))
    times["validate_s"] = time.perf_counter() - t0
    result.candidate = str(output)
    if result.passed:
        save_model_atomic(res.model, output)
    if json_out:
        doc = {"model": str(model), "output": str(output) if result.passed else None, "exporter": res.exporter, "opset": res.opset,
               "source_opset": loaded.opset, "fallback_reason": res.fallback_reason, "passes": converted.passes,
               "notes": [*converted.notes, *res.notes],
               "nodes": {"original": len(loaded.model.graph.node), **res.nodes}, "simplified_with": res.simplified_with,
               "tail": converted.tail.op_types if converted.tail else None, "times": times, "validation": result.to_dict()}
        typer.echo(json.dumps(doc, indent=2, default=str))
    else:
        from rich.console import Console

        con = Console(file=sys.stdout, width=max(Console().width, 150))
        from rich.markup import escape

        con.print(escape(f"converted {model} (passes: {', '.join(converted.passes) or 'none'}), exported with {res.exporter} at opset {res.opset}"
                         f" (original: {loaded.opset})" + (f" (fallback: {res.fallback_reason})" if res.fallback_reason else "")))
        con.print(escape(f"nodes: original {len(loaded.model.graph.node)}, exported {res.nodes_exported}, simplified {res.nodes_simplified}"
                         + (f" ({res.simplified_with})" if res.simplified_with else " (not simplified)")))
        for note in [*converted.notes, *res.notes]:
            con.print(escape(f"note: {note}"))
        print_table(result, con)
    if not result.passed:
        raise ValidationFailed(f"round trip of {model} failed validation ({result.reason}); nothing written")


def register(app: typer.Typer) -> None:
    app.command("roundtrip")(roundtrip)
