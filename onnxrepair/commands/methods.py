"""``onnxrepair methods``: the registered repair methods, what each needs, and its options."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import typer


def _describe() -> list[dict]:
    from .. import methods as registry  # imports torch: only when the command runs, not for --help

    out = []
    for spec in registry.available().values():
        opts = []
        for f in registry.config_fields(spec):
            default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            opts.append({"option": "--" + f.name.replace("_", "-"), "type": t, "default": default})
        out.append({"name": spec.name, "task": spec.task, "summary": spec.summary, "needs": spec.needs, "inputs": spec.inputs, "paper": spec.paper, "options": opts})
    return out


def methods_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout.")) -> None:
    """List the registered repair methods, the data each needs, and their options."""
    desc = _describe()
    if as_json:
        typer.echo(json.dumps(desc, indent=2, default=str))
        return
    from rich.console import Console

    from ..report import fmt_value

    con = Console()
    con.print("[bold]repair methods[/] (onnxrepair repair MODEL --method NAME [--option value ...])")
    for d in desc:
        # one block per method: names never break at 80 columns, defaults read as they are typed
        con.print()
        con.print(f"[bold]{d['name']}[/]  ({d['task']}; needs {d['needs']})", highlight=False)
        for line in (d["summary"], f"paper: {d['paper']}" if d["paper"] else ""):
            if line:
                con.print(textwrap.fill(line, width=max(40, con.width - 1), initial_indent="  ", subsequent_indent="    "), markup=False, highlight=False)
        width = max((len(o["option"]) for o in d["options"]), default=0)
        for o in d["options"]:
            con.print(f"    {o['option']:<{width}}  {fmt_value(o['default'])}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("methods")(methods_cmd)
