"""What this machine offers for repair, proven by running something on each device and provider rather than
by listing what is installed: onnxruntime-gpu lists the CUDA provider on machines where it cannot load, and
``torch.cuda.is_available()`` can be true where a kernel then fails.

:func:`environment` is the short record every report carries (device, provider really used, versions);
:func:`diagnose` is ``onnxrepair doctor``.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Check:
    name: str  # "torch:cpu", "torch:cuda", "onnxruntime:CPUExecutionProvider", ...
    ok: bool
    detail: str
    seconds: float = 0.0


@dataclass
class Diagnosis:
    checks: list[Check] = field(default_factory=list)
    versions: dict[str, Any] = field(default_factory=dict)

    def ok(self, name: str) -> bool:
        return any(c.ok for c in self.checks if c.name == name)

    @property
    def cuda(self) -> bool:
        """Both sides work on the GPU: torch ran a kernel and an onnxruntime session ran on CUDA."""
        return self.ok("torch:cuda") and self.ok("onnxruntime:CUDAExecutionProvider")

    def to_dict(self) -> dict[str, Any]:
        return {"checks": [asdict(c) for c in self.checks], "versions": self.versions, "cuda": self.cuda}


def versions() -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                           "onnxruntime": ort.__version__, "torch_cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "ort_providers_listed": ort.get_available_providers()}
    return out


def _tiny_model() -> bytes:
    """y = relu(x @ W + b): small enough to build in memory, real enough to need a kernel on each provider."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]), helper.make_node("Relu", ["z"], ["y"])],
        "doctor", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def check_torch(device: str) -> Check:
    import torch

    t = time.perf_counter()
    try:
        if device.startswith("cuda") and not torch.cuda.is_available():
            return Check(f"torch:{device}", False, "torch.cuda.is_available() is False")
        a = torch.randn(64, 64, device=device)
        v = float((a @ a).sum())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            name = torch.cuda.get_device_name(torch.device(device))
            return Check(f"torch:{device}", np.isfinite(v), f"matmul ran on {name}", time.perf_counter() - t)
        return Check(f"torch:{device}", np.isfinite(v), "matmul ran", time.perf_counter() - t)
    except Exception as e:  # a driver or kernel failure is the finding, not a crash
        return Check(f"torch:{device}", False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", time.perf_counter() - t)


def check_ort(provider: str) -> Check:
    import onnxruntime as ort

    t = time.perf_counter()
    name = f"onnxruntime:{provider}"
    if provider not in ort.get_available_providers():
        return Check(name, False, "not in this onnxruntime build")
    if provider == "CUDAExecutionProvider":
        from .runtime import cuda_usable

        if not cuda_usable():  # trying would only print onnxruntime's load errors and fall back
            return Check(name, False, "listed by this build, but the NVIDIA driver library (libcuda.so.1) is not on this machine")
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # a failed CUDA load is reported here, not printed
        sess = ort.InferenceSession(_tiny_model(), opts, providers=[provider])
        used = sess.get_providers()
        x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
        y = sess.run(None, {"x": x})[0]
        if not used or used[0] != provider:
            return Check(name, False, f"session fell back to {used[0] if used else 'nothing'}", time.perf_counter() - t)
        return Check(name, bool(np.isfinite(y).all()), f"session ran on {used[0]}", time.perf_counter() - t)
    except Exception as e:
        return Check(name, False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", time.perf_counter() - t)


def diagnose() -> Diagnosis:
    d = Diagnosis(versions=versions())
    d.checks.append(check_torch("cpu"))
    d.checks.append(check_torch("cuda"))
    for p in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        d.checks.append(check_ort(p))
    return d


def environment(device: Any = None, provider: str | None = None) -> dict[str, Any]:
    """What a report records: the torch device used, the onnxruntime provider that really ran, the GPU, versions."""
    import torch

    v = versions()
    gpu = None
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"device": str(device) if device is not None else None, "provider_used": provider, "gpu": gpu,
            "torch": v["torch"], "onnxruntime": v["onnxruntime"], "cuda": v["torch_cuda"], "cudnn": v["cudnn"]}
