"""The evaluator perturbs what it says it perturbs: blur changes a textured image at every sigma, a fixture
model's accuracy under blur is not its clean accuracy, and a corruption at severity 5 changes an image more
than at severity 1. (The hand-computed cases in test_evaluate.py use constant images, which blur leaves alone.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FIXTURES, fixture_path
from onnxrepair.data.contract import InputContract
from onnxrepair.data.dataset import ArrayDataset
from onnxrepair.evaluate import evaluate_models
from onnxrepair.perturb import corruptions as C
from onnxrepair.perturb.blur import DEEPPATCH_SIGMAS, gaussian_blur


def _textured(n: int = 4, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Stripes of several frequencies plus noise, in [0, 1]: every blur sigma has something to smooth."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    base = 0.5 + 0.2 * torch.sin(xx * 1.3) + 0.15 * torch.sin(yy * 0.4) * torch.cos(xx * 0.25)
    x = base.expand(n, c, size, size) + 0.1 * torch.rand(n, c, size, size, generator=g)
    return x.clamp(0, 1).contiguous()


def test_blur_changes_a_textured_image_at_every_sigma():
    x = _textured()
    change = [float((gaussian_blur(x, s) - x).abs().mean()) for s in DEEPPATCH_SIGMAS]
    assert min(change) > 0.02, change
    assert all(a < b for a, b in zip(change, change[1:])), f"more blur should change more: {change}"


def test_accuracy_under_blur_differs_from_clean_on_a_fixture_model():
    d = np.load(FIXTURES / "data" / "mnist_small.npz")
    ds = ArrayDataset(d["x"][:200], d["y"][:200])
    rep = evaluate_models([fixture_path("torch_lenet_legacy11")], ds, InputContract(scale=255.0), blur=True, provider="cpu")
    m = rep.models[0]
    blur = {float(s): a for s, a in m.blur.items()}
    # measured on these 200 images: clean 0.905, sigma 3 0.65; robustness (clean + 6 blurred copies) 0.83
    assert m.clean > 0.85
    assert blur[3.0] < m.clean - 0.1, (m.clean, blur)
    assert blur[3.0] < blur[0.5]
    assert m.robustness < m.clean - 0.03
    assert m.robustness == pytest.approx((m.clean + sum(blur.values())) / (1 + len(DEEPPATCH_SIGMAS)))


# CIFAR-10-C's elastic_transform table is not monotone in pixel change: severity 1 is affine only with the
# largest affine jitter (0.08 of the image side), later severities trade it for elastic displacement.
NOT_MONOTONE = {"elastic_transform"}


@pytest.mark.parametrize("name", sorted(set(C.CORRUPTIONS) - NOT_MONOTONE))
def test_severity_5_changes_more_than_severity_1(name):
    x = _textured(n=4, size=32)
    lo, hi = C.SEVERITIES[name][0], C.SEVERITIES[name][-1]
    d1 = (C.apply(name, x, lo, seed=1) - x).abs()
    d5 = (C.apply(name, x, hi, seed=1) - x).abs()
    assert float(d5.mean()) > float(d1.mean()) > 0, (name, float(d1.mean()), float(d5.mean()))
    changed1, changed5 = float((d1 > 1 / 255).float().mean()), float((d5 > 1 / 255).float().mean())
    if changed1 < 0.9:  # where severity 1 already moves (nearly) every pixel, only the size of the change can grow
        assert changed5 > changed1, (name, changed1, changed5)


def test_elastic_transform_changes_the_image_at_every_severity():
    x = _textured(n=4, size=32)
    assert all(float((C.apply("elastic_transform", x, s, seed=1) - x).abs().mean()) > 0.02 for s in C.SEVERITIES["elastic_transform"])
