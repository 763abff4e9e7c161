"""Peak memory and time of a repair, per method, on models of real size (issue 19).

    .venv/bin/python bench/memory.py --data-dir ../shared/datasets [--models resnet18_cifar,resnet18_cifar_w32]
        [--methods deeppatch,finetune] [--n-train 300] [--epochs 1] [--max-memory 4GB]

Models come from ``bench/memory_models.py`` (random weights, seeded: only memory and time are measured). Each
(model, method) pair runs in a fresh process, through the pipeline's own stages (prepare -> run -> export -> judge,
as ``onnxrepair repair`` runs them), on a class-balanced CIFAR-10 subset (32x32) read from the shared tarball. Each
child reports the process's peak resident memory (``ru_maxrss``: the figure ``/usr/bin/time -f %M`` gives) and the
pipeline's per-stage figures (``RepairResult.memory``). The parent prints a table, the ratio of each method's peak to
plain fine-tuning on the same model (target <= 1.5x) and whether DeepPatch stays under 4 GB with the default budget,
and writes ``bench/results/memory.json`` and ``memory.txt``.

Kept short so it runs on a shared 2-core machine: a few hundred images, one epoch, and DeepPatch's filter assessment
on the stem convolution only with 16 assessment images (``--assess-all`` assesses every conv: ~4,800 filters on
ResNet-18, each a pass of the rest of the network). The stem is where a stacked ablation holds the largest cut and
runs the longest suffix; training still back-propagates through the whole network to the stem's unit, and the gate
sits on the first patched conv as always.

Other methods: ``--methods`` takes any registered name; ``METHOD_OPTIONS`` holds each one's bench settings (DARE
needs its ``--history`` checkpoints, ArchRepair its block search budget: add them there when they land).
"""

from __future__ import annotations

import argparse
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
TARGET_GB = 4.0
TARGET_RATIO = 1.5

# per method: options as `onnxrepair repair` takes them (strings); {stem_only} is filled with the exclude list
METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "deeppatch": {"gate_samples": "300"},
    "finetune": {},
    "finetune-last": {},
    "augmix": {},
    # "dare": {"history": "<dir of ONNX checkpoints>"},   # when DARE lands: make checkpoints with memory_models.py
    # "archrepair": {...},                                  # when ArchRepair lands
}


def _dataset(data_dir: Path, n_train: int, n_test: int) -> Path:
    """CIFAR-10 subset as an npz in bench/work (made once from the tarball)."""
    from deeppatch import load_cifar

    path = WORK / f"cifar_{n_train}_{n_test}.npz"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        tr, te = load_cifar(data_dir, n_train, n_test)
        np.savez(path, x_train=tr.x, y_train=tr.y, x_test=te.x, y_test=te.y)
    return path


def child(spec: dict) -> dict:
    """One repair in this process; returns its figures."""
    import torch

    from onnxrepair import repair as stages
    from onnxrepair.data.contract import InputContract
    from onnxrepair.data.dataset import ArrayDataset
    from onnxrepair.localize.filters import conv_nodes

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    t0 = time.perf_counter()
    d = np.load(spec["data"])
    train = ArrayDataset(x=d["x_train"], y=d["y_train"])
    test = ArrayDataset(x=d["x_test"], y=d["y_test"])
    calib, heldout = test.split(0.5, seed=0)
    contract = InputContract(scale=255.0)
    opts = dict(spec["options"])
    opts["epochs"] = str(spec["epochs"])
    if spec["method"] == "deeppatch" and not spec.get("assess_all"):
        import converters

        convs = [n.name for n, _ in conv_nodes(converters.convert(spec["model"]).gm)]
        opts["exclude"] = ",".join(convs[1:])
    prep = stages.prepare(spec["model"], spec["method"], train, splits=(train, calib, heldout), contract=contract, options=opts,
                          device="cpu", seed=0, max_memory=spec.get("max_memory"))
    out = stages.run(prep)
    exported = stages.export(prep, out)
    with tempfile.TemporaryDirectory() as tmp:
        res = stages.judge(prep, out, exported, output=Path(tmp) / "repaired.onnx", force=True)
    return {
        "model": Path(spec["model"]).stem, "method": spec["method"], "options": opts,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": time.perf_counter() - t0,
        "timings_s": res.timings_s, "memory": res.memory, "params": int(sum(p.numel() for p in prep.inputs.model.parameters())),
        "accuracy": {"before": res.before.get("accuracy"), "after": res.after.get("accuracy")},
        "passes": out.info.get("passes"),
    }


def run_child(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, __file__, "--child", f.name], capture_output=True, text=True, env=env)
    os.unlink(f.name)
    if p.returncode != 0:
        return {"model": Path(spec["model"]).stem, "method": spec["method"], "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = (f"{'model':<20} {'params':>7} {'method':<10} {'peak RSS':>9} {'method':>8} {'assess':>7} {'train':>7} {'calib':>7} "
            f"{'evaluate':>8} {'time':>7} {'vs finetune':>11}")
    lines = [head, "-" * len(head)]
    ft = {r["model"]: r["peak_rss_mb"] for r in rows if r.get("method") == "finetune" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<20} {'':>7} {r['method']:<10} failed: {r['error']}")
            continue
        st = r["memory"]["stages"]

        def gb(name: str) -> str:
            return f"{st[name]['stage_peak_mb'] / 1024:.2f}" if name in st else "-"

        ratio = f"{r['peak_rss_mb'] / ft[r['model']]:.2f}x" if r["model"] in ft else "-"
        lines.append(f"{r['model']:<20} {r['params'] / 1e6:>6.1f}M {r['method']:<10} {r['peak_rss_mb'] / 1024:>7.2f}GB "
                     f"{gb('method'):>8} {gb('method.assess'):>7} {gb('method.train'):>7} {gb('method.calibrate'):>7} "
                     f"{gb('evaluate'):>8} {r['wall_s']:>6.0f}s {ratio:>11}")
    lines.append("GB = 2^30 bytes; peak RSS: the process (ru_maxrss); stage columns: each stage's own peak resident size (sampled)")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[dict]:
    out = []
    ft = {r["model"]: r["peak_rss_mb"] for r in rows if r.get("method") == "finetune" and "error" not in r}
    for r in rows:
        if "error" in r or r["method"] == "finetune" or r["model"] not in ft:
            continue
        v = {"model": r["model"], "method": r["method"], "peak_gb": round(r["peak_rss_mb"] / 1024, 2),
             "ratio_to_finetune": round(r["peak_rss_mb"] / ft[r["model"]], 2)}
        v["ratio_met"] = v["ratio_to_finetune"] <= TARGET_RATIO
        if r["method"] == "deeppatch" and r["model"] == "resnet18_cifar":
            v["under_4gb"] = v["peak_gb"] < TARGET_GB
        out.append(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--models", default="resnet18_cifar", help="comma-separated: resnet18_cifar, resnet18_cifar_w32, resnet50_224")
    ap.add_argument("--methods", default="deeppatch,finetune")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=200, help="halved into calibration and held-out")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-memory", default=None, help="budget for every run (default: the pipeline's default)")
    ap.add_argument("--assess-all", action="store_true", help="DeepPatch: assess every conv (slow), not only the stem")
    ap.add_argument("--assess-samples", type=int, default=16, help="DeepPatch: images per assessment (the stacked pass holds "
                    "up to 16 ablations of this many images, within the budget's per-pass cap)")
    ap.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(Path(a.child).read_text())), default=str))
        return 0
    from memory_models import export as export_model

    data = _dataset(a.data_dir, a.n_train, a.n_test)
    rows = []
    for model in a.models.split(","):
        path = export_model(model, WORK / "models")
        for method in a.methods.split(","):
            opts = dict(METHOD_OPTIONS.get(method, {}))
            if method == "deeppatch":
                opts["assess_samples"] = str(a.assess_samples)
            spec = {"model": str(path), "method": method, "options": opts, "epochs": a.epochs,
                    "data": str(data), "max_memory": a.max_memory, "assess_all": a.assess_all}
            print(f"... {model} {method}", file=sys.stderr, flush=True)
            rows.append(run_child(spec))
    txt = table(rows)
    vs = verdicts(rows)
    cmd = "bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(txt)
    for v in vs:
        print(f"{v['model']} {v['method']}: peak {v['peak_gb']:.2f}GB, {v['ratio_to_finetune']:.2f}x fine-tuning "
              f"({'met' if v['ratio_met'] else 'NOT met'}: <= {TARGET_RATIO}x)"
              + (f"; under {TARGET_GB:.0f}GB: {'yes' if v['under_4gb'] else 'NO'}" if "under_4gb" in v else ""))
    print(f"reproduce: .venv/bin/python {cmd}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": cmd, "rows": rows, "verdicts": vs, "n_train": a.n_train, "n_test": a.n_test,
                                 "epochs": a.epochs}, indent=2, default=str))
    a.out.with_suffix(".txt").write_text(txt + "\n" + "\n".join(json.dumps(v) for v in vs) + f"\nreproduce: .venv/bin/python {cmd}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
