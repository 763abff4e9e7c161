"""``onnxrepair doctor [--require cuda]``: what this machine offers, proven by running a tiny model on each
device and provider; exit 1 when a requirement is unmet."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ..errors import UsageError, ValidationFailed


def doctor_cmd(
    require: Optional[str] = typer.Option(None, "--require", help="Exit 1 unless this works end to end: cuda (torch and onnxruntime)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """Check torch and onnxruntime on CPU and CUDA by running a tiny model on each."""
    from ..doctor import diagnose

    if require not in (None, "cuda", "cpu"):
        raise UsageError(f"--require takes cuda or cpu, not {require!r}")
    d = diagnose()
    if as_json:
        typer.echo(json.dumps(d.to_dict(), indent=2, default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        table = Table(title="onnxrepair doctor: what really runs here")
        for col in ("check", "works", "detail"):
            table.add_column(col)
        for c in d.checks:
            table.add_row(c.name, "yes" if c.ok else "no", c.detail)
        console.print(table)
        v = d.versions
        console.print(f"torch {v['torch']} (CUDA {v['torch_cuda']}, cuDNN {v['cudnn']}), onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, "
                      f"python {v['python']}")
        console.print("CUDA end to end: " + ("yes" if d.cuda else "no"))
    if require == "cuda" and not d.cuda:
        failed = [f"{c.name} ({c.detail})" for c in d.checks if c.name.endswith(("cuda", "CUDAExecutionProvider")) and not c.ok]
        raise ValidationFailed("CUDA required but not working: " + "; ".join(failed))
    if require == "cpu" and not (d.ok("torch:cpu") and d.ok("onnxruntime:CPUExecutionProvider")):
        raise ValidationFailed("the CPU path does not work: " + "; ".join(f"{c.name} ({c.detail})" for c in d.checks if not c.ok))


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_cmd)
