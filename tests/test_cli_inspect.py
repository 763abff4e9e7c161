"""``onnxrepair inspect``: interface, histogram, readiness and repair sites on the fixtures."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURE_NAMES, fixture_path

from onnxrepair.cli import main


def _inspect(name, capsys):
    assert main(["inspect", str(fixture_path(name)), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_inspect_every_fixture(name, capsys):
    info = _inspect(name, capsys)
    assert info["conversion"]["ready"], info["conversion"]
    assert info["inputs"] and info["outputs"] and info["op_histogram"]
    assert info["parameters"] > 0
    assert info["repair_sites"]["conv"] or info["repair_sites"]["dense"]


def test_inspect_resnet_sites(capsys):
    info = _inspect("torch_resnet_bn_legacy17", capsys)
    sites = info["repair_sites"]
    assert [c["filters"] for c in sites["conv"]] == [8, 8, 8, 16]
    assert all(c["groups"] == 1 for c in sites["conv"])
    assert [(d["in_features"], d["out_features"]) for d in sites["dense"]] == [(16, 10)]
    assert len(sites["residual_blocks"]) == 1 and sites["residual_blocks"][0]["body_convs"] == 2
    assert info["op_histogram"]["BatchNormalization"] == 3
    assert info["inputs"][0] == {"name": "input", "dtype": "FLOAT", "shape": ["batch", 1, 28, 28]}
    assert info["parameters"] == 2610 + 3 * 2 * 8 + 0  # weights + BN running stats (kept BN)


def test_inspect_keras_and_sklearn(capsys):
    k = _inspect("keras_cnn_nhwc_tf2onnx", capsys)
    assert k["inputs"][0]["shape"][1:] == [28, 28, 1]
    assert [(d["in_features"], d["out_features"]) for d in k["repair_sites"]["dense"]] == [(784, 32), (32, 10)]
    assert not k["repair_sites"]["residual_blocks"]
    s = _inspect("sklearn_mlp_zipmap", capsys)
    assert s["conversion"]["onnx_tail"] and "ZipMap" in s["conversion"]["onnx_tail"]
    assert "ai.onnx.ml::ZipMap" in s["op_histogram"]


def test_inspect_table_output(capsys):
    assert main(["inspect", str(fixture_path("torch_resnet_dynamo18"))]) == 0
    out = capsys.readouterr().out
    assert "repair sites" in out and "residual" in out and "conversion: ready" in out


def _resize_half_pixel_nearest(tmp_path):
    """Every op has a converter (Resize-18), but this node's nearest mode is one torch cannot reproduce."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["p"], mode="nearest", coordinate_transformation_mode="half_pixel",
                              nearest_mode="round_prefer_floor", name="up_halfpixel"),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], name="dense")]
    inits = [numpy_helper.from_array(np.ones((16, 4), np.float32), "w"), numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]
    g = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    p = tmp_path / "resize_half_pixel.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(p))
    return p


def test_readiness_is_a_trial_conversion(tmp_path, capsys):
    """Issue 13 item 5: 'ready' used to mean 'every op has a converter'; a node the converter refuses made
    inspect say ready and roundtrip fail."""
    p = _resize_half_pixel_nearest(tmp_path)
    assert main(["inspect", str(p), "--json"]) == 0
    conv = json.loads(capsys.readouterr().out)["conversion"]
    assert conv["checked"] == "trial conversion" and not conv["ready"]
    assert "Resize-18" in conv["error"] and "'up_halfpixel'" in conv["error"]
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "conversion: fails" in out and "up_halfpixel" in out and "conversion: ready" not in out
    assert main(["inspect", str(p), "--json", "--ops-only"]) == 0
    conv = json.loads(capsys.readouterr().out)["conversion"]
    assert conv["ready"] and conv["checked"].startswith("op-level only")


def test_readiness_reports_passes(capsys):
    info = _inspect("torch_cnn_autopad_legacy11", capsys)
    assert info["conversion"]["ready"] and "explicit_auto_pad" in info["conversion"]["passes"]
    info = _inspect("torch_cnn_unsorted_legacy13", capsys)
    assert info["sorted_nodes"] > 0 and "topological_sort" in info["conversion"]["passes"]
    assert info["output_source_op"] == "Gemm" and info["inputs"][0]["shape"][0] == "N"
