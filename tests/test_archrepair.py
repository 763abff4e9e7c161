"""ArchRepair (onnxrepair.methods.archrepair): the search runs in seconds on the committed tiny ResNet, the
repaired file passes the pipeline's export + onnxruntime fidelity check, the cell keeps the block's shapes,
and --block / blockless models fail as usage errors (exit 2)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import FIXTURES, fixture_path

from onnxrepair.cli import main
from onnxrepair.data import load_dataset

MNIST = FIXTURES / "data" / "mnist_small.npz"
RESNET = fixture_path("torch_resnet_folded_legacy17")
FAST = {"corruptions": "gaussian_noise,deeppatch_blur", "pool": "300", "failures": "150", "search_epochs": "2",
        "finetune_epochs": "1", "batch_size": "64"}


def _inputs(model_path, n: int = 400):
    import converters
    from onnxrepair.data.contract import finalize_contract, resolve_contract
    from onnxrepair.methods import RepairInputs
    from onnxrepair.repair import split_data

    train = load_dataset(str(MNIST)).limit(n, seed=0)
    conv = converters.convert(model_path)
    contract = resolve_contract(conv.inputs[0].shape, train.x[:64])
    finalize_contract(contract, train.x[:64])
    tr, calib, _ = split_data(train, None, 0)
    return RepairInputs(model=conv.gm, contract=contract, train=tr, calib=calib, output_kind="logits", device=torch.device("cpu"))


def _run(inputs, **opts):
    from onnxrepair import methods

    spec = methods.get("archrepair")
    cfg = methods.make_config(spec, {**FAST, **{k: str(v) for k, v in opts.items()}})
    return spec.fn(inputs, cfg)


def test_search_repairs_a_block_through_the_pipeline(tmp_path, one_torch_thread):
    from onnxrepair.repair import repair

    res = repair(str(RESNET), "archrepair", load_dataset(str(MNIST)), output=tmp_path / "r.onnx", options=FAST,
                 force=True, eval_corruptions=("gaussian_noise",), provider="cpu")
    info = res.info
    assert res.fidelity["passed"] and res.written and (tmp_path / "r.onnx").exists()
    assert info["chosen_block"] == "block_add" and info["ranking"][0]["block"] == "block_add"
    assert info["ranking"][0]["score"] > 0
    assert [e["edge"] for e in info["edges"]] == ["0->1", "0->2", "1->2"]
    for e in info["edges"]:  # every edge reports its alpha weights, a distribution
        assert sum(e["alpha"].values()) == pytest.approx(1, abs=1e-3)
    assert info["repair_data"]["failures_used"] > 0 and info["params_removed"] > 0
    assert info["params_delta"] == info["params_added"] - info["params_removed"]
    assert set(info["seconds"]) >= {"localise", "search", "finetune", "total"}
    assert info["seconds"]["total"] < 60 and len(info["history"]["search"]) == 3  # epoch 0 + 2 search epochs
    assert any("block_add" in line for line in res.summary)
    assert res.latency_ms["ratio"]["batch1"] > 0
    # the exported graph holds standard ONNX ops only
    import onnx

    m = onnx.load(str(tmp_path / "r.onnx"))
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}


def test_cell_keeps_the_block_shapes_and_conv_ops_export(one_torch_thread):
    """A cell forced to new ops (no "original", no "none") maps the block's input shape to its output shape."""
    from onnxrepair.graph.edit import region_nodes  # noqa: F401
    from onnxrepair.localize.blocks import find_blocks
    from onnxrepair.methods.archrepair import CELL_NAME

    inputs = _inputs(RESNET)
    out = _run(inputs, ops="conv_3x3,sep_conv_3x3,dil_conv_3x3,skip", nodes=1)
    gm = out.model
    cell = getattr(gm, CELL_NAME)
    blk = find_blocks(inputs.model, torch.rand(2, 1, 28, 28))[0]
    y = cell(torch.rand(3, *blk.in_shape))
    assert list(y.shape[1:]) == blk.out_shape
    assert out.info["edges"][0]["op"] in ("conv_3x3", "sep_conv_3x3", "dil_conv_3x3", "skip")
    x = torch.rand(5, 1, 28, 28)
    assert gm(x).shape == (5, 10)


def test_weights_only_and_layer_level(one_torch_thread):
    inputs = _inputs(RESNET)
    w = _run(inputs, ops="original")
    assert w.info["edges"] == [{"edge": "0->1", "op": "original", "alpha": {"original": 1.0}}]
    assert w.info["params_added"] == w.info["params_removed"] and w.info["seconds"]["search"] == 0
    lay = _run(inputs, level="layer", search_epochs=1)
    region = lay.info["repaired_region"]
    assert region["nodes"] == [region["name"]] and region["name"] in ("block_conv1_conv", "block_conv2_conv")
    assert [r["layer"] for r in lay.info["layer_ranking"]] != [] and lay.info["chosen_block"] == "block_add"


def test_search_can_keep_the_original_block_exactly(one_torch_thread):
    """No search, no fine-tuning: the cell is the original block, so predictions are unchanged."""
    from onnxrepair.methods.archrepair import CELL_NAME

    inputs = _inputs(RESNET)
    out = _run(inputs, search_epochs=0, finetune_epochs=0, keep_alpha_scale="false")
    assert [e["op"] for e in out.info["edges"]] == ["none (dropped)", "original", "none (dropped)"]
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(out.model(x), inputs.model(x), atol=1e-5)
    # by default the kept op keeps its softmax weight as a constant scale
    scaled = _run(inputs, search_epochs=0, finetune_epochs=0)
    w = scaled.info["edges"][1]["alpha"]["original"]
    assert float(getattr(scaled.model, CELL_NAME).ops[0].weight) == pytest.approx(w, abs=1e-4)


def test_plain_cnn_stage_repair(one_torch_thread):
    inputs = _inputs(fixture_path("torch_lenet_legacy11"))
    out = _run(inputs, block="stage2_c2_conv", score="spectrum")
    assert out.info["chosen_block"] == "stage2_c2_conv"
    assert all(r["spectrum"] is not None for r in out.info["ranking"])
    assert out.model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_bad_block_name_exits_2_listing_blocks(tmp_path, capsys):
    rc = main(["repair", str(RESNET), "--method", "archrepair", "--data", str(MNIST), "-o", str(tmp_path / "o.onnx"),
               "--block", "nope", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "block 'nope' does not exist; blocks: block_add" in err
    assert not (tmp_path / "o.onnx").exists()


def test_model_without_blocks_exits_2_saying_why(tmp_path, capsys):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    path = tmp_path / "dense_image.onnx"
    torch.onnx.export(net, (torch.rand(1, 1, 28, 28),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17)
    rc = main(["repair", str(path), "--method", "archrepair", "--data", str(MNIST), "-o", str(tmp_path / "o.onnx"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a block to repair" in err and "no convolution" in err
