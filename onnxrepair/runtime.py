"""onnxruntime sessions with an explicit provider choice, and batched inference.

CUDA falls back to CPU silently in onnxruntime, so every session records the providers that
really loaded (``session.get_providers()``) and callers report that, not what was asked for.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
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

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.sess.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> list:
        return self.sess.run(list(outputs) if outputs else None, feeds)

    def run_batched(self, x: np.ndarray, batch_size: int = 256, output: int | str = 0) -> np.ndarray:
        """Run a single-input model over ``x`` in batches and return one output, concatenated."""
        name_in = self.input_names[0]
        out_name = output if isinstance(output, str) else self.output_names[output]
        dtype = ORT_TO_NP.get(self.sess.get_inputs()[0].type, np.float32)
        parts = []
        for i in range(0, len(x), batch_size):
            xb = np.ascontiguousarray(x[i : i + batch_size], dtype=dtype)
            parts.append(self.sess.run([out_name], {name_in: xb})[0])
        return np.concatenate(parts, axis=0) if parts else np.empty((0,))


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
