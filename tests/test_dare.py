"""DARE (onnxrepair.methods.dare): mining, the NNSlicer-style slice, masked tuning, the method on the history fixture."""

from __future__ import annotations

import glob
import re

import numpy as np
import pytest
import torch
from torch import fx, nn

from conftest import FIXTURES, fixture_path

FINAL = fixture_path("torch_cnn_history_final_legacy17")
HISTORY = FIXTURES / "models" / "history"


def _natural(paths):
    return sorted(paths, key=lambda p: int(re.findall(r"\d+", str(p).rsplit("/", 1)[-1])[-1]))


def _seq(paths, final):
    from onnxrepair.extras import ModelSequence

    return ModelSequence.from_paths(paths, final=final)


def _history(final):
    """epoch_1..epoch_7 (epoch_8 holds the final weights; the pipeline would skip it)."""
    return _seq(_natural(glob.glob(str(HISTORY / "*.onnx")))[:-1], final)


# --------------------------------------------------------------------------- mining
def test_mining_acceptance_rule_target_and_drops():
    from onnxrepair.methods.dare import MiningState

    # input 0: final right (0.6); ckpt 0 beats it (0.7), ckpt 1 does not beat the running best (0.65), ckpt 2 does (0.9)
    # input 1: final wrong (0.2); ckpt 0 is more confident (0.3) but still wrong -> rejected; ckpt 1 right (0.5) -> accepted
    # input 2: nothing beats the final model -> dropped
    # input 3: final right at 0.4 (multi-class); ckpt 2 at 0.45 without being the argmax -> accepted (final was right)
    final_p = torch.tensor([0.6, 0.2, 0.9, 0.4])
    final_ok = torch.tensor([True, False, True, True])
    ckpts = [
        (torch.tensor([0.7, 0.3, 0.1, 0.1]), torch.tensor([True, False, False, False])),
        (torch.tensor([0.65, 0.5, 0.2, 0.2]), torch.tensor([True, True, False, False])),
        (torch.tensor([0.9, 0.4, 0.3, 0.45]), torch.tensor([True, True, False, False])),
    ]
    st = MiningState.start(final_p, final_ok)
    seen = []
    for k, (p, right) in enumerate(ckpts):
        def act(idx, k=k):
            seen.append((k, idx.tolist()))
            return (torch.full((len(idx), 2), float(k)) + idx[:, None].float() / 10)
        st.step(k, p, right, act)
    assert st.source.tolist() == [2, 1, -1, 2]
    assert seen == [(0, [0]), (1, [1]), (2, [0, 3])]  # activations computed only for the accepted inputs
    assert torch.allclose(st.target[0], torch.tensor([2.0, 2.0])) and torch.allclose(st.target[1], torch.tensor([1.1, 1.1]))
    assert torch.allclose(st.best, torch.tensor([0.9, 0.5, 0.9, 0.45]))
    assert st.accepted_per_checkpoint == {0: 1, 1: 1, 2: 2}


def test_scan_indices():
    from onnxrepair.errors import UsageError
    from onnxrepair.methods.dare import scan_indices

    assert scan_indices(7, "later-half") == [3, 4, 5, 6]
    assert scan_indices(200, "later-half")[0] == 100
    assert scan_indices(3, "all") == [0, 1, 2]
    with pytest.raises(UsageError):
        scan_indices(3, "first")


def test_default_cut_cnn_and_mlp():
    import converters
    from onnxrepair.methods.dare import default_cut

    assert default_cut(converters.convert(FINAL).gm, torch.rand(2, 1, 28, 28)) == "relu_2"  # conv3 + ReLU, before GAP
    mlp = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)))
    assert default_cut(mlp, torch.rand(2, 4)) == "_3"  # the ReLU after the penultimate Linear


# --------------------------------------------------------------------------- slice
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(8, 5)
        self.out = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.out(torch.relu(self.fc(x.mean((2, 3)))))


def test_nnslicer_slice_shapes_and_share(one_torch_thread):
    from onnxrepair.localize.slices import class_contributions, merge_class_slices, sliceable_layers, synapse_mask

    torch.manual_seed(0)
    net = _Net().eval()
    x, y = torch.rand(40, 3, 8, 8), torch.arange(40) % 4
    layers = sliceable_layers(net)
    contrib, counts = class_contributions(net, layers, x, y, net, batch_size=16)
    assert counts == {0: 10, 1: 10, 2: 10, 3: 10}
    assert contrib[0]["conv"].shape == (6, 3) and contrib[0]["conv2"].shape == (8, 6) and contrib[0]["fc"].shape == (5, 8)
    keep = merge_class_slices(contrib, 0.95)
    for n, m in layers:
        assert keep[n].sum() == int(np.ceil(0.95 * keep[n].numel()))
    mask = synapse_mask(layers, keep)
    assert mask["conv.weight"].shape == (6, 3, 3, 3) and mask["fc.weight"].shape == (5, 8) and mask["conv.bias"].shape == (6,)
    # a conv mask covers the whole kernel of a kept (out, in) pair
    assert torch.equal(mask["conv2.weight"].all((2, 3)), mask["conv2.weight"].any((2, 3)))
    share = sum(int(m.sum()) for k, m in mask.items() if k.endswith("weight")) / sum(m.weight.numel() for _, m in layers)
    assert 0.93 <= share <= 0.97


def test_contribution_matches_first_order_definition(one_torch_thread):
    """For a Linear layer the contribution is |w_oi · Δa_i · ∂z_c/∂y_o| summed over samples."""
    from onnxrepair.localize.slices import class_contributions

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x, y = torch.rand(6, 3), torch.zeros(6, dtype=torch.long)
    contrib, _ = class_contributions(net, [("2", net[2])], x, y, net)
    h = torch.relu(net[0](x))
    dev = h - h.mean(0)
    g = torch.zeros(6, 2)
    g[:, 0] = 1  # dz_0/dy = e_0
    want = (net[2].weight[None] * g[:, :, None] * dev[:, None, :]).abs().sum(0)
    torch.testing.assert_close(contrib[0]["2"], want.detach())


def test_tuning_leaves_weights_outside_the_slice_bit_identical(one_torch_thread):
    from onnxrepair.graph import split_at
    from onnxrepair.localize.slices import class_contributions, merge_class_slices, sliceable_layers, synapse_mask
    from onnxrepair.transform import RegressionData, TuningConfig, tune_prefix

    torch.manual_seed(0)
    gm = fx.symbolic_trace(_Net().eval())
    split = split_at(gm, "relu_1")
    x, y = torch.rand(32, 3, 8, 8), torch.arange(32) % 4
    layers = sliceable_layers(gm, {n for n, _ in split.prefix.named_parameters()})
    assert [n for n, _ in layers] == ["conv", "conv2"]
    contrib, _ = class_contributions(gm, layers, x, y, gm)
    mask = synapse_mask(layers, merge_class_slices(contrib, 0.7))
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    with torch.no_grad():
        target = split.prefix(x) + 0.5
    tune_prefix(split.prefix, RegressionData(x, target), mask, TuningConfig(epochs=3, lr=1e-2, batch_size=8, restore="step"),
                device=torch.device("cpu"))
    after = dict(gm.named_parameters())
    moved = 0
    for n, p in after.items():
        if n in mask:
            assert torch.equal(p[~mask[n]], before[n][~mask[n]]), n
            moved += int((p[mask[n]] != before[n][mask[n]]).sum())
        else:
            assert torch.equal(p, before[n]), n  # suffix and anything outside the prefix's slice
    assert moved > 0


# --------------------------------------------------------------------------- the method
def _inputs(history=None):
    import converters
    from onnxrepair.data import load_dataset
    from onnxrepair.data.contract import finalize_contract, resolve_contract
    from onnxrepair.methods import RepairInputs
    from onnxrepair.repair import split_data

    c = converters.convert(FINAL)
    ds = load_dataset(str(FIXTURES / "data" / "mnist_small.npz"))
    contract = resolve_contract(c.inputs[0].shape, ds.x[:256])
    finalize_contract(contract, ds.x[:256])
    tr, cal, _ = split_data(ds, None, 0)
    inp = RepairInputs(model=c.gm, contract=contract, train=tr, calib=cal, output_kind="logits", device=torch.device("cpu"))
    inp.extras = {"history": history(c.gm) if history else None}
    return inp


def test_method_on_history_fixture(one_torch_thread):
    from onnxrepair.methods import get, make_config

    spec = get("dare")
    inp = _inputs(_history)
    before = {n: p.detach().clone() for n, p in inp.model.named_parameters()}
    out = spec.fn(inp, make_config(spec, {"eps": "0.1", "epochs": "4", "lrs": "1e-4,1e-3"}))
    info = out.info
    assert info["cut"] == "relu_2"
    m = info["mining"]
    assert m["accepted"] > 0 and m["accepted"] + m["dropped"] == m["pool"]
    assert sum(m["target_epochs"].values()) == m["accepted"]
    assert list(m["target_epochs"]) == ["epoch_4.onnx", "epoch_5.onnx", "epoch_6.onnx", "epoch_7.onnx"]  # the later half of 7 checkpoints
    assert info["choice"]["lr"] in (1e-4, 1e-3) and len(info["choice"]["runs"]) == 2
    assert all(torch.equal(p, before[n]) for n, p in inp.model.named_parameters())  # the input model is untouched
    assert [n for n, _ in out.model.named_parameters()] == list(before)  # same architecture
    # the suffix (the classifier head) is never tuned
    assert torch.equal(dict(out.model.named_parameters())["fc/Gemm.weight"], before["fc/Gemm.weight"])


def test_cut_and_slice_share_grid_chosen_on_validation(one_torch_thread):
    """``--cut-layer default,NODE --slice-keep 0.95,0.5``: every (cut, share, lr) cell is tuned and scored, the chosen
    cell is the best validation score (ties to the earlier cell), and each cut mines its own targets."""
    from onnxrepair.methods import get, make_config

    spec = get("dare")
    inp = _inputs(_history)
    out = spec.fn(inp, make_config(spec, {"eps": "0.1", "epochs": "1", "lrs": "1e-3", "cut_layer": "default,relu_1",
                                          "slice_keep": "0.95,0.5", "select_max_drop": "100"}))
    runs = out.info["choice"]["runs"]
    assert [(r["cut"], r["slice_keep"]) for r in runs] == [("relu_2", 0.95), ("relu_2", 0.5), ("relu_1", 0.95), ("relu_1", 0.5)]
    best = min(r["score"] for r in runs)
    first_best = next(r for r in runs if r["score"] <= best + 1e-12)
    ch = out.info["choice"]
    assert (ch["cut"], ch["slice_keep"]) == (first_best["cut"], first_best["slice_keep"])
    assert out.info["cut"] == ch["cut"] and out.info["slice"]["keep"] == ch["slice_keep"]
    # the 50 % slice tunes fewer weights than the 95 % one at the same cut; the earlier cut has a smaller prefix
    assert runs[1]["tunable_weights"] < runs[0]["tunable_weights"] and runs[3]["tunable_weights"] < runs[2]["tunable_weights"]
    assert runs[2]["tunable_weights"] < runs[0]["tunable_weights"]
    single = spec.fn(inp, make_config(spec, {"eps": "0.1", "epochs": "1", "lrs": "1e-3"}))
    assert [(r["cut"], r["slice_keep"]) for r in single.info["choice"]["runs"]] == [("relu_2", 0.95)]  # the published defaults


def test_transfer_selection_crafts_once_on_the_original(one_torch_thread, monkeypatch):
    """``select_protocol=transfer``: the validation examples are crafted once, on the original model, and every epoch of
    every lr is scored on them; white-box crafts on each scored classifier. At epoch 0 (the original) both agree."""
    from onnxrepair.errors import UsageError
    from onnxrepair.methods import dare as D
    from onnxrepair.methods import get, make_config

    calls = []
    craft = D.RobustSelector.craft

    def counting(self, model):
        calls.append(model)
        return craft(self, model)

    monkeypatch.setattr(D.RobustSelector, "craft", counting)
    spec = get("dare")
    inp = _inputs(_history)
    opts = {"eps": "0.1", "epochs": "2", "lrs": "1e-4,1e-3", "select_size": "64"}
    tr = spec.fn(inp, make_config(spec, {**opts, "select_protocol": "transfer"}))
    assert len(calls) == 1 and "transfer" in tr.info["choice"]["on"]
    assert all(p is not q for p, q in zip(calls[0].parameters(), inp.model.parameters()))  # a copy, not the caller's model
    calls.clear()
    wb = spec.fn(inp, make_config(spec, {**opts, "select_protocol": "whitebox"}))
    assert len(calls) == 2 * 3  # two lrs, epochs 0..2 each
    first = lambda out: [r["curve"][0]["val_fgsm"] for r in out.info["choice"]["runs"]]  # noqa: E731
    assert first(tr) == first(wb)
    with pytest.raises(UsageError, match="select-protocol"):
        spec.fn(inp, make_config(spec, {**opts, "select_protocol": "blackbox"}))


def test_no_input_accepted_is_validation_failed(one_torch_thread):
    """A history holding only the final model's weights can never beat the final model."""
    from onnxrepair.errors import ValidationFailed
    from onnxrepair.methods import get, make_config

    spec = get("dare")
    with pytest.raises(ValidationFailed, match="no pool input was accepted"):
        spec.fn(_inputs(lambda gm: _seq([FINAL], gm)), make_config(spec, {"scan": "all", "epochs": "1", "lrs": "1e-3"}))


# --------------------------------------------------------------------------- the per-attack adversarial fine-tuning peers
@pytest.mark.parametrize("attack,name", [("fgsm", "fgsm"), ("cw", "cw-l2")])
def test_adversarial_training_peer_per_attack(attack, name, one_torch_thread):
    from onnxrepair.errors import UsageError
    from onnxrepair.methods import get, make_config

    spec = get("adversarial-training")
    inp = _inputs()
    inp.train = inp.train.limit(128, seed=0)
    inp.calib = inp.calib.limit(32, seed=0)
    out = spec.fn(inp, make_config(spec, {"attack": attack, "epochs": "1", "eps": "0.1" if attack == "fgsm" else "2",
                                          "steps": "3", "calib_attack_size": "16"}))
    assert out.info["attack"]["name"] == name
    assert f"calib_{attack}" in out.info["history"][0]
    with pytest.raises(UsageError, match="--attack"):
        spec.fn(inp, make_config(spec, {"attack": "jsma"}))


# --------------------------------------------------------------------------- through the pipeline and the CLI
DATA = FIXTURES / "data" / "mnist_small.npz"


def test_pipeline_repairs_with_the_history_fixture(tmp_path, one_torch_thread):
    """The whole history folder (epoch_8 = the final weights, skipped; epoch_3 by the dynamo exporter) through
    prepare -> DARE -> export -> judge: the repaired file keeps the interface and validates on onnxruntime."""
    import onnx

    from onnxrepair.data import load_dataset
    from onnxrepair.repair import repair

    out = tmp_path / "dare.onnx"
    res = repair(FINAL, "dare", load_dataset(str(DATA)).limit(500, seed=0), output=out, max_accuracy_drop=100.0,
                 options={"history": str(HISTORY), "eps": "0.1", "epochs": "2", "lrs": "1e-3"})
    assert res.written and out.exists() and res.fidelity["passed"]
    assert res.info["history"]["skipped"] == [{"checkpoint": "epoch_8.onnx", "reason": "same weights as the final model"}]
    assert "epoch_3.onnx" in res.info["history"]["checkpoints"]
    assert res.info["mining"]["accepted"] > 0 and any("accepted" in line for line in res.summary)
    a, b = onnx.load(str(FINAL)), onnx.load(str(out))
    sig = lambda m: [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in (*m.graph.input, *m.graph.output)]
    assert sig(a) == sig(b)


def _softened(tmp_path):
    """A checkpoint that is the final model with its logits halved: never more confident in the true class where the
    final model is right, and predicting the same (wrong) class where it is wrong, so no input is ever accepted."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(FINAL))
    for init in m.graph.initializer:
        if init.name.startswith("fc"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.5, init.name))
    path = tmp_path / "softened_1.onnx"
    onnx.save(m, str(path))
    return path


def _cli(tmp_path, history, *extra):
    from onnxrepair.cli import main

    out = tmp_path / "out.onnx"
    rc = main(["repair", str(FINAL), "--method", "dare", "--data", str(DATA), "-o", str(out), "--history", str(history),
               "--epochs", "1", "--lrs", "1e-3", *extra])
    return rc, out


def test_cli_bad_histories(tmp_path, capsys, one_torch_thread):
    rc, out = _cli(tmp_path, tmp_path / "nothing_*.onnx")
    assert rc == 2 and not out.exists()
    assert "names no .onnx file" in capsys.readouterr().err

    bad = tmp_path / "hist"
    bad.mkdir()
    (bad / "epoch_1.onnx").write_bytes((HISTORY / "epoch_1.onnx").read_bytes())
    (bad / "epoch_2.onnx").write_bytes(b"this is not a protobuf")
    rc, out = _cli(tmp_path, bad)
    assert rc == 3 and not out.exists()
    assert "epoch_2.onnx" in capsys.readouterr().err

    rc, out = _cli(tmp_path, f"{HISTORY / 'epoch_1.onnx'},{fixture_path('torch_lenet_legacy11')}")
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "torch_lenet_legacy11.onnx" in err and "architecture" in err

    rc, out = _cli(tmp_path, _softened(tmp_path), "--scan", "all")
    assert rc == 1 and not out.exists()
    assert "no pool input was accepted" in capsys.readouterr().err


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_selection_attack_crafted_in_parts_is_the_same_as_in_one_pass(attack):
    """Crafting the selector's attack back-propagates through the whole model, so a memory budget crafts it in parts
    (issue 19: on ResNet-50 at 224 the 64 images in one pass held 6 GB): every image's examples are those of one pass,
    PGD's random start drawn for the whole set and sliced."""
    import converters
    from conftest import FIXTURES, fixture_path

    from onnxrepair.data import load_dataset
    from onnxrepair.data.contract import finalize_contract, resolve_contract
    from onnxrepair.methods.dare import RobustSelector

    data = load_dataset(str(FIXTURES / "data" / "mnist_small.npz")).limit(40, seed=0)
    conv = converters.convert(fixture_path("torch_lenet_legacy11"))
    contract = resolve_contract(conv.inputs[0].shape, data.x[:16])
    finalize_contract(contract, data.x[:16])
    unit, y = contract.to_unit(data.x), torch.as_tensor(data.y, dtype=torch.long)
    whole = RobustSelector(unit, y, contract, attack, 0.3, 3, "logits").craft(conv.gm)
    parts = RobustSelector(unit, y, contract, attack, 0.3, 3, "logits", chunk=7).craft(conv.gm)
    assert not torch.equal(whole, unit)
    assert torch.allclose(whole, parts, atol=1e-6)


def test_slice_contributions_do_not_depend_on_the_pass_size():
    """DARE's slice sums per-class contributions over samples: the budget's smaller passes (issue 19) give the same
    sums to float rounding, so the same synapses are kept."""
    import converters

    from onnxrepair.data import load_dataset
    from onnxrepair.data.contract import finalize_contract, resolve_contract
    from onnxrepair.localize.slices import class_contributions, merge_class_slices, sliceable_layers
    from onnxrepair.nn import first_output

    data = load_dataset(str(FIXTURES / "data" / "mnist_small.npz")).limit(60, seed=0)
    conv = converters.convert(fixture_path("torch_lenet_legacy11"))
    contract = resolve_contract(conv.inputs[0].shape, data.x[:16])
    finalize_contract(contract, data.x[:16])
    x, y = contract.to_model(contract.to_unit(data.x)), torch.as_tensor(data.y, dtype=torch.long)
    layers = sliceable_layers(conv.gm)
    run = lambda xb: first_output(conv.gm(xb))  # noqa: E731
    big, n_big = class_contributions(conv.gm, layers, x, y, run, batch_size=64)
    small, n_small = class_contributions(conv.gm, layers, x, y, run, batch_size=3)
    assert n_big == n_small
    for c in big:
        for n in big[c]:
            assert torch.allclose(big[c][n], small[c][n], rtol=1e-4, atol=1e-7), (c, n)
    kb, ks = merge_class_slices(big, 0.5), merge_class_slices(small, 0.5)
    assert all(torch.equal(kb[n], ks[n]) for n in kb)
