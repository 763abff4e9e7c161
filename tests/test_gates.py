"""DeepPatch's router, every gate kind: it routes perturbed inputs to the patch far more often than clean ones,
the stats gate's threshold gives the clean rate it was calibrated for, and the exported ONNX file routes the same
samples as the torch graph. Fresh data (never seen by the method) drawn like the calibration data."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from _deeppatch_fixtures import TinyCNN, synthetic, to_onnx_and_back, train_tiny
from converters.export import export_graph
from onnxrepair.data.contract import InputContract
from onnxrepair.graph.patching import get_gate
from onnxrepair.methods import RepairInputs, get
from onnxrepair.perturb.blur import DEEPPATCH_SIGMAS, gaussian_blur

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTRACT = InputContract(scale=255.0)
KINDS = ("stats", "logistic", "disagreement")
# A clean rate far from what an untuned threshold gives on this well-separated data (~0 %), so a threshold
# that is never applied shows.
CLEAN_RATE = 0.2


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    # seed 2: with 1 epoch and seeds 0 and 1 the units never flip an on/off state, so the published
    # statistic is 0 on every input and the disagreement gate has nothing to route on (AUC 0.5)
    torch.manual_seed(2)
    train = synthetic(300, seed=1)
    path = tmp_path_factory.mktemp("gates") / "tiny.onnx"
    gm = to_onnx_and_back(train_tiny(TinyCNN(bn=False), train, epochs=5), path)
    return gm, train, path


_cache: dict = {}


@pytest.fixture
def patched(original, request):
    kind = request.param
    if kind not in _cache:
        gm, train, _ = original
        spec = get("deeppatch")
        inputs = RepairInputs(model=gm, contract=CONTRACT, train=train, calib=synthetic(200, seed=2), output_kind="logits",
                              device=torch.device("cpu"), seed=0)
        cfg = spec.config_cls(epochs=1, assess_samples=32, assess="perfloss", gate=kind, gate_clean_rate=CLEAN_RATE)
        _cache[kind] = spec.fn(inputs, cfg)
    return _cache[kind]


def _fresh() -> dict[str, torch.Tensor]:
    clean = CONTRACT.to_unit(synthetic(300, seed=9).x)
    return {"clean": clean, **{f"blur:{s:g}": gaussian_blur(clean, s) for s in DEEPPATCH_SIGMAS}}


@torch.no_grad()
def _routes(model, x_unit: torch.Tensor) -> torch.Tensor:
    got = []
    h = get_gate(model).register_forward_hook(lambda m, i, o: got.append(o))
    try:
        model(CONTRACT.to_model(x_unit))
    finally:
        h.remove()
    return got[0]


@pytest.mark.parametrize("patched", KINDS, indirect=True)
def test_gate_routes_perturbed_inputs_not_clean_ones(patched):
    out = patched
    assert out.info["gate"]["kind"] == get_gate(out.model).kind
    rates = {k: float(_routes(out.model, x).float().mean()) for k, x in _fresh().items()}
    pert = [rates[f"blur:{s:g}"] for s in DEEPPATCH_SIGMAS if s >= 1.5]
    # measured: stats 0.22 clean vs 1.0 blurred, logistic 0.0 vs 1.0, disagreement 0.08 vs 0.47-0.63
    assert min(pert) > rates["clean"] + 0.3, rates
    assert np.mean(pert) > 2 * rates["clean"], rates
    # the calibration figures the report shows point the same way
    r = out.info["routing_calib"]
    assert r["perturbed_mean"] > r["clean"] + 0.3


@pytest.mark.parametrize("patched", ["stats"], indirect=True)
def test_stats_gate_clean_rate_is_the_calibrated_one(patched):
    out = patched
    # on the calibration data the threshold is the (1 - rate) quantile of the clean scores: the rate, up to one sample
    assert out.info["routing_calib"]["clean"] == pytest.approx(CLEAN_RATE, abs=0.01)
    # on fresh clean data drawn the same way: within sampling tolerance (measured 0.22 on 300 images)
    rate = float(_routes(out.model, _fresh()["clean"]).float().mean())
    assert abs(rate - CLEAN_RATE) <= 0.08, rate


@pytest.mark.parametrize("patched", KINDS, indirect=True)
def test_onnx_routes_the_same_samples_as_torch(patched, original):
    out = patched
    gm, _, orig_path = original
    fresh = _fresh()
    x = torch.cat([fresh["clean"][:40], fresh["blur:1"][40:70], fresh["blur:3"][70:100]])
    routes = _routes(out.model, x).numpy()
    assert routes.any() and not routes.all(), "the mixed batch should use both paths"
    res = export_graph(out.model, [CONTRACT.to_model(x[:2])], ["input"], ["logits"], exporter="legacy")
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    orig = ort.InferenceSession(str(orig_path), providers=["CPUExecutionProvider"])
    xm = CONTRACT.to_model(x).numpy()
    got, want = sess.run(None, {"input": xm})[0], orig.run(None, {"input": xm})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, out.model(torch.from_numpy(xm)).numpy(), atol=1e-4, rtol=1e-4)
    # a sample the ONNX file routes to the patch gives an output other than the original file's
    ort_routes = np.abs(got - want).max(1) > 1e-4
    assert np.array_equal(ort_routes, routes), (ort_routes.astype(int), routes.astype(int))
