"""Memory: measured per stage, budgeted, and what one sample of a model's activations costs.

Three pieces the pipeline (:mod:`onnxrepair.repair`) and the methods share (issue 19):

* :class:`Memory` records, per stage (convert, method and the method's own steps, export, validate, evaluate),
  the process's resident memory: the lifetime peak (``ru_maxrss``) reached by the end of the stage and how much
  the stage raised it, the resident size at its start and end (``/proc/self/statm``), and the stage's own peak,
  sampled every 10 ms by a background thread (``ru_maxrss`` cannot be reset without also resetting what
  ``/usr/bin/time`` and the parent see, so it is not). On CUDA, ``torch.cuda.max_memory_allocated`` per stage.
* The same object is the *budget* (``--max-memory``): :meth:`Memory.fit` says how many samples (or stacked
  ablations x samples) one pass may hold, from a measured per-sample cost, and raises
  :class:`MemoryBudgetError` (exit 2) naming the stage and the smallest budget that would work when not even one
  fits. Stacking is a speed trick: callers split their work into the passes this allows, and their results do not
  depend on the split.
* :func:`activation_cost` measures a model's per-sample activation memory by running it once on two samples
  through an :class:`torch.fx.Interpreter` that tracks which tensors are alive (storage-deduplicated): the most
  alive at once (inference) and the sum of every node's output (an upper bound of what autograd keeps).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import fx

from .errors import UsageError

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
# A stacked or captured pass is sized to at most this much activation memory even when the budget allows more:
# on CPU, throughput stops growing long before (bench/memory.py measures the assessment at both sizes).
PASS_BYTES = 1 * GiB
DEFAULT_SHARE = 0.5  # default budget: what the process holds now + this share of the memory still available
MARGIN = 1.5  # safety factor on measured activation costs (operator workspaces, allocator slack)

_UNITS = {"": GiB, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


class MemoryBudgetError(UsageError):
    """A stage cannot run within the memory budget, not even one sample at a time (exit 2). Raised before the
    stage allocates and before any training, so nothing has been written."""

    def __init__(self, stage: str, needed: int, limit: int, detail: str = "") -> None:
        self.stage, self.needed, self.limit = stage, int(needed), int(limit)
        more = f" ({detail})" if detail else ""
        super().__init__(f"not enough memory for {stage}{more}: it needs about {format_size(needed)}, over the budget of "
                         f"{format_size(limit)}; the smallest budget that would work is --max-memory {format_size(needed, ceil=True)}; "
                         "nothing was written")


class OutOfMemory(MemoryBudgetError):
    """An allocation failed inside a stage that the budget had sized as fitting (exit 2): the machine or device had
    less free than the budget assumed, or the stage needed more than its estimate (operator workspaces, a library's
    own buffers). Raised by :meth:`Memory.stage` in place of ``MemoryError`` / ``torch.OutOfMemoryError`` / torch's
    CPU allocator error, naming the innermost stage that was running, what was resident and what the failed
    allocation asked for; the pipeline writes nothing after it (outputs go through temporary files)."""

    def __init__(self, stage: str, in_use: int, tried: int | None, limit: int, cause: str) -> None:
        self.stage, self.limit, self.tried, self.in_use = stage, int(limit), tried, int(in_use)
        self.needed = int(in_use + (tried or 0))
        asked = f"; it asked for {format_size(tried)} more with {format_size(in_use)} in use, so it needs at least " \
                f"{format_size(self.needed, ceil=True)}" if tried else f" with {format_size(in_use)} in use"
        UsageError.__init__(self, f"ran out of memory in stage {stage!r} ({cause}){asked}; the budget of {format_size(limit)} "
                            "did not predict it: free memory, lower --batch-size or --max-memory, or use a larger machine; "
                            "nothing was written")


_OOM_TEXT = re.compile(r"can't allocate memory|not enough memory|out of memory|failed to allocate memory|cannot allocate memory", re.I)
_TRIED = re.compile(r"(?:tried to allocate|allocate)\s+([0-9.]+)\s*(bytes|[KMGT]i?B)?", re.I)
_TRIED_UNITS = {"bytes": 1, None: 1, "kib": 1 << 10, "kb": 1 << 10, "mib": 1 << 20, "mb": 1 << 20, "gib": 1 << 30,
                "gb": 1 << 30, "tib": 1 << 40, "tb": 1 << 40}


def out_of_memory(e: BaseException) -> tuple[bool, int | None, str]:
    """(is this an allocation failure, bytes the failed allocation asked for if the message says, a short cause).
    Python's and numpy's ``MemoryError``, ``torch.OutOfMemoryError`` (CUDA), torch's CPU allocator (a RuntimeError
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes") and onnxruntime's "Failed to
    allocate memory"."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    is_oom = isinstance(e, MemoryError) or (oom_type is not None and isinstance(e, oom_type)) or \
        (isinstance(e, RuntimeError) and bool(_OOM_TEXT.search(str(e)))) or \
        (type(e).__module__.startswith("onnxruntime") and bool(_OOM_TEXT.search(str(e))))
    if not is_oom:
        return False, None, ""
    tried = None
    m = _TRIED.search(str(e))
    if m:
        unit = (m.group(2) or "bytes").lower()
        tried = int(float(m.group(1)) * _TRIED_UNITS.get(unit, 1))
    first = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", str(e).strip()).splitlines()[0] if str(e).strip() else ""
    return True, tried, f"{type(e).__name__}: {first[:120]}" if first else type(e).__name__


def parse_size(text: str | int | float) -> int:
    """'4GB', '512MiB', '1.5g', 4 (GB) -> bytes. GB and GiB both mean 2**30 (memory is counted in pages)."""
    if isinstance(text, (int, float)):
        return int(float(text) * GiB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"--max-memory expects a size such as 4GB, 512MB or 1.5GiB, not {text!r}")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise UsageError(f"--max-memory must be positive, not {text!r}")
    return n


def format_size(n: float, ceil: bool = False) -> str:
    """Bytes as GB (or MB below 1 GB), one decimal; ``ceil`` rounds up (for a budget that must suffice)."""
    import math

    if n >= GiB:
        v = n / GiB
        return f"{math.ceil(v * 10) / 10 if ceil else v:.1f}GB"
    v = n / MiB
    return f"{math.ceil(v) if ceil else v:.0f}MB"


def rss_bytes() -> int:
    """Current resident set size of this process (``/proc/self/statm``; 0 where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The process's lifetime peak resident set size (``ru_maxrss``, KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def available_bytes() -> tuple[int, str]:
    """(bytes still available to this process, where the figure comes from): the smaller of the kernel's
    MemAvailable and a cgroup (v2 or v1) limit minus its usage."""
    avail, src = 0, "MemAvailable"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for lim_p, use_p in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(lim_p) as f:
                raw = f.read().strip()
            if raw == "max":
                continue
            with open(use_p) as f:
                room = int(raw) - int(f.read().strip())
            if 0 < room < (avail or room + 1) and int(raw) < 1 << 60:
                avail, src = room, "the cgroup's limit minus its usage"
        except (OSError, ValueError):
            continue
    return avail, src


def default_limit(device: torch.device | str = "cpu") -> tuple[int, str]:
    """(budget in bytes, how it was chosen): on CPU what the process holds now plus half of what is available;
    on CUDA, what torch holds now plus half of the device's free memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        held = torch.cuda.memory_allocated(dev)
        return held + int(free * DEFAULT_SHARE), f"default: {format_size(held)} held + half of {format_size(free)} free on {dev}"
    avail, src = available_bytes()
    rss = rss_bytes()
    if not avail:
        return rss + 4 * GiB, "default: 4GB above the current resident size (no /proc/meminfo)"
    return rss + int(avail * DEFAULT_SHARE), f"default: {format_size(rss)} resident + half of {format_size(avail)} available ({src})"


# --------------------------------------------------------------------------- per-sample activation cost


@dataclass
class ActivationCost:
    """Bytes *per sample* of a model's activations, measured on two samples (:func:`activation_cost`)."""

    peak_live: int  # inference: the most activation memory alive at once (inputs included)
    saved: int  # every node's output summed: an upper bound of what autograd keeps for backward
    input: int  # one model input
    largest: int  # the largest single activation
    nodes: dict[str, int] = field(default_factory=dict)  # per fx node, its output's bytes per sample

    def to_dict(self) -> dict[str, float]:
        return {"peak_live_mb": self.peak_live / MiB, "saved_mb": self.saved / MiB, "input_mb": self.input / MiB,
                "largest_mb": self.largest / MiB}


def _tensors(v: Any) -> Iterator[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (tuple, list)):
        for x in v:
            yield from _tensors(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _tensors(x)


class _Liveness(fx.Interpreter):
    """Runs the graph and tracks the bytes of batch-sized tensors alive after each node (by storage, so views
    count once), freeing a node's output after its last user ran."""

    def __init__(self, gm: fx.GraphModule, batch: int) -> None:
        super().__init__(gm)
        self.batch = batch
        nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(nodes)}
        self.last = {n: max([self.index[u] for u in n.users], default=self.index[n]) for n in nodes}
        self.free_at: dict[int, list[fx.Node]] = {}
        for n, i in self.last.items():
            self.free_at.setdefault(i, []).append(n)
        self.storages: dict[int, list] = {}  # data_ptr -> [bytes, live references]
        self.owned: dict[fx.Node, list[int]] = {}
        self.live = self.peak = self.saved = self.largest = 0
        self.sizes: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        ptrs, total = [], 0
        for t in _tensors(out):
            if t.ndim == 0 or t.shape[0] != self.batch or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            total += t.numel() * t.element_size()
            ptrs.append(ptr)
            rec = self.storages.get(ptr)
            if rec is None:
                self.storages[ptr] = [nbytes, 1]
                self.live += nbytes
            else:
                rec[1] += 1
        self.owned[n] = ptrs
        self.sizes[n.name] = total
        if n.op not in ("placeholder", "output"):  # the output node hands back a tensor counted where it was made
            self.saved += total
        self.largest = max(self.largest, total)
        self.peak = max(self.peak, self.live)
        for dead in self.free_at.get(self.index[n], ()):
            for ptr in self.owned.pop(dead, ()):
                rec = self.storages[ptr]
                rec[1] -= 1
                if rec[1] == 0:
                    self.live -= rec[0]
                    del self.storages[ptr]
        return out


@torch.no_grad()
def activation_cost(gm: fx.GraphModule, example: torch.Tensor | tuple[torch.Tensor, ...]) -> ActivationCost:
    """Per-sample activation bytes of ``gm`` measured by running it on ``example`` (a batch of model inputs;
    two samples are enough: every counted tensor scales with the batch)."""
    ex = example if isinstance(example, tuple) else (example,)
    b = int(ex[0].shape[0])
    interp = _Liveness(gm, b)
    was = gm.training
    gm.eval()
    try:
        interp.run(*ex)
    finally:
        gm.train(was)
    inp = sum(t.numel() * t.element_size() for t in ex)
    return ActivationCost(peak_live=-(-interp.peak // b), saved=-(-interp.saved // b), input=-(-inp // b),
                          largest=-(-interp.largest // b), nodes={k: -(-v // b) for k, v in interp.sizes.items()})


# --------------------------------------------------------------------------- the meter and the budget


@dataclass
class _Stage:
    name: str
    t0: float
    rss_start: int
    peak_start: int
    sampled: int
    cuda: int = 0
    seconds: float = 0.0
    rss_end: int = 0
    peak_end: int = 0


class Memory:
    """The memory budget of one repair and the meter of its stages (module docstring).

    ``limit``: bytes, or None for :func:`default_limit` (said in the log and the report). ``device``: where the
    budgeted passes run (CUDA budgets device memory, the CPU the process's resident size)."""

    def __init__(self, limit: int | str | None = None, device: torch.device | str = "cpu", *, pass_bytes: int = PASS_BYTES,
                 margin: float = MARGIN, sample_every_s: float = 0.01) -> None:
        self.device = torch.device(device)
        if limit is None:
            self.limit, self.source = default_limit(self.device)
        else:
            self.limit = parse_size(limit) if isinstance(limit, str) else int(limit)
            self.source = f"--max-memory {format_size(self.limit)}"
        self.pass_bytes, self.margin = pass_bytes, margin
        self.stages: dict[str, dict[str, float]] = {}
        self.sizing: list[dict[str, Any]] = []
        self.cost: ActivationCost | None = None
        self._open: list[_Stage] = []
        self._lock = threading.Lock()
        self._every = sample_every_s
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.lifetime_peak = peak_rss_bytes()

    # ---- meter
    def _cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            rss = rss_bytes()
            with self._lock:
                for s in self._open:
                    s.sampled = max(s.sampled, rss)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure a stage; stages nest (``method`` holds ``method.assess``), each keeps its own figures."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="onnxrepair-memory", daemon=True)
            self._thread.start()
        rss = rss_bytes()
        s = _Stage(name, time.perf_counter(), rss, peak_rss_bytes(), rss)
        if self._cuda():
            peak_now = torch.cuda.max_memory_allocated(self.device)
            for o in self._open:  # a nested reset must not lose the enclosing stage's peak
                o.cuda = max(o.cuda, peak_now)
            torch.cuda.reset_peak_memory_stats(self.device)
        with self._lock:
            self._open.append(s)
        try:
            yield
        except UsageError:
            raise  # an inner stage's OutOfMemory already names it; a MemoryBudgetError names its own
        except Exception as e:  # noqa: BLE001 - only allocation failures are turned into OutOfMemory, the rest re-raised
            oom, tried, cause = out_of_memory(e)
            if not oom:
                raise
            in_use = max(self.used(), rss_bytes())
            log.error("out of memory in %s: %s", name, e)
            raise OutOfMemory(name, in_use, tried, self.limit, cause) from e
        finally:
            rss = rss_bytes()
            with self._lock:
                self._open.remove(s)
                s.sampled = max(s.sampled, rss)
            s.rss_end, s.peak_end, s.seconds = rss, peak_rss_bytes(), time.perf_counter() - s.t0
            self.lifetime_peak = max(self.lifetime_peak, s.peak_end)
            rec = {
                "peak_mb": round(s.peak_end / MiB, 1),  # process peak (ru_maxrss) reached by the end of the stage
                "increase_mb": round((s.peak_end - s.peak_start) / MiB, 1),  # how much this stage raised it
                "stage_peak_mb": round(s.sampled / MiB, 1),  # the stage's own peak resident size (sampled)
                "rss_start_mb": round(s.rss_start / MiB, 1),
                "rss_end_mb": round(s.rss_end / MiB, 1),
                "seconds": round(s.seconds, 3),
            }
            if self._cuda():
                s.cuda = max(s.cuda, torch.cuda.max_memory_allocated(self.device))
                rec["cuda_peak_mb"] = round(s.cuda / MiB, 1)
                for o in self._open:
                    o.cuda = max(o.cuda, s.cuda)
            self.stages[name] = rec
            if not self._open:
                self.close()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # ---- budget
    def used(self) -> int:
        """What counts against the budget now: torch's device memory on CUDA, else the resident size."""
        if self._cuda():
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes()

    def fit(self, stage: str, per_item: int, want: int, *, fixed: int = 0, what: str = "sample") -> int:
        """How many items (at most ``want``) one pass of ``stage`` may hold, each costing ``per_item`` bytes (times the
        safety margin) on top of ``fixed`` bytes and what is in use now; at most :data:`PASS_BYTES` of them, but
        always one when one fits. Raises :class:`MemoryBudgetError` when not even one fits."""
        each = max(1, int(per_item * self.margin))
        used = self.used()
        room = self.limit - used - fixed
        if room < each:
            raise MemoryBudgetError(stage, used + fixed + each, self.limit, f"one {what} of {format_size(each)} on top of "
                                    f"{format_size(used + fixed)} in use")
        n = max(1, min(int(want), min(room, self.pass_bytes) // each))
        self.sizing.append({"stage": stage, "what": what, "per_item_mb": round(each / MiB, 3), "wanted": int(want), "chosen": int(n),
                            "room_mb": round(room / MiB, 1)})
        if n < want:
            log.info("%s: %d %ss per pass instead of %d (budget %s, %s each)", stage, n, what, want, format_size(self.limit), format_size(each))
        return n

    def require(self, needs: dict[str, tuple[int, str]]) -> None:
        """Check several stages up front: ``{stage: (bytes on top of what is in use now, what)}``; raises
        :class:`MemoryBudgetError` for the most demanding one that does not fit (so a repair stops before any
        training rather than in the middle)."""
        used = self.used()
        worst = max(needs.items(), key=lambda kv: kv[1][0], default=None)
        if worst is not None and used + worst[1][0] > self.limit:
            stage, (extra, what) = worst
            raise MemoryBudgetError(stage, used + extra, self.limit, what)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "budget_mb": round(self.limit / MiB, 1), "budget_source": self.source, "device": str(self.device),
            "pass_cap_mb": round(self.pass_bytes / MiB, 1), "margin": self.margin,
            "peak_mb": round(max(self.lifetime_peak, peak_rss_bytes()) / MiB, 1), "stages": dict(self.stages),
            "sizing": list(self.sizing),
        }
        if self.cost is not None:
            out["activation_cost_per_sample"] = self.cost.to_dict()
        return out
