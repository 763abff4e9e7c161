"""`onnxrepair evaluate --protected`: fairness metrics for CSV data, in the table and the JSON report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES, fixture_path

from onnxrepair.cli import main
from onnxrepair.data.loaders import load_dataset
from onnxrepair.fairness import evaluate_fairness, predict
from onnxrepair.runtime import make_session

MODEL = fixture_path("adult_mlp")
DATA = FIXTURES / "data" / "adult_test.csv"
ARGS = ["--data", str(DATA), "--target", "income", "-q", "--provider", "cpu"]


def test_fairness_in_report_and_table(tmp_path, capsys):
    """Two models (the same file twice, as a before/after pair would be): both reported, same figures,
    equal to the library call and to a hand count of the statistical parity difference."""
    rc = main(["evaluate", str(MODEL), str(MODEL), *ARGS, "--protected", "sex", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rep = json.loads((tmp_path / "r.json").read_text())
    fair = rep["fairness"]
    assert fair["protected"] == {"column": "sex", "privileged": 1.0, "unprivileged": 0.0}
    assert list(fair["models"]) == [m["name"] for m in rep["models"]] == ["adult_mlp", "adult_mlp#2"]
    a, b = fair["models"].values()
    assert a == b
    for key in ("accuracy", "spd", "aaod", "eod", "idr", "idr_data"):
        assert np.isfinite(a[key]), key
    assert a["accuracy"] == pytest.approx(rep["models"][0]["clean"])  # the same predictions, two ways

    ds = load_dataset(DATA, target="income", protected=["sex"])
    sex = ds.x[:, ds.columns.index("sex")]
    pred = predict(make_session(MODEL, "cpu"), ds.x)
    spd = pred[sex == 0].mean() - pred[sex == 1].mean()  # P(ŷ=1 | unprivileged) − P(ŷ=1 | privileged)
    assert a["spd"] == pytest.approx(spd)
    from onnxrepair.data.tabular import resolve_protected

    lib = evaluate_fairness([MODEL], ds, resolve_protected(ds, "sex"), provider="cpu", seed=0)[0]
    assert a["idr"] == pytest.approx(lib["idr"]) and a["aaod"] == pytest.approx(lib["aaod"])

    for head in ("SPD", "AAOD", "EOD", "IDR"):
        assert head in out.out
    assert "sex" in out.out and f"{a['spd']:+.4f}" in out.out


def test_fairness_json_stdout_and_value_pair(capsys):
    """--json carries the fairness block; an explicit (reversed) value pair flips the sign of SPD."""
    rc = main(["evaluate", str(MODEL), *ARGS, "--protected", "sex", "--json"])
    assert rc == 0
    d1 = json.loads(capsys.readouterr().out)["fairness"]["models"]["adult_mlp"]
    rc = main(["evaluate", str(MODEL), *ARGS, "--protected", "sex", "--privileged", "0", "--unprivileged", "1", "--json"])
    assert rc == 0
    d2 = json.loads(capsys.readouterr().out)["fairness"]["models"]["adult_mlp"]
    assert d2["spd"] == pytest.approx(-d1["spd"]) and d2["accuracy"] == d1["accuracy"]


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--protected", "gender"], "'gender'"),  # missing column
        (["--protected", "sex", "--privileged", "7"], "does not occur"),
        (["--privileged", "1"], "need --protected"),
    ],
)
def test_fairness_bad_input(extra, msg, tmp_path, capsys):
    rc = main(["evaluate", str(MODEL), *ARGS, *extra, "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.json").exists()


def test_protected_needs_csv(tmp_path, capsys):
    d = np.load(FIXTURES / "data" / "mnist_small.npz")
    np.savez(tmp_path / "m.npz", x=d["x"][:10], y=d["y"][:10])
    rc = main(["evaluate", str(fixture_path("torch_lenet_legacy11")), "--data", str(tmp_path / "m.npz"), "--protected", "sex", "-q", "--provider", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "CSV" in err and len(err.strip().splitlines()) == 1, err


def test_fairness_plot(tmp_path):
    """--plots with --protected draws the fairness bars; a model with more disparity gets taller bars."""
    from PIL import Image

    from onnxrepair.report import PALETTE, plot_fairness

    rc = main(["evaluate", str(MODEL), *ARGS, "--protected", "sex", "--plots", str(tmp_path / "p")])
    assert rc == 0 and (tmp_path / "p" / "fairness.png").exists()
    fair = {"unfair": {"abs_spd": 0.4, "aaod": 0.3, "abs_eod": 0.2, "idr": 0.1}, "fair": {"abs_spd": 0.1, "aaod": 0.1, "abs_eod": 0.05, "idr": 0.0}}
    img = Image.open(plot_fairness(fair, "sex", tmp_path / "q")).convert("RGB")
    px = np.asarray(img)

    def height(color) -> int:  # the tallest column of this colour, in pixels
        mask = (px == np.array(color, np.uint8)).all(axis=2)
        return int(mask[:, :420].sum(axis=0).max())  # left of the legend

    assert height(PALETTE[0]) > 3 * height(PALETTE[1]) > 0


def test_bar_chart_draws_negative_values_below_the_zero_line(tmp_path):
    from PIL import Image

    from onnxrepair.report import PALETTE, bar_chart

    img = np.asarray(Image.open(bar_chart(tmp_path / "b.png", "t", ["a"], {"down": [-30.0], "up": [10.0]}, marks=[-20.0])).convert("RGB"))
    rows = lambda c: np.nonzero((img[:, :400] == np.array(c, np.uint8)).all(axis=2).any(axis=1))[0]  # noqa: E731  (left of the legend)
    down, up = rows(PALETTE[0]), rows(PALETTE[1])
    assert up.max() <= down.min() + 1  # the positive bar ends where the negative one starts: the zero line
    assert len(down) > 2 * len(up)  # -30 is three times as long as +10
