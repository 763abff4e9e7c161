"""Memory (issue 19): measured per stage, budgeted, and the budget never changes a result.

The committed ResNet with BatchNorm kept (``torch_resnet_bn_legacy17``, trained on MNIST-5k) repaired with DeepPatch
on the committed MNIST subset under two budgets: one that lets every pass stack as configured, one that splits every
pass into a few images. Same featswap ranking, same selected filters, same gate threshold, same routing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, fixture_path

from onnxrepair.cli import main
from onnxrepair.data import load_dataset
from onnxrepair.memory import PASS_BYTES, MiB, Memory, MemoryBudgetError, activation_cost, format_size, parse_size, rss_bytes
from onnxrepair.repair import prepare, run, split_data

MODEL = fixture_path("torch_resnet_bn_legacy17")
DATA = FIXTURES / "data" / "mnist_small.npz"
OPTIONS = {"epochs": "1", "assess_samples": "32", "gate_samples": "64", "batch_size": "64"}


def _splits():
    data = load_dataset(DATA)
    tr, calib, heldout = split_data(data.limit(400, seed=0), None, seed=0)
    return tr.limit(128, seed=0), calib, heldout


@pytest.fixture(scope="module")
def two_budgets():
    out = {}
    for name, pass_bytes in (("roomy", 1 << 30), ("tight", 256 << 10)):  # 256 KB per pass: a few images at a time
        prep = prepare(MODEL, "deeppatch", load_dataset(DATA), splits=_splits(), options=OPTIONS, device="cpu", seed=0)
        prep.memory.pass_bytes = pass_bytes
        out[name] = (prep, run(prep))
    return out


def test_budget_splits_the_passes_and_changes_no_result(two_budgets):
    (p_roomy, roomy), (p_tight, tight) = two_budgets["roomy"], two_budgets["tight"]
    a, b = roomy.info, tight.info
    # the tight budget really split every pass
    assert b["passes"]["assess_group"] * b["passes"]["assess_batch"] < a["passes"]["assess_group"] * a["passes"]["assess_batch"]
    assert b["passes"]["assess_group"] * b["passes"]["assess_batch"] <= 4
    assert b["passes"]["capture_batch"] < a["passes"]["capture_batch"]
    # featswap ranking and the filters it selected
    for layer in a["ranking"]:
        ra, rb = a["ranking"][layer]["top"], b["ranking"][layer]["top"]
        assert [r["channel"] for r in ra] == [r["channel"] for r in rb], layer
        assert [r["acc_score"] for r in ra] == [r["acc_score"] for r in rb], layer  # counts of correct answers: exact
        # the loss change (the tie-break) is a float sum: convolutions round differently at other batch sizes
        assert [r["loss_score"] for r in ra] == pytest.approx([r["loss_score"] for r in rb], abs=1e-4), layer
    assert [l["channels"] for l in a["layers_patched"]] == [l["channels"] for l in b["layers_patched"]]
    # the gate: threshold, AUCs, routing, calibration accuracy
    assert a["gate"]["threshold"] == pytest.approx(b["gate"]["threshold"], abs=1e-5)
    assert a["gate"]["boundary"] == pytest.approx(b["gate"]["boundary"], abs=1e-6)
    for k in a["gate"]["auc"]:
        assert a["gate"]["auc"][k] == pytest.approx(b["gate"]["auc"][k], abs=1e-6)
    assert a["routing_calib"] == b["routing_calib"]
    assert a["calib_accuracy"] == b["calib_accuracy"]
    assert a["best_epoch"] == b["best_epoch"]


def test_stages_are_measured(two_budgets):
    prep, _ = two_budgets["roomy"]
    rep = prep.memory.report()
    for stage in ("convert", "prepare", "method", "method.assess", "method.train", "method.calibrate"):
        rec = rep["stages"][stage]
        assert rec["stage_peak_mb"] >= rec["rss_start_mb"] > 0
        assert rec["peak_mb"] >= rec["stage_peak_mb"] - 16  # the process peak by the end of the stage holds the stage's own (the kernel syncs RSS counters lazily)
        assert rec["increase_mb"] >= 0
    assert rep["activation_cost_per_sample"]["peak_live_mb"] > 0
    assert {s["stage"] for s in rep["sizing"]} >= {"deeppatch assessment", "deeppatch calibration"}


def test_budget_below_one_sample_stops_before_training():
    prep = prepare(MODEL, "deeppatch", load_dataset(DATA), splits=_splits(), options=OPTIONS, device="cpu", seed=0)
    prep.memory.limit = rss_bytes() - 64 * MiB  # less than the process already holds
    with pytest.raises(MemoryBudgetError) as e:
        run(prep)
    assert "method.train" not in prep.memory.stages and "method.assess" not in prep.memory.stages
    msg = str(e.value)
    assert "deeppatch" in msg and "--max-memory" in msg and "nothing was written" in msg
    assert e.value.needed > e.value.limit and e.value.exit_code == 2


def test_cli_max_memory_too_small_exits_2_and_writes_nothing(tmp_path, capsys):
    out, report = tmp_path / "r.onnx", tmp_path / "r.json"
    code = main(["repair", str(MODEL), "--method", "deeppatch", "--data", str(DATA), "-o", str(out), "--report", str(report),
                 "--max-memory", "200MB", "--limit", "200", "-q", "--epochs", "1"])
    assert code == 2
    assert not out.exists() and not report.exists()
    err = capsys.readouterr().err
    assert "not enough memory for" in err and "--max-memory" in err


def test_parse_and_format_sizes():
    assert parse_size("4GB") == 4 << 30 == parse_size("4 GiB") == parse_size("4g") == parse_size(4)
    assert parse_size("512MB") == 512 * MiB
    assert format_size(parse_size("1.5GB")) == "1.5GB"
    with pytest.raises(Exception):
        parse_size("lots")


def test_activation_cost_counts_what_is_alive():
    from torch import fx, nn

    class Net(nn.Module):
        def forward(self, x):
            a = x * 2  # 4 floats per sample each
            b = a + 1
            return b.sum(1)

    gm = fx.symbolic_trace(Net())
    c = activation_cost(gm, torch.zeros(2, 4))
    # x alive while a is made, then a and b: at most 2 vectors of 4 floats alive at once (16 + 16 bytes)
    assert c.input == 16 and c.peak_live == 32 and c.saved == 16 + 16 + 4


def test_fit_splits_and_refuses():
    mem = Memory(limit=rss_bytes() + 100 * MiB, pass_bytes=10 * MiB, margin=1.0)
    assert mem.fit("x", 1 * MiB, 1000) == 10  # the pass cap, not the budget, bounds a pass
    assert mem.fit("x", 1 * MiB, 3) == 3
    assert mem.fit("x", 50 * MiB, 8) == 1  # one always fits when it fits in the budget
    with pytest.raises(MemoryBudgetError):
        mem.fit("x", 1 << 40, 1)


# --------------------------------------------------------------------------- out of memory the budget did not predict


def _huge_torch(*a, **k):
    return torch.empty(1 << 48, dtype=torch.uint8)  # a real allocation failure: torch's CPU allocator refuses 256 TB


def _huge_numpy(*a, **k):
    return np.empty(1 << 48, dtype=np.uint8)  # numpy's own MemoryError


@pytest.mark.parametrize("target,fn,stage", [
    ("onnxrepair.methods.finetune.train_mixture", _huge_torch, "method"),  # during training
    ("onnxrepair.evaluate.evaluate_models", _huge_numpy, "evaluate"),  # after export, inside the atomic write of -o
])
def test_out_of_memory_in_a_stage_exits_2_names_it_and_writes_nothing(tmp_path, capsys, monkeypatch, target, fn, stage):
    monkeypatch.setattr(target, fn)
    import converters.io

    real_write = converters.io.write_model

    def write_with_external_data(model, path, data_name=None):  # as a model past 2 GB does: weights in a file beside it
        real_write(model, path, data_name)
        (Path(path).parent / data_name).write_bytes(b"weights")

    monkeypatch.setattr(converters.io, "write_model", write_with_external_data)
    out, report = tmp_path / "r.onnx", tmp_path / "r.json"
    code = main(["repair", str(fixture_path("torch_lenet_legacy11")), "--method", "finetune", "--data", str(DATA), "-o", str(out),
                 "--report", str(report), "--limit", "200", "-q", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert list(tmp_path.iterdir()) == []  # no model, no report, no temporary file left behind
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and f"ran out of memory in stage {stage!r}" in line[0] and "nothing was written" in line[0]
    assert "256.0TB" in line[0] or "262144" in line[0] or "needs at least" in line[0]  # how much it asked for
    assert "Traceback" not in err


def test_out_of_memory_names_the_innermost_stage_and_leaves_other_errors_alone():
    from onnxrepair.memory import OutOfMemory

    mem = Memory(limit=rss_bytes() + 100 * MiB)
    with pytest.raises(OutOfMemory) as e:
        with mem.stage("method"):
            with mem.stage("method.train"):
                _huge_torch()
    assert e.value.stage == "method.train" and e.value.exit_code == 2
    assert e.value.tried == 1 << 48 and e.value.needed >= 1 << 48  # what the failed allocation asked for, on top of what was in use
    assert "method.train" in mem.stages and "method" in mem.stages  # both stages still measured
    with pytest.raises(ValueError):  # not an allocation failure: untouched
        with mem.stage("method"):
            raise ValueError("a bug")
    with pytest.raises(MemoryBudgetError) as e2:  # the budget's own refusal keeps its message
        with mem.stage("method"):
            mem.fit("x", 1 << 40, 1)
    assert "smallest budget that would work" in str(e2.value)


def test_archrepair_search_split_by_the_budget_chooses_the_same_cell(one_torch_thread):
    """ArchRepair's search holds every candidate op's activations for its batch: the budget splits a search step into
    micro-batches whose gradients add up to the whole batch's (and the localisation's gradient passes, the scoring
    passes and the discrete cell's fine-tuning likewise), and the data sets kept at the block's entry must fit half a
    pass (the others run the frozen prefix again per batch). On the committed folded ResNet: a budget of 2 MB per pass
    (a few images at a time, nothing kept at the entry) and the default pick the same block and cell, with the same
    alphas and losses to float rounding."""
    from test_archrepair import RESNET, _inputs, _run

    outs = {}
    for name, pass_bytes in (("default", None), ("tight", 2 << 20)):
        inputs = _inputs(RESNET)
        if pass_bytes:
            inputs.memory = Memory(pass_bytes=pass_bytes)
        outs[name] = _run(inputs, search_epochs=2).info
    a, b = outs["default"], outs["tight"]
    # the default splits the search only down to what a fine-tuning batch of the whole model holds; the tight budget further
    assert a["passes"]["localise_batch"] == 256 and a["passes"]["finetune_micro_batch"] == 64  # not split
    assert b["passes"]["search_micro_batch"] <= 8 < a["passes"]["search_micro_batch"] < 64
    assert b["passes"]["localise_batch"] <= 16 and b["passes"]["search_eval_batch"] <= 8 and b["passes"]["finetune_micro_batch"] <= 16
    # the default keeps every set at the block's entry; the tight budget (1 MB for them) only the small calibration
    # sets: the repair and distillation sets run the prefix again per batch
    every = ["repair", "kd", "calib_clean", "calib_corrupted"]
    assert a["passes"]["entry_cached"] == {"search": every, "finetune": every}
    assert b["passes"]["entry_cached"] == {"search": every[2:], "finetune": every[2:]}
    assert a["chosen_block"] == b["chosen_block"]
    assert [r["score"] for r in a["ranking"]] == pytest.approx([r["score"] for r in b["ranking"]], rel=1e-4)
    assert [(e["edge"], e["op"]) for e in a["edges"]] == [(e["edge"], e["op"]) for e in b["edges"]]
    for ea, eb in zip(a["edges"], b["edges"]):
        assert ea["alpha"] == pytest.approx(eb["alpha"], abs=2e-4), ea["edge"]
    for ra, rb in zip(a["history"]["search"], b["history"]["search"]):
        assert ra.get("loss", 0) == pytest.approx(rb.get("loss", 0), rel=1e-4)
        assert (ra["calib_clean"], ra["calib_corrupted"]) == (rb["calib_clean"], rb["calib_corrupted"])
    for ra, rb in zip(a["history"]["finetune"], b["history"]["finetune"]):  # the discrete cell's fine-tuning, split too
        assert ra.get("loss", 0) == pytest.approx(rb.get("loss", 0), rel=1e-4)
    assert a["calib_accuracy"] == pytest.approx(b["calib_accuracy"], abs=1e-9)
    assert a["finetune_best_epoch"] == b["finetune_best_epoch"]


def test_augmix_step_split_by_the_budget_is_the_same_update(one_torch_thread):
    """AugMix's step sends three views of every row through the model, so it holds three times a fine-tuning batch:
    the budget splits it (train_loop's micro_batch) into parts whose weighted gradients add up to the whole batch's.
    On the committed ResNet fixture: a step never holds more rows than a third of the batch by default, a tight pass
    splits further, and the trained weights and loss history match the unsplit run's to float rounding."""
    from test_archrepair import RESNET, _inputs

    from onnxrepair import methods

    spec = methods.get("augmix")
    cfg = methods.make_config(spec, {"epochs": "2", "batch-size": "32", "lr": "0.01"})
    outs = {}
    for name, pass_bytes in (("unsplit", None), ("default", PASS_BYTES), ("tight", 2 << 20)):
        inputs = _inputs(RESNET, n=200)
        if pass_bytes is not None:
            inputs.memory = Memory(pass_bytes=pass_bytes)
            inputs.memory.cost = activation_cost(inputs.model, inputs.contract.to_model(inputs.contract.to_unit(inputs.train.x[:2])))
        else:
            inputs.memory = None
        outs[name] = spec.fn(inputs, cfg)
    assert outs["unsplit"].info["micro_batch"] is None
    assert outs["default"].info["micro_batch"] == 32 // 3
    assert 1 <= outs["tight"].info["micro_batch"] < 32 // 3
    ref = outs["unsplit"].model.state_dict()
    for name in ("default", "tight"):
        got = outs[name].model.state_dict()
        for k, v in ref.items():
            assert torch.allclose(v, got[k], rtol=1e-4, atol=1e-5), (name, k)
        for ra, rb in zip(outs["unsplit"].info["history"], outs[name].info["history"]):
            assert ra.get("loss", 0) == pytest.approx(rb.get("loss", 0), rel=1e-4)
    assert outs["default"].info["best_epoch"] == outs["unsplit"].info["best_epoch"]
