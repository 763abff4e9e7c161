"""Models whose batch dimension is fixed (mobile/edge exports declaring [1, ...]) are fed in chunks of their
batch everywhere: evaluation of several models in one run, latency, the fidelity validation and repair."""

from __future__ import annotations

import json

import numpy as np
import onnx
from conftest import FIXTURES, fixture_path

from onnxrepair.cli import main
from onnxrepair.runtime import example_batch, latency_comparison, make_session
from onnxrepair.validate import validate

FIXED = fixture_path("torch_lenet_fixedbatch_legacy11")
DYNAMIC = fixture_path("torch_lenet_legacy11")
MNIST = FIXTURES / "data" / "mnist_small.npz"


def test_fixture_declares_batch_one():
    dims = onnx.load(str(FIXED)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 1, 28, 28]


def test_session_knows_and_chunks_the_fixed_batch():
    fixed, dyn = make_session(FIXED, "cpu"), make_session(DYNAMIC, "cpu")
    assert fixed.fixed_batch == 1 and dyn.fixed_batch is None
    x = np.random.default_rng(0).random((37, 1, 28, 28), dtype=np.float32)
    a = fixed.run({"input": x})[0]
    b = dyn.run({"input": x})[0]
    assert a.shape == (37, 10)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert example_batch((1, 1, 28, 28)) == 1 and example_batch(("batch", 1, 28, 28)) == 2


def test_padding_of_a_last_partial_chunk(tmp_path):
    """A batch fixed at 4 fed 10 rows: chunks 4, 4, 2 (+2 padded rows dropped again)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])
    m = helper.make_model(helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / "neg4.onnx"
    onnx.save(m, str(p))
    s = make_session(p, "cpu")
    assert s.fixed_batch == 4
    v = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.testing.assert_array_equal(s.run({"x": v})[0], -v)


def test_evaluate_compares_fixed_and_dynamic_models_in_one_run(tmp_path, capsys):
    """Seen: 'internal error: InvalidArgument ... Got: 256 Expected: 1' (exit 4)."""
    rep = tmp_path / "r.json"
    rc = main(["evaluate", str(DYNAMIC), str(FIXED), "--data", str(MNIST), "--limit", "300", "--corruptions", "fog",
               "--severities", "1", "-q", "--provider", "cpu", "--report", str(rep)])
    err = capsys.readouterr().err
    assert rc == 0, err
    d = json.loads(rep.read_text())
    a, b = d["models"]
    assert a["clean"] == b["clean"] and a["clean"] > 0.8  # the same weights read the same way
    assert a["corruptions"] == b["corruptions"]
    assert any("fixed at 1" in n for n in d["notes"])


def test_latency_says_how_a_fixed_batch_was_timed():
    x = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
    lat = latency_comparison(DYNAMIC, FIXED, x, "cpu")
    assert set(lat["ratio"]) == {"batch1", "batch64"}
    assert lat["notes"] == ["repaired: batch fixed at 1, so batch64 is 64 row(s) in 64 run(s) of batch 1"]


def test_validation_of_a_fixed_batch_reference_at_a_larger_batch():
    r = validate(FIXED, str(DYNAMIC), batches=(1, 7), provider="cpu")
    assert r.passed, r.reason
    assert {c.batch for c in r.comparisons} == {1, 7}
    assert all(c.shape[0] == c.batch for c in r.comparisons)


def test_repair_of_a_fixed_batch_model_keeps_the_batch(tmp_path, capsys, one_torch_thread):
    out, rep = tmp_path / "r.onnx", tmp_path / "r.json"
    rc = main(["repair", str(FIXED), "--method", "finetune", "--data", str(MNIST), "-o", str(out), "--report", str(rep),
               "-q", "--provider", "cpu", "--device", "cpu", "--limit", "400", "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    d = json.loads(rep.read_text())
    assert d["fidelity"]["passed"] and d["fidelity"]["batches"] == [1, 64]
    assert "64 run(s) of batch 1" in " ".join(d["latency_ms"]["notes"])
