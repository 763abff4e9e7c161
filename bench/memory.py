"""Peak memory and time of a repair, per method, on models of real size (issue 19).

    .venv/bin/python bench/memory.py --data-dir ../shared/datasets [--models resnet18_cifar_w16,resnet18_cifar_w32,
        resnet18_cifar,resnet50_224] [--methods finetune,deeppatch,dare,archrepair,...] [--tabular-methods fmt,...]
        [--n-train 300] [--epochs 1] [--max-memory 4GB] [--assess-convs N] [--threads 1]
    .venv/bin/python bench/memory.py --merge a.json,b.json --out bench/results/memory.json   # runs made in parts

Models come from ``bench/memory_models.py`` (random weights, seeded: only memory and time are measured): the CIFAR
ResNet-18 at widths 16, 32 and 64 (0.7M, 2.8M, 11.2M parameters; 32x32) and torchvision's ResNet-50 (23.5M; 224x224,
CIFAR-10 images upsampled). Each (model, method) pair runs in a fresh process through the pipeline's own stages
(prepare -> run -> export -> judge, as ``onnxrepair repair`` runs them) on a class-balanced CIFAR-10 subset read from
the shared tarball. The parent reads the child's peak resident memory from its rusage (``os.wait4``: the figure
``/usr/bin/time -f %M`` gives); the parent imports no torch, since Linux starts a forked child's ``ru_maxrss`` at the
parent's. Per-stage figures come from the report (``RepairResult.memory``). The table gives each method's peak, its
ratio to plain fine-tuning on the same model (target <= 1.5x), how far the method stage rose above the resident size
at its start and that ratio too, and whether the ResNet-18 stays under 4 GB and the ResNet-50 under 16 GB; JSON,
text and a plot of peak memory against parameters (``memory.png``, drawn with Pillow) go to ``bench/results/``.

Every image method: finetune, deeppatch, dare (its history: three noisy copies of the model the bench exports with
``memory_models.history``), archrepair, finetune-last, augmix, adversarial-training; FMT is tabular-only (a fairness
repair of CSV rows), so it and the tabular peers run through the CLI on the Adult MLP fixture, the largest tabular
model the project has (its baseline: reweigh-finetune, there being no plain ``finetune`` for tables).

Kept short so it runs on a shared 2-core machine, only where a setting sets time and not what one pass holds (the
results say each): a few hundred images or fewer, one epoch, PGD-2, one DARE learning rate, one ArchRepair search and
fine-tuning epoch, the judge's evaluation on clean + blur + Gaussian noise for every method, and DeepPatch's filter
assessment on ``--assess-convs`` convs (0: every conv, the method's default; ~4,800 filters on the full-width
ResNet-18, ~26,000 on ResNet-50, each a pass of the rest of the network). The stem is where a stacked ablation holds
the largest cut and runs the longest suffix, and the assessment keeps only a ranking per layer, so its peak does not
grow with the number of layers assessed (measured on width 16: every conv vs the stem alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"
TARGET_GB = {"resnet18_cifar": 4.0, "resnet50_224": 16.0}  # issue 19: the full-width ResNet-18 at 32x32, ResNet-50 at 224x224
TARGET_RATIO = 1.5
IMAGE_METHODS = ("finetune", "deeppatch", "dare", "archrepair", "finetune-last", "augmix", "adversarial-training")
TABULAR_METHODS = ("reweigh-finetune", "fmt", "counterfactual-finetune")  # FMT is tabular-only (fairness on CSV rows)
TABULAR = {"model": "fixtures/models/adult_mlp.onnx", "data": "fixtures/data/adult_train.csv", "val": "fixtures/data/adult_test.csv",
           "target": "income", "protected": "sex"}  # the largest tabular model the project has (its fairness fixtures)

# per method: bench settings, as `onnxrepair repair` takes them (strings). Shortened only where the setting sets time,
# not what one pass holds (each is said in the results): epochs, PGD steps, DARE's learning rates, ArchRepair's epochs.
METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "deeppatch": {"gate_samples": "300"},
    "finetune": {},
    "finetune-last": {},
    "augmix": {},
    "adversarial-training": {"steps": "2"},  # PGD-2 instead of 7: each step is one forward+backward of the same batch
    "dare": {"lrs": "0.001", "select_size": "64"},  # history: made by memory_models.history (3 noisy copies)
    "archrepair": {"pool": "{n_train}", "failures": "100", "search_epochs": "{epochs}", "finetune_epochs": "{epochs}"},
    "fmt": {}, "counterfactual-finetune": {}, "reweigh-finetune": {},
}
# the baseline each method's peak is divided by: plain fine-tuning; on tabular data (no plain `finetune` there)
# reweighing + fine-tuning, which is a plain weighted fine-tune
# the judge's evaluation: clean, the 6 blur levels and this corruption for every method alike (a method's own training
# corruptions would make ArchRepair's evaluation 15x longer; the evaluation's memory is its batch, not the count)
EVAL_CORRUPTIONS = ("gaussian_noise",)
BASELINE = {"image": "finetune", "tabular": "reweigh-finetune"}


def _dataset(data_dir: Path, n_train: int, n_test: int, size: int = 32) -> Path:
    """CIFAR-10 subset as an npz in bench/work (made once from the tarball); ``size`` > 32 upsamples (bilinear)
    to the model's input, as a user feeding a 224x224 model would."""
    from deeppatch import load_cifar

    path = WORK / f"cifar_{n_train}_{n_test}_{size}.npz"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        tr, te = load_cifar(data_dir, n_train, n_test)
        xs = [tr.x, te.x]
        if size != 32:
            import torch

            xs = [torch.nn.functional.interpolate(torch.from_numpy(x).float(), size=(size, size), mode="bilinear",
                                                  align_corners=False).round().clamp(0, 255).to(torch.uint8).numpy() for x in xs]
        np.savez(path, x_train=xs[0], y_train=tr.y, x_test=xs[1], y_test=te.y)
    return path


def prepare_inputs(want: dict) -> dict:
    """(in a subprocess) export the models, DARE's history and the data sets the runs need; their paths."""
    from memory_models import export as export_model
    from memory_models import history as export_history

    out = {}
    for model in want["models"]:
        r50 = model == "resnet50_224"
        data = _dataset(Path(want["data_dir"]), want["r50_n_train" if r50 else "n_train"], want["r50_n_test" if r50 else "n_test"],
                        224 if r50 else 32)
        out[model] = {"model": str(export_model(model, WORK / "models")), "data": str(data)}
        if want["dare"]:
            out[model]["history"] = str(export_history(model, WORK / "models"))
    return out


def _prepare_in_child(want: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, __file__, "--prepare", json.dumps(want)], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"preparing models and data failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def child(spec: dict) -> dict:
    """One repair in this process through the pipeline's stages; returns its figures (the parent adds the peak)."""
    import torch

    from onnxrepair import methods as registry
    from onnxrepair import repair as stages
    from onnxrepair.data.contract import InputContract
    from onnxrepair.data.dataset import ArrayDataset
    from onnxrepair.localize.filters import conv_nodes

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    d = np.load(spec["data"])
    train = ArrayDataset(x=d["x_train"], y=d["y_train"])
    test = ArrayDataset(x=d["x_test"], y=d["y_test"])
    calib, heldout = test.split(0.5, seed=0)
    contract = InputContract(scale=255.0)
    opts = dict(spec["options"])
    fields = {f.name for f in dataclasses.fields(registry.get(spec["method"]).config_cls)}
    if "epochs" in fields:
        opts["epochs"] = str(spec["epochs"])
    if spec.get("batch_size") and "batch_size" in fields:
        opts["batch_size"] = str(spec["batch_size"])
    if spec["method"] == "deeppatch" and spec.get("assess_convs"):
        import converters

        convs = [n.name for n, _ in conv_nodes(converters.convert(spec["model"]).gm)]
        opts["exclude"] = ",".join(convs[spec["assess_convs"]:]) or "none"
    if spec.get("skip_latency"):  # the judge's latency timing (64-row batches, 23 calls per file): time, not memory
        import onnxrepair.runtime as rt

        rt.latency_comparison = lambda *a, **k: {"skipped": "bench/memory.py --skip-latency"}
    prep = stages.prepare(spec["model"], spec["method"], train, splits=(train, calib, heldout), contract=contract, options=opts,
                          device="cpu", seed=0, max_memory=spec.get("max_memory"))
    out = stages.run(prep)
    exported = stages.export(prep, out)
    with tempfile.TemporaryDirectory() as tmp:
        res = stages.judge(prep, out, exported, output=Path(tmp) / "repaired.onnx", force=True,
                           eval_corruptions=tuple(spec.get("eval_corruptions") or ()) or None)
    return {
        "model": Path(spec["model"]).stem, "method": spec["method"], "options": opts, "kind": "image",
        "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": time.perf_counter() - t0,
        "timings_s": res.timings_s, "memory": res.memory, "params": int(sum(p.numel() for p in prep.inputs.model.parameters())),
        "accuracy": {"before": res.before.get("accuracy"), "after": res.after.get("accuracy")},
        "passes": out.info.get("passes"), "layers_assessed": len(out.info.get("ranking", {}) or {}),
        "sizes": {"train": len(train), "calib": len(calib), "heldout": len(heldout), "input": list(train.x.shape[1:])},
    }


def _wait_peak(cmd: list[str], env: dict) -> tuple[int, float, str, str]:
    """Run ``cmd`` and return (exit code, the child's peak resident size in MB from its own rusage, stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return p.returncode, ru.ru_maxrss / 1024, out.read(), err.read()


def run_child(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    code, peak, out, err = _wait_peak([sys.executable, __file__, "--child", f.name], env)
    os.unlink(f.name)
    base = {"model": Path(spec["model"]).stem, "method": spec["method"], "peak_rss_mb": peak, "wall_s": time.perf_counter() - t0}
    if code != 0:
        return {**base, "error": (err or out).strip().splitlines()[-1:], "exit_code": code}
    return {**json.loads(out.strip().splitlines()[-1]), **base}


def run_tabular(method: str, epochs: int, max_memory: str | None) -> dict:
    """A tabular repair through the CLI itself (CSV loading, one-hot encoding and all), in its own process."""
    t = TABULAR
    opts = {k: v for k, v in METHOD_OPTIONS.get(method, {}).items()}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "onnxrepair", "repair", t["model"], "--method", method, "--data", t["data"], "--val", t["val"],
               "--target", t["target"], "--protected", t["protected"], "-o", f"{tmp}/r.onnx", "--report", f"{tmp}/r.json",
               "--force", "-q", "--epochs", str(epochs), "--device", "cpu"]
        for k, v in opts.items():
            cmd += ["--" + k.replace("_", "-"), v]
        if max_memory:
            cmd += ["--max-memory", max_memory]
        t0 = time.perf_counter()
        code, peak, out, err = _wait_peak(cmd, dict(os.environ, PYTHONPATH=str(ROOT)))
        wall = time.perf_counter() - t0
        base = {"model": Path(t["model"]).stem, "method": method, "kind": "tabular", "peak_rss_mb": peak, "wall_s": wall}
        rep_p = Path(tmp) / "r.json"
        if not rep_p.exists():
            return {**base, "error": (err or out).strip().splitlines()[-1:], "exit_code": code}
        rep = json.loads(rep_p.read_text())
    return {**base, "exit_code": code, "timings_s": rep["timings_s"], "memory": rep["memory"], "params": None,
            "accuracy": {"before": rep["before"].get("accuracy"), "after": rep["after"].get("accuracy")}, "options": opts,
            "sizes": rep["splits"]}


def _stage_gb(r: dict, name: str) -> str:
    st = r.get("memory", {}).get("stages", {})
    return f"{st[name]['stage_peak_mb'] / 1024:.2f}" if name in st else "-"


def method_increase_mb(r: dict) -> float | None:
    """How far the method stage rose above the resident size at its start (its own work: what it captured, trained,
    stacked), from the report's sampled per-stage figures."""
    st = r.get("memory", {}).get("stages", {}).get("method")
    return None if st is None else max(0.0, st["stage_peak_mb"] - st["rss_start_mb"])


def _baselines(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """{(model, variant): its plain fine-tuning row}; a variant without its own (e.g. every-conv) uses the model's."""
    return {(r["model"], r.get("variant") or ""): r for r in rows
            if "error" not in r and r["method"].split("/")[0] == BASELINE[r.get("kind", "image")]}


def _baseline(base: dict, r: dict) -> dict | None:
    return base.get((r["model"], r.get("variant") or "")) or base.get((r["model"], ""))


def table(rows: list[dict]) -> str:
    head = (f"{'model':<19} {'params':>7} {'method':<21} {'peak RSS':>8} {'vs ft':>6} {'method':>6} {'+method':>7} {'vs ft':>6} "
            f"{'assess':>6} {'train':>6} {'calib':>6} {'evaluate':>8} {'time':>6}")
    lines = [head, "-" * len(head)]
    base = _baselines(rows)
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<19} {'':>7} {r['method']:<21} {r['peak_rss_mb'] / 1024:>6.2f}GB  failed (exit {r.get('exit_code')}): "
                         f"{' '.join(r['error'])[:160]}")
            continue
        b = _baseline(base, r)
        ratio = f"{r['peak_rss_mb'] / b['peak_rss_mb']:.2f}x" if b else "-"
        inc, binc = method_increase_mb(r), (method_increase_mb(b) if b else None)
        iratio = f"{inc / binc:.2f}x" if inc is not None and binc else "-"
        lines.append(f"{r['model']:<19} {r['params'] / 1e6:>6.2f}M {r['method']:<21} {r['peak_rss_mb'] / 1024:>6.2f}GB {ratio:>6} "
                     f"{_stage_gb(r, 'method'):>6} {(inc or 0) / 1024:>6.2f}G {iratio:>6} {_stage_gb(r, 'method.assess'):>6} "
                     f"{_stage_gb(r, 'method.train'):>6} {_stage_gb(r, 'method.calibrate'):>6} {_stage_gb(r, 'evaluate'):>8} "
                     f"{r['wall_s']:>5.0f}s")
    lines += [
        "GB = 2^30 bytes. peak RSS: the child process's ru_maxrss (what /usr/bin/time -f %M gives), read by the parent;",
        "vs ft: its ratio to the same model's plain fine-tuning (tabular: reweigh-finetune), target <= 1.5x;",
        "method: the method stage's own peak resident size; +method: how far that rose above the resident size at the",
        "method's start (its own captures, stacks, training state; the ~0.9 GB of torch + onnxruntime + the model come",
        "before it), and vs ft its ratio to fine-tuning's; assess/train/calib/evaluate: those stages' own peaks (sampled).",
    ]
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[dict]:
    out = []
    base = _baselines(rows)
    for r in rows:
        if "error" in r:
            out.append({"model": r["model"], "method": r["method"], "failed": True, "exit_code": r.get("exit_code"), "error": r["error"]})
            continue
        v = {"model": r["model"], "method": r["method"], "peak_gb": round(r["peak_rss_mb"] / 1024, 2)}
        b = _baseline(base, r)
        if b and r is not b:
            v["ratio_to_finetune"] = round(r["peak_rss_mb"] / b["peak_rss_mb"], 2)
            v["ratio_met"] = v["ratio_to_finetune"] <= TARGET_RATIO
            inc, binc = method_increase_mb(r), method_increase_mb(b)
            if inc is not None and binc:
                v["method_increase_ratio"] = round(inc / binc, 2)
        if r["model"] in TARGET_GB:
            v["target_gb"] = TARGET_GB[r["model"]]
            v["under_target"] = v["peak_gb"] < TARGET_GB[r["model"]]
        out.append(v)
    return out


def plot(rows: list[dict], path: Path) -> Path:
    """Peak memory against model size, one line per method (the ResNet-18 widths at 32x32 joined; ResNet-50 at
    224x224 a separate point at its size): a PNG drawn with Pillow (matplotlib is not installed)."""
    import math

    from onnxrepair.report import PALETTE as _P, _canvas, _nice_step, _ylabel

    PALETTE = list(_P) + [(227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

    ok = [r for r in rows if "error" not in r and r.get("kind", "image") == "image" and not r.get("variant")]
    if not ok:
        return path
    methods = list(dict.fromkeys(r["method"] for r in ok))
    size, right = (820, 480), 230
    img, d, (x0, x1, y0, y1) = _canvas("peak resident memory vs model size (one process per repair)", size, right,
                                      "ResNet-18 (CIFAR layout) at widths 16/32/64, 32x32 input; ResNet-50 at 224x224 (square markers)")
    xs = [math.log10(r["params"]) for r in ok]
    xmin, xmax = math.floor(min(xs) * 2) / 2, math.ceil(max(xs) * 2) / 2
    ymax = max(r["peak_rss_mb"] for r in ok) / 1024
    step = _nice_step(ymax)
    ytop = math.ceil(ymax / step) * step

    def px(p: float) -> float:
        return x0 + (math.log10(p) - xmin) / ((xmax - xmin) or 1) * (x1 - x0)

    def py(gb: float) -> float:
        return y0 - gb / ytop * (y0 - y1)

    k = 0
    while k * step <= ytop + 1e-9:
        d.line([x0, py(k * step), x1, py(k * step)], fill=(225, 225, 225))
        d.text((x0 - 30, py(k * step) - 6), f"{k * step:g}", fill="black")
        k += 1
    for e in range(int(xmin * 2), int(xmax * 2) + 1):
        v = 10 ** (e / 2)
        d.line([px(v), y0, px(v), y0 + 4], fill="black")
        d.text((px(v) - 12, y0 + 6), f"{v / 1e6:.2g}M", fill="black")
    d.text(((x0 + x1) / 2 - 60, size[1] - 20), "parameters (log scale)", fill="black")
    _ylabel(d, (x0, x1, y0, y1), "peak RSS (GB)")
    for i, m in enumerate(methods):
        col = PALETTE[i % len(PALETTE)]
        fam = sorted((r for r in ok if r["method"] == m and r["model"].startswith("resnet18")), key=lambda r: r["params"])
        pts = [(px(r["params"]), py(r["peak_rss_mb"] / 1024)) for r in fam]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        for r in ok:
            if r["method"] == m and not r["model"].startswith("resnet18"):
                q = (px(r["params"]) + (i - len(methods) / 2) * 3, py(r["peak_rss_mb"] / 1024))
                d.rectangle([q[0] - 4, q[1] - 4, q[0] + 4, q[1] + 4], fill=col)
        d.line([x1 + 10, y1 + 14 + 16 * i, x1 + 28, y1 + 14 + 16 * i], fill=col, width=3)
        d.text((x1 + 32, y1 + 7 + 16 * i), m, fill="black")
    for gb, label in ((4.0, "4 GB (ResNet-18 target)"), (16.0, "16 GB (ResNet-50 target)")):
        if gb <= ytop:
            for xx in range(int(x0), int(x1), 10):
                d.line([xx, py(gb), xx + 5, py(gb)], fill=(120, 120, 120))
            d.text((x0 + (x1 - x0) // 3, py(gb) + 2), label, fill=(90, 90, 90))
    img.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--models", default="resnet18_cifar_w16,resnet18_cifar_w32,resnet18_cifar,resnet50_224",
                    help="comma-separated: resnet18_cifar (width 64), resnet18_cifar_w32, resnet18_cifar_w16, resnet50_224")
    ap.add_argument("--methods", default=",".join(IMAGE_METHODS), help="image methods, run on every model")
    ap.add_argument("--r50-methods", default=None, help="image methods on resnet50_224 (default: --methods)")
    ap.add_argument("--tabular-methods", default=",".join(TABULAR_METHODS), help="on the Adult MLP fixture ('' for none)")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=200, help="halved into calibration and held-out")
    ap.add_argument("--r50-n-train", type=int, default=128, help="training images for resnet50_224 (CIFAR upsampled to 224)")
    ap.add_argument("--r50-n-test", type=int, default=60)
    ap.add_argument("--r50-batch-size", type=int, default=32, help="training batch for resnet50_224 (every method that has one)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-memory", default=None, help="budget for every run (default: the pipeline's default)")
    ap.add_argument("--assess-convs", type=int, default=0, help="DeepPatch on the ResNet-18s: assess the first N convs (0: every "
                    "conv, the method's default)")
    ap.add_argument("--r50-assess-convs", type=int, default=1, help="the same on resnet50_224 (default: the stem only; every conv "
                    "is ~26,000 filters)")
    ap.add_argument("--assess-samples", type=int, default=8, help="DeepPatch: images per assessment")
    ap.add_argument("--skip-latency", action="store_true", help="skip the judge's latency comparison of the two files (64-row "
                    "batches, 23 calls each: ~10 min per ResNet-50 run on shared cores; it measures time, not memory)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    ap.add_argument("--replot", type=Path, default=None, help="redraw the plot and table from a results JSON and exit")
    ap.add_argument("--merge", default=None, help="comma-separated results JSONs (runs made in parts) merged into --out, with "
                    "their table, verdicts and plot; each part's command is kept")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(Path(a.child).read_text())), default=str))
        return 0
    if a.prepare:
        print(json.dumps(prepare_inputs(json.loads(a.prepare))))
        return 0
    if a.merge:
        parts = []
        for item in a.merge.split(","):  # PATH or PATH:LABEL (LABEL is appended to the method's name: a variant)
            f, _, label = item.partition(":")
            part = json.loads(Path(f).read_text()) if not f.endswith(".jsonl") else \
                {"command": f"(rows of a run stopped part-way, kept in {f})", "rows": [json.loads(ln) for ln in Path(f).read_text().splitlines() if ln]}
            if label:
                for r in part["rows"]:
                    r["method"] = f"{r['method']}/{label}"
                    r["variant"] = label
            parts.append(part)
        rows, superseded = [], []
        for part in parts:  # a later part's row of the same model and method replaces an earlier one (a re-measurement)
            for r in part["rows"]:
                old = next((i for i, o in enumerate(rows) if (o["model"], o["method"]) == (r["model"], r["method"])), None)
                if old is not None:
                    o = rows.pop(old)
                    superseded.append({"model": o["model"], "method": o["method"], "peak_gb": round(o["peak_rss_mb"] / 1024, 2),
                                       "error": o.get("error")})
                rows.append(r)
        txt, vs = table(rows), verdicts(rows)
        if superseded:
            was = ["failed" if o["error"] else f"{o['peak_gb']:.2f}GB" for o in superseded]
            txt += "\nre-measured by a later part (earlier rows dropped): " + "; ".join(
                f"{o['model']} {o['method']} (was {w})" for o, w in zip(superseded, was))
        cmds = [part["command"] if part["command"].startswith("(") else f".venv/bin/python {part['command']}" for part in parts]
        a.out.write_text(json.dumps({"command": " && ".join(cmds), "parts": [{k: v for k, v in part.items() if k != "rows"}
                                     for part in parts], "rows": rows, "verdicts": vs, "superseded": superseded}, indent=2, default=str))
        a.out.with_suffix(".txt").write_text(txt + "\n" + "\n".join(json.dumps(v) for v in vs) + "\nreproduce (the parts, then "
                                             f"--merge):\n" + "\n".join(cmds) + f"\n.venv/bin/python bench/memory.py --merge {a.merge}\n")
        print(txt)
        print(plot(rows, a.out.with_suffix(".png")))
        return 0
    if a.replot:
        rows = json.loads(a.replot.read_text())["rows"]
        print(table(rows))
        print(plot(rows, a.replot.with_suffix(".png")))
        return 0
    # the parent stays lean (no torch): Linux hands a forked child the parent's peak resident size as its own
    # starting ru_maxrss, so models and data are made in a subprocess and each repair is timed from a small parent
    t_start = time.perf_counter()
    models = [m for m in a.models.split(",") if m]
    want = {"models": models, "data_dir": str(a.data_dir), "n_train": a.n_train, "n_test": a.n_test, "r50_n_train": a.r50_n_train,
            "r50_n_test": a.r50_n_test, "dare": "dare" in (a.methods + "," + (a.r50_methods or "")).split(",")}
    made = _prepare_in_child(want)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".partial.jsonl").unlink(missing_ok=True)
    rows = []
    for model in models:
        r50 = model == "resnet50_224"
        n_train = a.r50_n_train if r50 else a.n_train
        methods = (a.r50_methods if r50 and a.r50_methods is not None else a.methods).split(",")
        for method in [m for m in methods if m]:
            opts = {k: v.format(n_train=n_train, epochs=a.epochs) for k, v in METHOD_OPTIONS.get(method, {}).items()}
            if method == "deeppatch":
                opts["assess_samples"] = str(a.assess_samples)
            if method == "dare":
                opts["history"] = made[model]["history"]
            spec = {"model": made[model]["model"], "method": method, "options": opts, "epochs": a.epochs, "data": made[model]["data"],
                    "max_memory": a.max_memory, "threads": a.threads or None,
                    "assess_convs": (a.r50_assess_convs if r50 else a.assess_convs) if method == "deeppatch" else 0,
                    "batch_size": a.r50_batch_size if r50 else None, "eval_corruptions": EVAL_CORRUPTIONS,
                    "skip_latency": a.skip_latency}
            print(f"... {model} {method}", file=sys.stderr, flush=True)
            rows.append(run_child(spec))
            with open(a.out.with_suffix(".partial.jsonl"), "a") as f:  # a run stopped part-way keeps what it measured
                f.write(json.dumps(rows[-1], default=str) + "\n")
            print(f"    peak {rows[-1]['peak_rss_mb'] / 1024:.2f}GB, {rows[-1]['wall_s']:.0f}s" +
                  (f", failed: {rows[-1]['error']}" if "error" in rows[-1] else ""), file=sys.stderr, flush=True)
    for method in [m for m in a.tabular_methods.split(",") if m]:
        print(f"... adult_mlp {method}", file=sys.stderr, flush=True)
        rows.append(run_tabular(method, a.epochs, a.max_memory))
    if any(r.get("kind") == "tabular" for r in rows):  # counted after every run: the parent imports onnx only now
        import onnx

        n = sum(int(np.prod(i.dims)) for i in onnx.load(str(ROOT / TABULAR["model"])).graph.initializer)
        for r in rows:
            if r.get("kind") == "tabular":
                r["params"] = n
    txt = table(rows)
    vs = verdicts(rows)
    cmd = "bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(txt)
    for v in vs:
        if v.get("failed"):
            print(f"{v['model']} {v['method']}: FAILED (exit {v['exit_code']})")
            continue
        print(f"{v['model']} {v['method']}: peak {v['peak_gb']:.2f}GB"
              + (f", {v['ratio_to_finetune']:.2f}x fine-tuning ({'met' if v['ratio_met'] else 'NOT met'}: <= {TARGET_RATIO}x)"
                 if "ratio_to_finetune" in v else "")
              + (f"; under {v['target_gb']:.0f}GB: {'yes' if v['under_target'] else 'NO'}" if "target_gb" in v else ""))
    total = time.perf_counter() - t_start
    print(f"total {total / 60:.1f} min; reproduce: .venv/bin/python {cmd}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": cmd, "rows": rows, "verdicts": vs, "total_s": total,
                                 "settings": {k: v for k, v in vars(a).items() if k not in ("child", "replot", "out")}},
                                indent=2, default=str))
    a.out.with_suffix(".txt").write_text(txt + "\n" + "\n".join(json.dumps(v) for v in vs) +
                                         f"\ntotal {total / 60:.1f} min\nreproduce: .venv/bin/python {cmd}\n")
    print(plot(rows, a.out.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
