"""The ``onnxrepair`` command.

Each subcommand lives in ``onnxrepair/commands/<name>.py`` and defines ``register(app)``;
this module only assembles them and maps errors to the documented exit codes:
0 ok, 1 validation/retention failed, 2 usage error, 3 unreadable or unsupported model.
A user error prints one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

import typer

from . import __version__, commands
from .errors import USER_ERRORS

app = typer.Typer(
    name="onnxrepair",
    help="Repair trained models given as ONNX files, and prove what changed on onnxruntime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"onnxrepair {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (stderr)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch tuning (0 = torch's default). Small models on busy machines run faster on 1."),
) -> None:
    _state["debug"] = debug
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


for _mod in pkgutil.iter_modules(commands.__path__):
    if _mod.name.startswith("_"):  # helpers shared by commands, not commands
        continue
    importlib.import_module(f"{commands.__name__}.{_mod.name}").register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (used by the console script and by tests)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in args
    try:
        app(args=args, standalone_mode=False, prog_name="onnxrepair")
        return 0
    except USER_ERRORS as e:  # onnxrepair's and converters' errors: one line, their exit code
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        return e.exit_code
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as e:
        # usage errors of the (vendored) click layer: bad flags, missing options; they know their exit code
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return int(e.exit_code)
        if _state["debug"]:
            raise
        typer.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
        return 4


def _console_script() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _console_script()
