"""`onnxrepair doctor`: proof by running, not by listing."""

from __future__ import annotations

import json

from onnxrepair import doctor
from onnxrepair.cli import main


def test_cpu_works_and_is_proven_by_a_run(capsys):
    assert main(["doctor", "--json", "--require", "cpu"]) == 0
    d = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in d["checks"]}
    assert checks["torch:cpu"]["ok"] and checks["onnxruntime:CPUExecutionProvider"]["ok"]
    assert "ran" in checks["onnxruntime:CPUExecutionProvider"]["detail"]
    assert d["versions"]["onnxruntime"] and d["versions"]["torch"]


def test_a_listed_provider_that_falls_back_is_not_working(monkeypatch):
    """onnxruntime-gpu lists CUDA where it cannot load; a session that falls back to CPU must count as failed."""
    import onnxruntime as ort

    real = ort.InferenceSession

    class FallsBack(real):  # what onnxruntime does when the CUDA library cannot load
        def __init__(self, model, opts=None, providers=None, **kw):
            super().__init__(model, opts, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "InferenceSession", FallsBack)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("onnxrepair.runtime.cuda_usable", lambda: True)
    c = doctor.check_ort("CUDAExecutionProvider")
    assert not c.ok and "fell back" in c.detail


def test_require_cuda_fails_with_exit_1_where_cuda_does_not_run(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "check_torch", lambda dev: doctor.Check(f"torch:{dev}", dev == "cpu", "stub"))
    monkeypatch.setattr(doctor, "check_ort", lambda p: doctor.Check(f"onnxruntime:{p}", p.startswith("CPU"), "stub"))
    assert main(["doctor", "--require", "cuda"]) == 1
    assert "CUDA required but not working" in capsys.readouterr().err
    monkeypatch.setattr(doctor, "check_torch", lambda dev: doctor.Check(f"torch:{dev}", True, "stub"))
    monkeypatch.setattr(doctor, "check_ort", lambda p: doctor.Check(f"onnxruntime:{p}", True, "stub"))
    assert main(["doctor", "--require", "cuda"]) == 0
