"""Fine-tuning baselines: which weights move, and the best-checkpoint rule."""

from __future__ import annotations

import torch

from _deeppatch_fixtures import TinyCNN, synthetic, to_onnx_and_back, train_tiny
from onnxrepair.data.contract import InputContract
from onnxrepair.methods import RepairInputs, get


def _run(name, gm, **cfg):
    spec = get(name)
    inputs = RepairInputs(model=gm, contract=InputContract(scale=255.0), train=synthetic(200, seed=1), calib=synthetic(80, seed=2),
                          output_kind="logits", device=torch.device("cpu"), seed=0)
    return spec.fn(inputs, spec.config_cls(**cfg))


def test_finetune_last_moves_only_the_head(tmp_path):
    torch.manual_seed(0)
    gm = to_onnx_and_back(train_tiny(TinyCNN(bn=False), synthetic(200, seed=1), epochs=3), tmp_path / "m.onnx")
    out = _run("finetune-last", gm, epochs=2, lr=0.05)
    before, after = gm.state_dict(), out.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert out.info["layers_trained"] == ["fc/Gemm"]
    if out.info["best_epoch"] > 0:
        assert changed and all(k.startswith("fc/Gemm") for k in changed)
    else:
        assert not changed  # epoch 0 (the original) was best: nothing may have moved


def test_finetune_all_moves_convs(tmp_path):
    torch.manual_seed(0)
    gm = to_onnx_and_back(train_tiny(TinyCNN(bn=False), synthetic(200, seed=1), epochs=6), tmp_path / "m.onnx")
    with torch.no_grad():  # swap two classes in the head: accuracy falls, fine-tuning must win it back
        w = getattr(gm, "fc/Gemm").weight
        w.copy_(w[[1, 0, 2, 3]])
    out = _run("finetune", gm, epochs=4, lr=0.01)
    assert out.info["best_epoch"] > 0
    assert out.info["calib_accuracy"]["repaired_clean"] > out.info["calib_accuracy"]["original_clean"]
    before, after = gm.state_dict(), out.model.state_dict()
    assert not torch.equal(before["c1/Conv.weight"], after["c1/Conv.weight"])
    h = out.info["history"]
    assert max(e["mixed"] for e in h) == h[out.info["best_epoch"]]["mixed"]


def test_fit_max_clean_drop_makes_over_budget_epochs_ineligible():
    """The checkpoint choice under the retention limit: an epoch with the best mixed score but more clean-accuracy loss
    than ``max_clean_drop`` points is not chosen; without the limit it is."""
    import numpy as np

    from onnxrepair.data.dataset import ArrayDataset
    from onnxrepair.train import fit

    # epoch 0: clean 0.80 mixed 0.60; epoch 1: clean 0.79 (-1 pt) mixed 0.70; epoch 2: clean 0.797 (-0.3) mixed 0.65
    scores = iter([(0.80, 0.60), (0.79, 0.70), (0.797, 0.65)])
    data = ArrayDataset(x=np.zeros((4, 1, 2, 2), dtype=np.uint8), y=np.zeros(4, dtype=np.int64))
    contract = InputContract(scale=255.0, mean=(0.0,), std=(1.0,))

    def run(limit):
        nonlocal scores
        scores = iter([(0.80, 0.60), (0.79, 0.70), (0.797, 0.65)])
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))

        def score():
            c, m = next(scores)
            return {"calib_clean": c, "mixed": m}

        res = fit(model, list(model.parameters()), data, lambda x, y, s: model(x).sum() * 0, score, contract=contract, epochs=2,
                  batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0, device=torch.device("cpu"), seed=0, max_clean_drop=limit)
        return res.best_epoch

    assert run(100.0) == 1
    assert run(0.5) == 2
    assert run(0.0) == 0
