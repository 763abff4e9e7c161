"""The two retrain-free fairness peers, judged on their exported ONNX files: ``reject-option`` changes decisions only
in its band, in the direction that narrows the gap, and ``drop-attribute`` makes predictions independent of the
protected column; both keep the model's interface (graph ops, not a wrapper script)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import fx, nn

from converters.export import export_graph
from onnxrepair.data.contract import InputContract
from onnxrepair.data.dataset import ArrayDataset
from onnxrepair.data.protected import ProtectedSpec
from onnxrepair.errors import UsageError
from onnxrepair.methods import RepairInputs, get
from onnxrepair.methods.reject_option import RejectOption, RejectOptionConfig, decide, encode_decision, favourable_score
from onnxrepair.metrics import statistical_parity_difference
from onnxrepair.runtime import make_session

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = ProtectedSpec("g", 1, 1.0, 0.0)


class Scored(nn.Module):
    """Two logits whose softmax gives P(class 1) = sigmoid(4·x0 + 1.5·g): the privileged group (g = 1) scores higher."""

    def __init__(self, probs: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[4.0, 1.5, 0.0]]))
            self.lin.bias.zero_()
        self.probs = probs

    def forward(self, x):
        z = self.lin(x)
        logits = torch.cat([torch.zeros_like(z), z], dim=1)
        return torch.softmax(logits, dim=1) if self.probs else logits


def _data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.normal(0, 0.6, n), rng.integers(0, 2, n), rng.normal(size=n)]).astype(np.float32)
    p = 1 / (1 + np.exp(-(4 * x[:, 0] + 1.5 * x[:, 1])))
    y = (rng.random(n) < p).astype(np.int64)
    return ArrayDataset(x, y, columns=["x0", "g", "noise"])


def _ort(module: nn.Module, x: np.ndarray, tmp: Path, name: str) -> np.ndarray:
    r = export_graph(module.eval(), [torch.zeros(2, x.shape[1])], ["features"], ["out"], exporter="legacy")
    onnx.save(r.model, tmp / f"{name}.onnx")
    return make_session(tmp / f"{name}.onnx", "cpu").run_batched(x)


@pytest.mark.parametrize("probs", [False, True])
def test_reject_option_changes_decisions_only_in_the_band_on_onnxruntime(tmp_path, probs):
    gm = fx.symbolic_trace(Scored(probs)).eval()
    ds = _data()
    kind = "probs" if probs else "logits"
    roc = RejectOption(gm, 1, boosted=0.0, demoted=1.0, threshold=0.5, margin=0.15, kind=kind)
    before = _ort(gm, ds.x, tmp_path, "before").argmax(1)
    after_out = _ort(roc, ds.x, tmp_path, "after")
    after = after_out.argmax(1)
    with torch.no_grad():
        p = favourable_score(gm(torch.as_tensor(ds.x)), kind).numpy()
    band = np.abs(p - 0.5) <= 0.15
    g = ds.x[:, 1]
    assert band.sum() > 100 and (~band).sum() > 100
    np.testing.assert_array_equal(after[~band], before[~band])  # outside the band nothing changes
    assert (after[band & (g == 0)] == 1).all() and (after[band & (g == 1)] == 0).all()
    assert (after != before).sum() > 50
    # the pair of values per row is kept, only ordered by the decision (probabilities stay probabilities)
    orig_out = _ort(gm, ds.x, tmp_path, "again")
    np.testing.assert_allclose(np.sort(after_out, 1), np.sort(orig_out, 1), atol=1e-5)
    # the torch rule and the numpy rule used by the search agree
    np.testing.assert_array_equal(after, decide(p, g, 0.0, 1.0, 0.5, 0.15).astype(int))
    # a threshold other than the model's own: outside the band the decision is p > θ
    shifted = _ort(RejectOption(gm, 1, 0.0, 1.0, 0.7, 0.05, kind), ds.x, tmp_path, "shifted").argmax(1)
    out = np.abs(p - 0.7) > 0.05
    np.testing.assert_array_equal(shifted[out], (p[out] > 0.7).astype(int))


def test_encode_decision_single_column_outputs():
    fav = torch.tensor([True, False, True, False])
    logit = torch.tensor([[-2.0], [3.0], [0.0], [0.0]])
    out = encode_decision(logit, fav, "logits")
    assert ((out[:, 0] > 0) == fav).all() and torch.equal(out.abs()[:2], logit.abs()[:2])
    q = torch.tensor([[0.2], [0.9], [0.5], [0.5]])
    out = encode_decision(q, fav, "probs")
    assert ((out[:, 0] > 0.5) == fav).all() and ((out >= 0) & (out <= 1)).all()
    assert torch.equal(favourable_score(q, "probs"), q[:, 0]) and torch.allclose(favourable_score(q, "probs", 0), 1 - q[:, 0])
    with pytest.raises(UsageError, match="binary"):
        favourable_score(torch.zeros(2, 3), "logits")


def _inputs(gm, train, calib, spec=SPEC):
    return RepairInputs(gm, InputContract(layout="tabular"), train, calib, "logits", torch.device("cpu"), 0, protected=spec)


def test_reject_option_method_narrows_the_gap_on_held_out_rows(tmp_path):
    """The band is chosen on calibration rows; on other rows the gap in favourable rates shrinks, the deprived group
    (here the unprivileged one) is the one boosted, and accuracy there drops by no more than the budget allows."""
    gm = fx.symbolic_trace(Scored()).eval()
    calib, held = _data(seed=1), _data(seed=2)
    m = get("reject-option")
    out = m.fn(_inputs(gm, _data(seed=0), calib), RejectOptionConfig(max_drop=3.0))
    info = out.info
    assert info["boosted_group"] == "unprivileged" and info["selection_rows"] == "calib"
    assert info["margin"] > 0 and info["accuracy_drop_points_on_selection"] <= 3.0 + 1e-9
    assert info["selection_after"]["abs_spd"] < info["selection_before"]["abs_spd"]
    before = _ort(gm, held.x, tmp_path, "b").argmax(1)
    after = _ort(out.model, held.x, tmp_path, "a").argmax(1)
    spd_b = statistical_parity_difference(before, held.x[:, 1])
    spd_a = statistical_parity_difference(after, held.x[:, 1])
    assert spd_b < -0.2 and spd_b + 0.05 < spd_a <= 0.05  # moved toward parity, from below, not far past it
    # with no accuracy to spend and a fixed θ = 0.5, the only eligible band keeps accuracy: never worse than the original
    strict = m.fn(_inputs(gm, _data(seed=0), calib), RejectOptionConfig(max_drop=0.0))
    assert strict.info["accuracy_drop_points_on_selection"] <= 1e-9


def test_reject_option_auto_direction_boosts_the_group_with_fewer_favourable_decisions():
    gm = fx.symbolic_trace(Scored()).eval()
    flipped = ProtectedSpec("g", 1, 0.0, 1.0)  # now g = 0 is called privileged, and it is the deprived group
    m = get("reject-option")
    out = m.fn(_inputs(gm, _data(seed=0), _data(seed=1), flipped), RejectOptionConfig(max_drop=3.0))
    assert out.info["boosted_group"] == "privileged"
    fixed = m.fn(_inputs(gm, _data(seed=0), _data(seed=1), flipped), RejectOptionConfig(max_drop=3.0, direction="unprivileged"))
    assert fixed.info["boosted_group"] == "unprivileged"
    with pytest.raises(UsageError, match="direction"):
        m.fn(_inputs(gm, _data(), _data()), RejectOptionConfig(direction="both"))
    with pytest.raises(UsageError, match="protected"):
        m.fn(RepairInputs(gm, InputContract(layout="tabular"), _data(), None, "logits", torch.device("cpu")), RejectOptionConfig())


def test_drop_attribute_makes_predictions_independent_of_the_column(tmp_path):
    gm = fx.symbolic_trace(Scored()).eval()
    ds = _data()
    m = get("drop-attribute")
    out = m.fn(_inputs(gm, ds, None), m.config_cls())
    x0, x1 = ds.x.copy(), ds.x.copy()
    x0[:, 1], x1[:, 1] = 0.0, 1.0
    a0 = _ort(out.model, x0, tmp_path, "d0")
    a1 = _ort(out.model, x1, tmp_path, "d1")
    np.testing.assert_array_equal(a0, a1)  # the column no longer matters at all
    orig_priv = _ort(gm, x1, tmp_path, "o1")
    np.testing.assert_allclose(a0, orig_priv, atol=1e-6)  # = the original model with every row privileged
    assert (_ort(gm, x0, tmp_path, "o0").argmax(1) != orig_priv.argmax(1)).any()  # and the column did matter before
    unpriv = m.fn(_inputs(gm, ds, None), m.config_cls(value="unprivileged"))
    np.testing.assert_allclose(_ort(unpriv.model, x1, tmp_path, "u1"), _ort(gm, x0, tmp_path, "o0b"), atol=1e-6)
    with pytest.raises(UsageError, match="--value"):
        m.fn(_inputs(gm, ds, None), m.config_cls(value="other"))


@pytest.mark.parametrize("method", ["reject-option", "drop-attribute"])
def test_peers_repair_a_one_column_sigmoid_model_through_the_cli(tmp_path, method):
    """A Keras model with one sigmoid column: the post-processing reads and rewrites P(class 1), the file keeps the
    interface and passes the pipeline's fidelity check on onnxruntime."""
    import json

    from conftest import FIXTURES, fixture_path

    from onnxrepair.cli import main

    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    rc = main(["repair", str(fixture_path("keras_adult_sigmoid_tf2onnx")), "--method", method,
               "--data", str(FIXTURES / "data" / "adult_train.csv"), "--val", str(FIXTURES / "data" / "adult_test.csv"),
               "--target", "income", "--protected", "sex", "-o", str(out), "--report", str(rep), "--quiet", "--force", "--provider", "cpu"])
    assert rc == 0 and out.exists()
    report = json.loads(rep.read_text())
    src, dst = onnx.load(fixture_path("keras_adult_sigmoid_tf2onnx")), onnx.load(out)
    assert [(i.name, i.type) for i in src.graph.input] == [(i.name, i.type) for i in dst.graph.input]
    assert [o.name for o in src.graph.output] == [o.name for o in dst.graph.output]
    assert report["after"]["idr"] < report["before"]["idr"]  # both take away (drop) or override (band) the attribute's direct effect
