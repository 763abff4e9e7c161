"""The smaller things a new user hits first: start-up time, `methods` output, help text, warnings that leak,
how budgets and figures are printed, and what the plots show."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import FIXTURES, ROOT, fixture_path

from onnxrepair.cli import main
from onnxrepair.report import _eps, fmt_value, legend_labels

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_cli_import_loads_neither_torch_nor_onnxruntime():
    """Seen: --help took 6.5 s, mostly importing torch for nothing."""
    code = "import sys, onnxrepair.cli; print(sorted(m for m in ('torch', 'onnxruntime', 'onnx2torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, check=True).stdout.strip()
    assert out == "[]"


def test_methods_prints_whole_names_and_typed_defaults(capsys):
    """Seen: names broken at 80 columns, defaults as Python values ((0.03137254901960784), (()))."""
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("adversarial-training", "deeppatch", "fmt", "finetune"):
        assert any(line.startswith(f"{name}  (") for line in out.splitlines()), name
    assert "0.0313725" not in out and "(())" not in out and "()" not in out
    assert "--eps" in out and "8/255" in out


def test_default_formatting():
    assert [fmt_value(v) for v in (8 / 255, 0.2, (), ("fog", "blur"), True, None, 3)] == ["8/255", "0.2", "none", "fog,blur", "true", "none", "3"]
    assert _eps(0.2) == "0.2" and _eps(2 / 255) == "2/255" and _eps(0.5) == "0.5"  # seen: 0.2 shown as 51/255


def test_config_help_keeps_the_input_table_name(capsys):
    """Seen: '--config ... (top level or an table)': rich markup ate '[input]'."""
    assert main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out.replace("│", " ")  # the help box wraps lines between frame characters
    assert "an [input] table" in " ".join(out.split())


def test_onnx2torch_warning_does_not_leak(tmp_path):
    r = subprocess.run([sys.executable, "-m", "onnxrepair", "roundtrip", str(fixture_path("keras_cnn_nhwc_tf2onnx")), "-o", str(tmp_path / "o.onnx"),
                        "--provider", "cpu"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "UserWarning" not in r.stderr and "Warning" not in r.stdout


def test_repair_table_speaks_percent_like_evaluate():
    """Seen: repair printed 1.0000 where evaluate printed 100.00."""
    from onnxrepair.commands.repair import _metric_cells

    assert _metric_cells("clean", 0.905, 0.9105) == ("clean (%)", "90.50", "91.05", "+0.55 pts")
    assert _metric_cells("spd", -0.2356, -0.192) == ("spd", "-0.2356", "-0.1920", "+0.0436")


def test_legend_names_with_a_shared_prefix_stay_apart():
    names = ["torch_lenet_legacy11_original", "torch_lenet_legacy11_repaired_deeppatch"]
    labels = legend_labels(names, 18)
    assert len(set(labels)) == 2 and all(len(x) <= 18 for x in labels)
    assert labels[0].endswith("original") and "deeppatch" in labels[1]
    assert legend_labels(["a", "b"], 18) == ["a", "b"]


def test_plots_include_attacks_and_name_the_data(tmp_path):
    from PIL import Image

    plots = tmp_path / "p"
    rc = main(["evaluate", str(fixture_path("torch_lenet_legacy11")), "--data", str(FIXTURES / "data" / "mnist_small.npz"), "--limit", "64",
               "--attacks", "fgsm", "--eps", "2/255,0.1", "--no-blur", "--plots", str(plots), "-q", "--provider", "cpu", "--device", "cpu"])
    assert rc == 0
    assert sorted(p.name for p in plots.iterdir()) == ["attack_fgsm.png"]  # seen: no chart for attacks
    assert Image.open(plots / "attack_fgsm.png").size == (620, 400)
