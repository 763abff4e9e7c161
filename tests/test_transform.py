"""The model-transformation framework: cut choice, fx splitting, masked tuning, synchronisation,
and a non-FMT strategy plugging in unchanged."""

import copy

import pytest
import torch
from torch import fx, nn

from onnxrepair.errors import UsageError
from onnxrepair.transform import (
    FullSlice,
    RegressionData,
    TuningConfig,
    default_cut,
    run_transform,
    tune_prefix,
)
from onnxrepair.transform import split_model as split_at
from onnxrepair.graph import resolve_node as resolve_cut
from onnxrepair.localize.slices import neuron_mask, topk_frequent


def mlp(seed=0, widths=(6, 16, 8, 4, 2)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return fx.symbolic_trace(nn.Sequential(*layers[:-1])).eval()


def test_default_cut_leaves_two_layers_in_suffix():
    gm = mlp(widths=(5, 64, 32, 16, 8, 4, 2))  # the FMT paper's MLP: prefix = first 4 layers, 8-d
    sp = split_at(gm)
    assert sp.prefix(torch.zeros(3, 5)).shape == (3, 8)
    assert [lay.width for lay in sp.layers] == [64, 32, 16, 8]
    assert sp.cut == default_cut(gm)


def test_split_composes_to_the_model():
    gm = mlp()
    x = torch.randn(10, 6)
    for cut in ("1", "2", "3", "5"):
        sp = split_at(gm, cut)
        assert not sp.suffix_takes_inputs
        torch.testing.assert_close(sp.suffix(sp.prefix(x)), gm(x), rtol=0, atol=0)


def test_unknown_cut_lists_valid():
    gm = mlp()
    with pytest.raises(UsageError, match="does not exist; valid: .*_0"):
        resolve_cut(gm, "layer9")
    assert resolve_cut(gm, "2") == "_2"  # module name resolves to its node


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h)) + x)


def test_suffix_that_reads_the_input():
    gm = fx.symbolic_trace(Skip()).eval()
    sp = split_at(gm, "relu")
    x = torch.randn(5, 4)
    assert sp.suffix_takes_inputs
    torch.testing.assert_close(sp.run_suffix(*sp.run_prefix(x)), gm(x))


def _data(sp, n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    with torch.no_grad():
        t = sp.prefix(x) + 0.5 * torch.randn(n, sp.layers[-1].width, generator=g)
    return RegressionData(x, t)


@pytest.mark.parametrize("restore", ["step", "epoch"])
def test_masked_tuning_leaves_other_weights_bit_identical(restore):
    sp = split_at(mlp(), "_3")
    imp = [torch.tensor([i % 3 == 0 for i in range(16)]), torch.tensor([True, False] * 4)]
    mask = neuron_mask(sp, imp)
    before = {n: p.detach().clone() for n, p in sp.prefix.named_parameters()}
    info = tune_prefix(sp.prefix, _data(sp), mask, TuningConfig(epochs=5, lr=1e-2, batch_size=16, restore=restore), device=torch.device("cpu"))
    assert info["loss"][-1] < info["loss"][0]
    moved = 0
    for n, p in sp.prefix.named_parameters():
        m = mask[n]
        assert torch.equal(p[~m], before[n][~m]), n  # bit-identical outside the slice
        moved += int((p[m] != before[n][m]).sum())
    assert moved > 0 and moved <= info["tunable_weights"]


@pytest.mark.parametrize("restore", ["step", "epoch"])
def test_checkpoint_keeps_the_best_eligible_epoch(restore):
    """The weights returned are the ones the checkpoint saw at the best-scoring eligible epoch; an
    ineligible epoch (score None) is never chosen, even when it would score best."""
    sp = split_at(mlp(), "_3")
    mask = neuron_mask(sp, [torch.ones(16, dtype=torch.bool), torch.ones(8, dtype=torch.bool)])
    seen = {}

    def checkpoint(epoch):
        seen[epoch] = {n: p.detach().clone() for n, p in sp.prefix.named_parameters()}
        return (None if epoch == 4 else float((epoch - 3) ** 2)), {"note": epoch}

    info = tune_prefix(sp.prefix, _data(sp), mask, TuningConfig(epochs=5, lr=1e-2, batch_size=16, restore=restore),
                       device=torch.device("cpu"), checkpoint=checkpoint)
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    sel = info["selection"]
    assert sel["selected_epoch"] == 3 and sel["eligible"] and [e["note"] for e in sel["epochs"]] == [0, 1, 2, 3, 4, 5]
    for n, p in sp.prefix.named_parameters():
        assert torch.equal(p, seen[3][n]), n
    # the choice mattered: epoch 3 differs from the last epoch and from the original
    assert any(not torch.equal(seen[3][n], seen[5][n]) for n in seen[3])
    assert any(not torch.equal(seen[3][n], seen[0][n]) for n in seen[3])


def test_checkpoint_with_no_eligible_epoch_returns_the_original():
    sp = split_at(mlp(), "_3")
    mask = neuron_mask(sp, [torch.ones(16, dtype=torch.bool), torch.ones(8, dtype=torch.bool)])
    before = {n: p.detach().clone() for n, p in sp.prefix.named_parameters()}
    info = tune_prefix(sp.prefix, _data(sp), mask, TuningConfig(epochs=3, lr=1e-2, batch_size=16),
                       device=torch.device("cpu"), checkpoint=lambda epoch: (None, {}))
    assert info["selection"]["selected_epoch"] == 0 and not info["selection"]["eligible"]
    assert info["changed_weights"] == 0
    for n, p in sp.prefix.named_parameters():
        assert torch.equal(p, before[n]), n


def test_neuron_mask_shape():
    sp = split_at(mlp(), "_3")
    mask = neuron_mask(sp, [torch.tensor([True] + [False] * 15), torch.tensor([False, True] + [False] * 6)])
    w0, w1 = mask["0.weight"], mask["2.weight"]
    assert w0.sum() == 6 and w0[0].all()  # all inputs into the important first-layer neuron
    assert w1.sum() == 1 and w1[1, 0]  # only important(0) -> important(1)
    assert mask["2.bias"].tolist() == [False, True] + [False] * 6


def test_topk_frequent():
    delta = torch.tensor([[5.0, 4, 0, 0, 1], [0, 3, 9, 0, 0], [0, 8, 0, 7, 0]])
    keep, counts = topk_frequent(delta, top_ratio=0.4, keep_ratio=0.2)  # top 2 per row, keep 1
    assert counts.tolist() == [1, 3, 1, 1, 0]
    assert keep.tolist() == [False, True, False, False, False]


def test_topk_frequent_ignores_neurons_that_did_not_move():
    # rows where the flip moves one neuron (or none): zero ties must not be marked (they would go to index 0)
    delta = torch.tensor([[0.0, 0, 0, 2], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 3, 0]])
    keep, counts = topk_frequent(delta, top_ratio=0.5, keep_ratio=0.25)  # top 2 per row, keep 1
    assert counts.tolist() == [0, 0, 1, 2]
    assert keep.tolist() == [False, False, False, True]


class ShiftTargets:
    """A stand-in for a different instance (e.g. DARE): fixed targets, labels available."""

    name = "shift"

    def make(self, ctx):
        with torch.no_grad():
            return RegressionData(ctx.x_train, ctx.split.prefix(ctx.x_train) + 1.0, {"note": "plugged in"})


def test_run_transform_synchronises_and_keeps_suffix_and_architecture():
    gm = mlp()
    original = copy.deepcopy(gm)
    x = torch.randn(128, 6)
    res = run_transform(gm, cut="_3", targets=ShiftTargets(), slicer=FullSlice(), tuning=TuningConfig(epochs=3, lr=1e-2),
                        x_train=x, device=torch.device("cpu"))
    new = res.model
    assert new.code == original.code  # architecture unchanged
    assert [n for n, _ in new.named_parameters()] == [n for n, _ in original.named_parameters()]
    for n in ("4.weight", "4.bias", "6.weight", "6.bias"):  # suffix untouched
        assert torch.equal(new.get_parameter(n), original.get_parameter(n))
    assert not torch.equal(new.get_parameter("0.weight"), original.get_parameter("0.weight"))  # prefix tuned, synced
    for n, p in gm.named_parameters():  # the caller's model is never modified
        assert torch.equal(p, original.get_parameter(n))
    assert res.info["targets"]["note"] == "plugged in"
    assert res.info["suffix_parameters"] == ["4.bias", "4.weight", "6.bias", "6.weight"]
    # the synced classifier equals suffix(prefix) of the tuned split
    sp = split_at(new, "_3")
    torch.testing.assert_close(sp.suffix(sp.prefix(x)), new(x))
