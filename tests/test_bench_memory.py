"""bench/memory.py's own arithmetic and its measurement trap (issue 19): ratios to plain fine-tuning per model, the
per-model targets, and a parent that imports no torch (Linux starts a forked child's ru_maxrss at the parent's peak, so
a heavy parent would hand every child its own resident size as a floor)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memory as bench  # noqa: E402  (bench/memory.py)


def _row(model, method, peak_mb, start_mb, method_peak_mb, kind="image"):
    return {"model": model, "method": method, "kind": kind, "peak_rss_mb": peak_mb, "params": 1_000_000, "wall_s": 1.0,
            "memory": {"stages": {"method": {"stage_peak_mb": method_peak_mb, "rss_start_mb": start_mb}}}}


def test_verdicts_divide_by_the_same_models_finetune_and_apply_its_target():
    rows = [_row("resnet18_cifar", "finetune", 1000, 900, 1100), _row("resnet18_cifar", "augmix", 1600, 900, 1500),
            _row("resnet50_224", "finetune", 8000, 1000, 7000), _row("resnet50_224", "deeppatch", 9000, 1000, 8000),
            _row("adult_mlp", "reweigh-finetune", 900, 700, 710, "tabular"), _row("adult_mlp", "fmt", 950, 700, 720, "tabular"),
            {"model": "resnet18_cifar", "method": "dare", "peak_rss_mb": 700, "wall_s": 1.0, "error": ["x"], "exit_code": 2}]
    v = {(x["model"], x["method"]): x for x in bench.verdicts(rows)}
    assert v[("resnet18_cifar", "augmix")]["ratio_to_finetune"] == 1.6 and not v[("resnet18_cifar", "augmix")]["ratio_met"]
    assert v[("resnet18_cifar", "augmix")]["method_increase_ratio"] == 3.0  # (1500-900) / (1100-900)
    assert v[("resnet18_cifar", "augmix")]["under_target"] and v[("resnet18_cifar", "augmix")]["target_gb"] == 4.0
    assert v[("resnet50_224", "deeppatch")]["ratio_to_finetune"] == 1.12 and v[("resnet50_224", "deeppatch")]["target_gb"] == 16.0
    assert v[("adult_mlp", "fmt")]["ratio_to_finetune"] == 1.06  # the tabular baseline is reweigh-finetune
    assert "ratio_to_finetune" not in v[("resnet18_cifar", "finetune")]
    assert v[("resnet18_cifar", "dare")]["failed"]  # a failed run is reported, never dropped
    assert "failed (exit 2)" in bench.table(rows)


def test_the_bench_parent_imports_no_torch():
    code = "import sys; sys.path.insert(0, 'bench'); import memory; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_merge_lets_a_later_part_re_measure_a_row(tmp_path):
    import json

    first = {"command": "bench/memory.py a", "rows": [_row("m", "finetune", 1000, 900, 1100), _row("m", "archrepair", 3000, 900, 2900)]}
    second = {"command": "bench/memory.py b", "rows": [_row("m", "archrepair", 1400, 900, 1300)]}
    for name, part in (("a", first), ("b", second)):
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    out = tmp_path / "merged.json"
    assert bench.main(["--merge", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [(r["method"], r["peak_rss_mb"]) for r in merged["rows"]] == [("finetune", 1000), ("archrepair", 1400)]
    assert merged["superseded"] == [{"model": "m", "method": "archrepair", "peak_gb": 2.93, "error": None}]
    assert "m archrepair (was 2.93GB)" in out.with_suffix(".txt").read_text()
