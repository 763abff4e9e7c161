"""converters stands alone and reads a model once: its own errors, the interface in one object, unsorted graphs
sorted (and said so), checker refusals as one complete line, external data found or named."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import ROOT, fixture_path
from onnx import TensorProto, helper, numpy_helper

from converters import read
from converters.errors import ConverterError, ConverterUsageError, ModelError
from onnxrepair.cli import main


def test_converters_imports_nothing_from_onnxrepair():
    """Import every converters module in a fresh interpreter: no onnxrepair module may load."""
    code = (
        "import importlib, pkgutil, sys, json, converters\n"
        "for m in pkgutil.iter_modules(converters.__path__):\n"
        "    importlib.import_module('converters.' + m.name)\n"
        "from converters import convert, export_like, read\n"
        "print(json.dumps(sorted(k for k in sys.modules if k == 'onnxrepair' or k.startswith('onnxrepair.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_onnxrepair_errors_are_the_converters_errors(tmp_path):
    from onnxrepair import errors

    assert errors.ModelError is ModelError and issubclass(errors.UnsupportedOpsError, ModelError)
    assert ModelError.exit_code == 3 and ConverterUsageError.exit_code == 2
    p = tmp_path / "not.onnx"
    p.write_bytes(b"\xff\xfe not a protobuf at all")
    with pytest.raises(errors.ModelError):  # existing ``except ModelError`` code still catches what converters raises
        read(p)


def test_read_gives_the_whole_interface():
    info = read(fixture_path("keras_adult_sigmoid_tf2onnx"))
    assert [s.name for s in info.inputs] and [s.name for s in info.outputs]
    assert info.inputs[0].dtype_name == "FLOAT" and isinstance(info.inputs[0].shape[0], str)  # symbolic batch, named
    assert info.output_source_op == "Sigmoid"
    assert info.opset == 13 and info.producer.startswith("tf2onnx")
    assert info.external_data == [] and info.sorted_nodes == 0 and info.notes == []
    assert isinstance(info.metadata, dict)
    assert info.model.graph.node  # the proto, for convert(info) without another parse
    fixed = read(fixture_path("torch_cnn_batch1_legacy13"))
    assert fixed.inputs[0].shape == (1, 1, 28, 28)


def test_convert_takes_what_read_returned(monkeypatch):
    """convert(read(path)) must not parse the file again."""
    import converters.load as load
    from converters import convert

    info = read(fixture_path("torch_lenet_legacy11"))
    calls = []
    real = onnx.load
    monkeypatch.setattr(load.onnx, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    conv = convert(info)
    assert conv.loaded is info and calls == []


def test_unsorted_nodes_are_sorted_and_reported(tmp_path):
    info = read(fixture_path("torch_cnn_unsorted_legacy13"))
    assert info.sorted_nodes > 0 and "topological order" in info.notes[0]
    onnx.checker.check_model(info.model)  # sorted in memory
    out = tmp_path / "rt.onnx"
    assert main(["roundtrip", str(fixture_path("torch_cnn_unsorted_legacy13")), "-o", str(out), "--provider", "cpu", "--json"]) == 0


def _broken_after_sorting(tmp_path):
    """Two nodes read a tensor nothing produces: sorting cannot help, the checker must refuse."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Relu", ["h"], ["y"], name="late_relu"), helper.make_node("Add", ["x", "ghost"], ["h"], name="adds_a_ghost")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    p = tmp_path / "broken.onnx"
    onnx.save(m, str(p))
    return p


def test_checker_refusal_is_one_complete_line(tmp_path, capsys):
    p = _broken_after_sorting(tmp_path)
    with pytest.raises(ModelError) as e:
        read(p)
    msg = str(e.value)
    assert "\n" not in msg
    raw = ""
    m = onnx.load(str(p))
    nodes = list(m.graph.node)[::-1]  # the order the sort finds: the checker now trips over 'ghost'
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    try:
        onnx.checker.check_model(m)
    except Exception as c:  # the checker's own text: its sentence runs over several lines
        raw = str(c)
    assert len(raw.strip().splitlines()) > 1
    last_words = " ".join(raw.split())[-40:]
    assert last_words in msg, (last_words, msg)  # the sentence is not cut
    assert main(["inspect", str(p)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and last_words in err


def test_external_data_read_and_missing_named(tmp_path):
    src = onnx.load(str(fixture_path("torch_mlp_tabular_legacy17")))
    p = tmp_path / "ext.onnx"
    onnx.save_model(src, str(p), save_as_external_data=True, location="ext.weights", size_threshold=0)
    info = read(p)
    assert info.external_data == ["ext.weights"]
    assert all(t.data_location != TensorProto.EXTERNAL for t in info.model.graph.initializer)
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(ModelError, match="external data file missing: ext.weights"):
        read(p)


@pytest.mark.parametrize("content, code, words", [
    (None, 2, "no such file"),
    (b"", 3, "empty file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", 3, "Git LFS pointer"),
])
def test_read_errors(tmp_path, content, code, words):
    p = tmp_path / "m.onnx"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ConverterError) as e:
        read(p)
    assert e.value.exit_code == code and words in str(e.value)


def test_truncated_file_is_a_model_error(tmp_path):
    data = fixture_path("torch_lenet_legacy11").read_bytes()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        read(p)


def test_cli_maps_converter_usage_error_to_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err and "Traceback" not in err


def test_atomic_writer_keeps_the_external_data_branch(tmp_path, monkeypatch):
    """Past protobuf's limit the weights go to <name>.data beside the model (the limit lowered to test it)."""
    import converters.io as cio

    monkeypatch.setattr(cio, "PROTOBUF_LIMIT", 1000)
    m = onnx.load(str(fixture_path("torch_mlp_tabular_legacy17")))
    dest = cio.save_model_atomic(m, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists() and dest.exists()
    got = onnx.load(str(dest))
    a = {t.name: numpy_helper.to_array(t) for t in got.graph.initializer}
    fresh = onnx.load(str(fixture_path("torch_mlp_tabular_legacy17")))  # (the saved proto now points at the .data file)
    b = {t.name: numpy_helper.to_array(t) for t in fresh.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_weight_count_includes_subgraphs_and_constants_once():
    from onnx import TensorProto, helper, numpy_helper

    from converters import weight_count

    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")  # 12, in the main graph
    branch_w = numpy_helper.from_array(np.ones(5, np.float32), "bw")  # 5, inside the then-branch
    shared = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")  # the main graph's name again: counted once
    then_g = helper.make_graph([helper.make_node("Identity", ["bw"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [5])], [branch_w, shared])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(np.zeros(7, np.float32)))],
                               "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [7])])  # 7, a Constant
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
                          [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    assert weight_count(helper.make_model(g)) == 12 + 5 + 7
