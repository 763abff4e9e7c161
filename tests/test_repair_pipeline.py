"""The repair pipeline end to end: interface kept, retention contract, nothing lost, held-out kept apart."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from conftest import FIXTURES, fixture_path

from converters.load import graph_inputs, graph_outputs
from onnxrepair import methods as registry
from onnxrepair.cli import main
from onnxrepair.data.tabular import load_csv
from onnxrepair.errors import ValidationFailed
from onnxrepair.methods import MethodOutput
from onnxrepair.repair import repair, split_data
from onnxrepair.runtime import make_session

ADULT = fixture_path("adult_mlp")
TRAIN = FIXTURES / "data" / "adult_train.csv"
TEST = FIXTURES / "data" / "adult_test.csv"
SEEN: dict[str, np.ndarray] = {}


@dataclass
class _BreakCfg:
    scale: float = -1.0  # multiply the last layer's weights: -1 flips the decision


@registry.register("test-breaker", config=_BreakCfg, task="robustness", summary="test only: damages the model", needs="any", inputs="any")
def _breaker(inputs, cfg: _BreakCfg) -> MethodOutput:
    SEEN["train"] = inputs.train.x.copy()
    SEEN["calib"] = inputs.calib.x.copy()
    model = copy.deepcopy(inputs.model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(cfg.scale)
        last.bias.mul_(cfg.scale)
    return MethodOutput(model=model, info={"scaled": cfg.scale})


@dataclass
class _KeepCfg:
    pass


@registry.register("test-identity", config=_KeepCfg, task="robustness", summary="test only: returns the model", needs="any", inputs="any")
def _identity(inputs, cfg) -> MethodOutput:
    return MethodOutput(model=copy.deepcopy(inputs.model), info={})


def test_fmt_cli_end_to_end_keeps_interface(tmp_path):
    out, rep = tmp_path / "fair.onnx", tmp_path / "report.json"
    rc = main(["repair", str(ADULT), "--method", "fmt", "--data", str(TRAIN), "--val", str(TEST), "--target", "income",
               "--protected", "sex", "-o", str(out), "--report", str(rep), "--quiet", "--force", "--epochs", "5", "--provider", "cpu",
               "--select", "fairness"])
    assert rc == 0 and out.exists() and rep.exists()
    a, b = onnx.load(str(ADULT)), onnx.load(str(out))
    assert [(s.name, s.elem_type) for s in graph_inputs(a)] == [(s.name, s.elem_type) for s in graph_inputs(b)]
    assert [(s.name, s.elem_type) for s in graph_outputs(a)] == [(s.name, s.elem_type) for s in graph_outputs(b)]
    assert isinstance(graph_inputs(b)[0].shape[0], str), "batch dimension must stay dynamic"
    meta = {p.key: p.value for p in b.metadata_props}
    assert meta["onnxrepair.method"] == "fmt" and "onnxrepair.input_contract" in meta and meta["onnxrepair.source_sha256"]
    report = json.loads(rep.read_text())
    assert report["written"] and report["task"] == "fairness" and report["fidelity"]["passed"]
    sel = report["info"]["selection"]  # FMT chose its epoch on the pipeline's calibration split, not on held-out rows
    assert sel["rows"] == "calib" and 0 <= sel["selected_epoch"] <= 5 and len(sel["epochs"]) == 6
    for k in ("accuracy", "abs_spd", "aaod", "abs_eod", "idr"):
        assert k in report["before"] and k in report["after"]
    sess = make_session(str(out), "cpu")
    x = load_csv(TEST, "income", ["sex"]).x
    for n in (1, 17):
        assert sess.run_batched(x[:n]).shape == (n, 2)


def test_fmt_on_the_keras_sigmoid_model_reads_probabilities(tmp_path):
    """A Keras Dense(1, sigmoid) classifier (tf2onnx): FMT sees probabilities (confidence max(p, 1 - p)),
    the before/after figures threshold at 0.5, and the repaired file keeps the single-column interface."""
    src = fixture_path("keras_adult_sigmoid_tf2onnx")
    out, rep = tmp_path / "fair.onnx", tmp_path / "report.json"
    rc = main(["repair", str(src), "--method", "fmt", "--data", str(TRAIN), "--val", str(TEST), "--target", "income",
               "--protected", "sex", "-o", str(out), "--report", str(rep), "--quiet", "--force", "--epochs", "3", "--provider", "cpu"])
    assert rc == 0 and out.exists()
    report = json.loads(rep.read_text())
    assert report["output_kind"] == "probs" and report["fidelity"]["passed"]
    assert report["before"]["output_reading"] == report["after"]["output_reading"] == "probability"
    sess = make_session(str(out), "cpu")
    p = sess.run_batched(load_csv(TEST, "income", ["sex"]).x[:7])
    assert p.shape == (7, 1) and (p >= 0).all() and (p <= 1).all()


def test_retention_contract_refuses_and_writes_nothing(tmp_path):
    out, rep = tmp_path / "broken.onnx", tmp_path / "report.json"
    args = ["repair", str(ADULT), "--method", "test-breaker", "--data", str(TRAIN), "--target", "income", "-o", str(out),
            "--report", str(rep), "--quiet", "--provider", "cpu"]
    assert main(args) == 1
    assert not out.exists(), "a model that breaks the retention limit must not be written"
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file may be left behind"
    report = json.loads(rep.read_text())
    assert report["written"] is False and report["retention"]["passed"] is False and report["retention"]["drop_points"] > 0.5
    # --force writes it, and says it was forced
    assert main([*args, "--force"]) == 0 and out.exists()
    assert json.loads(rep.read_text())["retention"]["forced"] is True


def test_library_call_raises_and_keeps_input(tmp_path):
    train = load_csv(TRAIN, "income")
    before = ADULT.read_bytes()
    with pytest.raises(ValidationFailed, match="max-accuracy-drop"):
        repair(ADULT, "test-breaker", train, output=tmp_path / "x.onnx", provider="cpu")
    assert ADULT.read_bytes() == before and not (tmp_path / "x.onnx").exists()


def test_heldout_never_reaches_the_method(tmp_path):
    train = load_csv(TRAIN, "income")
    res = repair(ADULT, "test-breaker", train, output=tmp_path / "x.onnx", options={"scale": "1"}, provider="cpu")
    assert res.written and res.retention["drop_points"] == pytest.approx(0.0, abs=1e-9)
    # the method saw exactly split_data's train and calib parts (whose disjointness from held-out is tested by
    # index in test_registry), never the held-out rows the retention contract is judged on
    tr, calib, held = split_data(train, None, seed=0)
    np.testing.assert_array_equal(SEEN["train"], tr.x)
    np.testing.assert_array_equal(SEEN["calib"], calib.x)
    assert res.splits == {"train": len(tr), "calib": len(calib), "heldout": len(held)}


def test_identity_repair_reproduces_original_outputs(tmp_path):
    out = tmp_path / "same.onnx"
    assert main(["repair", str(ADULT), "--method", "test-identity", "--data", str(TRAIN), "--target", "income", "-o", str(out), "--quiet", "--provider", "cpu"]) == 0
    x = load_csv(TEST, "income").x
    a = make_session(str(ADULT), "cpu").run_batched(x)
    b = make_session(str(out), "cpu").run_batched(x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(ADULT.read_bytes())
    rc = main(["repair", str(src), "--method", "test-identity", "--data", str(TRAIN), "--target", "income", "-o", str(src), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is the input model" in err[0]
    assert src.read_bytes() == ADULT.read_bytes()


@pytest.mark.parametrize("method", ["fmt", "reject-option", "drop-attribute", "reweigh-finetune", "counterfactual-finetune"])
def test_fairness_method_without_a_protected_column_is_a_usage_error(tmp_path, method, capsys):
    rc = main(["repair", str(ADULT), "--method", method, "--data", str(TRAIN), "--target", "income", "-o", str(tmp_path / "o.onnx"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"method {method!r} needs --protected COLUMN" in err[0], err
    assert not list(tmp_path.iterdir())


def test_unknown_method_option_is_a_usage_error(tmp_path, capsys):
    rc = main(["repair", str(ADULT), "--method", "fmt", "--data", str(TRAIN), "--target", "income", "--protected", "sex", "-o", str(tmp_path / "o.onnx"), "--bogus", "1"])
    assert rc == 2 and "has no option --bogus" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_csv_with_the_wrong_feature_count_is_a_usage_error(tmp_path, capsys):
    import csv

    rows = list(csv.reader(open(TRAIN, newline="")))
    short = tmp_path / "short.csv"
    with open(short, "w", newline="") as f:
        csv.writer(f).writerows(r[1:] for r in rows)  # the first feature column dropped
    out = tmp_path / "o.onnx"
    rc = main(["repair", str(ADULT), "--method", "fmt", "--data", str(short), "--target", "income", "--protected", "sex", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "rows of 31 features" in err[0] and "takes [N,32]" in err[0]
    assert not out.exists()


def test_root_option_after_the_command_says_where_it_goes(tmp_path, capsys):
    rc = main(["repair", str(ADULT), "--method", "fmt", "--data", str(TRAIN), "--target", "income", "--protected", "sex", "-o", str(tmp_path / "o.onnx"), "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--threads is an option of onnxrepair itself" in err[0]
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("method", ["finetune", "finetune-last", "augmix", "adversarial-training", "deeppatch"])
def test_image_method_on_a_tabular_model_is_a_usage_error(tmp_path, capsys, method):
    """Robustness methods blur, corrupt or attack images: on a tabular model they are refused up front
    with one line naming the methods that fit, not an internal error halfway through."""
    rc = main(["repair", str(ADULT), "--method", method, "--data", str(TRAIN), "--target", "income", "-o", str(tmp_path / "o.onnx"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"method {method!r} repairs image models" in err[0] and "fmt" in err[0]
    assert not list(tmp_path.iterdir())


def test_fairness_method_on_an_image_model_is_a_usage_error(tmp_path, capsys):
    rc = main(["repair", str(fixture_path("torch_lenet_legacy11")), "--method", "fmt", "--data", str(FIXTURES / "data" / "mnist_small.npz"),
               "--protected", "sex", "-o", str(tmp_path / "o.onnx"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "repairs tabular models" in err[0] and "deeppatch" in err[0], err
    assert not list(tmp_path.iterdir())


def test_report_counts_the_weights_each_file_stores(tmp_path):
    out, rep = tmp_path / "same.onnx", tmp_path / "r.json"
    assert main(["repair", str(ADULT), "--method", "test-identity", "--data", str(TRAIN), "--target", "income", "-o", str(out),
                 "--report", str(rep), "--quiet", "--provider", "cpu"]) == 0
    w = json.loads(rep.read_text())["export"]["weights"]
    stored = sum(int(np.prod(t.dims)) for t in onnx.load(str(ADULT)).graph.initializer)
    assert w["original"] == stored > 0
    assert w["repaired"] == sum(int(np.prod(t.dims)) for t in onnx.load(str(out)).graph.initializer)
    assert w["repaired"] == w["original"]  # same weights, nothing added
