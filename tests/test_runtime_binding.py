"""onnxruntime I/O binding (Session.run with torch tensors): the same outputs as plain runs.

CUDA is where binding pays (device tensors read in place); here the CPU provider runs the same code path, so the
results must be identical to the numpy path, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from onnxrepair.data.contract import InputContract
from onnxrepair.data.dataset import ArrayDataset
from onnxrepair.evaluate import evaluate_models
from onnxrepair.runtime import make_session

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _mnist(n: int):
    with np.load(FIX / "data" / "mnist_small.npz") as z:
        x, y = z["x"][:n], z["y"][:n].astype(np.int64)
    return (x[:, None] if x.ndim == 3 else x), y


@pytest.mark.parametrize("model", ["torch_lenet_legacy11.onnx", "torch_lenet_fixedbatch_legacy11.onnx"])
def test_bound_run_equals_plain_run(model):
    s = make_session(FIX / "models" / model, "cpu")
    assert s.bindable and not s.binds  # the CPU provider: callers keep numpy unless told to bind
    x, _ = _mnist(5)  # 5 rows: a fixed-batch model gets them in padded chunks
    feed = (x / 255.0).astype(np.float32)
    plain = s.run({s.input_names[0]: feed})
    bound = s.run({s.input_names[0]: torch.from_numpy(feed.astype(np.float64))})  # cast to the input's dtype on the way
    assert len(plain) == len(bound) and all(np.array_equal(a, b) for a, b in zip(plain, bound))
    assert bound[0].shape[0] == 5


def test_sequence_outputs_are_not_bound():
    s = make_session(FIX / "models" / "sklearn_mlp_zipmap.onnx", "cpu")
    assert not s.bindable
    s.bind = True
    assert not s.binds
    rows = np.random.default_rng(0).random((4, 16), dtype=np.float32)
    plain, via_torch = s.run({s.input_names[0]: rows}), s.run({s.input_names[0]: torch.from_numpy(rows)})
    assert np.array_equal(plain[0], via_torch[0]) and plain[1] == via_torch[1]


def test_evaluation_with_binding_equals_without():
    x, y = _mnist(96)
    ds = ArrayDataset(x=x, y=y)
    c = InputContract(layout="nchw", scale=255.0)
    reps = []
    for bind in (False, True):
        s = make_session(FIX / "models" / "torch_lenet_legacy11.onnx", "cpu")
        s.bind = bind
        reps.append(evaluate_models([s], ds, c, corruptions=["gaussian_noise"], severities=[3], blur=True, batch_size=32, provider="cpu", device="cpu"))
    a, b = (r.models[0] for r in reps)
    assert a.clean == b.clean and a.blur == b.blur and a.corruptions == b.corruptions
    assert a.clean > 0.5
