"""``onnxrepair repair MODEL.onnx --method NAME --data TRAIN -o OUT.onnx``

Method options are the fields of the method's config dataclass, given as ``--field-name value``
after the common options (``onnxrepair methods`` lists them); the command is generated from the
method registry, so adding a method never edits this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from . import _options


def _parse_method_options(args: list[str], global_options: frozenset[str] = frozenset()) -> dict[str, str]:
    """``["--epochs", "3", "--mode=single", "--flag"]`` -> {"epochs": "3", "mode": "single", "flag": "true"}.
    An option of the root command given after ``repair`` gets a message saying where it goes."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise UsageError(f"unexpected argument {a!r}; method options are given as --name value")
        key = a[2:]
        name = key.split("=", 1)[0]
        if name in global_options:
            raise UsageError(f"--{name} is an option of onnxrepair itself: give it before the command (onnxrepair --{name} ... repair ...)")
        if "=" in key:
            key, val = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            val = args[i + 1]
            i += 1
        else:
            val = "true"
        opts[key.replace("-", "_")] = val
        i += 1
    return opts


def repair_cmd(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="The model to repair (.onnx). Never overwritten."),
    method: str = typer.Option(..., "--method", "-m", help="Repair method (see `onnxrepair methods`)."),
    data: Path = typer.Option(..., "--data", help="Training data: .npz, image folder, CIFAR batches, IDX, or CSV."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the repaired .onnx (atomically)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation data; halved into calibration and held-out splits."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the full report as JSON here."),
    max_accuracy_drop: float = typer.Option(0.5, "--max-accuracy-drop", help="Largest allowed clean-accuracy drop on held-out data, in points."),
    force: bool = typer.Option(False, "--force", help="Write the model even if it breaks --max-accuracy-drop."),
    target: Optional[str] = typer.Option(None, "--target", help="CSV: the label column."),
    protected: Optional[str] = typer.Option(None, "--protected", help="CSV: the protected attribute column (fairness methods)."),
    privileged: Optional[float] = typer.Option(None, "--privileged", help="Value of the privileged group."),
    unprivileged: Optional[float] = typer.Option(None, "--unprivileged", help="Value of the unprivileged group (if not binary)."),
    eval_corruptions: Optional[str] = typer.Option(None, "--eval-corruptions", help="Corruptions for the before/after report (default: the training ones + DeepPatch's blur set)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most N training rows (stratified)."),
    provider: str = typer.Option("auto", "--provider", help="onnxruntime provider for evaluation: auto, cpu, cuda."),
    device: str = typer.Option("auto", "--device", help="torch device for tuning: auto, cpu, cuda."),
    seed: int = typer.Option(0, "--seed"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget, e.g. 4GB (default: what the process holds + half of what is available, said in the log). Sizes the stacked and captured passes; results do not depend on it. Exit 2, before any training, when a stage cannot fit even one sample."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset of the repaired file (default: the original's where an exporter writes it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report JSON to stdout instead of a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr (bars in a terminal, stage lines otherwise)."),
    log_json: Optional[Path] = _options.LOG_JSON,
    layout: Optional[str] = _options.LAYOUT,
    scale: Optional[float] = _options.SCALE,
    mean: Optional[str] = _options.MEAN,
    std: Optional[str] = _options.STD,
    config: Optional[Path] = _options.CONFIG,
) -> None:
    """Repair MODEL with a registered method; write OUT.onnx only if it keeps clean accuracy."""
    from .. import methods as registry  # imports torch: only when the command runs, not for --help
    from ..repair import repair

    spec = registry.get(method)
    root = ctx.find_root().command
    global_options = frozenset(o[2:] for p in root.params for o in p.opts if o.startswith("--"))
    cfg = registry.make_config(spec, _parse_method_options(list(ctx.args), global_options))
    contract = _options.build_contract(model, layout=layout, scale=scale, mean=mean, std=std, config=config)
    # --limit goes into the loader: a lazy image folder then settles the contract from the subset and decodes no other rows
    train = _options.load_data(data, contract, target=target, protected=protected, limit=limit, seed=seed)
    val_ds = _options.load_data(val, contract, target=target, protected=protected) if val is not None else None
    res = repair(
        model, method, train, output=output, val=val_ds, contract=contract, config=cfg,
        max_accuracy_drop=max_accuracy_drop, force=force, protected=protected, privileged=privileged, unprivileged=unprivileged,
        eval_corruptions=tuple(s for s in eval_corruptions.split(",") if s) if eval_corruptions else None,
        provider=provider, device=device, seed=seed, report_path=report, max_memory=max_memory,
        progress=_options.reporter(quiet, log_json, model), opset=opset,
    )
    if res is None:  # a torchrun rank other than 0: it trained its share; rank 0 reports and writes
        return
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2, default=str))
    else:
        print_repair_result(res)


def _metric_rows(m: dict) -> dict[str, float]:
    """Flatten one model's figures into named rows: top-level numbers, then blur per sigma, corruption means."""
    rows: dict[str, float] = {}
    for k, v in m.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (k == "accuracy" and "clean" in m):  # accuracy mirrors clean
            rows[k] = v
    for sigma, acc in (m.get("blur") or {}).items():
        rows[f"blur sigma={sigma}"] = acc
    for name, by_sev in (m.get("corruptions") or {}).items():
        if by_sev:
            rows[f"{name} (mean over severities)"] = sum(by_sev.values()) / len(by_sev)
    for name, by_eps in (m.get("adversarial") or {}).items():
        for eps, acc in by_eps.items():
            rows[f"{name} eps={eps}"] = acc
    return rows


_DIFFERENCES = ("spd", "aaod", "eod", "abs_spd", "abs_eod")  # group differences: shown as numbers, as evaluate shows them


def _metric_cells(key: str, before: float, after: float) -> tuple[str, str, str, str]:
    """A row as evaluate prints it: accuracies and rates in percent (change in points), differences as numbers."""
    if key in _DIFFERENCES:
        return key, f"{before:+.4f}" if key in ("spd", "eod") else f"{before:.4f}", f"{after:+.4f}" if key in ("spd", "eod") else f"{after:.4f}", f"{after - before:+.4f}"
    return f"{key} (%)", f"{100 * before:.2f}", f"{100 * after:.2f}", f"{100 * (after - before):+.2f} pts"


def print_repair_result(res) -> None:
    """Before/after table on stdout; the last line says PASSED/FAILED like a validation tool."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    b, a = _metric_rows(res.before), _metric_rows(res.after)
    table = Table(title=f"{res.method}: {Path(res.input_path).name} -> {res.output_path or '(not written)'}  [held-out, onnxruntime {res.provider}]")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")  # percentages change in points; group differences (SPD, AAOD, EOD) as numbers
    for k in [k for k in b if k in a]:
        if isinstance(b[k], int):  # counts (rows per group): no change to show
            table.add_row(k, str(b[k]), str(a[k]), "")
            continue
        table.add_row(*_metric_cells(k, float(b[k]), float(a[k])))
    console.print(table)
    for line in res.summary:  # the method's own lines: the CLI does not know the method
        console.print(line)
    r = res.retention
    console.print(
        f"held-out clean accuracy {100 * r['accuracy_before']:.2f}% -> {100 * r['accuracy_after']:.2f}% "
        f"(drop {r['drop_points']:.2f} pts, limit {r['limit_points']}); fidelity max abs diff {res.fidelity['max_abs']:.1e}; exporter {res.exporter}"
    )
    ex = res.export or {}
    if ex:
        console.print(f"exported at opset {ex.get('opset')} (source {ex.get('source_opset')}); nodes {ex['nodes']['exported']} -> "
                      f"{ex['nodes']['simplified']} after {ex.get('simplified_with') or 'no optimizer'}")
        w = ex.get("weights")
        if w:
            console.print(f"weights stored in the file: {w['original']:,} -> {w['repaired']:,} ({w['repaired'] - w['original']:+,})")
    if res.memory:
        console.print(memory_line(res.memory))
    if res.latency_ms:
        lr = res.latency_ms["ratio"]
        console.print("latency repaired/original on onnxruntime: " + ", ".join(f"{k} {v:.2f}x" for k, v in lr.items()))
        for note in res.latency_ms.get("notes", []):
            console.print(f"note: {note}", markup=False, highlight=False)
    console.print("PASSED" if res.written else "FAILED")


def memory_line(mem: dict) -> str:
    """One line: the budget, and each stage's own peak resident memory (sampled), the method's steps in brackets."""
    st = mem.get("stages", {})

    def gb(mb: float) -> str:
        return f"{mb / 1024:.2f}GB"

    parts = []
    for name, rec in st.items():
        if name.startswith("method."):
            continue
        txt = f"{name} {gb(rec['stage_peak_mb'])}"
        if "cuda_peak_mb" in rec:
            txt += f" (cuda {gb(rec['cuda_peak_mb'])})"
        subs = [f"{k.split('.', 1)[1]} {gb(v['stage_peak_mb'])}" for k, v in st.items() if k.startswith(name + ".")]
        if subs:
            txt += " (" + ", ".join(subs) + ")"
        parts.append(txt)
    return (f"peak memory {gb(mem['peak_mb'])} (budget {gb(mem['budget_mb'])}); by stage: " + ", ".join(parts))


def register(app: typer.Typer) -> None:
    app.command(
        "repair",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(repair_cmd)
