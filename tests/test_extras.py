"""Extra inputs the pipeline loads for a method: ONNX checkpoints found, ordered, checked against the final model
and converted one at a time, handed over as the final graph holding each checkpoint's weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import converters
from onnxrepair.errors import UsageError
from onnxrepair.extras import ModelSequence, find_models, load_weights_by_position, resolve_models

from conftest import fixture_path

LEGACY = fixture_path("torch_lenet_legacy11")
DYNAMO = fixture_path("torch_lenet_dynamo20")
RESNET = fixture_path("torch_resnet_folded_legacy17")


def _probe() -> torch.Tensor:
    return torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _perturbed_copy(src, dst, scale: float):
    """A checkpoint of the same architecture with other weights: the source file with its initialisers scaled."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.ndim >= 1:
            init.CopyFrom(numpy_helper.from_array(a * scale, init.name))
    onnx.save(m, str(dst))
    return dst


def test_natural_order_and_forms(tmp_path):
    for n in (10, 2, 1):
        shutil.copy(LEGACY, tmp_path / f"epoch_{n}.onnx")
    (tmp_path / "notes.txt").write_text("x")
    want = ["epoch_1.onnx", "epoch_2.onnx", "epoch_10.onnx"]
    assert [p.name for p in find_models(str(tmp_path))] == want  # a directory
    assert [p.name for p in find_models(str(tmp_path / "epoch_*.onnx"))] == want  # a glob, naturally sorted
    listed = f"{tmp_path / 'epoch_10.onnx'},{tmp_path / 'epoch_1.onnx'}"
    assert [p.name for p in find_models(listed, order="given")] == ["epoch_10.onnx", "epoch_1.onnx"]
    with pytest.raises(UsageError, match="names no .onnx file"):
        find_models(str(tmp_path / "nothing_*.onnx"))
    with pytest.raises(UsageError, match="order"):
        find_models(str(tmp_path), order="random")


def test_checkpoints_from_another_exporter_map_onto_the_final_graph(tmp_path):
    final = converters.convert(LEGACY).gm.eval()
    ck = _perturbed_copy(DYNAMO, tmp_path / "ck_1.onnx", 0.9)  # dynamo names its nodes differently
    seq = resolve_models(str(ck), final=final, probe=_probe())
    assert seq.names == ["ck_1.onnx"] and not seq.skipped
    (name, gm), = list(seq)
    own = converters.convert(ck).gm.eval()
    x = _probe()
    torch.testing.assert_close(gm(x), own(x), rtol=1e-4, atol=1e-5)  # the checkpoint's function
    assert [n.name for n in gm.graph.nodes] == [n.name for n in final.graph.nodes]  # in the final's graph
    assert not torch.allclose(gm(x), final(x))


def test_final_model_in_history_is_skipped_and_said(tmp_path):
    final = converters.convert(LEGACY).gm.eval()
    same = shutil.copy(LEGACY, tmp_path / "ck_2.onnx")
    other = _perturbed_copy(LEGACY, tmp_path / "ck_1.onnx", 1.1)
    seq = resolve_models(f"{other},{same}", final=final, probe=_probe())
    assert seq.names == ["ck_1.onnx"]
    assert seq.skipped == [{"checkpoint": "ck_2.onnx", "reason": "same weights as the final model"}]
    with pytest.raises(UsageError, match="no checkpoint left"):
        resolve_models(str(same), final=final, probe=_probe())


def test_other_architecture_names_checkpoint_and_parameter():
    final = converters.convert(LEGACY).gm.eval()
    other = converters.convert(RESNET).gm.eval()
    with pytest.raises(UsageError, match="checkpoint r.onnx: .*not the same architecture"):
        load_weights_by_position(final, other, "r.onnx")


def test_unreadable_checkpoint_is_a_model_error_naming_it(tmp_path):
    from onnxrepair.errors import ModelError

    bad = tmp_path / "ck_3.onnx"
    bad.write_bytes(b"not onnx at all")
    with pytest.raises(ModelError, match="ck_3.onnx"):
        resolve_models(str(bad), final=converters.convert(LEGACY).gm.eval(), probe=_probe())


def test_sequence_converts_on_demand(monkeypatch):
    calls = []
    real = converters.convert

    def counting(path, *a, **k):
        calls.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(converters, "convert", counting)
    seq = ModelSequence.from_paths([LEGACY, LEGACY])
    assert calls == []
    it = iter(seq)
    next(it)
    assert len(calls) == 1  # one checkpoint converted, not the whole history
