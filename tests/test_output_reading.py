"""How a model's first output becomes a class: decided from the graph, once per model, not from the
value range of whatever batch is at hand (a logit column can lie in [0, 1] too)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from converters.load import output_source_op
from onnxrepair.data.contract import InputContract
from onnxrepair.data.dataset import ArrayDataset
from onnxrepair.fairness import evaluate_fairness, predict
from onnxrepair.data.protected import ProtectedSpec
from onnxrepair.repair import _output_kind
from onnxrepair.runtime import Session, labels_from_output, make_session, output_reading, reading_from_values


def _one_column(tail: str) -> bytes:
    """x[N,2] @ [[1],[0]] -> (tail) -> [N,1]: the output is the first feature, through a Sigmoid or not."""
    w = numpy_helper.from_array(np.array([[1.0], [0.0]], np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 1], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"])]
    if tail == "sigmoid":
        nodes += [helper.make_node("Sigmoid", ["z"], ["p"]), helper.make_node("Reshape", ["p", "shape"], ["y"])]
    elif tail == "label":
        nodes += [helper.make_node("Cast", ["z"], ["y"], to=TensorProto.INT64)]
    else:
        nodes += [helper.make_node("Identity", ["z"], ["y"])]
    out_type = TensorProto.INT64 if tail == "label" else TensorProto.FLOAT
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                          [helper.make_tensor_value_info("y", out_type, ["N", 1])], [w, shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def test_output_source_op_looks_through_reshapes():
    assert output_source_op(onnx.load_from_string(_one_column("sigmoid"))) == "Sigmoid"
    assert output_source_op(onnx.load_from_string(_one_column("logit"))) == "MatMul"


def test_logit_column_inside_unit_interval_is_read_as_a_logit():
    x = np.array([[0.3, 0.0], [0.7, 0.0], [-0.2, 0.0]], np.float32)  # logits 0.3, 0.7, -0.2
    sess = make_session(_one_column("logit"), "cpu")
    assert output_reading(sess) == "logit"
    assert predict(sess, x).tolist() == [1, 1, 0]  # logit > 0; a range guess on rows 0-1 alone would say 0.3 < 0.5 -> 0
    assert predict(sess, x[:2]).tolist() == [1, 1]  # the same rows read the same way whatever else is in the batch


def test_sigmoid_column_is_a_probability_and_integer_output_a_label():
    x = np.array([[0.3, 0.0], [-1.0, 0.0]], np.float32)
    sess = make_session(_one_column("sigmoid"), "cpu")
    assert output_reading(sess) == "probability" and predict(sess, x).tolist() == [1, 0]
    lab = make_session(_one_column("label"), "cpu")
    assert output_reading(lab) == "label"
    assert predict(lab, np.array([[3.0, 0.0], [0.0, 0.0]], np.float32)).tolist() == [3, 0]  # labels as they are


def test_without_a_graph_the_values_decide_once_per_model():
    src = make_session(_one_column("logit"), "cpu")
    bare = Session(sess=src.sess, provider="cpu")  # no source: nothing to read the graph from
    assert output_reading(bare) is None
    assert reading_from_values(np.array([[0.2], [0.9]], np.float32)) == "probability"
    assert reading_from_values(np.array([[0.2], [1.9]], np.float32)) == "logit"
    assert reading_from_values(np.array([[0.2, 0.8]], np.float32)) == "scores"
    assert labels_from_output(np.array([[0.2, 0.8], [0.6, 0.4]], np.float32), "scores").tolist() == [1, 0]
    # evaluate_fairness reads the data rows once and reads the pairs the same way
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.uniform(0.05, 0.95, 200), rng.integers(0, 2, 200)]).astype(np.float32)
    ds = ArrayDataset(x, (x[:, 0] > 0.5).astype(np.int64), columns=["score", "group"])
    spec = ProtectedSpec("group", 1, 1.0, 0.0)
    rep = evaluate_fairness({"bare": bare, "file": src}, ds, spec, provider="cpu", n_pairs=100)
    assert rep["bare"]["output_reading"] == "probability" and rep["file"]["output_reading"] == "logit"
    assert rep["file"]["accuracy"] == pytest.approx(float(((x[:, 0] > 0).astype(int) == ds.y).mean()))
    assert rep["bare"]["accuracy"] == 1.0


def test_repair_output_kind_for_one_column_follows_the_graph():
    lin = torch.nn.Linear(2, 1)
    data = ArrayDataset(np.zeros((4, 2), np.float32), np.zeros(4, np.int64))
    contract = InputContract(layout="tabular")
    assert _output_kind(lin, contract, data, torch.device("cpu"), "Sigmoid") == "probs"
    assert _output_kind(lin, contract, data, torch.device("cpu"), "Gemm") == "logits"
    soft = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Softmax(dim=1))
    assert _output_kind(soft, contract, data, torch.device("cpu"), "Softmax") == "probs"


def test_evaluator_reads_the_keras_sigmoid_fixture_as_probabilities():
    """The Keras binary classifier (Dense(1, sigmoid), via tf2onnx, its output named 'logits') scored by
    the evaluator and by the fairness path: both threshold at 0.5 and agree with a hand count."""
    from conftest import FIXTURES, fixture_path

    from onnxrepair.data.loaders import load_dataset
    from onnxrepair.evaluate import evaluate_models

    path = fixture_path("keras_adult_sigmoid_tf2onnx")
    ds = load_dataset(FIXTURES / "data" / "adult_test.csv", target="income", protected=["sex"])
    sess = make_session(path, "cpu")
    assert output_reading(sess) == "probability"
    p = sess.run_batched(ds.x)[:, 0]
    hand = float(((p > 0.5).astype(int) == ds.y).mean())
    assert hand > 0.75
    rep = evaluate_models([path], ds, [InputContract(layout="tabular")], blur=False, provider="cpu")
    assert rep.models[0].clean == pytest.approx(hand, abs=0)
    spec = ProtectedSpec("sex", ds.columns.index("sex"), 1.0, 0.0)
    fair = evaluate_fairness([path], ds, spec, provider="cpu", n_pairs=200)
    assert fair[0]["accuracy"] == pytest.approx(hand, abs=0) and fair[0]["output_reading"] == "probability"


def test_log_probs_turns_one_column_into_two_classes():
    from onnxrepair.nn import log_probs

    z = torch.tensor([[0.0], [2.0], [-3.0]])
    lp = log_probs(z, "logits")
    assert lp.shape == (3, 2)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(3))
    torch.testing.assert_close(lp[:, 1].exp(), torch.sigmoid(z[:, 0]))
    p = torch.sigmoid(z)
    torch.testing.assert_close(log_probs(p, "probs"), lp, atol=1e-6, rtol=1e-5)  # the same classifier, read either way
    two = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(log_probs(two, "logits"), torch.log_softmax(two, 1))  # several columns: unchanged


@pytest.mark.parametrize("method", ["counterfactual-finetune", "reweigh-finetune"])
def test_fairness_baselines_repair_a_sigmoid_model(tmp_path, method):
    """The baselines fine-tune with cross-entropy; on a one-column model that used to index class 1 of a
    single column (internal error)."""
    from conftest import FIXTURES, fixture_path

    from onnxrepair.cli import main

    out = tmp_path / "o.onnx"
    rc = main(["repair", str(fixture_path("keras_adult_sigmoid_tf2onnx")), "--method", method,
               "--data", str(FIXTURES / "data" / "adult_train.csv"), "--target", "income", "--protected", "sex",
               "-o", str(out), "--quiet", "--force", "--epochs", "1", "--provider", "cpu"])
    assert rc == 0 and out.exists()
