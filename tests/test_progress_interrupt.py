"""Ctrl-C exits 130 with one line and leaves nothing behind; progress reaches a log file as plain stage lines;
--log-json writes per-epoch metrics."""

from __future__ import annotations

import io
import json

import pytest
from conftest import FIXTURES, fixture_path
from rich.console import Console

from onnxrepair import methods as registry
from onnxrepair.cli import main
from onnxrepair.progress import Reporter, current_stage

LENET = fixture_path("torch_lenet_legacy11")
MNIST = FIXTURES / "data" / "mnist_small.npz"


def _method_that(monkeypatch, body):
    import dataclasses

    monkeypatch.setitem(registry._REGISTRY, "finetune", dataclasses.replace(registry.get("finetune"), fn=body))


def test_ctrl_c_during_repair_exits_130_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def interrupted(inputs, cfg):
        with inputs.progress.task("train", total=3) as advance:
            advance()
            raise KeyboardInterrupt

    _method_that(monkeypatch, interrupted)
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    rc = main(["repair", str(LENET), "--method", "finetune", "--data", str(MNIST), "-o", str(out), "--report", str(rep), "-q", "--limit", "300"])
    cap = capsys.readouterr()
    assert rc == 130
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("interrupted: repair stopped by Ctrl-C during 'train'")
    assert f"nothing written to {out}, {rep}" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary file


def test_ctrl_c_during_export_removes_the_temporary_file(tmp_path, monkeypatch, capsys):
    """Interrupted while the exported file is being validated: the temporary file beside -o goes too."""
    import onnxrepair.repair as rp

    def boom(*a, **k):
        assert any(p.name.startswith(".out.onnx.") for p in tmp_path.iterdir())  # the temporary file existed
        raise KeyboardInterrupt

    monkeypatch.setattr(rp, "_validate_export", boom)
    out = tmp_path / "out.onnx"
    rc = main(["repair", str(LENET), "--method", "finetune", "--data", str(MNIST), "-o", str(out), "-q", "--limit", "300", "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 130 and "during 'validation'" in err, err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_evaluate(tmp_path, monkeypatch, capsys):
    import onnxrepair.evaluate as ev

    def boom(*a, **k):
        raise KeyboardInterrupt
        yield  # pragma: no cover

    monkeypatch.setattr(ev, "_clean_predictions", boom)
    rep = tmp_path / "r.json"
    rc = main(["evaluate", str(LENET), "--data", str(MNIST), "--report", str(rep), "-q"])
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip() == f"interrupted: evaluate stopped by Ctrl-C during 'clean'; nothing written to {rep}"
    assert list(tmp_path.iterdir()) == []


def _plain_reporter(**kw):
    buf = io.StringIO()
    return Reporter(console=Console(file=buf, force_terminal=False, width=200), **kw), buf


def test_plain_mode_prints_stage_task_and_epoch_lines():
    r, buf = _plain_reporter()
    assert r.plain
    r.stage("export")
    with r.task("train", total=4) as advance:
        for _ in range(4):
            advance()
        r.epoch(1, 2, loss=0.5, calib_clean=0.95)
    lines = buf.getvalue().splitlines()
    assert [ln.split("] ", 1)[1] for ln in lines][:4] == ["export", "train: started (4 steps)", "epoch 1/2: loss 0.5000, calib_clean 95.00 %",
                                                          lines[3].split("] ", 1)[1]]
    assert lines[3].split("] ", 1)[1].startswith("train: done 4/4 in ")
    assert "\r" not in buf.getvalue()


def test_terminal_bar_shows_epoch_and_loss():
    buf = io.StringIO()
    r = Reporter(console=Console(file=buf, force_terminal=True, width=120))
    assert not r.plain
    with r.task("train", total=2) as advance:
        advance()
        r.epoch(1, 2, loss=0.25)
        advance()
    out = buf.getvalue()
    assert "train epoch 1/2 loss 0.250" in out
    assert "epoch 1/2: loss 0.2500" in out


def test_log_json_lines(tmp_path):
    p = tmp_path / "log.jsonl"
    r = Reporter(enabled=False, log_json=str(p))
    r.stage("export")
    with r.task("train", total=1) as advance:
        advance()
        r.epoch(1, 1, loss=0.1, calib_clean=0.9)
    r.close()
    ev = [json.loads(line) for line in p.read_text().splitlines()]
    assert [e["event"] for e in ev] == ["stage", "task", "epoch", "task_done"]
    assert ev[2]["loss"] == 0.1 and ev[2]["calib_clean"] == 0.9 and ev[2]["epochs"] == 1


def test_repair_log_json_and_plain_stderr(tmp_path, monkeypatch, capsys, one_torch_thread):
    """A repair whose stderr is a file: the stage lines are there; --log-json holds the epochs the training loop
    reported (onnxrepair.train.train_loop calls Reporter.epoch once per epoch, with loss and calibration scores)."""
    log = tmp_path / "log.jsonl"
    rc = main(["repair", str(LENET), "--method", "finetune", "--data", str(MNIST), "-o", str(tmp_path / "o.onnx"), "--limit", "300",
               "--epochs", "1", "--log-json", str(log), "--device", "cpu"])
    err = capsys.readouterr().err  # capsys: not a terminal
    assert rc == 0, err
    for stage in ("repair with finetune", "export", "validation", "evaluation", "epoch 1/1"):
        assert f"] {stage}" in err, (stage, err)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["name"] for e in events if e["event"] == "stage"] == ["repair with finetune", "export", "validation", "evaluation"]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1]
    assert epochs[0]["loss"] > 0 and 0 <= epochs[0]["calib_clean"] <= 1


def test_current_stage_names_the_innermost_task():
    r = Reporter(enabled=False)
    with pytest.raises(KeyboardInterrupt):
        with r.task("outer"):
            with r.task("inner"):
                raise KeyboardInterrupt
    assert current_stage() == "inner"
