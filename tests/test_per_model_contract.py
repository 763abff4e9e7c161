"""One evaluate run compares models that need different preprocessing: each model's contract comes from its own
metadata or its own --config, and the shared perturbed inputs reach each model through its own contract."""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import FIXTURES, fixture_path
from test_find_contract import _prepend

from onnxrepair.cli import main
from onnxrepair.data.contract import InputContract, contract_to_metadata

LENET = fixture_path("torch_lenet_legacy11")
MNIST = FIXTURES / "data" / "mnist_small.npz"


def _run(args, capsys):
    rc = main(["evaluate", *args, "--data", str(MNIST), "--limit", "300", "--corruptions", "fog,gaussian_noise", "--severities", "2",
               "-q", "--json", "--provider", "cpu", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)["models"]


def _assert_same_figures(a, b):
    assert a["clean"] == b["clean"] > 0.8
    assert a["robustness"] == pytest.approx(b["robustness"], abs=1 / 2100)
    for c in a["corruptions"]:
        assert a["corruptions"][c]["2"] == pytest.approx(b["corruptions"][c]["2"], abs=1 / 300), c


def test_per_model_config(tmp_path, capsys):
    """Seen: 'the models' contracts use different pixel scales' — one contract for every model."""
    m255 = _prepend(tmp_path / "m255.onnx", 1 / 255)  # takes 0-255 pixels
    (tmp_path / "a.toml").write_text("[input]\nscale = 255\n")
    (tmp_path / "b.toml").write_text("[input]\nscale = 1\n")
    a, b = _run([str(LENET), str(m255), "--config", str(tmp_path / "a.toml"), "--config", str(tmp_path / "b.toml")], capsys)
    _assert_same_figures(a, b)  # the same network behind the right preprocessing sees the same corrupted images
    assert (a["contract"]["scale"], b["contract"]["scale"]) == (255.0, 1.0)


def test_per_model_contract_from_metadata(tmp_path, capsys):
    m = onnx.load(str(_prepend(tmp_path / "tmp.onnx", 0.3081, 0.1307)))  # takes MNIST-normalised input
    contract_to_metadata(m, InputContract(layout="nchw", scale=255.0, mean=(0.1307,), std=(0.3081,), image_shape=(1, 28, 28)))
    onnx.save(m, str(tmp_path / "norm.onnx"))
    a, b = _run([str(LENET), str(tmp_path / "norm.onnx")], capsys)
    _assert_same_figures(a, b)
    assert b["contract"]["source"] == "metadata"


def test_config_count_must_match(tmp_path, capsys):
    (tmp_path / "a.toml").write_text("scale = 255\n")
    rc = main(["evaluate", str(LENET), str(LENET), str(LENET), "--data", str(MNIST), "--config", str(tmp_path / "a.toml"),
               "--config", str(tmp_path / "a.toml"), "-q"])
    assert rc == 2 and "--config given 2 times for 3 models" in capsys.readouterr().err
