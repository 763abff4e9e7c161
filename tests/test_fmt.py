"""FMT: pair generator, slicer, targets, the registered method end to end (ONNX in, onnxruntime
metrics out), and the two baselines."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from onnxrepair.data.contract import InputContract
from onnxrepair.data.tabular import load_csv, resolve_protected
from onnxrepair.errors import UsageError
from onnxrepair.data.protected import ProtectedSpec
from onnxrepair.methods import RepairInputs, get
from onnxrepair.methods.reweigh_finetune import kamiran_calders_weights
from onnxrepair.data.protected import counterfactual_pairs, feature_groups, flip_protected
from onnxrepair.methods.fmt import CounterfactualTargets, ProtectedSensitivitySlicer
from onnxrepair.transform import TransformContext, split_model as split_at

ROOT = Path(__file__).resolve().parents[1]
SPEC = ProtectedSpec("sex", 1, 1.0, 0.0)


def test_pairs_differ_only_in_protected_and_follow_marginals():
    rng = np.random.default_rng(0)
    x = np.stack([rng.integers(0, 3, 200), rng.integers(0, 2, 200), rng.normal(size=200)], 1).astype(np.float32)
    a, b = counterfactual_pairs(x, SPEC, 500, seed=3)
    assert a.shape == b.shape == (500, 3)
    assert (a[:, 1] == 1).all() and (b[:, 1] == 0).all()
    np.testing.assert_array_equal(np.delete(a, 1, 1), np.delete(b, 1, 1))
    for j in (0, 2):  # every value comes from that column of the training rows
        assert np.isin(a[:, j], x[:, j]).all()
    assert abs(a[:, 0].mean() - x[:, 0].mean()) < 0.15  # marginal, roughly
    # columns are drawn independently, not as whole rows
    combos = {(r[0], r[2]) for r in x}
    assert np.mean([(r[0], r[2]) in combos for r in a]) < 0.7  # whole rows would give 1.0
    a2, _ = counterfactual_pairs(x, SPEC, 500, seed=3)
    np.testing.assert_array_equal(a, a2)


def test_feature_groups_join_onehot_columns():
    cols = ["age", "work=a", "work=b", "sex", "work=other", "rel=x", "rel=y"]
    assert feature_groups(cols, 7) == [[0], [1, 2, 4], [3], [5, 6]]
    assert feature_groups(None, 3) == [[0], [1], [2]]
    assert feature_groups(["a", "b"], 3) == [[0], [1], [2]]  # names that do not fit the data are ignored


def test_pairs_sample_a_onehot_feature_as_one_draw():
    """A categorical feature's marginal is over its categories: each pair holds exactly one category
    (sampling its one-hot columns independently gives rows with none or several, which no record has)."""
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 3, 400)
    x = np.column_stack([rng.normal(size=400), np.eye(3)[cat], rng.integers(0, 2, 400)]).astype(np.float32)
    spec = ProtectedSpec("sex", 4, 1.0, 0.0)
    groups = feature_groups(["age", "c=a", "c=b", "c=c", "sex"], 5)
    a, b = counterfactual_pairs(x, spec, 2000, seed=1, groups=groups)
    assert (a[:, 1:4].sum(1) == 1).all() and (b[:, 1:4].sum(1) == 1).all()
    np.testing.assert_allclose(a[:, 1:4].mean(0), np.eye(3)[cat].mean(0), atol=0.04)  # the category marginal
    assert (a[:, 4] == 1).all() and (b[:, 4] == 0).all()
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    ungrouped, _ = counterfactual_pairs(x, spec, 2000, seed=1)
    assert (ungrouped[:, 1:4].sum(1) != 1).any()  # what the grouping prevents
    with pytest.raises(ValueError):
        counterfactual_pairs(x, spec, 5, groups=[[0, 1], [2, 3]])


def test_flip_protected_drops_other_values():
    x = np.array([[0, 1], [0, 0], [0, 7]], dtype=np.float32)
    o, f = flip_protected(x, SPEC)
    assert o[:, 1].tolist() == [1, 0] and f[:, 1].tolist() == [0, 1]


class Biased(nn.Module):
    """Hidden neuron 2 of the first layer reads only the protected feature (index 1)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 3), nn.Linear(3, 2)
        with torch.no_grad():
            self.l1.weight.mul_(0.1)
            self.l1.weight[2] = torch.tensor([0.0, 5.0, 0.0])
            self.l1.bias[2] = 1.0
            self.l2.weight.mul_(0.1)
            self.l2.weight[3] = 0.0
            self.l2.weight[3, 2] = 5.0

    def forward(self, x):
        h = torch.relu(self.l1(x))
        h = torch.relu(self.l2(h))
        return self.l4(torch.relu(self.l3(h)))


def _ctx(gm, x, cut=None):
    return TransformContext(split_at(gm, cut), torch.as_tensor(x), torch.device("cpu"), 0, "logits", SPEC)


def test_slicer_finds_the_protected_neurons():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Biased()).eval()
    x = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    x[:, 1] = np.random.default_rng(1).integers(0, 2, 300)
    ctx = _ctx(gm, x, "relu_1")
    important, info = ProtectedSensitivitySlicer(0.2, 0.2).important(ctx)
    assert important[0].nonzero().flatten().tolist() == [2]
    assert important[1].nonzero().flatten().tolist() == [3]
    mask, _ = ProtectedSensitivitySlicer(0.2, 0.2).mask(ctx)
    assert mask["l1.weight"].sum() == 3 and mask["l1.weight"][2].all()
    assert mask["l2.weight"].sum() == 1 and mask["l2.weight"][3, 2]
    with pytest.raises(UsageError):
        ProtectedSensitivitySlicer(0.0, 0.1)


@pytest.mark.parametrize("mode", ["dual", "single"])
def test_targets_are_the_more_confident_members_activation(mode):
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Biased()).eval()
    x = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    x[:, 1] = np.random.default_rng(1).integers(0, 2, 100)
    ctx = _ctx(gm, x, "relu_1")
    data = CounterfactualTargets(40, mode).make(ctx)
    a, b = (torch.as_tensor(v) for v in counterfactual_pairs(x, SPEC, 40, 0))
    with torch.no_grad():
        ca, cb = torch.softmax(gm(a), 1).max(1).values, torch.softmax(gm(b), 1).max(1).values
        ha, hb = ctx.split.prefix(a), ctx.split.prefix(b)
    want = torch.where((ca >= cb)[:, None], ha, hb)
    if mode == "dual":
        assert data.x.shape == (80, 3)
        torch.testing.assert_close(data.target, torch.cat([want, want]))
    else:
        assert data.x.shape == (40, 3)
        torch.testing.assert_close(data.target, want)
        torch.testing.assert_close(data.x, torch.where((ca >= cb)[:, None], b, a))  # the less confident member
    with pytest.raises(UsageError):
        CounterfactualTargets(10, "triple")


def test_kamiran_calders_weights_hand_computed():
    g = np.array([1, 1, 1, 0])
    y = np.array([1, 1, 0, 0])
    # P(g=1)=3/4, P(y=1)=1/2, P(g=1,y=1)=2/4 -> 0.75; (1,0): 3/4*1/2/(1/4)=1.5; (0,0): 1/4*1/2/(1/4)=0.5
    np.testing.assert_allclose(kamiran_calders_weights(g, y), [0.75, 0.75, 1.5, 0.5])


def _fixture():
    from converters.load import load_model
    from converters.to_torch import to_torch

    tr = load_csv(ROOT / "fixtures/data/adult_train.csv", "income", ["sex"])
    te = load_csv(ROOT / "fixtures/data/adult_test.csv", "income", ["sex"])
    return tr, te, resolve_protected(tr, "sex"), to_torch(load_model(ROOT / "fixtures/models/adult_mlp.onnx"))


def _inputs(gm, tr, spec):
    return RepairInputs(gm, InputContract(layout="tabular"), tr, None, "logits", torch.device("cpu"), 0, protected=spec)


def test_fmt_end_to_end_on_onnxruntime(tmp_path):
    import onnx

    from converters.export import export_graph
    from onnxrepair.fairness import evaluate_fairness

    tr, te, spec, gm = _fixture()
    spec_m = get("fmt")
    out = spec_m.fn(_inputs(gm, tr, spec), spec_m.config_cls(epochs=8, n_pairs=1500, batch_size=256, select="last"))
    info = out.info
    assert "selection" not in info and not info["labels_used"]
    assert info["labels_used"] is False and info["cut_shape"] == [8]
    assert info["slice"]["tunable_weights"] < info["slice"]["prefix_weights"]
    # weights outside the slice are bit-identical to the original model's, the suffix too
    orig = dict(gm.named_parameters())
    changed = sum(int((p != orig[n]).sum()) for n, p in out.model.named_parameters())
    assert 0 < changed <= info["slice"]["tunable_weights"]
    for n in info["suffix_parameters"]:
        assert torch.equal(out.model.get_parameter(n), orig[n])
    r = export_graph(out.model, [torch.zeros(2, tr.x.shape[1])], ["features"], ["logits"], exporter="legacy")
    onnx.save(r.model, tmp_path / "fmt.onnx")
    res = evaluate_fairness({"before": ROOT / "fixtures/models/adult_mlp.onnx", "after": tmp_path / "fmt.onnx"}, te, spec, provider="cpu", n_pairs=2000)
    b, a = res["before"], res["after"]
    assert b["provider"] == "cpu" and 0.7 < b["accuracy"] < 1
    assert a["idr"] < b["idr"]  # the counterfactual regression makes pair predictions agree
    assert a["accuracy"] > b["accuracy"] - 0.05
    # list form, as the repair pipeline calls it: keyed by path and indexable by position
    again = evaluate_fairness([ROOT / "fixtures/models/adult_mlp.onnx", tmp_path / "fmt.onnx"], te, spec, provider="cpu", n_pairs=2000)
    assert again[0] == b and again[1] == a


def test_fmt_selection_returns_the_epoch_it_reports():
    """Epoch selection on the training rows: the returned classifier measures exactly what the report
    says of the selected epoch, that epoch is within the accuracy budget and scores lowest among
    those that are; with a zero budget only the original or an epoch losing nothing qualifies."""
    from onnxrepair.methods.fmt import FairnessSelector
    from onnxrepair.transform import TransformContext, split_model as split_at

    tr, _, spec, gm = _fixture()
    m = get("fmt")
    out = m.fn(_inputs(gm, tr, spec), m.config_cls(epochs=6, n_pairs=1500, batch_size=256, lr=1e-4, select="fairness", select_max_drop=1.0))
    sel = out.info["selection"]
    assert out.info["labels_used"]
    assert sel["rows"] == "train" and sel["strategy"] == FairnessSelector.name and len(sel["epochs"]) == 7
    eligible = [e for e in sel["epochs"] if e["score"] is not None]
    assert all(e["accuracy_drop_points"] <= 1.0 + 1e-9 for e in eligible)
    chosen = next(e for e in sel["epochs"] if e["epoch"] == sel["selected_epoch"])
    assert chosen["score"] == min(e["score"] for e in eligible)
    ctx = TransformContext(split_at(out.model), torch.zeros(1), torch.device("cpu"))
    again = FairnessSelector(tr.x, tr.y, spec).metrics(ctx)
    for k in ("accuracy", "abs_spd", "aaod", "abs_eod"):
        assert again[k] == pytest.approx(chosen[k], abs=1e-12), k
    strict = m.fn(_inputs(gm, tr, spec), m.config_cls(epochs=6, n_pairs=1500, batch_size=256, select="fairness", select_max_drop=0.0))
    kept = next(e for e in strict.info["selection"]["epochs"] if e["epoch"] == strict.info["selection"]["selected_epoch"])
    assert kept["accuracy_drop_points"] <= 1e-9
    if strict.info["selection"]["selected_epoch"] == 0:
        orig = dict(gm.named_parameters())
        assert all(torch.equal(p, orig[n]) for n, p in strict.model.named_parameters())


def test_fmt_bad_input():
    tr, _, spec, gm = _fixture()
    m = get("fmt")
    with pytest.raises(UsageError, match="protected"):
        m.fn(RepairInputs(gm, InputContract(layout="tabular"), tr, None, "logits", torch.device("cpu")), m.config_cls())
    with pytest.raises(UsageError, match="does not exist; valid"):
        m.fn(_inputs(gm, tr, spec), m.config_cls(cut_layer="nope", epochs=1))
    with pytest.raises(UsageError, match="--select must be"):
        m.fn(_inputs(gm, tr, spec), m.config_cls(select="best", epochs=1))
    with pytest.raises(UsageError, match="--select-max-drop"):
        m.fn(_inputs(gm, tr, spec), m.config_cls(select_max_drop=-1, epochs=1))


@pytest.mark.parametrize("name", ["counterfactual-finetune", "reweigh-finetune"])
def test_baselines_run(name):
    tr, _, spec, gm = _fixture()
    m = get(name)
    assert m.task == "fairness"
    out = m.fn(_inputs(gm, tr, spec), m.config_cls(epochs=1))
    assert out.info["labels_used"] is True
    assert any(not torch.equal(p, q) for p, q in zip(out.model.parameters(), gm.parameters()))


def test_slice_counts_ceil_and_artefact():
    from onnxrepair.localize.slices import slice_counts

    # the paper's MLP prefix widths 64-32-16-8
    assert [slice_counts(w, 0.2, 0.1) for w in (64, 32, 16, 8)] == [(13, 7), (7, 4), (4, 2), (2, 1)]
    assert [slice_counts(w, 0.2, 0.1, "artefact") for w in (64, 32, 16, 8)] == [(12, 6), (6, 3), (3, 2), (1, 1)]
    assert slice_counts(4, 0.2, 0.1, "artefact") == (0, 0)  # int(0.8), round(0.4): a narrow layer gets nothing
    assert slice_counts(5, 0.2, 0.1, "artefact") == (1, 0)  # round(0.5) = 0 (half to even)
    assert slice_counts(4, 0.2, 0.1) == (1, 1)
    with pytest.raises(ValueError):
        slice_counts(8, 0.2, 0.1, "floor")
    from onnxrepair.localize.slices import topk_frequent

    delta = torch.arange(1, 81, dtype=torch.float32).reshape(5, 16)  # every row: the last columns move most
    keep, marks = topk_frequent(delta, 0.2, 0.1, "artefact")  # 3 marked per row, 2 kept
    assert marks.tolist() == [0] * 13 + [5, 5, 5] and keep.nonzero().flatten().tolist() == [13, 14]
    keep, marks = topk_frequent(delta, 0.2, 0.1)  # ceil: 4 marked, 2 kept
    assert marks.tolist() == [0] * 12 + [5] * 4 and int(keep.sum()) == 2
    with pytest.raises(UsageError, match="slice-counts"):
        ProtectedSensitivitySlicer(counts="round")


def test_fmt_artefact_options_free_biases_and_pairs_per_row():
    """free_biases: every prefix bias may move and is never restored, while weights outside the slice stay
    bit-identical; without it, biases of neurons outside the slice stay too. pairs_per_row: one pair per training row."""
    tr, _, spec, gm = _fixture()
    m = get("fmt")
    orig = dict(gm.named_parameters())
    runs = {}
    for free in (False, True):
        out = m.fn(_inputs(gm, tr, spec), m.config_cls(epochs=2, n_pairs=600, batch_size=256, free_biases=free))
        runs[free] = out
        prefix_biases = [f"{lay}.bias" for lay in out.info["prefix_layers"]]
        params = dict(out.model.named_parameters())
        important = [lay["important"] for lay in out.info["slice"]["layers"]]
        outside = {n: [i for i in range(orig[n].numel()) if i not in imp] for n, imp in zip(prefix_biases, important)}
        moved_outside = {n: int((params[n][idx] != orig[n][idx]).sum()) for n, idx in outside.items()}
        if free:  # biases of neurons outside the slice moved (dead ReLUs get no gradient and stay) and were not put back
            assert out.info["slice"]["free_biases"] is True
            assert moved_outside[prefix_biases[0]] == len(outside[prefix_biases[0]]), moved_outside  # the first layer: all alive
            assert sum(moved_outside.values()) > 0.6 * sum(len(v) for v in outside.values())
        else:  # only the biases of slice neurons can move
            assert moved_outside == {n: 0 for n in prefix_biases}
        for n, p in params.items():  # weight matrices: outside the slice never move in either case
            if n.endswith(".weight"):
                assert int((p != orig[n]).sum()) <= out.info["slice"]["tunable_weights"]
        for n in out.info["suffix_parameters"]:
            assert torch.equal(params[n], orig[n])
    assert runs[True].info["slice"]["tunable_weights"] > runs[False].info["slice"]["tunable_weights"]
    assert runs[False].info["targets"]["pairs"] == 600
    rows = m.fn(_inputs(gm, tr, spec), m.config_cls(epochs=0, pairs_per_row=True, n_pairs=600))
    assert rows.info["targets"]["pairs"] == len(tr) and rows.info["targets"]["samples"] == 2 * len(tr)
