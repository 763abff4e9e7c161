"""The ``onnxrepair`` command.

Each subcommand lives in ``onnxrepair/commands/<name>.py`` and defines ``register(app)``;
this module only assembles them and maps errors to the documented exit codes:
0 ok, 1 validation/retention failed, 2 usage error, 3 unreadable or unsupported model, 130 interrupted (Ctrl-C).
A user error prints one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import pkgutil
import sys
import warnings

import typer

from . import __version__, commands
from .errors import USER_ERRORS, OnnxRepairError

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
    # under torchrun the other ranks say only errors; rank 0 speaks for the run (onnxrepair.distributed.env_rank,
    # read here without importing torch)
    quiet_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    logging.basicConfig(level=logging.ERROR if quiet_rank else logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # onnx2torch's converters trip torch deprecation warnings (slice indexing) that say nothing to a user of
        # this tool; --verbose shows them
        warnings.filterwarnings("ignore", category=UserWarning, module=r"onnx2torch(\.|$)")


class Interrupted(OnnxRepairError):
    """Ctrl-C (SIGINT) during a command: exit 130, one line naming what stopped and what was (not) written."""

    exit_code = 130


_OUTPUT_PARAMS = ("output", "report", "plots", "log_json")  # the options through which commands write files


def _stamp(p) -> tuple | None:
    try:
        st = os.stat(p)
        return (st.st_mtime_ns, st.st_size)
    except (OSError, TypeError):
        return None


def _interruptible(name: str, fn):
    """Wrap a command so that KeyboardInterrupt becomes :class:`Interrupted` with a message (typer would turn it
    into a silent exit, which ``standalone_mode=False`` returned as 0). Outputs are written through temporary
    files that are removed on the way out (``onnxrepair.io.atomic_path``), so an interrupted run leaves its
    ``-o``/``--report`` paths as they were; the message says so only after checking."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        outs = {k: kwargs[k] for k in _OUTPUT_PARAMS if kwargs.get(k) is not None}
        before = {k: _stamp(v) for k, v in outs.items()}
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            from .progress import current_stage

            stage = current_stage()
            changed = [str(v) for k, v in outs.items() if _stamp(v) != before[k]]
            kept = [str(v) for k, v in outs.items() if _stamp(v) == before[k]]
            written = (f"; partly written: {', '.join(changed)}" if changed else "") + (f"; nothing written to {', '.join(kept)}" if kept else "")
            raise Interrupted(f"{name} stopped by Ctrl-C" + (f" during {stage!r}" if stage else "") + written) from None

    return run


for _mod in pkgutil.iter_modules(commands.__path__):
    if _mod.name.startswith("_"):  # helpers shared by commands, not commands
        continue
    importlib.import_module(f"{commands.__name__}.{_mod.name}").register(app)
for _cmd in app.registered_commands:
    _cmd.callback = _interruptible(_cmd.name or _cmd.callback.__name__, _cmd.callback)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (used by the console script and by tests)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in args
    try:
        rv = app(args=args, standalone_mode=False, prog_name="onnxrepair")
        return rv if isinstance(rv, int) and rv == 130 else 0  # typer returns 130 for a KeyboardInterrupt it caught
    except USER_ERRORS as e:  # onnxrepair's and converters' errors: one line, their exit code
        if _state["debug"] and not isinstance(e, Interrupted):
            raise
        typer.echo(f"{'interrupted' if isinstance(e, Interrupted) else 'error'}: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:  # outside a command (while options are parsed)
        typer.echo("interrupted: onnxrepair interrupted before a command ran", err=True)
        return 130
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
