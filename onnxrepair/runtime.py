"""onnxruntime sessions with an explicit provider choice, and batched inference.

CUDA falls back to CPU silently in onnxruntime, so every session records the providers that
really loaded (``session.get_providers()``) and callers report that, not what was asked for.

Reading a classifier's first output as classes (:func:`output_reading`, :func:`labels_from_output`):
integer labels as they are, several columns by argmax, one column as P(class 1) > 0.5 when the graph
computes it with a Sigmoid, else as a logit > 0. Decided from the graph once per model, so every batch
of one model is read the same way; only a session made without a file or bytes falls back to values.

Fixed batch (exports for mobile/edge runtimes often declare an input ``[1, 3, 224, 224]``): a session knows its
fixed batch (:attr:`Session.fixed_batch`, from the first input's declared shape) and :meth:`Session.run` feeds any
number of rows in chunks of it (the last chunk padded with copies of its last row, the padding dropped from the
outputs), so every caller can hand it the batch it likes.

I/O binding (:meth:`Session.run` with torch tensors as feeds): the tensors are bound where they lie — on a CUDA
session, CUDA tensors are read in place, with no copy to the host and back — and the outputs are bound on the
session's device, then copied to the host (a classifier's outputs are small). :attr:`Session.binds` says whether
callers should hand it device tensors: by default only when the CUDA provider really loaded and every output is a
tensor (sequences and maps, e.g. ZipMap, cannot be bound). On the CPU provider binding also works (tests compare it
with plain runs); there it saves nothing, so callers keep feeding numpy.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from .errors import ModelError, UsageError, ValidationFailed

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

ORT_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}


@dataclass
class Session:
    """An onnxruntime session plus what it really runs on."""

    sess: ort.InferenceSession
    provider: str  # "cuda" or "cpu": the first provider that actually loaded
    source: str | bytes | None = None  # the file path or model bytes it was made from, for readers of the graph
    reading: str | None = None  # how the first output gives classes: set by the first ``classes`` call
    bind: bool | None = None  # feed torch tensors through I/O binding; None: when CUDA really runs (see ``binds``)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.sess.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.sess.get_outputs()]

    @functools.cached_property
    def fixed_batch(self) -> int | None:
        """The batch size the model's inputs declare (an integer first dimension), or None when it is dynamic."""
        return declared_batch(self.sess.get_inputs())

    @functools.cached_property
    def bindable(self) -> bool:
        """Every output is a tensor, so all of them can be bound (I/O binding holds no sequences or maps)."""
        return all(o.type.startswith("tensor(") for o in self.sess.get_outputs())

    @functools.cached_property
    def device_id(self) -> int:
        """The GPU the CUDA provider runs on (0 unless the session was made with another ``device_id``)."""
        return int(self.sess.get_provider_options().get("CUDAExecutionProvider", {}).get("device_id", 0))

    @property
    def binds(self) -> bool:
        """Whether callers should feed torch tensors on their device (bound by :meth:`run`) instead of numpy."""
        return self.bindable and (self.provider == "cuda" if self.bind is None else self.bind)

    def run(self, feeds: dict, outputs: Sequence[str] | None = None) -> list:
        """Run ``feeds`` (numpy arrays, or torch tensors: I/O binding, see the module docstring); a model with a
        fixed batch gets them in chunks of that batch. Returns numpy outputs either way."""
        if feeds and _is_torch(next(iter(feeds.values()))):
            if not self.bindable:
                return self.run({k: v.detach().cpu().numpy() for k, v in feeds.items()}, outputs)
            return self._run_rows(feeds, outputs, self._run_bound)
        return self._run_rows(feeds, outputs, lambda f, names: self.sess.run(names, f))

    def _run_rows(self, feeds: dict, outputs: Sequence[str] | None, run_once) -> list:
        names = list(outputs) if outputs else None
        fb = self.fixed_batch
        n = len(next(iter(feeds.values()))) if feeds else 0
        if fb is None or n == fb or not feeds:
            return run_once(feeds, names)
        parts = []
        for lo in range(0, n, fb):
            hi = min(n, lo + fb)
            chunk = {k: _pad_rows(v[lo:hi], fb) for k, v in feeds.items()}
            parts.append([_take_rows(o, hi - lo) for o in run_once(chunk, names)])
        return [_concat_rows([p[i] for p in parts]) for i in range(len(parts[0]))] if parts else run_once(feeds, names)

    def _run_bound(self, feeds: dict, names: list[str] | None) -> list[np.ndarray]:
        """One run with I/O binding: torch inputs bound in place (cast to the input's dtype, made contiguous),
        outputs allocated by onnxruntime on the session's device and copied to the host."""
        import torch

        binding = self.sess.io_binding()
        keep = []  # the bound tensors must outlive the run
        types = {i.name: ORT_TO_NP.get(i.type, np.float32) for i in self.sess.get_inputs()}
        device_id = self.device_id
        for name, t in feeds.items():
            np_dtype = np.dtype(types.get(name, np.float32))
            t = t.detach().to(torch_dtype(np_dtype)).contiguous()
            keep.append(t)
            if t.is_cuda:
                torch.cuda.current_stream(t.device).synchronize()  # onnxruntime runs on its own stream: the data must be ready
            binding.bind_input(name, "cuda" if t.is_cuda else "cpu", t.device.index or 0, np_dtype.type, tuple(t.shape), t.data_ptr())
        for name in names or self.output_names:
            binding.bind_output(name, "cuda" if self.provider == "cuda" else "cpu", device_id)
        self.sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def classes(self, out: np.ndarray) -> np.ndarray:
        """Predicted classes from this session's first output ``out``, read as :func:`output_reading`
        says (the graph; the values of this first ``out`` when there is no graph), fixed on first use."""
        out = np.asarray(out)
        if self.reading is None:
            self.reading = output_reading(self) or reading_from_values(out)
        return labels_from_output(out, self.reading)

    def run_batched(self, x: np.ndarray, batch_size: int = 256, output: int | str = 0) -> np.ndarray:
        """Run a single-input model over ``x`` in batches and return one output, concatenated."""
        name_in = self.input_names[0]
        out_name = output if isinstance(output, str) else self.output_names[output]
        dtype = ORT_TO_NP.get(self.sess.get_inputs()[0].type, np.float32)
        parts = []
        for i in range(0, len(x), batch_size):
            xb = np.ascontiguousarray(x[i : i + batch_size], dtype=dtype)
            parts.append(self.run({name_in: xb}, [out_name])[0])
        return np.concatenate(parts, axis=0) if parts else np.empty((0,))


def declared_batch(inputs) -> int | None:
    """The fixed batch that onnxruntime input specs declare (all inputs with a rank agree on an integer first
    dimension), else None."""
    dims = {i.shape[0] for i in inputs if len(i.shape) >= 1}
    if len(dims) == 1:
        (d,) = dims
        if isinstance(d, int) and d > 0:
            return d
    return None


def example_batch(shape: Sequence, default: int = 2) -> int:
    """Rows for an export example: a model's fixed batch (a declared integer first dimension), else ``default``
    (more than one row, so no batch size of 1 is frozen into the trace)."""
    d = shape[0] if len(shape) else None
    return d if isinstance(d, int) and d > 0 else default


def _is_torch(v) -> bool:
    return type(v).__module__.startswith("torch") and hasattr(v, "data_ptr")


def torch_dtype(np_dtype) -> "torch.dtype":  # noqa: F821 - torch is imported on first use
    """The torch dtype of a numpy dtype (float32, float16, int64, uint8, bool, ...), for device feeds of a model input."""
    import torch

    return getattr(torch, np.dtype(np_dtype).name)


def _pad_rows(v, batch: int):
    if _is_torch(v):
        import torch

        if len(v) >= batch or len(v) == 0:
            return v
        return torch.cat([v, v[-1:].expand(batch - len(v), *v.shape[1:])], dim=0)
    v = np.ascontiguousarray(v)
    if len(v) >= batch or len(v) == 0:
        return v
    return np.concatenate([v, np.repeat(v[-1:], batch - len(v), axis=0)], axis=0)


def _take_rows(o, n: int):
    return o[:n] if isinstance(o, (np.ndarray, list)) else o


def _concat_rows(parts: list):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=0) if parts[0].ndim else parts[0]
    if isinstance(parts[0], list):  # sequences (ZipMap): one entry per row
        return [e for p in parts for e in p]
    return parts[0]


def _rows(example: np.ndarray, b: int, dtype) -> np.ndarray:
    """A contiguous batch of ``b`` rows of ``example`` (its first row repeated when it has fewer)."""
    xb = np.repeat(example[:1], b, axis=0) if len(example) < b else example[:b]
    return np.ascontiguousarray(xb, dtype=dtype)


def measure_latency(model: str | os.PathLike, example: np.ndarray, provider: str = "auto", batches: Sequence[int] = (1, 64),
                    repeats: int = 20, label: str | None = None) -> tuple[dict[str, float], list[str]]:
    """Median milliseconds per call at each of ``batches`` (rows of ``example``, repeated when short), and notes.
    A model with a fixed batch gets each batch in runs of its batch (64 rows = 64 runs of batch 1): the time is for
    the rows, so the figures of a fixed and a dynamic model compare the same work; the note says so."""
    sess = make_session(model, provider)
    name = sess.input_names[0]
    dtype = ORT_TO_NP.get(sess.sess.get_inputs()[0].type, np.float32)
    out: dict[str, float] = {}
    notes: list[str] = []
    for b in batches:
        xb = _rows(example, b, dtype)
        for _ in range(3):
            sess.run({name: xb})
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            sess.run({name: xb})
            times.append(time.perf_counter() - t)
        out[f"batch{b}"] = float(np.median(times) * 1e3)
        fb = sess.fixed_batch
        if fb is not None and b != fb:
            runs = -(-b // fb)
            notes.append(f"{label or Path(str(model)).name}: batch fixed at {fb}, so batch{b} is {b} row(s) in {runs} run(s) of batch {fb}"
                         + (" (padded)" if b % fb else ""))
    return out, notes


def latency_comparison(original: str | os.PathLike, repaired: str | os.PathLike, example: np.ndarray, provider: str = "auto") -> dict:
    """``{"original": {...}, "repaired": {...}, "ratio": {...}, "notes": [...]}`` of :func:`measure_latency` (the
    repair report's ``latency_ms``)."""
    a, na = measure_latency(original, example, provider, label="original")
    b, nb = measure_latency(repaired, example, provider, label="repaired")
    return {"original": a, "repaired": b, "ratio": {k: b[k] / a[k] for k in a}, "notes": na + nb}


def interleaved_ratio(original: str | os.PathLike, repaired: str | os.PathLike, example: np.ndarray, batches: Sequence[int] = (1, 64),
                      threads: int = 1, budget_s: float = 3.0) -> dict[str, float]:
    """Repaired/original time per call at each of ``batches``, CPU, ``threads`` intra-op threads: the two sessions
    run A B B A (on shared cores the load swings 2x between seconds; calls microseconds apart see the same load) and
    the ratio of each side's 20th-percentile call time is reported. Batch 1 cycles through up to 32 rows of ``example``.
    At most ~``budget_s`` seconds per batch size, at least 15 rounds."""
    sa, sb = make_session(original, "cpu", threads=threads), make_session(repaired, "cpu", threads=threads)
    na, nb = sa.input_names[0], sb.input_names[0]
    dtype = ORT_TO_NP.get(sa.sess.get_inputs()[0].type, np.float32)
    out: dict[str, float] = {}
    for b in batches:
        if b == 1:
            feeds = [np.ascontiguousarray(example[i : i + 1], dtype=dtype) for i in range(min(32, len(example)))]
        else:
            feeds = [_rows(example, b, dtype)]
        for f in feeds[:3]:
            sa.run({na: f}), sb.run({nb: f})
        ta, tb, t_start, i = [], [], time.perf_counter(), 0
        while i < 15 or (time.perf_counter() - t_start < budget_s and i < 400):
            f = feeds[i % len(feeds)]
            t0 = time.perf_counter(); sa.run({na: f}); t1 = time.perf_counter()
            sb.run({nb: f}); t2 = time.perf_counter()
            sb.run({nb: f}); t3 = time.perf_counter()
            sa.run({na: f}); t4 = time.perf_counter()
            ta += [t1 - t0, t4 - t3]
            tb += [t2 - t1, t3 - t2]
            i += 1
        # each side's 20th percentile: on oversubscribed cores the longer calls are preempted more often, which
        # pulls a median of per-round ratios up (bench/deeppatch_latency.py measured 14-30x for a 2.7x file)
        out[f"batch{b}"] = float(np.percentile(tb, 20) / np.percentile(ta, 20))
    return out


def output_reading(session: Session) -> str | None:
    """How the first output gives a class: ``label`` (an integer output: the classes themselves),
    ``scores`` (several columns: argmax), ``probability`` (one column out of a Sigmoid, through
    reshapes), ``logit`` (one column from anything else); ``None`` when a single column's origin
    cannot be read because the session was not made from a file or bytes."""
    out = session.sess.get_outputs()[0]
    if "int" in out.type:
        return "label"
    last = out.shape[-1] if len(out.shape) >= 2 else 1
    if not isinstance(last, int):
        return None  # symbolic class dimension: only the values can tell
    if last > 1:
        return "scores"
    if session.source is None:
        return None
    import onnx

    from converters.load import output_source_op

    src = session.source
    model = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(src, load_external_data=False)
    return "probability" if output_source_op(model) == "Sigmoid" else "logit"


def reading_from_values(out: np.ndarray) -> str:
    """The fallback of :func:`output_reading`: judge by the values (one column in [0, 1] = probability)."""
    if np.issubdtype(out.dtype, np.integer):
        return "label"
    out = out.reshape(len(out), -1)
    if out.shape[1] > 1:
        return "scores"
    return "probability" if out.size and out.min() >= 0 and out.max() <= 1 else "logit"


def labels_from_output(out: np.ndarray, reading: str) -> np.ndarray:
    if reading == "label":
        return out.reshape(len(out)).astype(np.int64)
    out = out.reshape(len(out), -1)
    if reading == "scores":
        return out.argmax(axis=1).astype(np.int64)
    return (out[:, 0] > (0.5 if reading == "probability" else 0.0)).astype(np.int64)


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """onnxruntime-gpu *lists* CUDA even on machines without a GPU or driver; "auto" must not pick it
    there (it would fall back, but only after printing errors). A usable CUDA needs the driver library.
    Cached: ``find_library`` runs ``ldconfig`` (~0.2 s), which would otherwise be paid by every session."""
    if "CUDAExecutionProvider" not in available_providers():
        return False
    import ctypes.util

    return ctypes.util.find_library("cuda") is not None or os.path.exists("/usr/lib/x86_64-linux-gnu/libcuda.so.1")


def make_session(
    model: str | os.PathLike | bytes,
    provider: str = "auto",
    *,
    optimize: bool = True,
    require: str | None = None,
    threads: int | None = None,
) -> Session:
    """Create a session on ``provider`` ("auto" = CUDA where present, else CPU; "cpu"; "cuda").

    ``optimize=False`` turns graph optimisations off, for reference runs. ``require="cuda"`` raises
    :class:`ValidationFailed` if CUDA was asked for but did not really load.
    """
    provider = provider.lower()
    if provider not in ("auto", *PROVIDERS):
        raise UsageError(f"unknown provider {provider!r}; choose auto, cpu or cuda")
    avail = available_providers()
    if provider == "cpu":
        wanted = ["CPUExecutionProvider"]
    elif provider == "cuda" or (provider == "auto" and cuda_usable()):
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        wanted = ["CPUExecutionProvider"]
    ort.set_default_logger_severity(3)  # (converters/roundtrip) a listed-but-unloadable CUDA provider logs at the default logger
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # CUDA-missing warnings are reported by us, not printed by ORT
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    src = model if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(src, sess_options=opts, providers=[p for p in wanted if p in avail] or ["CPUExecutionProvider"])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"onnxruntime cannot load the model: {first}") from e
    used = sess.get_providers()
    real = "cuda" if used and used[0] == "CUDAExecutionProvider" else "cpu"
    if (require or "").lower() == "cuda" and real != "cuda":
        raise ValidationFailed(f"CUDA was required but onnxruntime ran on {used[0] if used else 'nothing'} (available: {', '.join(avail)})")
    return Session(sess=sess, provider=real, source=src)
