"""Wrong preprocessing looks like a bad model: near-chance accuracy under a guessed contract is said loudly,
and --find-contract finds the preprocessing a model expects (the committed LeNet behind a x/255 or a
normalising input stage, fed the committed uint8 digits)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import FIXTURES, fixture_path
from onnx import helper, numpy_helper

from onnxrepair.cli import main
from onnxrepair.data.contract import InputContract
from onnxrepair.data.loaders import load_dataset
from onnxrepair.evaluate import find_contract

LENET = fixture_path("torch_lenet_legacy11")
MNIST = FIXTURES / "data" / "mnist_small.npz"


def _prepend(dst, mul: float, add: float = 0.0):
    """The LeNet behind ``x * mul + add``: mul 1/255 makes a model that takes 0-255 pixels; mul 0.3081, add
    0.1307 one that takes MNIST-normalised input."""
    m = onnx.load(str(LENET))
    g, inp = m.graph, m.graph.input[0].name
    g.initializer.extend([numpy_helper.from_array(np.array(mul, np.float32), "pre_mul"), numpy_helper.from_array(np.array(add, np.float32), "pre_add")])
    for n in g.node:
        n.input[:] = ["pre_out" if x == inp else x for x in n.input]
    g.node.insert(0, helper.make_node("Add", ["pre_m", "pre_add"], ["pre_out"]))
    g.node.insert(0, helper.make_node("Mul", [inp, "pre_mul"], ["pre_m"]))
    onnx.save(m, str(dst))
    return dst


def _clean(args, capsys):
    rc = main(["evaluate", *args, "--data", str(MNIST), "-q", "--no-blur", "--json", "--provider", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out), cap.err


@pytest.fixture(scope="module")
def reference_clean():
    from onnxrepair.evaluate import evaluate_models

    return evaluate_models([LENET], load_dataset(MNIST), blur=False, provider="cpu").models[0].clean


def test_near_chance_under_a_guessed_contract_is_loud(tmp_path, capsys):
    """Seen: a model that takes 0-255 pixels scored 10.00 % under the guessed scale 255 with only a note."""
    d, err = _clean([str(_prepend(tmp_path / "m255.onnx", 1 / 255))], capsys)
    assert d["models"][0]["clean"] < 0.2
    assert "WARNING: m255 scores" in err and "under a guessed input contract" in err and "--find-contract" in err
    assert d["warnings"] and d["warnings"][0].startswith("m255 scores")


def test_no_warning_for_a_fitting_or_given_contract(tmp_path, capsys):
    d, err = _clean([str(LENET)], capsys)
    assert "WARNING" not in err and d["warnings"] == []
    d, err = _clean([str(_prepend(tmp_path / "m255.onnx", 1 / 255)), "--scale", "255", "--mean", "0", "--std", "0.5"], capsys)
    assert "WARNING" not in err  # the user chose it: their call


@pytest.mark.parametrize("mul,add,expect", [(1 / 255, 0.0, "[0,255]"), (0.3081, 0.1307, "MNIST mean/std")])
def test_find_contract_recovers_the_preprocessing(tmp_path, capsys, reference_clean, mul, add, expect):
    model = _prepend(tmp_path / "m.onnx", mul, add)
    ds = load_dataset(MNIST)
    best, tried = find_contract(model, ds, InputContract(layout="nchw", scale=255.0, image_shape=(1, 28, 28)), provider="cpu")
    assert tried[0]["preprocessing"] == expect and best.source == "found"
    assert tried[0]["accuracy"] > 0.8 and tried[-1]["accuracy"] < tried[0]["accuracy"]
    d, err = _clean([str(model), "--find-contract"], capsys)
    m = d["models"][0]
    assert m["clean"] == pytest.approx(reference_clean, abs=0.002)  # the wrapped model read right = the LeNet itself
    assert m["contract"]["source"] == "found"
    assert d["contract_search"]["m"][0]["preprocessing"] == expect
    assert "WARNING" not in err


def test_find_contract_refuses_what_it_cannot_search(capsys):
    rc = main(["evaluate", str(LENET), "--data", str(MNIST), "--find-contract", "--mean", "0.5", "-q"])
    assert rc == 2 and "--find-contract searches layout and mean/std itself" in capsys.readouterr().err
