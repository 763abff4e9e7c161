"""The converters added in converters/ops.py, each on a one-node ONNX graph: ORT vs converted torch
vs re-exported ONNX (both exporters)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from converters import convert, export_like
from converters.load import load_model
from converters.to_torch import unsupported_ops


def _model(nodes, inits, in_shape, out_shape, opset, out_type=TensorProto.FLOAT):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("y", out_type, out_shape)
    g = helper.make_graph(nodes, "g", [x], [y], initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10  # what onnxruntime 1.2x reads
    return m


I64 = np.int64
CASES = {
    "ReduceMean18": (lambda: _model([helper.make_node("ReduceMean", ["x", "ax"], ["y"], keepdims=0)], {"ax": np.array([2, 3], I64)},
                                    ["N", 3, 4, 5], ["N", 3], 18)),
    "ReduceSum13_noop": (lambda: _model([helper.make_node("ReduceSum", ["x", "ax"], ["y"], keepdims=1)], {"ax": np.array([-1], I64)},
                                        ["N", 3, 4], ["N", 3, 1], 18)),
    "ReduceMax20_all": (lambda: _model([helper.make_node("ReduceMax", ["x"], ["y"], keepdims=0)], {}, ["N", 3], [], 20)),
    "ReduceL2_18": (lambda: _model([helper.make_node("ReduceL2", ["x", "ax"], ["y"], keepdims=1)], {"ax": np.array([1], I64)},
                                   ["N", 6], ["N", 1], 18)),
    "ReshapeAllowzero": (lambda: _model([helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)], {"s": np.array([-1, 12], I64)},
                                        ["N", 3, 4], ["N", 12], 19)),
    "ReshapeZeroCopy": (lambda: _model([helper.make_node("Reshape", ["x", "s"], ["y"])], {"s": np.array([0, -1], I64)},
                                       ["N", 3, 4], ["N", 12], 14)),
    "ReshapeFrozenBatch": (lambda: _model([helper.make_node("Reshape", ["x", "s"], ["y"])], {"s": np.array([2, 12], I64)},
                                          ["N", 3, 4], ["N", 12], 21)),
    "CastLike": (lambda: _model([helper.make_node("CastLike", ["x", "d"], ["c"]), helper.make_node("Mul", ["c", "c"], ["y"])],
                                {"d": np.array([1.0], np.float64)}, ["N", 5], ["N", 5], 19, TensorProto.DOUBLE)),
    "AveragePool19": (lambda: _model([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], dilations=[1, 1])],
                                     {}, ["N", 2, 6, 6], ["N", 2, 3, 3], 19)),
    "Pad18": (lambda: _model([helper.make_node("Pad", ["x", "p"], ["y"], mode="constant")], {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], I64)},
                             ["N", 2, 3, 3], ["N", 2, 5, 5], 18)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_roundtrip(case, tmp_path):
    m = CASES[case]()
    onnx.checker.check_model(m)
    p = tmp_path / f"{case}.onnx"
    onnx.save(m, str(p))
    assert unsupported_ops(load_model(p).inventory) == []
    conv = convert(p)
    batch = 2 if case == "ReshapeFrozenBatch" else 3
    x = np.random.default_rng(0).random([batch if d == "N" else d for d in m.graph.input[0].type.tensor_type.shape.dim and
                                          [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]], dtype=np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = conv.gm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if ref.ndim == 0:  # a full reduction has no batch dim to keep dynamic
        return
    for exporter in ("dynamo", "legacy"):
        res = export_like(conv, exporter=exporter)
        for b in (1, 5):
            xb = np.random.default_rng(b).random((b, *x.shape[1:]), dtype=np.float32)
            want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xb})[0] \
                if case != "ReshapeFrozenBatch" else xb.reshape(b, -1)
            out = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xb})[0]
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6, err_msg=f"{exporter} batch {b}")


def test_static_reshape_replaces_onnx2torch_reshape():
    from converters.ops import DynamicReshape, StaticReshape

    conv = convert("fixtures/models/torch_lenet_legacy11.onnx")
    mods = [type(m) for m in conv.gm.modules()]
    assert StaticReshape in mods and DynamicReshape not in mods


def test_keras_flatten_shape_arithmetic_is_folded():
    from converters.ops import DynamicReshape, StaticReshape

    conv = convert("fixtures/models/keras_cnn_nhwc_tf2onnx.onnx")
    assert "fold_dynamic_reshapes" in conv.passes
    mods = [type(m).__name__ for m in conv.gm.modules()]
    assert "DynamicReshape" not in mods and "OnnxShape" not in mods and "StaticReshape" in mods
    del DynamicReshape, StaticReshape


def test_dilated_average_pool_is_refused(tmp_path):
    m = _model([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])], {}, ["N", 1, 6, 6], ["N", 1, 4, 4], 19)
    p = tmp_path / "d.onnx"
    onnx.save(m, str(p))
    from onnxrepair.errors import ModelError

    with pytest.raises(ModelError, match="dilations"):
        convert(p)


# ---------------------------------------------------------------- opset 18/19 ops and refusals that name the node

CASES.update({
    "Split18_uneven": (lambda: _model([helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3),
                                       helper.make_node("Concat", ["c", "a"], ["y"], axis=1)], {}, ["N", 7], ["N", 4], 18)),
    "Split18_sizes": (lambda: _model([helper.make_node("Split", ["x", "s"], ["a", "b"], axis=1),
                                      helper.make_node("Sub", ["a", "b"], ["y"])], {"s": np.array([3, 3], I64)}, ["N", 6], ["N", 3], 18)),
    "Resize18_nearest": (lambda: _model([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest", nearest_mode="floor",
                                                          coordinate_transformation_mode="asymmetric")],
                                        {"sc": np.array([1, 1, 2, 2], np.float32)}, ["N", 2, 3, 3], ["N", 2, 6, 6], 18)),
    "Resize19_linear_sizes": (lambda: _model([helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="linear",
                                                               coordinate_transformation_mode="half_pixel")],
                                             {"sz": np.array([1, 2, 5, 7], I64)}, ["N", 2, 3, 4], ["N", 2, 5, 7], 19)),
})


def _save(tmp_path, m, name="m.onnx"):
    p = tmp_path / name
    onnx.save(m, str(p))
    return p


@pytest.mark.parametrize("reduction", ["none", "add", "mul"])
def test_scatter_nd_18(tmp_path, reduction):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])
    node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction=reduction, name="scatter_rows")
    inits = [numpy_helper.from_array(np.array([[1], [3]], I64), "i"), numpy_helper.from_array(np.full((2, 5), 3.0, np.float32), "u")]
    m = helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=inits), opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    p = _save(tmp_path, m)
    conv = convert(p)
    xv = np.random.default_rng(0).random((4, 5), dtype=np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
    with torch.no_grad():
        np.testing.assert_allclose(conv.gm(torch.from_numpy(xv)).numpy(), ref, rtol=1e-6)
    for exporter in ("legacy", "dynamo"):
        res = export_like(conv, exporter=exporter)
        out = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
        np.testing.assert_allclose(out, ref, rtol=1e-6, err_msg=exporter)


def _refusal(tmp_path, nodes, inits, in_shape, out_shape, opset):
    from onnxrepair.errors import UnsupportedOpsError

    p = _save(tmp_path, _model(nodes, inits, in_shape, out_shape, opset))
    with pytest.raises(UnsupportedOpsError) as e:
        convert(p)
    return str(e.value)


def test_reduce_with_data_dependent_axes_is_refused_by_name(tmp_path):
    """Axes computed from the input's values (not its shape) cannot become a constant: the refusal says which
    node, which op and opset, and why."""
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0, name="max_all"),  # a value of x ...
             helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64, name="to_int"),
             helper.make_node("Unsqueeze", ["mi", "zero"], ["ax"], name="as_axes"),
             helper.make_node("ReduceMean", ["x", "ax"], ["y"], keepdims=1, name="mean_over_data_axes")]  # ... picks the axis
    msg = _refusal(tmp_path, nodes, {"zero": np.array([0], I64)}, [2, 3], [2, 1], 18)
    assert "ai.onnx::ReduceMean-18" in msg and "'mean_over_data_axes'" in msg and "axes computed from a tensor's values" in msg
    assert "\n" not in msg


def test_reduce_axes_from_shapes_are_folded(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Size", ["s"], ["r"]),
             helper.make_node("Sub", ["r", "one"], ["last"]), helper.make_node("Unsqueeze", ["last", "zero"], ["ax"]),
             helper.make_node("ReduceMean", ["x", "ax"], ["y"], keepdims=0, name="mean_last")]
    m = _model(nodes, {"one": np.array(1, I64), "zero": np.array([0], I64)}, ["N", 3, 4], ["N", 3], 18)
    conv = convert(_save(tmp_path, m))
    assert "fold_shape_inputs" in conv.passes and any("folded to [2]" in n for n in conv.notes)
    xv = np.random.default_rng(1).random((2, 3, 4), dtype=np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
    with torch.no_grad():
        np.testing.assert_allclose(conv.gm(torch.from_numpy(xv)).numpy(), ref, rtol=1e-6)


def test_same_auto_pad_is_made_explicit(tmp_path):
    from converters.onnx_passes import same_pads

    # ONNX spec examples: in 5, k 3, s 2 -> out 3, total pad 2 (1+1); in 6, k 3, s 2 -> out 3, total 1
    assert same_pads("SAME_UPPER", [5, 6], [3, 3], [2, 2], [1, 1]) == [1, 0, 1, 1]
    assert same_pads("SAME_LOWER", [5, 6], [3, 3], [2, 2], [1, 1]) == [1, 1, 1, 0]
    for mode in ("SAME_UPPER", "SAME_LOWER"):
        nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad=mode, name="pool")]
        m = _model(nodes, {}, ["N", 1, 6, 6], ["N", 1, 3, 3], 12)
        conv = convert(_save(tmp_path, m, f"{mode}.onnx"))
        assert conv.passes[0] == "explicit_auto_pad"
        xv = np.random.default_rng(2).random((2, 1, 6, 6), dtype=np.float32)
        ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
        with torch.no_grad():
            np.testing.assert_allclose(conv.gm(torch.from_numpy(xv)).numpy(), ref, rtol=1e-6, err_msg=mode)


def test_same_auto_pad_with_unknown_size_is_refused_by_name(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", name="conv_dyn")]
    msg = _refusal(tmp_path, nodes, {"w": np.ones((1, 1, 3, 3), np.float32)}, ["N", 1, "H", "W"], ["N", 1, "h", "w"], 13)
    assert "ai.onnx::Conv-11" in msg and "'conv_dyn'" in msg and "SAME_UPPER" in msg


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_average_pool_with_asymmetric_same_padding(tmp_path, mode, count_include_pad):
    """Keras AveragePooling2D(padding='same') with an odd total pad: onnx2torch refuses asymmetric pads."""
    nodes = [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad=mode,
                              count_include_pad=count_include_pad, name="avg_same")]
    m = _model(nodes, {}, ["N", 2, 6, 5], ["N", 2, 3, 3], 11)
    conv = convert(_save(tmp_path, m))
    xv = np.random.default_rng(3).random((2, 2, 6, 5), dtype=np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
    with torch.no_grad():
        np.testing.assert_allclose(conv.gm(torch.from_numpy(xv)).numpy(), ref, rtol=1e-5, atol=1e-6)
    for exporter in ("legacy", "dynamo"):
        res = export_like(conv, exporter=exporter)
        xb = np.random.default_rng(4).random((5, 2, 6, 5), dtype=np.float32)
        want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xb})[0]
        got = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xb})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=exporter)


def test_resize_mode_torch_cannot_match_is_refused_by_name(tmp_path):
    nodes = [helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="nearest", coordinate_transformation_mode="half_pixel",
                              nearest_mode="round_prefer_floor", name="up_halfpixel")]
    msg = _refusal(tmp_path, nodes, {"sc": np.array([1, 1, 2, 2], np.float32)}, ["N", 1, 3, 3], ["N", 1, 6, 6], 18)
    assert "ai.onnx::Resize-18" in msg and "'up_halfpixel'" in msg and "asymmetric + floor" in msg
