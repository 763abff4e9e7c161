"""DeepPatch: surgery, per-sample division of labour, exactness of the original path, ONNX export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from _deeppatch_fixtures import CONTRACT, TinyCNN, run_deeppatch, synthetic, to_onnx_and_back, train_tiny
from converters.export import export_graph
from onnxrepair.errors import UsageError
from onnxrepair.methods import get
from onnxrepair.graph.patching import GATE_NAME, PREFIX, set_routing
from onnxrepair.perturb.blur import gaussian_blur

_run = run_deeppatch


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    torch.manual_seed(0)
    train, calib = synthetic(400, seed=1), synthetic(160, seed=2)
    model = train_tiny(TinyCNN(), train, epochs=10)
    path = tmp_path_factory.mktemp("dp") / "tiny.onnx"
    gm = to_onnx_and_back(model, path)
    # the training form (units mixed in by the graph, the stats gate on the first patched conv): what these tests
    # inspect; the deployed switch (the default) has its own tests in test_deeppatch_switch.py
    out = _run(gm, train, calib, epochs=3, assess_samples=96, deploy="mix", gate="stats")
    return gm, out, path


def _mixed_batch(n: int = 24, seed: int = 5) -> torch.Tensor:
    unit = CONTRACT.to_unit(synthetic(n, seed=seed).x)
    sig = torch.tensor([0.0, 3.0]).repeat(n // 2)
    return torch.cat([unit[sig == 0], gaussian_blur(unit[sig > 0], 3.0)])


def _routes(model, x) -> torch.Tensor:
    got = []
    h = getattr(model, GATE_NAME).register_forward_hook(lambda m, i, o: got.append(o))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0]


def test_info_and_structure(repaired):
    gm, out, _ = repaired
    info = out.info
    assert [l["layer"] for l in info["layers_patched"]] == ["c1_conv", "c2_conv", "c3_conv"]
    assert [l["k"] for l in info["layers_patched"]] == [2, 3, 4]  # floor(0.25 * C_out)
    for key in ("ranking", "gate", "routing_calib", "params_added", "layers_skipped", "calib_accuracy"):
        assert key in info
    assert info["params_added"] == sum(l["params"] for l in info["layers_patched"]) > 0
    assert 0.0 <= info["gate"]["boundary"] <= 1.0
    assert len(info["ranking"]["c3_conv"]["top"]) == 8


def test_only_patch_params_change(repaired):
    gm, out, _ = repaired
    before = gm.state_dict()
    after = out.model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    new = [k for k in after if k not in before]
    assert new and all(k.startswith(PREFIX) for k in new)
    # units are deltas to the blamed filters, starting at zero; training must have moved them
    mods = dict(out.model.named_modules())
    moved = False
    for layer in out.info["layers_patched"]:
        moved |= bool(mods[layer["unit"]].weight.abs().sum() > 0)
    assert moved


@torch.no_grad()
def test_per_sample_routing_is_batch_independent(repaired):
    _, out, _ = repaired
    model = out.model
    x = CONTRACT.to_model(_mixed_batch())
    routes = _routes(model, x)
    assert routes.any() and not routes.all(), "the mixed batch should use both paths"
    ref = model(x)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    shuffled = model(x[perm])
    assert torch.equal(_routes(model, x[perm]), routes[perm])
    torch.testing.assert_close(shuffled, ref[perm], atol=1e-5, rtol=1e-5)
    assert torch.equal(shuffled.argmax(1), ref.argmax(1)[perm])
    # one at a time gives the same answers as the mixed batch
    single = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(single, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_original_path_is_exactly_original(repaired):
    gm, out, _ = repaired
    model = out.model
    x = CONTRACT.to_model(_mixed_batch())
    routes = _routes(model, x)
    orig = gm(x)
    rep = model(x)
    assert (~routes).any()
    assert torch.equal(rep[~routes], orig[~routes])
    assert not torch.equal(rep[routes], orig[routes])  # the patch does something
    set_routing(model, "original")
    try:
        assert torch.equal(model(x), orig)
    finally:
        set_routing(model, "gate")


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@torch.no_grad()
def test_export_runs_on_onnxruntime(repaired, exporter, tmp_path):
    gm, out, orig_path = repaired
    model = out.model
    res = export_graph(model, [torch.rand(2, 1, 12, 12)], ["input"], ["logits"], exporter=exporter)
    assert res.exporter == exporter
    onnx.checker.check_model(res.model)
    assert all(n.domain in ("", "ai.onnx") for n in res.model.graph.node)
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess_orig = ort.InferenceSession(str(orig_path), providers=["CPUExecutionProvider"])
    x = CONTRACT.to_model(_mixed_batch())
    for xb in (x, x[:1], x[5:6]):  # dynamic batch
        got = sess.run(None, {"input": xb.numpy()})[0]
        np.testing.assert_allclose(got, model(xb).numpy(), atol=1e-4, rtol=1e-4)
    routes = _routes(model, x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    want = sess_orig.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got[~routes], want[~routes], atol=1e-5, rtol=1e-5)


def test_skips_depthwise_and_excluded(tmp_path):
    torch.manual_seed(0)
    train = synthetic(120, seed=1)
    gm = to_onnx_and_back(train_tiny(TinyCNN(depthwise=True), train, epochs=2), tmp_path / "dw.onnx")
    out = _run(gm, train, synthetic(60, seed=2), epochs=1, assess_samples=32, exclude=("c3_conv",))
    reasons = {s["layer"]: s["reason"] for s in out.info["layers_skipped"]}
    assert "depthwise" in reasons["c2_conv"]
    assert "excluded" in reasons["c3_conv"]
    assert [l["layer"] for l in out.info["layers_patched"]] == ["c1_conv"]
    with pytest.raises(UsageError):
        _run(gm, train, None, epochs=1, exclude=("c1_conv", "c3_conv"))


def test_stats_gate_is_default_and_reports_all_aucs(repaired):
    _, out, _ = repaired
    g = out.info["gate"]
    assert g["kind"] == "stats"
    assert set(g["auc"]) == {"disagreement", "logistic", "stats", "input"}
    # the default since issue 14: the input gate in the deployment switch (cheapest; AUC on a par, bench_latency)
    cfg = get("deeppatch").config_cls()
    assert (cfg.gate, cfg.deploy, cfg.switch) == ("input", "switch", "overlay")
    assert all(0.0 <= v <= 1.0 for v in g["auc"].values())
    # threshold set so that about gate_clean_rate (2 %) of clean calib inputs reach the patch
    assert out.info["routing_calib"]["clean"] <= 0.05
    assert out.info["routing_calib"]["perturbed"]["blur:3"] > out.info["routing_calib"]["clean"]
    assert out.info["gate_params"] == 2 * 8 + 2 * 8 + 4 * 8 + 1  # mean, std (2C each), weight (4C), bias; C = 8 at c1


@pytest.mark.parametrize("gate", ["logistic", "disagreement", "stats"])
def test_gates_are_per_sample_and_export(tmp_path, gate):
    torch.manual_seed(0)
    train = synthetic(200, seed=1)
    gm = to_onnx_and_back(train_tiny(TinyCNN(bn=False), train, epochs=5), tmp_path / "nobn.onnx")
    out = _run(gm, train, synthetic(80, seed=2), epochs=1, assess_samples=32, gate=gate, assess="perfloss")
    assert out.info["gate"]["kind"] == gate
    res = export_graph(out.model, [torch.rand(2, 1, 12, 12)], ["input"], ["logits"], exporter="legacy")
    onnx.checker.check_model(res.model)
    assert all(n.domain in ("", "ai.onnx") for n in res.model.graph.node)
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    xs = CONTRACT.to_model(_mixed_batch())
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": xs.numpy()})[0], out.model(xs).numpy(), atol=1e-4, rtol=1e-4)
    x = CONTRACT.to_model(_mixed_batch())
    with torch.no_grad():
        ref = out.model(x)
    perm = torch.arange(len(x)).flip(0)
    with torch.no_grad():
        torch.testing.assert_close(out.model(x[perm]), ref[perm], atol=1e-5, rtol=1e-5)
        routes = _routes(out.model, x)
        assert torch.equal(ref[~routes], gm(x)[~routes])


def test_ratio_one_patches_every_filter_without_assessing_and_taylor_runs_end_to_end(tmp_path):
    """ratio 1: every filter of every conv is patched and no ranking is computed (none could change the plan);
    ``assess="taylor"`` ranks by first-order featswap and repairs like the others (same number of filters patched)."""
    torch.manual_seed(0)
    train = synthetic(120, seed=1)
    gm = to_onnx_and_back(train_tiny(TinyCNN(), train, epochs=2), tmp_path / "t.onnx")
    calib = synthetic(60, seed=2)
    full = _run(gm, train, calib, epochs=1, assess_samples=32, ratio=1.0)
    assert full.info["ranking"] == {}
    assert all(l["k"] == l["c_out"] and l["channels"] == list(range(l["c_out"])) for l in full.info["layers_patched"])
    tay = _run(gm, train, calib, epochs=1, assess_samples=32, assess="taylor")
    fs = _run(gm, train, calib, epochs=1, assess_samples=32)
    assert [(l["layer"], l["k"]) for l in tay.info["layers_patched"]] == [(l["layer"], l["k"]) for l in fs.info["layers_patched"]]
    assert all(r["samples"] == 32 for r in tay.info["ranking"].values())
