"""Progress on stderr: rich bars in a terminal, plain stage lines in a log file; per-epoch JSON lines on request.

What the pipeline and the methods call (all no-ops on :data:`SILENT`, except that the current stage is
remembered so an interrupt can say what it stopped):

* ``with reporter.task("assess filters", total=n) as advance: ... advance()`` — a unit of work with a count.
  In a terminal: a bar. Not a terminal (CI, ``2> log``): one line when it starts and one when it ends
  (``[  12.3 s] assess filters: done 40/40 in 3.1 s``), so a log shows every stage without carriage returns.
* ``reporter.stage("export")`` — a pipeline stage with no count (one line in either mode).
* ``reporter.epoch(epoch, epochs, loss=..., **metrics)`` — the end of one training epoch: a line
  ``epoch 2/3: loss 0.4123, calib_clean 95.20 %`` in either mode (in a terminal printed above the bar, and the bar
  of the running task shows ``epoch 2/3 loss 0.412``), and a JSON line ``{"event": "epoch", ...}`` in ``log_json``.
* ``reporter.log(msg)`` — a free line (rich markup allowed; stripped in plain mode).

``log_json`` (the CLI's ``--log-json FILE``) receives one JSON object per line for every stage, task and epoch,
with ``t`` = seconds since the reporter was made.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from contextvars import ContextVar
from typing import IO, Any, Callable, Iterator

from rich.console import Console

stderr_console = Console(stderr=True)

_STAGE: ContextVar[str | None] = ContextVar("onnxrepair_stage", default=None)


def current_stage() -> str | None:
    """What the innermost running task or the last stage was called (for the message of an interrupt)."""
    return _STAGE.get()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Reporter:
    """Progress for one command run; see the module docstring.

    ``enabled=False`` prints nothing (``--quiet``, ``--json``) but still writes ``log_json``.
    ``plain``: None = decide by whether stderr is a terminal.
    """

    def __init__(self, enabled: bool = True, *, plain: bool | None = None, log_json: str | IO[str] | None = None,
                 console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or stderr_console
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self._t0 = time.perf_counter()
        self._json: IO[str] | None = None
        self._own_json = False
        if log_json is not None:
            if isinstance(log_json, str) or hasattr(log_json, "__fspath__"):
                self._json = open(log_json, "w", buffering=1)
                self._own_json = True
            else:
                self._json = log_json
        self._bar: Callable[[str], None] | None = None  # sets the running bar's description (terminal mode)
        self._bar_print: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ helpers
    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def _line(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.plain:
            self.console.print(f"[{self._elapsed():7.1f} s] {msg}", markup=False, highlight=False, soft_wrap=True)
        elif self._bar_print is not None:
            self._bar_print(msg)
        else:
            self.console.print(msg, markup=False, highlight=False)

    def _event(self, event: str, **fields: Any) -> None:
        if self._json is not None:
            self._json.write(json.dumps({"event": event, "t": round(self._elapsed(), 3), **fields}, default=str) + "\n")

    def close(self) -> None:
        if self._own_json and self._json is not None:
            self._json.close()
            self._json = None

    # ------------------------------------------------------------------ the calls
    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
        token = _STAGE.set(description)
        t0 = time.perf_counter()
        done = [0.0]
        self._event("task", name=description, total=total)
        try:
            if not self.enabled or self.plain:
                self._line(f"{description}: started" + (f" ({total:g} steps)" if total else ""))

                def advance(n: float = 1, description: str | None = None) -> None:
                    done[0] += n

                yield advance
                self._line(f"{description}: done" + (f" {done[0]:g}/{total:g}" if total else "") + f" in {time.perf_counter() - t0:.1f} s")
            else:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
                with Progress(*cols, console=self.console, transient=False) as prog:
                    tid = prog.add_task(description, total=total)

                    def advance(n: float = 1, description: str | None = None) -> None:
                        prog.update(tid, advance=n, **({"description": description} if description else {}))

                    outer = (self._bar, self._bar_print)
                    self._bar = lambda d: prog.update(tid, description=d)
                    self._bar_print = lambda m: prog.console.print(m, markup=False, highlight=False)
                    try:
                        yield advance
                    finally:
                        self._bar, self._bar_print = outer
            self._event("task_done", name=description, seconds=round(time.perf_counter() - t0, 3))
        except BaseException:
            raise  # the stage stays set: an interrupt's message names the innermost task it stopped
        else:
            _STAGE.reset(token)

    def stage(self, name: str, detail: str = "") -> None:
        """A pipeline stage begins (export, validation, evaluation): one line, and the stage an interrupt names."""
        _STAGE.set(name)
        self._event("stage", name=name, **({"detail": detail} if detail else {}))
        self._line(name + (f": {detail}" if detail else ""))

    def epoch(self, epoch: int, epochs: int | None = None, *, loss: float | None = None, **metrics: float) -> None:
        """The end of training epoch ``epoch`` (1-based) of ``epochs``, with its mean training ``loss`` and any
        calibration scores (``calib_clean=0.95``; fractions in [0, 1] are shown as percentages)."""
        of = f"/{epochs}" if epochs else ""
        parts = [] if loss is None else [f"loss {loss:.4f}"]
        for k, v in metrics.items():
            parts.append(f"{k} {100 * v:.2f} %" if isinstance(v, float) and 0.0 <= v <= 1.0 and k != "loss" else f"{k} {_fmt(v)}")
        self._event("epoch", epoch=epoch, epochs=epochs, loss=loss, **metrics)
        if self._bar is not None and self.enabled and not self.plain:
            self._bar(f"train epoch {epoch}{of}" + ("" if loss is None else f" loss {loss:.3f}"))
        self._line(f"epoch {epoch}{of}: " + (", ".join(parts) or "done"))

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.plain:
            from rich.text import Text

            self._line(Text.from_markup(msg).plain)
        elif self._bar_print is not None:
            self._bar_print(msg)
        else:
            self.console.print(msg)


SILENT = Reporter(enabled=False)
