"""evaluate --attack-source first: adversarial examples crafted once on the first model, the same images scored on
every model (the transfer protocol DARE's evaluation uses); 'each' stays white-box per model."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import FIXTURES, fixture_path

from onnxrepair.cli import main
from onnxrepair.data.loaders import load_dataset
from onnxrepair.evaluate import evaluate_models

A = fixture_path("torch_lenet_legacy11")
B = fixture_path("torch_resnet_folded_legacy17")
MNIST = FIXTURES / "data" / "mnist_small.npz"


def _adv(source, capsys):
    rc = main(["evaluate", str(A), str(B), "--data", str(MNIST), "--limit", "64", "--attacks", "fgsm", "--eps", "0.1", "--no-blur",
               "--attack-source", source, "-q", "--json", "--provider", "cpu", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    d = json.loads(cap.out)
    return d, [m["adversarial"]["fgsm"]["0.1"] for m in d["models"]]


def test_first_scores_the_first_models_adversarial_images_on_every_model(capsys):
    d_each, (a_each, b_each) = _adv("each", capsys)
    d_first, (a_first, b_first) = _adv("first", capsys)
    assert a_first == a_each  # the first model is attacked white-box either way
    assert d_first["attack_source"] == "first" and "transfer" in " ".join(d_first["notes"])
    # B under 'first' = B's accuracy on the images FGSM crafted on A, computed here independently of the evaluator
    from converters import convert
    from onnxrepair.data.contract import InputContract, ModelWithContract
    from onnxrepair.runtime import make_session

    ds = load_dataset(MNIST).limit(64, seed=0)
    c = InputContract(layout="nchw", scale=255.0, image_shape=(1, 28, 28))
    tm = ModelWithContract(convert(A).gm, c).eval()
    xu = c.to_unit(ds.x).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(tm(xu), torch.as_tensor(ds.y))
    (g,) = torch.autograd.grad(loss, xu)
    xa = (xu + 0.1 * g.sign()).clamp(0, 1).detach()
    sb = make_session(B, "cpu")
    pred = sb.classes(sb.run({sb.input_names[0]: c.to_model(xa).numpy()})[0])
    assert b_first == float(np.mean(pred == ds.y))
    assert b_first != b_each  # transfer and white-box differ on this pair (white-box is the stronger attack)
    assert b_each < b_first


def test_library_keyword_and_bad_value(capsys):
    ds = load_dataset(MNIST).limit(32, seed=0)
    rep = evaluate_models([A], ds, blur=False, attacks="fgsm", eps=(0.1,), attack_source="first", provider="cpu", device="cpu")
    assert rep.attack_source == "first"
    rc = main(["evaluate", str(A), "--data", str(MNIST), "--attacks", "fgsm", "--attack-source", "last", "-q"])
    assert rc == 2 and "--attack-source must be each or first" in capsys.readouterr().err
