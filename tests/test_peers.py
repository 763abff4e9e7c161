"""The robustness peers (AugMix, PGD adversarial training): losses, views, the attack, the methods end to end."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import FIXTURES, fixture_path
from onnxrepair.data.contract import InputContract
from onnxrepair.data.dataset import ArrayDataset
from onnxrepair.errors import UsageError
from onnxrepair.methods import RepairInputs, get
from onnxrepair.train import accuracy
from onnxrepair.methods.augmix import jsd_loss
from onnxrepair.data.contract import ModelWithContract
from onnxrepair.perturb.attacks import PGD
from onnxrepair.perturb.augment import AUGMIX_OPS, augmix, autocontrast, equalize, posterize, resolve_ops

CONTRACT = InputContract(scale=255.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    d = np.load(FIXTURES / "data" / "mnist_small.npz")
    return d["x"], d["y"]


@pytest.fixture(scope="module")
def lenet():
    from converters import convert

    return convert(fixture_path("torch_lenet_legacy11")).gm.eval()


def _inputs(gm, x, y, n_train=256, n_calib=128) -> RepairInputs:
    return RepairInputs(model=gm, contract=CONTRACT, train=ArrayDataset(x[:n_train], y[:n_train]),
                        calib=ArrayDataset(x[n_train : n_train + n_calib], y[n_train : n_train + n_calib]),
                        output_kind="logits", device=torch.device("cpu"), seed=0)


def _run_on_ort(module, x_unit: torch.Tensor) -> np.ndarray:
    from converters.export import export_graph

    res = export_graph(module, [x_unit[:2]], ["input"], ["logits"], exporter="legacy")
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x_unit.numpy()})[0]


# ----------------------------------------------------------------------------- pieces


def test_jsd_is_zero_for_identical_and_positive_otherwise():
    lp = torch.log_softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), 1)
    assert float(jsd_loss(lp, lp, lp)) == pytest.approx(0.0, abs=1e-6)
    other = torch.log_softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(1)), 1)
    assert float(jsd_loss(lp, other, lp)) > 1e-3
    assert float(jsd_loss(lp, other, lp)) <= np.log(3) + 1e-6  # JS of 3 distributions is bounded by log 3


def test_augmix_views_in_unit_range_deterministic_and_different(mnist):
    x = CONTRACT.to_unit(mnist[0][:64])
    a = augmix(x, np.random.default_rng(5))
    b = augmix(x, np.random.default_rng(5))
    c = augmix(x, np.random.default_rng(6))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, x)


@pytest.mark.parametrize("op", sorted(AUGMIX_OPS))
def test_every_op_keeps_shape_and_range(op, mnist):
    x = CONTRACT.to_unit(mnist[0][:8])
    for s in (1, 5):
        y = AUGMIX_OPS[op](x, s, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


def test_torch_ops_match_pil(mnist):
    from PIL import Image, ImageOps

    raw = mnist[0][:4, 0]
    x = CONTRACT.to_unit(mnist[0][:4])
    g = torch.Generator()
    for i, img in enumerate(raw):
        pil = Image.fromarray(img)
        eq = np.asarray(ImageOps.equalize(pil))
        assert np.array_equal((equalize(x[i : i + 1], 1, g)[0, 0] * 255).round().numpy().astype(np.uint8), eq)
        po = np.asarray(ImageOps.posterize(pil, 4))
        assert np.array_equal((posterize(x[i : i + 1], 3, g)[0, 0] * 255).round().numpy().astype(np.uint8), po)
        ac = np.asarray(ImageOps.autocontrast(pil)).astype(np.float32)
        assert np.abs(autocontrast(x[i : i + 1], 1, g)[0, 0].numpy() * 255 - ac).max() <= 1.0


def test_augmix_refuses_evaluation_corruptions():
    with pytest.raises(UsageError, match="evaluation corruption"):
        resolve_ops(("rotate", "fog"))
    with pytest.raises(UsageError, match="unknown augmix op"):
        resolve_ops(("sharpen",))


def test_pgd_respects_the_eps_ball_and_restores_mode(lenet, mnist):
    import copy

    gm = copy.deepcopy(lenet).train()
    x, y = CONTRACT.to_unit(mnist[0][:64]), torch.as_tensor(mnist[1][:64])
    eps = 8 / 255
    adv = pgd_linf(gm, CONTRACT, x, y, "logits", eps=eps, steps=7, step_size=2 / 255, seed=0)
    assert gm.training  # mode restored
    assert all(p.grad is None for p in gm.parameters())
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    gm.eval()
    assert accuracy(gm, CONTRACT.to_model(adv), y) < accuracy(gm, CONTRACT.to_model(x), y)



def pgd_linf(m, contract, x, y, kind, *, eps, steps, step_size, seed):
    """The PGD the adversarial-training peer crafts with: the evaluator's attack, seeded per call."""
    return PGD(ModelWithContract(m, contract), eps, steps=steps, alpha=step_size, seed=seed, output_kind=kind)(x, y)


# ----------------------------------------------------------------------------- methods


def test_augmix_method_trains_exports_and_runs_on_ort(lenet, mnist):
    import copy

    gm = copy.deepcopy(lenet)
    with torch.no_grad():  # swap two classes in the head: the original loses, training must win it back
        w, b = getattr(gm, "f2/Gemm").weight, getattr(gm, "f2/Gemm").bias
        w.copy_(w[[1, 0, *range(2, 10)]])
        b.copy_(b[[1, 0, *range(2, 10)]])
    spec = get("augmix")
    out = spec.fn(_inputs(gm, *mnist, n_train=512), spec.config_cls(epochs=2, batch_size=64, lr=0.003))
    info = out.info
    assert info["best_epoch"] > 0 and not out.model.training
    h = info["history"]
    assert h[info["best_epoch"]]["mixed"] == max(e["mixed"] for e in h) > h[0]["mixed"]
    assert not torch.equal(gm.state_dict()["c1/Conv.weight"], out.model.state_dict()["c1/Conv.weight"])
    assert info["augmix"]["ops"] and "rotate" in info["augmix"]["ops"]
    x = CONTRACT.to_unit(mnist[0][900:964])
    want = out.model(x).detach().numpy()
    np.testing.assert_allclose(_run_on_ort(out.model, x), want, rtol=1e-4, atol=1e-4)


def test_adversarial_training_improves_pgd_accuracy_and_exports(lenet, mnist):
    spec = get("adversarial-training")
    eps = 0.1
    inputs = _inputs(lenet, *mnist)
    out = spec.fn(inputs, spec.config_cls(epochs=2, batch_size=64, eps=eps, steps=3, step_size=0.04, calib_attack_size=64))
    assert not out.model.training and out.info["attack"]["eps"] == eps
    x, y = CONTRACT.to_unit(mnist[0][:256]), torch.as_tensor(mnist[1][:256])

    def pgd_acc(m):
        adv = pgd_linf(m, CONTRACT, x, y, "logits", eps=eps, steps=3, step_size=0.04, seed=1)
        return accuracy(m, CONTRACT.to_model(adv), y)

    assert out.info["best_epoch"] > 0
    assert pgd_acc(out.model) > pgd_acc(lenet)
    assert not torch.equal(lenet.state_dict()["c1/Conv.weight"], out.model.state_dict()["c1/Conv.weight"])
    np.testing.assert_allclose(_run_on_ort(out.model, x[:32]), out.model(x[:32]).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_peers_are_listed(capsys):
    from onnxrepair.cli import main

    assert main(["methods", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    for name in ("augmix", "adversarial-training"):
        assert listed[name]["task"] == "robustness" and listed[name]["needs"] == "labelled images"
