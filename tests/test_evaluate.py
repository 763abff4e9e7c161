"""The evaluator's figures against hand-computed cases, and the `onnxrepair evaluate` CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from onnxrepair.cli import main
from onnxrepair.data.contract import InputContract
from onnxrepair.data.dataset import ArrayDataset
from onnxrepair.evaluate import evaluate_models
from onnxrepair.errors import DataError, UsageError


class MeanVote(nn.Module):
    """logits [m, 1-m] with m the image's mean pixel: class 0 iff m > 0.5 (``flip`` swaps the classes)."""

    def __init__(self, flip: bool = False) -> None:
        super().__init__()
        self.flip = flip
        self.dummy = nn.Conv2d(3, 3, 1)  # gives the graph a parameter; identity weights
        with torch.no_grad():
            self.dummy.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.dummy.bias.zero_()

    def forward(self, x):
        m = self.dummy(x).mean(dim=(1, 2, 3))
        out = torch.stack([m, 1 - m], 1)
        return out.flip(1) if self.flip else out


def _export(module, path, shape=(1, 3, 8, 8)):
    torch.onnx.export(module.eval(), torch.rand(*shape), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    return _export(MeanVote(), d / "a.onnx"), _export(MeanVote(flip=True), d / "b.onnx")


def _constant_ds():
    # 10 constant images: 6 bright (class 0 predicted), 4 dark (class 1 predicted); 3 labels are wrong
    vals = np.array([200] * 6 + [50] * 4, dtype=np.uint8)
    x = np.broadcast_to(vals[:, None, None, None], (10, 3, 8, 8)).copy()
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])  # rows 4, 5 (bright, labelled 1) and 9 (dark, labelled 0) wrong
    return ArrayDataset(x=x, y=y, classes=["bright", "dark"], name="const")


def test_hand_computed(models):
    a, b = models
    c = InputContract(layout="nchw", scale=255.0)
    rep = evaluate_models([a, b], _constant_ds(), c, corruptions=["brightness", "contrast"], severities=[1, 5], blur=True, batch_size=4, provider="cpu")
    ma, mb = rep.models
    assert ma.clean == pytest.approx(0.7) and mb.clean == pytest.approx(0.3)
    # class "bright" (label 0): rows 0-3 right, row 9 wrong -> 4/5; "dark" (label 1): rows 6-8 right, 4-5 wrong -> 3/5
    assert ma.per_class == pytest.approx({"bright": 0.8, "dark": 0.6})
    # constant images: blur and contrast change nothing; brightness +0.3 keeps 50/255 below 0.5
    assert all(v == pytest.approx(0.7) for v in ma.blur.values()) and ma.robustness == pytest.approx(0.7)
    assert ma.corruptions == {"brightness": {1: pytest.approx(0.7), 5: pytest.approx(0.7)}, "contrast": {1: pytest.approx(0.7), 5: pytest.approx(0.7)}}
    assert ma.mca == pytest.approx(0.7) and mb.mca == pytest.approx(0.3)
    d = rep.to_dict()
    json.dumps(d)
    assert d["models"][0]["corruptions"]["brightness"]["5"] == pytest.approx(0.7)
    assert rep.images_scored == 2 * 10 * (1 + 4 + 6)


def test_models_see_identical_perturbed_inputs(models):
    """Complementary models on the same noisy images: accuracies sum to exactly 1 at every severity."""
    a, b = models
    rng = np.random.default_rng(0)
    x = np.broadcast_to(rng.integers(118, 138, size=(40, 1, 1, 1)), (40, 3, 8, 8)).astype(np.uint8).copy()
    ds = ArrayDataset(x=x, y=rng.integers(0, 2, size=40))
    rep = evaluate_models([a, b], ds, InputContract(scale=255.0), corruptions=["gaussian_noise", "impulse_noise"], blur=False, batch_size=16, provider="cpu")
    for c in ("gaussian_noise", "impulse_noise"):
        for s in range(1, 6):
            assert rep.models[0].corruptions[c][s] + rep.models[1].corruptions[c][s] == pytest.approx(1.0)
    # and the noise really changed predictions somewhere
    assert any(rep.models[0].corruptions["gaussian_noise"][s] != rep.models[0].clean for s in range(1, 6))


def test_attacks_through_evaluator(models):
    a, _ = models
    rng = np.random.default_rng(1)
    x = np.broadcast_to(rng.integers(110, 146, size=(30, 1, 1, 1)), (30, 3, 8, 8)).astype(np.uint8).copy()
    ds = ArrayDataset(x=x, y=(x[:, 0, 0, 0] < 128).astype(np.int64))  # all correct when clean
    rep = evaluate_models([a], ds, InputContract(scale=255.0), blur=False, attacks=["fgsm", "pgd"], eps=[0.0, 20 / 255], provider="cpu")
    m = rep.models[0]
    assert m.clean == 1.0 and m.adversarial["fgsm"][0.0] == 1.0
    # a pixel shift of 20/255 flips every image within 18/255 of the 0.5 threshold: |v - 127.5| < 20
    expect = float(np.mean(np.abs(x[:, 0, 0, 0].astype(float) - 127.5) >= 20))
    assert m.adversarial["fgsm"][20 / 255] == pytest.approx(expect)
    assert m.adversarial["pgd"][20 / 255] <= m.adversarial["fgsm"][20 / 255]


def test_bad_input(models):
    a, _ = models
    c = InputContract(scale=255.0)
    ds = _constant_ds()
    with pytest.raises(DataError, match=r"takes \[N,3,8,8\]"):
        evaluate_models([a], ArrayDataset(x=np.zeros((2, 3, 4, 4), np.uint8), y=np.zeros(2, np.int64)), c)
    with pytest.raises(DataError, match="output range"):
        evaluate_models([a], ArrayDataset(x=ds.x, y=ds.y + 2), c)
    with pytest.raises(UsageError, match="unknown corruption"):
        evaluate_models([a], ds, c, corruptions="fogg")
    with pytest.raises(UsageError, match="unknown attack"):
        evaluate_models([a], ds, c, attacks="deepfool")


# ----------------------------------------------------------------------------- CLI


def test_cli_evaluate(models, tmp_path, capsys):
    a, b = models
    np.savez(tmp_path / "d.npz", x=_constant_ds().x.transpose(0, 2, 3, 1), y=_constant_ds().y)  # NHWC on disk
    rc = main(["evaluate", str(a), str(b), "--data", str(tmp_path / "d.npz"), "--corruptions", "contrast", "--severities", "1-2",
               "--report", str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots"), "-q", "--provider", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["models"][0]["clean"] == pytest.approx(0.7) and rep["models"][1]["clean"] == pytest.approx(0.3)
    assert rep["models"][0]["contract"]["scale"] == 255.0  # guessed from uint8 data
    assert (tmp_path / "plots" / "contrast.png").exists() and (tmp_path / "plots" / "deeppatch_blur.png").exists()
    out = capsys.readouterr().out
    assert "clean" in out and "70.00" in out


def test_cli_bad_input(models, tmp_path, capsys):
    a, _ = models
    ds = _constant_ds()
    np.savez(tmp_path / "ok.npz", x=ds.x, y=ds.y)
    np.savez(tmp_path / "small.npz", x=ds.x[:, :1], y=ds.y)  # 1 channel, the model takes 3
    np.savez(tmp_path / "nan.npz", x=np.full((2, 3, 8, 8), np.nan, np.float32), y=np.zeros(2, np.int64))
    np.savez(tmp_path / "lab.npz", x=ds.x, y=ds.y + 5)
    (tmp_path / "bad.onnx").write_bytes(b"nonsense")
    cases = [
        (["--data", str(tmp_path / "small.npz")], 2, "layout nchw"),
        (["--data", str(tmp_path / "nan.npz")], 2, "NaN"),
        (["--data", str(tmp_path / "lab.npz")], 2, "output range"),
        (["--data", str(tmp_path / "ok.npz"), "--corruptions", "fogg"], 2, "known: gaussian_noise"),
        (["--data", str(tmp_path / "ok.npz"), "--attacks", "deepfool"], 2, "known: fgsm"),
        (["--data", str(tmp_path / "nothing.npz")], 2, "no such"),
        (["--data", str(tmp_path / "ok.npz"), "--severities", "x"], 2, "severities"),
    ]
    for extra, code, msg in cases:
        rc = main(["evaluate", str(a), *extra, "-q", "--provider", "cpu"])
        err = capsys.readouterr().err
        assert rc == code and msg in err, (extra, rc, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    rc = main(["evaluate", str(tmp_path / "bad.onnx"), "--data", str(tmp_path / "ok.npz"), "-q", "--provider", "cpu"])
    assert rc == 3, capsys.readouterr().err


# ----------------------------------------------------------------------------- the lean clean path


@pytest.mark.parametrize(
    "name,contract",
    [
        ("torch_lenet_legacy11", InputContract(layout="nchw", scale=255.0)),
        ("torch_lenet_legacy11", InputContract(layout="nchw", scale=255.0, mean=(0.1307,), std=(0.3081,))),
        ("keras_cnn_nhwc_tf2onnx", InputContract(layout="nhwc", scale=255.0, mean=(0.5,), std=(0.25,))),
    ],
)
def test_fast_clean_path_matches_torch_path(name, contract, mnist_small):
    """The numpy feeder (fused scale/mean/std, NHWC transpose, prefetch thread) gives the same predictions
    as the torch path (to_unit → to_model per batch), and feeds equal to float32 rounding."""
    from conftest import fixture_path

    from onnxrepair.evaluate import _clean_predictions
    from onnxrepair.runtime import make_session

    x, y = mnist_small
    path = fixture_path(name)
    sess = make_session(path, "cpu")
    inp = sess.sess.get_inputs()[0]
    slow = []
    for lo in range(0, len(x), 128):  # a batch size that leaves a ragged last batch
        feed = contract.to_model(contract.to_unit(x[lo : lo + 128])).numpy()
        fast = contract.numpy_feeder()(x[lo : lo + 128])
        assert fast.shape == feed.shape and fast.dtype == np.float32 and fast.flags.c_contiguous
        np.testing.assert_allclose(fast, feed, rtol=0, atol=4e-6)
        slow.append(sess.sess.run(None, {inp.name: feed})[0].argmax(1))
    slow = np.concatenate(slow)
    assert (slow == y).mean() > 0.5  # the contract is a sensible one, so predictions mean something

    ds = ArrayDataset(x=x, y=y)
    rep = evaluate_models([path, path], ds, [contract, dataclasses.replace(contract, notes=[])], blur=False, batch_size=128, provider="cpu")
    assert rep.models[0].clean == rep.models[1].clean == pytest.approx(float((slow == y).mean()), abs=0)
    from onnxrepair.evaluate import _Model

    m = _Model("m", str(path), sess, contract, inp.name, np.dtype(np.float32), tuple(inp.shape), 10)
    for prefetch in (True, False):
        got = np.concatenate([p["m"] for _, _, p, _ in _clean_predictions([m], x, 128, prefetch=prefetch)])
        np.testing.assert_array_equal(got, slow)
