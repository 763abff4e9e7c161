"""Round trip over every fixture in the MANIFEST: ONNX -> GraphModule -> ONNX, judged on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import FIXTURE_NAMES, MANIFEST, fixture_path

from converters import convert, export_like
from converters.export import get_metadata
from converters.load import sha256_file
from onnxrepair.validate import Tolerance, validate

_CACHE: dict[str, object] = {}


def _converted(name):
    if name not in _CACHE:
        _CACHE[name] = convert(fixture_path(name))
    return _CACHE[name]


_EXPORTS: dict[tuple[str, str], object] = {}


def _exported(name, exporter="legacy"):
    if (name, exporter) not in _EXPORTS:
        _EXPORTS[(name, exporter)] = export_like(_converted(name), exporter=exporter, extra_metadata={"onnxrepair.action": "test"})
    return _EXPORTS[(name, exporter)]


def test_manifest_lists_every_fixture_file():
    assert FIXTURE_NAMES, "fixtures/models/MANIFEST.json is empty; run fixtures/make_fixtures.py"
    for name, entry in MANIFEST.items():
        assert fixture_path(name).exists(), name
        assert fixture_path(name).stat().st_size < 1_000_000
        for key in ("producer", "exporter", "opset", "layout", "task", "dataset"):
            assert key in entry, (name, key)


def _cases():
    """(name, exporter) for every fixture; an exporter the MANIFEST records as failing on a model
    (``known_export_failure``) is a strict xfail, so the day it works the test says so."""
    for name in FIXTURE_NAMES:
        for exporter in ("dynamo", "legacy"):
            why = MANIFEST.get(name, {}).get("known_export_failure", {}).get(exporter)
            yield pytest.param(name, exporter, marks=pytest.mark.xfail(strict=True, reason=why)) if why else (name, exporter)


def _dims(v) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name, exporter", list(_cases()))
def test_roundtrip_matches_original(name, exporter):
    conv = _converted(name)
    res = _exported(name, exporter)
    assert res.exporter == exporter
    src = fixture_path(name)
    original = onnx.load(str(src))
    inits = {t.name for t in original.graph.initializer}
    # dims kept as they were: a fixed batch stays fixed, a dynamic one keeps its name (batch_size, N, ...)
    for a, b in zip(res.model.graph.input, [i for i in original.graph.input if i.name not in inits]):
        assert _dims(a)[0] == _dims(b)[0], (a.name, _dims(a), _dims(b))
    for a, b in zip(res.model.graph.output, original.graph.output):
        if a.type.HasField("tensor_type") and _dims(b):
            assert _dims(a)[0] == _dims(b)[0], (a.name, _dims(a), _dims(b))
    # interface kept: names, dtypes, opset no older than the original's
    assert [i.name for i in res.model.graph.input] == [i.name for i in original.graph.input if i.name not in {t.name for t in original.graph.initializer}]
    assert [o.name for o in res.model.graph.output] == [o.name for o in original.graph.output]
    for a, b in zip(res.model.graph.output, original.graph.output):
        assert a.type.WhichOneof("value") == b.type.WhichOneof("value")
        if a.type.HasField("tensor_type"):
            assert a.type.tensor_type.elem_type == b.type.tensor_type.elem_type
    src_opset = conv.loaded.opsets["ai.onnx"]
    # the source's opset where the exporter writes it (legacy 7..20, dynamo 18+), else the nearest it writes
    assert res.opset == (min(src_opset, 20) if exporter == "legacy" else max(src_opset, 18))
    assert 0 < res.nodes_simplified <= res.nodes_exported
    meta = get_metadata(res.model)
    assert meta["onnxrepair.source_sha256"] == sha256_file(src)
    assert meta["onnxrepair.exporter"] == exporter
    assert meta["onnxrepair.action"] == "test"
    # batch 1 and 7: a frozen batch size would fail the second
    r = validate(src, res.model.SerializeToString(), batches=(1, 7), provider="cpu", tolerance=Tolerance(atol=1e-5, rtol=0.0))
    assert r.provider == "cpu"
    assert r.passed, r.reason
    for c in r.comparisons:
        assert c.max_abs <= 1e-5 * max(1.0, c.scale)
        if c.argmax_agreement is not None:
            assert c.argmax_agreement == 1.0
    assert {c.batch for c in r.comparisons} == {1, 7}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_gradients_reach_every_conv_and_dense_weight(name):
    conv = _converted(name)
    gm = conv.gm
    layers = [m for m in gm.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear))]
    assert layers, "no conv or dense layer found"
    for n, b in gm.named_buffers():
        assert not (b.is_floating_point() and b.ndim == 2 and "initializers" in n), f"dense weight {n} left as a frozen buffer"
    x = conv.example_inputs(batch=3, seed=2)
    gm.zero_grad()
    out = gm(*x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    out.float().square().sum().backward()
    for m in layers:
        assert m.weight.requires_grad and isinstance(m.weight, torch.nn.Parameter)
        assert m.weight.grad is not None and torch.count_nonzero(m.weight.grad) > 0, m
    for p in gm.parameters():
        assert p.requires_grad
    gm.zero_grad()


def test_convs_stay_conv2d():
    for name in FIXTURE_NAMES:
        if MANIFEST[name]["layout"] in ("nchw", "nhwc"):
            assert any(isinstance(m, torch.nn.Conv2d) for m in _converted(name).gm.modules()), name


def test_tf2onnx_dense_and_batchnorm_become_parameters():
    from converters.passes import ChannelAffine

    conv = _converted("keras_mlp_tf2onnx")
    assert "weights_to_parameters" in conv.passes
    assert sum(isinstance(m, torch.nn.Linear) for m in conv.gm.modules()) == 3
    assert sum(isinstance(m, ChannelAffine) for m in conv.gm.modules()) == 1


def test_sklearn_tail_split_and_reattached():
    conv = _converted("sklearn_mlp_zipmap")
    assert conv.tail is not None and "ZipMap" in conv.tail.op_types
    assert [o.name for o in conv.outputs] == [conv.tail.core_outputs[0]]  # the probability tensor
    probs = conv.gm(*conv.example_inputs(batch=4))
    assert probs.shape == (4, 10)
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    res = _exported("sklearn_mlp_zipmap", "dynamo")
    import onnxruntime as ort

    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    label, zipmap = sess.run(None, {"features": np.random.default_rng(0).random((3, 16), dtype=np.float32)})
    assert label.dtype == np.int64 and label.shape == (3,)
    assert isinstance(zipmap, list) and len(zipmap) == 3 and sorted(zipmap[0]) == list(range(10))


def test_roundtrip_accuracy_on_real_digits(mnist_small):
    """The round-tripped CNN classifies the held-out digits exactly as the original does."""
    x, y = mnist_small
    xf = (x[:64] / 255.0).astype(np.float32)
    r = validate(fixture_path("torch_resnet_bn_legacy17"), _exported("torch_resnet_bn_legacy17", "dynamo").model.SerializeToString(),
                 inputs={"input": xf}, batches=(1, 64), provider="cpu")
    assert r.passed, r.reason


def test_validation_detects_a_change():
    """The check can fail: perturb one conv filter and the comparison must say FAILED."""
    conv = convert(fixture_path("torch_resnet_folded_legacy17"))
    first = next(m for m in conv.gm.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        first.weight[0].mul_(1.5)
    res = export_like(conv, exporter="legacy")
    r = validate(fixture_path("torch_resnet_folded_legacy17"), res.model.SerializeToString(), provider="cpu")
    assert not r.passed
    assert max(c.required_atol for c in r.comparisons) > 1e-5


def test_every_fixture_is_described():
    """A model dropped into fixtures/models without a MANIFEST entry (made by a script) fails here."""
    assert set(FIXTURE_NAMES) == set(MANIFEST), "fixtures/models and MANIFEST.json disagree"
