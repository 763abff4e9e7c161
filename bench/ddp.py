"""One process against ``torchrun --nproc-per-node N`` (gloo, CPU) for each method, on the committed fixtures.

    PYTHONPATH=. .venv/bin/python bench/ddp.py [--nproc 2] [--methods finetune,deeppatch,...]

Each method runs the same ``onnxrepair repair`` command twice -- as one process, and under torchrun with N processes
(``--standalone`` rendezvous on localhost, ``--threads 1`` each) -- and the bench compares what the two wrote: the
held-out figures of the report (clean, robustness, blur, fairness, measured on onnxruntime), the training losses
recorded in the report, the epoch kept, and the two model files' outputs on the held-out inputs (max |difference|
relative to max |output|, argmax agreement). It also checks that the distributed run wrote exactly the model and the
report, and how many training samples each rank took.

Wall time is for the whole command, import and conversion included, and on a 2-core machine N processes share the
same two cores: this is a *correctness* run, not a speed-up measure. Writes ``bench/results/ddp.json`` and
``bench/results/ddp.md`` (the table and the command).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FX = ROOT / "fixtures"
MNIST = ["--data", str(FX / "data" / "mnist_small.npz")]
ADULT = ["--data", str(FX / "data" / "adult_train.csv"), "--val", str(FX / "data" / "adult_test.csv"), "--target", "income", "--protected", "sex"]
LENET = str(FX / "models" / "torch_lenet_legacy11.onnx")

# small settings (seconds of training each); the same as tests/test_methods_strict.py where it has them
CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "finetune": (LENET, MNIST, ["--epochs", "2", "--lr", "0.01"]),
    "deeppatch": (LENET, MNIST, ["--epochs", "2", "--lr", "0.01"]),
    "augmix": (LENET, MNIST, ["--epochs", "1"]),
    "adversarial-training": (LENET, MNIST, ["--epochs", "1", "--steps", "3", "--step-size", "0.0157"]),
    "archrepair": (str(FX / "models" / "torch_resnet_folded_legacy17.onnx"), MNIST,
                   ["--corruptions", "deeppatch_blur", "--severities", "1,2,3,4,5,6", "--pool", "600", "--failures", "300",
                    "--search-epochs", "2", "--finetune-epochs", "2"]),
    "dare": (str(FX / "models" / "torch_cnn_history_final_legacy17.onnx"), MNIST, ["--history", str(FX / "models" / "history"), "--eps", "0.1"]),
    "fmt": (str(FX / "models" / "adult_mlp.onnx"), ADULT, ["--epochs", "10", "--n-pairs", "2000"]),
    "reweigh-finetune": (str(FX / "models" / "adult_mlp.onnx"), ADULT, ["--epochs", "1"]),
}


def _run(method: str, out: Path, nproc: int) -> tuple[float, subprocess.CompletedProcess]:
    model, data, opts = CASES[method]
    out.mkdir(parents=True)
    cli = ["-m", "onnxrepair", "--threads", "1", "repair", model, "--method", method, *data, "-o", str(out / "model.onnx"),
           "--report", str(out / "report.json"), "--device", "cpu", "--provider", "cpu", "--quiet", "--force", *opts]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *launcher, *cli], capture_output=True, text=True, env=env, cwd=ROOT)
    return time.perf_counter() - t, p


def _numbers(d: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict/list, by path (timings and memory left out)."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if k in ("seconds", "timings_s", "memory", "passes"):
                continue
            out.update(_numbers(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(_numbers(v, f"{prefix}{i}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix[:-1]] = float(d)
    return out


def _losses(info: dict) -> dict[str, float]:
    return {k: v for k, v in _numbers(info).items() if "loss" in k.split(".")[-1]}


def _outputs(path: Path, data_args: list[str]) -> np.ndarray:
    import onnx

    from onnxrepair.data.contract import METADATA_KEY, InputContract
    from onnxrepair.runtime import make_session

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    contract = InputContract.from_json(meta[METADATA_KEY])
    from onnxrepair.commands._options import load_data

    tabular = not data_args[1].endswith(".npz")  # the held-out inputs: the Adult test rows, or MNIST images
    ds = load_data(data_args[3] if tabular else data_args[1], contract, target="income" if tabular else None,
                   protected="sex" if tabular else None)
    x = contract.to_model(contract.to_unit(ds.x[:200])).numpy()
    s = make_session(str(path), "cpu")
    return np.asarray(s.run({s.input_names[0]: x})[0], dtype=np.float64)


def compare(method: str, one: Path, two: Path) -> dict[str, Any]:
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    a1, a2 = _numbers(r1["after"]), _numbers(r2["after"])
    l1, l2 = _losses(r1["info"]), _losses(r2["info"])
    rel = [abs(l1[k] - l2[k]) / max(abs(l1[k]), 1e-12) for k in l1 if k in l2]
    o1, o2 = _outputs(one / "model.onnx", CASES[method][1]), _outputs(two / "model.onnx", CASES[method][1])
    scale = max(1.0, float(np.abs(o1).max()))
    return {
        "written_files": sorted(p.name for p in two.iterdir()),
        "distributed": r2.get("distributed"),
        "after_max_abs_diff": max((abs(a1[k] - a2[k]) for k in a1 if k in a2), default=0.0),
        "after_figures_compared": len([k for k in a1 if k in a2]),
        "loss_values_compared": len(rel),
        "loss_max_rel_diff": max(rel, default=0.0),
        "output_max_abs_diff_rel": float(np.abs(o1 - o2).max()) / scale,
        "argmax_agreement": float((o1.argmax(1) == o2.argmax(1)).mean()) if o1.ndim == 2 and o1.shape[1] > 1 else None,
        "clean_one": r1["after"].get("accuracy"), "clean_two": r2["after"].get("accuracy"),
        "changed_from_original": any(abs(_numbers(r1["before"]).get(k, v) - v) > 0 for k, v in a1.items()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--methods", default=",".join(CASES))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ddp"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in [s for s in args.methods.split(",") if s]:
            w1, p1 = _run(m, Path(tmp) / m / "one", 1)
            w2, p2 = _run(m, Path(tmp) / m / "two", args.nproc)
            row: dict[str, Any] = {"method": m, "wall_s_one": round(w1, 1), f"wall_s_{args.nproc}": round(w2, 1),
                                   "exit_one": p1.returncode, f"exit_{args.nproc}": p2.returncode}
            if p1.returncode == 0 and p2.returncode == 0:
                row.update(compare(m, Path(tmp) / m / "one", Path(tmp) / m / "two"))
            else:
                row["error"] = (p1.stderr if p1.returncode else p2.stderr)[-1500:]
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    cmd = "PYTHONPATH=. .venv/bin/python bench/ddp.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res = {"command": cmd, "nproc": args.nproc, "backend": "gloo", "cpu_cores": os.cpu_count(), "rows": rows,
           "note": "wall time of the whole command on a shared 2-core machine: a correctness run, not a speed-up measure"}
    Path(args.out + ".json").write_text(json.dumps(res, indent=2, default=str))
    n = args.nproc
    lines = [f"# One process vs torchrun --nproc-per-node {n} (gloo, CPU)", "", f"Command: `{cmd}`", "",
             f"Machine: {os.cpu_count()} shared CPU cores; the {n} processes share them, so wall time is not a speed-up "
             "measure (import and conversion run in every process). Each row is the same `onnxrepair repair` command "
             "(fixtures, `--threads 1`, seed 0) run as one process and under torchrun.", "",
             f"| method | wall 1 proc (s) | wall {n} procs (s) | files written ({n} procs) | train samples per rank | epoch losses: max rel diff | "
             "held-out figures: max abs diff | outputs: max abs diff / max abs output | argmax agreement | changed the model |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['wall_s_one']} | {r[f'wall_s_{n}']} | error (exit {r['exit_one']}/{r[f'exit_{n}']}) | | | | | | |")
            continue
        d = r["distributed"] or {}
        agree = "" if r["argmax_agreement"] is None else f"{100 * r['argmax_agreement']:.1f} %"
        lines.append(f"| {r['method']} | {r['wall_s_one']} | {r[f'wall_s_{n}']} | {', '.join(r['written_files'])} | "
                     f"{d.get('train_samples_per_rank')} | {r['loss_max_rel_diff']:.1e} ({r['loss_values_compared']} values) | "
                     f"{r['after_max_abs_diff']:.1e} ({r['after_figures_compared']} figures) | {r['output_max_abs_diff_rel']:.1e} | "
                     f"{agree} | {'yes' if r['changed_from_original'] else 'no'} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
