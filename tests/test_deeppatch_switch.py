"""DeepPatch's deployment form (issue 14): the per-sample switch between the untouched original model and the folded
patched model, exported as ONNX ``If`` nodes. A batch the gate routes nowhere takes the skip branch and gives the
original file's outputs exactly; routed rows get the patch; every row's answer is independent of its batch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from _deeppatch_fixtures import CONTRACT, TinyCNN, run_deeppatch, synthetic, to_onnx_and_back, train_tiny
from converters.export import export_graph
from onnxrepair.errors import UsageError
from onnxrepair.graph.patching import PerSampleSwitch, folded_model, get_gate, insert_patches, set_routing
from onnxrepair.perturb.blur import gaussian_blur

pytestmark = pytest.mark.usefixtures("one_torch_thread")
_run = run_deeppatch


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    train, calib = synthetic(300, seed=1), synthetic(160, seed=2)
    path = tmp_path_factory.mktemp("sw") / "tiny.onnx"
    gm = to_onnx_and_back(train_tiny(TinyCNN(), train, epochs=8), path)
    return gm, train, calib, path


_cache: dict = {}


def _repaired(base, **cfg):
    key = tuple(sorted(cfg.items()))
    if key not in _cache:
        gm, train, calib, _ = base
        _cache[key] = _run(gm, train, calib, epochs=2, assess_samples=64, **cfg)
    return _cache[key]


def _batches(n: int = 24):
    clean = CONTRACT.to_unit(synthetic(n, seed=7).x)
    return CONTRACT.to_model(clean), CONTRACT.to_model(gaussian_blur(clean, 3.0))


def _routes(model, x) -> torch.Tensor:
    got = []
    h = get_gate(model).register_forward_hook(lambda m, i, o: got.append(o))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0]


def _session(model, x2, exporter="legacy"):
    res = export_graph(model, [x2], ["input"], ["logits"], exporter=exporter)
    onnx.checker.check_model(res.model)
    return ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"]), res


@pytest.mark.parametrize("gate,mode", [("input", "overlay"), ("input", "exclusive"), ("stats", "overlay"), ("stats", "exclusive")])
def test_switch_skips_clean_batches_exactly_and_patches_perturbed_ones(base, gate, mode):
    gm, _, _, orig_path = base
    out = _repaired(base, gate=gate, switch=mode)
    model = out.model
    assert isinstance(model, PerSampleSwitch) and model.switch_mode == mode
    assert out.info["deploy"]["form"] == "switch"
    clean, blurred = _batches()
    sess, res = _session(model, clean[:2])
    ops = {n.op_type for n in res.model.graph.node}
    assert "If" in ops
    orig = ort.InferenceSession(str(orig_path), providers=["CPUExecutionProvider"])
    # clean rows the gate leaves alone: the skip branch, bit for bit the original file's answer
    r_clean = _routes(model, clean).numpy()
    keep = np.flatnonzero(~r_clean)
    assert len(keep) >= len(clean) // 2, r_clean
    # (overlay: the original runs in the main graph, optimised as in its own file -> bit for bit; exclusive: it runs
    # inside an If branch, where onnxruntime does not apply its NCHWc layout, so other conv kernels -> rounding only)
    same = np.array_equal if mode == "overlay" else (lambda a, b: np.allclose(a, b, atol=1e-5, rtol=1e-5))
    xc = clean.numpy()[keep]
    assert same(sess.run(None, {"input": xc})[0], orig.run(None, {"input": xc})[0])
    for i in keep[:3]:  # batch 1 as well
        xi = clean.numpy()[i : i + 1]
        assert same(sess.run(None, {"input": xi})[0], orig.run(None, {"input": xi})[0])
    # blurred rows: routed, and they get the folded patched model's answer, not the original's
    r_blur = _routes(model, blurred).numpy()
    assert r_blur.mean() > 0.8, r_blur
    xb = blurred.numpy()
    got, want = sess.run(None, {"input": xb})[0], orig.run(None, {"input": xb})[0]
    with torch.no_grad():
        patched = model.second(blurred).numpy()
    np.testing.assert_allclose(got[r_blur], patched[r_blur], atol=1e-4, rtol=1e-4)
    assert np.abs(got[r_blur] - want[r_blur]).max() > 1e-3
    # a mixed batch: each row as it would be alone (ONNX == torch, order kept)
    x = torch.cat([clean[:12], blurred[12:]])
    routes = _routes(model, x).numpy()
    assert routes.any() and not routes.all()
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
        single = torch.cat([model(x[i : i + 1]) for i in range(len(x))]).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(single, ref, atol=1e-5, rtol=1e-5)
    want = orig.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got[~routes], want[~routes], atol=1e-5, rtol=1e-5)
    perm = np.arange(len(x))[::-1].copy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()[perm]})[0], got[perm], atol=1e-5, rtol=1e-5)


def test_folded_model_is_the_trained_patched_path(base):
    """The routed side of the switch is the training graph's patched path with the units folded into the convs."""
    gm, train, calib, _ = base
    out = _repaired(base, deploy="mix", gate="stats")
    trained = out.model
    layers = out.info["layers_patched"]
    from onnxrepair.graph.patching import PatchedLayer

    pl = [PatchedLayer(l["layer"], l["module"], l["unit"], l["c_out"], l["channels"], l["params"]) for l in layers]
    folded = folded_model(gm, trained, pl)
    clean, blurred = _batches()
    set_routing(trained, "patched")
    try:
        with torch.no_grad():
            for x in (clean, blurred):
                torch.testing.assert_close(folded(x), trained(x), atol=1e-5, rtol=1e-5)
    finally:
        set_routing(trained, "gate")
    # only the blamed channels of the patched convs changed
    mods_o, mods_f = dict(gm.named_modules()), dict(folded.named_modules())
    for l in layers:
        w_o, w_f = mods_o[l["module"]].weight, mods_f[l["module"]].weight
        changed = sorted(int(c) for c in torch.nonzero((w_o != w_f).flatten(1).any(1))[:, 0])
        assert set(changed) <= set(l["channels"]) and changed, (changed, l["channels"])


def test_switch_and_mix_make_the_same_decisions(base):
    """Deploying changes the graph, not the repair: same units, same routing of the calibration data."""
    mix, sw = _repaired(base, deploy="mix", gate="stats"), _repaired(base, gate="stats", switch="overlay")
    assert mix.info["layers_patched"] == sw.info["layers_patched"]
    assert mix.info["routing_calib"] == sw.info["routing_calib"]
    clean, blurred = _batches()
    for x in (clean, blurred):
        assert torch.equal(_routes(mix.model, x), _routes(sw.model, x))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_switch_exports_with_both_exporters(base, exporter):
    out = _repaired(base, gate="input", switch="overlay")
    clean, blurred = _batches()
    sess, res = _session(out.model, clean[:2], exporter)
    assert res.exporter == exporter
    x = torch.cat([clean[:12], blurred[12:]])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], out.model(x).numpy(), atol=1e-4, rtol=1e-4)


def test_input_gate_routes_blur_not_clean_and_needs_the_switch(base):
    out = _repaired(base, gate="input", switch="overlay")
    g = out.info["gate"]
    assert g["kind"] == "input" and g["auc"]["input"] > 0.9
    r = out.info["routing_calib"]
    assert r["clean"] <= 0.05 and r["perturbed"]["blur:3"] > 0.8
    gm, train, calib, _ = base
    with pytest.raises(UsageError, match="--deploy switch"):
        _run(gm, train, calib, epochs=1, assess_samples=16, gate="input", deploy="mix")
    with pytest.raises(UsageError, match="--deploy"):
        _run(gm, train, calib, epochs=1, assess_samples=16, deploy="fused")


# ------------------------------------------------------------------ --max-latency-ratio, checked on the exported file


def _cli(tmp_path, *extra):
    from conftest import FIXTURES, fixture_path

    from onnxrepair.cli import main

    out, rep = tmp_path / "dp.onnx", tmp_path / "dp.json"
    rc = main(["--threads", "1", "repair", str(fixture_path("torch_lenet_legacy11")), "--method", "deeppatch", "--data",
               str(FIXTURES / "data" / "mnist_small.npz"), "-o", str(out), "--report", str(rep), "--epochs", "1",
               "--provider", "cpu", "--quiet", "--gate", "input", *extra])
    return rc, out, rep


def test_max_latency_ratio_refuses_a_file_over_it(tmp_path, capsys):
    # a repaired file can never run in half the original's time: the measured ratio is over the limit, exit 1
    rc, out, rep = _cli(tmp_path, "--max-latency-ratio", "0.5")
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists(), err
    assert "--max-latency-ratio 0.5" in err and "no model written" in err
    import json

    lim = json.loads(rep.read_text())["latency_ms"]["limit"]
    assert lim["max_ratio"] == 0.5 and not lim["passed"] and max(lim["measured_interleaved_1_thread"].values()) > 0.5


def test_max_latency_ratio_met_is_written_with_the_measurement(tmp_path, capsys):
    rc, out, rep = _cli(tmp_path, "--max-latency-ratio", "20")
    assert rc == 0 and out.exists(), capsys.readouterr().err
    import json

    report = json.loads(rep.read_text())
    lim = report["latency_ms"]["limit"]
    assert lim["passed"] and set(lim["measured_interleaved_1_thread"]) == {"batch1", "batch64"}
    assert max(lim["measured_interleaved_1_thread"].values()) <= 20
    assert report["info"]["deploy"]["form"] == "switch" and report["info"]["latency_limit"] == 20


def test_input_gate_threshold_gives_the_calibrated_clean_rate(base):
    """A clean rate far from what the untuned classifier gives (~0 % on this well-separated data), so a threshold
    that is never applied shows; the deployed model routes the same share of the calibration rows."""
    out = _repaired(base, gate="input", switch="overlay", gate_clean_rate=0.2)
    assert out.info["routing_calib"]["clean"] == pytest.approx(0.2, abs=0.01)
    _, _, calib, _ = base
    x = CONTRACT.to_model(CONTRACT.to_unit(calib.x))
    rate = float(_routes(out.model, x).float().mean())
    assert 0.1 <= rate <= 0.3, rate
