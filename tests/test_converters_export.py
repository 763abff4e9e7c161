"""Drop-in export (issue 13 items 1 and 10): the source opset kept where an exporter writes it, ``opset=`` to
choose, dimension names kept, a fixed batch kept fixed, the graph simplified with node counts reported."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import fixture_path

from converters import convert, export_like, read
from converters.errors import ConverterUsageError
from converters.export import plan_export
from onnxrepair.cli import main

_C: dict = {}


def _conv(name):
    if name not in _C:
        _C[name] = convert(read(fixture_path(name)))
    return _C[name]


def _dim0(model, i=0, out=False):
    v = (model.graph.output if out else model.graph.input)[i]
    d = v.type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") else d.dim_param


def test_auto_keeps_the_source_opset():
    """An opset-11 model re-exported under ``auto`` stays at 11 (it used to become 18)."""
    res = export_like(_conv("torch_lenet_legacy11"))
    assert res.opset == 11 and res.exporter == "legacy"
    assert not any("opset" in n for n in res.notes)
    res = export_like(_conv("torch_lenet_dynamo20"))  # 20: both exporters write it; dynamo first
    assert res.opset == 20


def test_opset_keyword_and_refusals():
    res = export_like(_conv("torch_lenet_legacy11"), opset=13)
    assert res.opset == 13 and any("asked for" in n for n in res.notes)
    with pytest.raises(ConverterUsageError, match="opset 12 cannot be written by the dynamo exporter"):
        export_like(_conv("torch_lenet_legacy11"), exporter="dynamo", opset=12)
    with pytest.raises(ConverterUsageError, match="legacy: 7..20"):
        plan_export("legacy", 21, 21)
    assert plan_export("auto", None, 11) == [("legacy", 11), ("dynamo", 18)]
    assert plan_export("auto", None, 18)[0] == ("dynamo", 18)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name, batch", [("torch_cnn_autopad_legacy11", "batch_size"), ("torch_cnn_unsorted_legacy13", "N"),
                                          ("torch_cnn_batch1_legacy13", 1)])
def test_dimension_names_and_fixed_batch_kept(name, batch, exporter):
    res = export_like(_conv(name), exporter=exporter)
    assert _dim0(res.model) == batch and _dim0(res.model, out=True) == batch
    names = {d.dim_param for v in res.model.graph.value_info for d in v.type.tensor_type.shape.dim if d.dim_param}
    assert "batch" not in names or batch == "batch"


def test_fixed_batch_roundtrip_cli(tmp_path, capsys):
    """Issue 13 item 1: a model exported with batch 1 round-trips, and its re-export keeps batch 1."""
    out = tmp_path / "b1.onnx"
    assert main(["roundtrip", str(fixture_path("torch_cnn_batch1_legacy13")), "-o", str(out), "--provider", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["validation"]["passed"]
    m = onnx.load(str(out))
    assert _dim0(m) == 1 and _dim0(m, out=True) == 1
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):  # batch 1 is part of the contract: batch 2 is refused, as by the original
        sess.run(None, {"input": np.zeros((2, 1, 28, 28), np.float32)})


def test_simplification_reports_and_removes_nodes():
    """The legacy exporter writes the asymmetric SAME padding as shape arithmetic; the optimizer folds it."""
    conv = _conv("torch_cnn_autopad_legacy11")
    raw = export_like(conv, exporter="legacy", optimize=False)
    simple = export_like(conv, exporter="legacy")
    assert raw.nodes_simplified == raw.nodes_exported and raw.simplified_with is None
    assert simple.nodes_exported == raw.nodes_exported
    assert simple.nodes_simplified < simple.nodes_exported and simple.simplified_with.startswith("onnxscript")
    assert simple.nodes == {"exported": simple.nodes_exported, "simplified": len(simple.model.graph.node)}
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    a = ort.InferenceSession(raw.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(simple.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_roundtrip_cli_opset_and_report(tmp_path, capsys):
    src = fixture_path("torch_lenet_legacy11")
    out = tmp_path / "o.onnx"
    assert main(["roundtrip", str(src), "-o", str(out), "--provider", "cpu", "--json", "--opset", "13"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["opset"] == 13 and doc["source_opset"] == 11
    assert doc["nodes"]["original"] == len(onnx.load(str(src)).graph.node)
    assert doc["nodes"]["simplified"] == len(onnx.load(str(out)).graph.node)
    assert main(["roundtrip", str(src), "-o", str(tmp_path / "p.onnx"), "--opset", "12", "--exporter", "dynamo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "opset 12" in err and not (tmp_path / "p.onnx").exists()


def test_roundtrip_cli_reports_sorting_and_passes(tmp_path, capsys):
    assert main(["roundtrip", str(fixture_path("torch_cnn_unsorted_legacy13")), "-o", str(tmp_path / "o.onnx"), "--provider", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "topological_sort" in out and "not in topological order" in out and "nodes: original" in out


def test_repaired_module_export_keeps_interface():
    """What repair does: an edited module exported like the original keeps names, batch name and opset."""
    conv = _conv("torch_cnn_unsorted_legacy13")
    edited = torch.fx.GraphModule(conv.gm, conv.gm.graph)
    with torch.no_grad():
        next(m for m in edited.modules() if isinstance(m, torch.nn.Conv2d)).weight.mul_(1.1)
    res = export_like(conv, edited)
    assert res.opset == 13 and _dim0(res.model) == "N"
    assert [i.name for i in res.model.graph.input] == ["input"] and [o.name for o in res.model.graph.output] == ["logits"]
