"""Scale-out on torch.distributed when a command is launched by ``torchrun`` (one process per device).

    torchrun --nnodes N --nproc-per-node M --rdzv-endpoint HOST:PORT -m onnxrepair repair MODEL.onnx ...

Every process runs the whole pipeline; only training is split. What each part does:

* **Training** (:func:`onnxrepair.train.train_loop`, which every method uses): every rank draws the *same* global
  batch (same seeds, and the batch's randomness — perturbation, AugMix views, PGD random starts — is drawn on the
  whole batch before it is split), takes its contiguous slice (:func:`shard`), computes the loss on it, and the
  gradients are summed over ranks weighted by each slice's share of the batch (:func:`sync_grads`: sample count,
  or the sum of row weights for a weighted loss). The step is then the single-process step on the whole batch,
  up to floating-point summation order; every optimiser (SGD with momentum and weight decay, Adam) sees identical
  gradients on every rank, so its state stays identical too. The trainable weights are broadcast from rank 0 at
  the start of each loop (:func:`broadcast_`), after checking that every rank holds the same shapes.
* **Scoring, checkpoint choice, calibration, assessment, DeepPatch's gate fit, FMT/DARE targets and slices**:
  redundantly on every rank. They are deterministic given identical weights and cost little next to training, so
  a shard + all-reduce would only add communication; the one decision that must never differ between ranks (which
  epoch is best) is taken from rank 0's score (:func:`agree`).
* **Export, validation, evaluation, the report and the model file**: rank 0 only; the other ranks wait until every
  rank has finished training (:func:`summary` is a collective) and exit 0 without writing anything. They do not wait
  through rank 0's evaluation: a barrier held longer than the group's timeout would fail and make torchrun stop
  rank 0 mid-write; torchrun itself waits for rank 0 and reports its exit.

Backends: gloo on the CPU, NCCL on CUDA (device ``cuda:LOCAL_RANK``). Without torchrun (or with one process) every
function here is a no-op and nothing is imported from torch.distributed's process group.

Not equal to one process (said in the README): BatchNorm statistics *while* training in train mode are per slice
(as in DDP without SyncBatchNorm; the running statistics are averaged over ranks after every step so the ranks
stay identical), and dropout masks in train mode are drawn per rank.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class _Session:
    """What one distributed run counts (for the report): samples and steps this rank trained on."""

    backend: str
    device: str
    samples: int = 0
    steps: int = 0
    loops: int = 0
    notes: list[str] = field(default_factory=list)


_session: _Session | None = None  # the process group is process-wide; so is what is counted for it


def launched() -> bool:
    """True when torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 without a launcher); usable before init."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def resolve_device(dev: torch.device) -> torch.device:
    """Under torchrun a CUDA device is this process's own GPU, ``cuda:LOCAL_RANK``."""
    if dev.type != "cuda" or not launched():
        return dev
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.index is not None and dev.index != local:
        log.warning("--device %s under torchrun: using cuda:%d (LOCAL_RANK)", dev, local)
    return torch.device("cuda", local)


@contextlib.contextmanager
def session(dev: torch.device, timeout_s: float = 1800.0) -> Iterator[torch.device]:
    """Join the process group for the run when launched by torchrun (gloo for a CPU device, NCCL for CUDA) and leave
    it at the end; yields the device this process trains on. Without a launcher: yields ``dev``, does nothing."""
    global _session
    if not launched() or active():  # a single process, or a group someone else already owns
        yield dev
        return
    dev = resolve_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _session = _Session(backend, str(dev))
    log.info("torch.distributed: rank %d of %d, backend %s, device %s", rank(), world(), backend, dev)
    try:
        yield dev
    finally:
        _session = None
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# --------------------------------------------------------------------------- batches
def shard_range(n: int, r: int | None = None, size: int | None = None) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch of ``n`` rows that rank ``r`` of ``size`` takes: contiguous slices whose
    lengths differ by at most one (as ``torch.tensor_split``). A batch with fewer rows than ranks is not split:
    every rank takes all of it (no rank ever computes a loss on an empty slice; :func:`sync_grads` averages the
    identical gradients back to the single-process one)."""
    r = rank() if r is None else r
    size = world() if size is None else size
    if size <= 1 or n < size:
        return 0, n
    base, extra = divmod(n, size)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def shard(batch: Any) -> Any:
    """This rank's slice of a global batch: tensors and arrays along dim 0, objects with ``take(index)`` and
    ``len`` (ArchRepair's cached activations) by index, tuples/lists/dicts element by element (each by its own
    length); anything else (ints, None, strings) passes unchanged."""
    if not active():
        return batch
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        if batch.ndim == 0:
            return batch
        lo, hi = shard_range(len(batch))
        return batch[lo:hi]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(shard(b) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(b) for b in batch)
    if isinstance(batch, dict):
        return {k: shard(v) for k, v in batch.items()}
    if hasattr(batch, "take") and hasattr(batch, "__len__"):
        lo, hi = shard_range(len(batch))
        return batch.take(torch.arange(lo, hi))
    return batch


# --------------------------------------------------------------------------- collectives
def sync_grads(params: Sequence[torch.Tensor], weight: float) -> float:
    """Replace each parameter's gradient by the weighted mean over ranks, ``Σ_r w_r g_r / Σ_r w_r`` — for a loss
    that is a mean over this rank's ``weight`` samples (or a weighted mean with total row weight ``weight``), that
    is the gradient of the same loss over the whole global batch. A parameter no rank has a gradient for keeps
    ``None`` (so SGD's weight decay and momentum skip it as they would in one process). One all-reduce.
    Returns this rank's share ``w_r / Σ w`` (1.0 without a process group)."""
    if not active():
        return 1.0
    params = list(params)
    dev = _comm_device() if dist.get_backend() == "nccl" or not params else params[0].device
    parts = [(p.grad.detach().reshape(-1).to(device=dev, dtype=torch.float32) * weight) if p.grad is not None
             else torch.zeros(p.numel(), device=dev) for p in params]
    tail = torch.tensor([1.0 if p.grad is not None else 0.0 for p in params] + [float(weight)], device=dev)
    flat = torch.cat(parts + [tail])
    dist.all_reduce(flat)
    total = float(flat[-1])
    scale = 1.0 / total if total > 0 else 0.0
    has = flat[len(flat) - 1 - len(params) : -1].tolist()
    off = 0
    for p, h in zip(params, has):
        n = p.numel()
        if h > 0:
            g = (flat[off : off + n] * scale).view_as(p).to(device=p.device, dtype=p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        off += n
    return float(weight) * scale if total > 0 else 1.0 / world()


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (parameters, buffers) in place with rank ``src``'s values, after checking that every
    rank holds the same shapes (a rank that localised or patched differently would otherwise hang a collective)."""
    if not active():
        return
    tensors = list(tensors)
    check_same([tuple(t.shape) for t in tensors], "trainable tensor shapes")
    for t in tensors:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            buf = t.detach().to(_comm_device())
            dist.broadcast(buf, src)
            with torch.no_grad():
                t.copy_(buf.to(t.device))
        else:
            with torch.no_grad():
                dist.broadcast(t.data, src)


def average_(tensors: Iterable[torch.Tensor]) -> None:
    """In place: the mean over ranks of each floating tensor (BatchNorm running statistics in train mode)."""
    if not active():
        return
    for t in tensors:
        if t.is_floating_point():
            buf = t.detach().to(_comm_device()) if dist.get_backend() == "nccl" else t.data
            dist.all_reduce(buf)
            with torch.no_grad():
                t.copy_(buf.to(t.device) / world())


def check_same(value: Any, what: str) -> None:
    """Raise when ``value`` differs between ranks (compared by a digest of its repr)."""
    if not active():
        return
    mine = hashlib.sha1(repr(value).encode()).hexdigest()  # not hash(): string hashes differ between processes
    got: list[Any] = [None] * world()
    dist.all_gather_object(got, mine)
    if len(set(got)) > 1:
        raise RuntimeError(f"torch.distributed: the ranks disagree on {what}; they must run identical work")


def agree(value: float | None) -> float | None:
    """Rank 0's ``value`` on every rank (None stays None): a decision taken from a score must not differ."""
    if not active():
        return value
    t = torch.tensor([0.0 if value is None else float(value), 1.0 if value is None else 0.0], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, 0)
    return None if t[1] > 0 else float(t[0])


def all_sum(*values: float) -> list[float]:
    """The sums over ranks of a few numbers (an epoch's loss total)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def count(samples: int, steps: int = 0, loops: int = 0) -> None:
    """Record training work done on this rank (reported by :func:`summary`)."""
    if _session is not None:
        _session.samples += int(samples)
        _session.steps += int(steps)
        _session.loops += int(loops)


def summary() -> dict[str, Any]:
    """What the report records about the run's processes (a collective: every rank calls it). One process:
    ``{"world_size": 1}``."""
    if not active() or _session is None:
        return {"world_size": 1}
    got: list[Any] = [None] * world()
    dist.all_gather_object(got, (_session.samples, _session.steps))
    return {"world_size": world(), "backend": _session.backend, "device_rank0": _session.device,
            "train_samples_per_rank": [g[0] for g in got], "train_steps": got[0][1], "train_loops": _session.loops,
            "sharded": "training batches (contiguous slice per rank, gradients all-reduced weighted by samples)",
            "redundant": "scoring, checkpoint choice (rank 0's score decides), calibration, assessment",
            "rank0_only": "export, validation, evaluation, report, model file"}

