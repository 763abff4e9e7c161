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
    # by default the kept op keeps its softmax weight as a scale, folded into the body's last conv (no Mul left)
    scaled = _run(inputs, search_epochs=0, finetune_epochs=0)
    w = scaled.info["edges"][1]["alpha"]["original"]
    cell = getattr(scaled.model, CELL_NAME)
    orig_cell = getattr(out.model, CELL_NAME)
    h = torch.rand(4, *out.info["repaired_region"]["in_shape"])
    with torch.no_grad():
        assert torch.allclose(cell.ops[0](h), w * orig_cell.ops[0](h), atol=1e-3)  # w is rounded in the report
    assert not any(type(m).__name__ == "Scaled" for m in cell.modules())


def test_fold_scale_is_exact_and_falls_back_to_mul():
    from onnxrepair.methods.archrepair import Scaled, fold_scale, make_op

    torch.manual_seed(0)
    x = torch.rand(2, 4, 8, 8)
    for name in ("conv_3x3", "sep_conv_3x3", "dil_conv_3x3", "avg_pool_3x3", "skip"):
        op = make_op(name, 4, 6, 2)
        for m in op.modules():  # new ops start at zero; give them weights
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.normal_(m.weight)
        with torch.no_grad():
            want = 0.3 * op(x)
            got = fold_scale(copy.deepcopy(op), 0.3)
            assert torch.allclose(got(x), want, atol=1e-5)
        assert not isinstance(got, Scaled)  # each ends in a conv here (channels change)
    pool = make_op("max_pool_3x3", 4, 4, 1)
    s = fold_scale(pool, 0.3)
    assert isinstance(s, Scaled) and torch.allclose(s(x), 0.3 * pool(x))


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


@pytest.mark.parametrize("opts, warm", [({}, 3.0), ({"warm_logit": "1"}, 1.0)])
def test_search_picks_new_ops_when_alpha_can_move(one_torch_thread, opts, warm):
    """With the defaults (arch_lr 0.03, "none" level with the new ops off the original's edge) the search trains
    the new ops (their weight gradients are reported) and picks new ops for the cell beside the original; the
    alpha trajectory is in info. The first version's settings (arch_lr 0.003, none_logit 3) never did. kd 1: at
    the default kd 4 the fixture's search keeps its epoch 0 (uniform alpha) by the checkpoint rule."""
    from onnxrepair.methods.archrepair import CELL_NAME, PRIMITIVES

    inputs = _inputs(RESNET)
    out = _run(inputs, search_epochs=2, kd=1, **opts)
    info = out.info
    new = [e["op"] for e in info["edges"] if e["op"] in PRIMITIVES and e["op"] != "none"]
    assert new, info["edges"]
    traj = info["alpha_trajectory"]
    assert set(traj) == {"0->1", "0->2", "1->2"} and len(traj["0->2"]["original"]) == 3  # epochs 0, 1, 2
    assert traj["0->2"]["original"][0] == pytest.approx(float(np.exp(warm) / (np.exp(warm) + 8)), abs=1e-3)
    assert traj["0->1"]["none"][0] == pytest.approx(1 / 8, abs=1e-3)
    grads = info["history"]["search"][1]["op_grad"]
    assert grads["0->1:conv_3x3"] > 0 and grads["0->2:original"] > 0
    # the default warm start keeps the original block and "none" elsewhere at epoch 0
    cell = getattr(out.model, CELL_NAME)
    assert len(cell.ops) == sum(1 for e in info["edges"] if "dropped" not in e["op"])


def test_kd_term_is_zero_only_on_the_teacher_and_enters_the_loss(one_torch_thread):
    from onnxrepair.methods.archrepair import Cached, _ce, _kd, _loss

    t = torch.randn(6, 10)
    assert float(_kd(t, t, "logits")) == pytest.approx(0, abs=1e-6)
    s = torch.randn(6, 10, requires_grad=True)
    loss = _kd(s, t, "logits")
    loss.backward()
    assert float(loss.detach()) > 0 and float(s.grad.abs().sum()) > 0
    # _loss = CE on the repair batch + kd * KD on the next clean batch
    student = torch.randn(4, 10)
    run = lambda d: d.cut  # noqa: E731  (a runner whose "model" is the identity on cached outputs)
    rep = Cached(student, (), torch.tensor([0, 1, 2, 3]))
    kb = Cached(torch.randn(4, 10), (), torch.randn(4, 10))
    want = _ce(student, rep.y, "logits") + 0.7 * _kd(kb.cut, kb.y, "logits")
    assert float(_loss(run, rep, iter([kb]), 0.7, "logits")) == pytest.approx(float(want), rel=1e-5)
    assert float(_loss(run, rep, None, 0.7, "logits")) == pytest.approx(float(_ce(student, rep.y, "logits")), rel=1e-5)
    # through the method: the distillation term changes the training loss and is reported
    inputs = _inputs(RESNET)
    a = _run(inputs, ops="original", finetune_epochs=1, kd=0.0)
    b = _run(inputs, ops="original", finetune_epochs=1, kd=1.0)
    assert a.info["kd"] == 0.0 and b.info["kd"] == 1.0
    assert b.info["history"]["finetune"][1]["loss"] > a.info["history"]["finetune"][1]["loss"]


def test_ft_lr_and_search_images_are_used(one_torch_thread):
    inputs = _inputs(RESNET)

    def ft_loss(**o):
        return _run(inputs, ops="original", finetune_epochs=1, **o).info["history"]["finetune"][1]["loss"]

    frozen, moved = ft_loss(ft_lr=1e-12), ft_loss(ft_lr=0.01)
    assert ft_loss() == pytest.approx(ft_loss(ft_lr=0.001))  # 0: the search's lr (0.001)
    assert abs(moved - frozen) > 0.1 * frozen  # 0.01 moves the weights a lot on this BN-folded fixture
    capped = _run(inputs, search_images=40, search_calib=7, search_epochs=1, finetune_epochs=0)
    assert capped.info["search_images"] == {"weights": 40, "alpha": 40}
    assert capped.info["search_calib_images"] == 7  # the search's epochs are scored on 7 calibration images
    assert all(round(h["calib_clean"] * 7, 6).is_integer() for h in capped.info["history"]["search"])


def test_clean_limit_counts_images_with_a_floor_of_one():
    """Issue 12: 0.5 pt of 149 calibration images is under one image, so the limit rejected every checkpoint that
    changed one clean prediction; it is now a whole number of images, at least one."""
    from onnxrepair.methods.archrepair import _preferring_clean, clean_limit_images

    assert clean_limit_images(149, 0.5) == 1 and clean_limit_images(1000, 0.5) == 5 and clean_limit_images(1000, 0.0) == 1
    assert clean_limit_images(400, 1.0) == 4
    orig = 137 / 149
    one = _preferring_clean(136 / 149, 0.7, orig, 0.5, 149)[1]
    two = _preferring_clean(135 / 149, 0.9, orig, 0.5, 149)[1]
    assert one["within_clean_limit"] and one["clean_images_lost"] == 1
    assert not two["within_clean_limit"] and two["clean_images_lost"] == 2
    # within the limit wins over a better mean that loses more
    assert _preferring_clean(136 / 149, 0.7, orig, 0.5, 149)[0] > _preferring_clean(135 / 149, 0.9, orig, 0.5, 149)[0]
    assert _preferring_clean(995 / 1000, 0.5, 1.0, 0.5, 1000)[1]["within_clean_limit"]
    assert not _preferring_clean(994 / 1000, 0.5, 1.0, 0.5, 1000)[1]["within_clean_limit"]
