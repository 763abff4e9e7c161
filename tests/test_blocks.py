"""Block finding and block blame (ArchRepair's localisation, onnxrepair.localize.blocks) on committed exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FIXTURES, fixture_path

from onnxrepair.errors import UsageError
from onnxrepair.graph.edit import region_nodes
from onnxrepair.localize.blocks import find_blocks, pick_block, score_blocks, spectrum_scores

RESNETS = ["torch_resnet_bn_legacy17", "torch_resnet_dynamo18", "torch_resnet_folded_legacy17"]


def _convert(name: str):
    import converters

    return converters.convert(fixture_path(name))


def _example(conv, n: int = 2) -> torch.Tensor:
    shape = [d if isinstance(d, int) else n for d in conv.inputs[0].shape]
    return torch.rand(*shape)


@pytest.mark.parametrize("name", RESNETS)
def test_residual_block_on_both_torch_exporters(name, one_torch_thread):
    conv = _convert(name)
    blocks = find_blocks(conv.gm, _example(conv))
    assert len(blocks) == 1
    b = blocks[0]
    assert b.kind == "residual" and len(b.convs) == 2
    assert b.in_shape == [8, 14, 14] and b.out_shape == [8, 14, 14] and b.stride == 1
    # the region runs from the max-pool that feeds both paths to the ReLU after the join, and is single-entry single-exit
    nodes = {n.name: n for n in conv.gm.graph.nodes}
    assert "max_pool" in nodes[b.entry].name
    assert b.join in b.nodes and b.exit == b.nodes[-1] and b.exit != b.join
    assert [n.name for n in region_nodes(conv.gm, b.entry, b.exit)] == b.nodes
    # 2 convs 8->8 3x3 (+ bias where BN was folded, + BN affine where it was kept)
    assert 2 * 8 * 8 * 9 <= b.params <= 2 * 8 * 8 * 9 + 4 * 8


@pytest.mark.parametrize("name,shapes", [
    ("torch_lenet_legacy11", [([1, 28, 28], [6, 28, 28]), ([6, 14, 14], [12, 10, 10])]),
    ("keras_cnn_nhwc_tf2onnx", [([1, 28, 28], [8, 28, 28]), ([8, 14, 14], [16, 14, 14])]),
])
def test_conv_stages_of_plain_cnns(name, shapes, one_torch_thread):
    conv = _convert(name)
    blocks = find_blocks(conv.gm, _example(conv))
    assert [b.kind for b in blocks] == ["stage", "stage"]
    assert [(b.in_shape, b.out_shape) for b in blocks] == shapes
    for b in blocks:  # a stage ends at its activation; the pooling after it is not part of it
        assert len(b.convs) == 1 and "relu" in b.exit and not any("pool" in n for n in b.nodes)


def test_keras_resnet_block(one_torch_thread):
    path = fixture_path("keras_resnet_tf2onnx")
    if not path.exists():
        pytest.skip("keras_resnet_tf2onnx fixture not made (fixtures/make_keras_resnet_fixture.py)")
    conv = _convert("keras_resnet_tf2onnx")
    blocks = find_blocks(conv.gm, _example(conv))
    assert len(blocks) == 1 and blocks[0].kind == "residual" and len(blocks[0].convs) == 2
    assert blocks[0].in_shape == blocks[0].out_shape == [8, 14, 14]


def test_pick_block_names_the_blocks(one_torch_thread):
    conv = _convert("torch_lenet_legacy11")
    blocks = find_blocks(conv.gm, _example(conv))
    assert pick_block(blocks, blocks[1].name, conv.gm) is blocks[1]
    assert pick_block(blocks, "c2_conv", conv.gm) is blocks[1]  # a node inside the block names it too
    with pytest.raises(UsageError, match="does not exist; blocks: stage1_c1_conv, stage2_c2_conv"):
        pick_block(blocks, "nope", conv.gm)
    with pytest.raises(UsageError, match="no convolution"):
        pick_block([], "x", _convert("torch_mlp_tabular_legacy17").gm)


def test_scores_rank_every_block(one_torch_thread):
    conv = _convert("torch_lenet_legacy11")
    gm = conv.gm.eval()
    d = np.load(FIXTURES / "data" / "mnist_small.npz")
    x = torch.as_tensor(d["x"][:300], dtype=torch.float32) / 255.0
    y = torch.as_tensor(d["y"][:300])
    with torch.no_grad():
        pred = gm(x).argmax(1)
    fail, ok = pred != y, pred == y
    assert fail.sum() > 5
    blocks = find_blocks(gm, x[:2])
    grad = score_blocks(gm, blocks, x[fail], y[fail], x[ok], "logits", "gradient")
    assert {r.block for r in grad} == {b.name for b in blocks}
    assert grad[0].score >= grad[1].score > 0 and all(r.spectrum is None for r in grad)
    spec = score_blocks(gm, blocks, x[fail], y[fail], x[ok], "logits", "spectrum")
    for r in spec:  # spectrum x gradient, the Ochiai mean in [0, 1]
        assert 0 <= r.spectrum <= 1 and r.score == pytest.approx(r.gradient * r.spectrum)
    # Ochiai: a neuron active on every failure and no passing input scores 1; inputs equal to the failures give 1/sqrt(2)
    s_same = spectrum_scores(gm, blocks[:1], x[fail], x[fail])
    assert 0 < s_same[0] <= 1 / np.sqrt(2) + 1e-6


def test_inspect_lists_blocks(capsys):
    import json

    from onnxrepair.cli import main

    assert main(["inspect", str(fixture_path("torch_resnet_bn_legacy17")), "--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)["blocks"]
    assert [(b["name"], b["kind"], b["in_shape"], b["out_shape"]) for b in blocks] == [("block_add", "residual", [8, 14, 14], [8, 14, 14])]
    assert main(["inspect", str(fixture_path("torch_lenet_legacy11"))]) == 0
    out = capsys.readouterr().out
    assert "blocks (archrepair --block NAME)" in out and "stage2_c2_conv" in out
