"""``onnxrepair evaluate MODEL.onnx [MODEL2.onnx ...] --data D``: accuracy under corruptions, blur and attacks,
scored on onnxruntime; several models are scored on identical perturbed inputs. With CSV data and
``--protected COL``, also the fairness metrics (accuracy, SPD, AAOD, EOD, individual discrimination rate) of
:func:`onnxrepair.fairness.evaluate_fairness`, on the same counterfactual pairs for every model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ..errors import UsageError
from . import _options


def evaluate_cmd(
    models: List[Path] = typer.Argument(..., help="One or more .onnx models, evaluated on the same inputs."),
    data: Path = typer.Option(..., "--data", help="Test data: .npz, image folder, CIFAR batches, IDX, or CSV."),
    corruptions: str = typer.Option("", "--corruptions", help="all | deeppatch | NAME,... (CIFAR-10-C names, DeepPatch transforms). Default: none."),
    severities: str = typer.Option("1-5", "--severities", help="Severities, e.g. 1-5 or 1,3,5."),
    blur: bool = typer.Option(True, "--blur/--no-blur", help="DeepPatch robustness accuracy (clean + 6 Gaussian blurs)."),
    attacks: str = typer.Option("", "--attacks", help="fgsm,pgd,pgdl2,cw (or all); crafted white-box per model (see --attack-source)."),
    attack_source: str = typer.Option("each", "--attack-source", help="each: craft attacks on every model's own graph (white-box); first: craft once on the first model and score the same adversarial images on every model (transfer)."),
    eps: str = typer.Option("8/255", "--eps", help="L-inf budgets (pixel units), comma separated."),
    eps_l2: str = typer.Option("0.5", "--eps-l2", help="L2 budgets for pgdl2 / cw."),
    attack_steps: Optional[int] = typer.Option(None, "--attack-steps", help="Iterations for PGD/CW (default 10 / 50)."),
    attack_limit: Optional[int] = typer.Option(None, "--attack-limit", help="Attack at most N images (stratified)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate at most N images (stratified random subset)."),
    split: Optional[str] = typer.Option(None, "--split", help="train | test, for sources holding both."),
    batch_size: int = typer.Option(256, "--batch-size"),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG charts into this folder: accuracy vs severity; with --protected, the fairness metrics per model."),
    provider: str = typer.Option("auto", "--provider", help="onnxruntime provider: auto, cpu, cuda."),
    device: Optional[str] = typer.Option(None, "--device", help="torch device for perturbations/attacks (default: cuda if available)."),
    seed: int = typer.Option(0, "--seed"),
    target: Optional[str] = typer.Option(None, "--target", help="CSV: the label column."),
    protected: Optional[str] = typer.Option(None, "--protected", help="CSV: report fairness metrics for this protected column."),
    privileged: Optional[float] = typer.Option(None, "--privileged", help="Privileged value of --protected (default: the larger of two)."),
    unprivileged: Optional[float] = typer.Option(None, "--unprivileged", help="Unprivileged value of --protected (default: the other one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report to stdout instead of tables."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr (bars in a terminal, stage lines otherwise)."),
    log_json: Optional[Path] = _options.LOG_JSON,
    layout: Optional[str] = _options.LAYOUT,
    scale: Optional[float] = _options.SCALE,
    mean: Optional[str] = _options.MEAN,
    std: Optional[str] = _options.STD,
    config: Optional[List[Path]] = typer.Option(None, "--config", help="TOML file with layout/scale/mean/std (top level or an \\[input] table); once for every model, or once per model in their order. Unset: each model's own metadata, else a guess."),
    find: bool = typer.Option(False, "--find-contract", help="Try the usual preprocessing (pixels in [0,1], [0,255], [-1,1]; ImageNet, CIFAR-10, MNIST mean/std; NCHW/NHWC) on 512 labelled images and use the best, per model (recorded in the report)."),
) -> None:
    """Clean, per-class, corruption (mCA), DeepPatch-robustness and adversarial accuracy on onnxruntime."""
    from ..evaluate import evaluate_models
    from ..io import check_output_path, write_json_atomic
    from ..perturb.attacks import resolve_attacks
    from ..perturb.corruptions import resolve_names
    from ..report import plot_fairness, plot_report, print_report

    # validate names before any work
    resolve_names(corruptions)
    resolve_attacks(attacks)
    if attack_source not in ("each", "first"):
        raise UsageError(f"--attack-source must be each or first, not {attack_source!r}")
    sev = _options.parse_severities(severities)
    if report is not None:
        check_output_path(report, *models)
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if protected is None and (privileged is not None or unprivileged is not None):
        raise UsageError("--privileged/--unprivileged need --protected COLUMN")
    if protected is not None and data.suffix.lower() != ".csv":
        raise UsageError(f"--protected needs tabular CSV data (with --target); {data} is not a .csv file")
    contracts = []
    ds = None
    configs = list(config or [])
    if len(configs) not in (0, 1, len(models)):
        raise UsageError(f"--config given {len(configs)} times for {len(models)} models: give it once for all, or once per model")
    for i, m in enumerate(models):
        cfg = configs[i] if len(configs) == len(models) else (configs[0] if configs else None)
        c = _options.build_contract(m, layout=layout, scale=scale, mean=mean, std=std, config=cfg)
        if ds is None:
            ds = _options.load_data(data, c, target=target, split=split, protected=protected)
        contracts.append(c)
    from ..data.contract import finalize_contract

    for c in contracts:
        finalize_contract(c, ds.x[:256])
    searched = {}
    if find:
        if mean or std or layout or config:
            raise UsageError("--find-contract searches layout and mean/std itself; leave out --layout/--mean/--std/--config (or drop --find-contract)")
        from ..evaluate import find_contract

        for i, m in enumerate(models):
            contracts[i], searched[m.stem if m.stem not in searched else f"{m.stem}#{i + 1}"] = find_contract(m, ds, contracts[i], seed=seed, provider=provider)
    spec = None
    if protected is not None:
        from ..data.tabular import resolve_protected

        spec = resolve_protected(ds, protected, privileged=privileged, unprivileged=unprivileged)
    if ds.x.ndim != 4:
        blur = False  # on by default for images; rows have nothing to blur
    rep = evaluate_models(
        models, ds, contracts,
        corruptions=corruptions, severities=sev, blur=blur, attacks=attacks,
        eps=_options.parse_eps(eps), eps_l2=_options.parse_eps(eps_l2), attack_steps=attack_steps, attack_limit=attack_limit,
        limit=limit, batch_size=batch_size, provider=provider, device=device, seed=seed,
        progress=_options.reporter(quiet or as_json, log_json, *models), attack_source=attack_source,
    )  # fmt: skip
    d = rep.to_dict()
    if searched:
        d["contract_search"] = searched
    for w in rep.warnings:
        typer.secho(f"WARNING: {w}", err=True, fg="red", bold=True)
    if spec is not None:
        from ..fairness import evaluate_fairness

        # the same names and the same --limit subset as the accuracy report
        fair = evaluate_fairness({m.name: p for m, p in zip(rep.models, models)}, ds.limit(limit, seed=seed), spec, provider=provider, seed=seed)
        d["fairness"] = {"protected": {"column": spec.column, "privileged": spec.privileged, "unprivileged": spec.unprivileged},
                         "models": {k: {kk: vv for kk, vv in v.items() if kk != "protected"} for k, v in fair.items()}}  # fmt: skip
    if report is not None:
        write_json_atomic(report, d)
    if plots is not None:
        files = plot_report(rep, plots)
        if spec is not None:
            files.append(plot_fairness(d["fairness"]["models"], spec.column, plots))
        d["plots"] = [str(f) for f in files]
    if as_json:
        typer.echo(json.dumps(d, indent=2, default=str))
        return
    con = Console()
    print_report(rep, con)
    if spec is not None:
        _print_fairness(d["fairness"], con)
    con.print(f"{rep.n} {'images' if ds.x.ndim == 4 else 'rows'}, {rep.images_scored} model evaluations in {rep.seconds:.1f} s ({rep.images_per_s:.0f}/s)")
    if report is not None:
        con.print(f"report: {report}")
    if plots is not None:
        con.print(f"plots: {plots}/ ({len(d['plots'])} files)")


def _print_fairness(fair: dict, con: Console) -> None:
    from rich.table import Table

    p = fair["protected"]
    t = Table(title=f"fairness on onnxruntime: protected {p['column']!r} (privileged {p['privileged']:g}, unprivileged {p['unprivileged']:g})")
    for col in ("model", "accuracy", "SPD", "AAOD", "EOD", "IDR (pairs)", "IDR (data)"):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for name, m in fair["models"].items():
        idr = m.get("idr")
        t.add_row(name, f"{100 * m['accuracy']:.2f} %", f"{m['spd']:+.4f}", f"{m['aaod']:.4f}", f"{m['eod']:+.4f}",
                  "—" if idr is None else f"{100 * idr:.2f} %", f"{100 * m['idr_data']:.2f} %")  # fmt: skip
    con.print(t)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
