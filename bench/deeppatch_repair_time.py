"""DeepPatch repair time before and after issue 14's speed-ups, same data, same seed, one process (item 2).

    .venv/bin/python bench/deeppatch_repair_time.py --model bench/work/cifar_resnet_n5000_e6_s0.onnx \\
        --data bench/work/cifar_2000_500.npz --mean 0.49,0.48,0.45 --std 0.25,0.24,0.26 --epochs 5

Runs ``onnxrepair repair --method deeppatch`` twice (``old`` then ``new``; ``--order new,old`` to swap):

* ``old``: every epoch trained, every assessment sample used, the gate's training passes run the whole model
  (``deeppatch._STOP_AT_GATE = False``: as before this change);
* ``new``: ``--patience P`` (stop after P epochs without a better calibration score), ``--assess-stable S`` (stop a
  conv's assessment once its blamed set is unchanged over S sample batches), gate passes stopped at the gate.

Both use the same gate and deployment (``--gate input``), so clean accuracy and robustness on the held-out split
(onnxruntime) say whether the result is the same. Seconds per stage come from each report's ``memory`` section.
Writes bench/results/deeppatch_repair_time.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "work" / "repair_time"


def run(kind: str, args) -> dict:
    from onnxrepair.cli import main
    from onnxrepair.methods import deeppatch

    out = WORK / f"{kind}.onnx"
    rep = out.with_suffix(".json")
    extra = ["--patience", str(args.patience), "--assess-stable", str(args.assess_stable)] if kind == "new" else []
    deeppatch._STOP_AT_GATE = kind == "new"
    contract = (["--scale", "255"] + (["--mean", args.mean] if args.mean else []) + (["--std", args.std] if args.std else []))
    if args.reuse and rep.exists():  # a finished run of this kind from before (its wall time is not known)
        return summarise(kind, json.loads(rep.read_text()), None)
    t = time.perf_counter()
    try:
        rc = main(["--threads", "1", "repair", str(args.model), "--method", "deeppatch", "--data", str(args.data), "-o", str(out),
                   "--report", str(rep), "--epochs", str(args.epochs), "--provider", "cpu", "--force", "--quiet", "--gate", "input",
                   *contract, *extra])
    finally:
        deeppatch._STOP_AT_GATE = True
    wall = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"{kind} repair failed (rc={rc})")
    return summarise(kind, json.loads(rep.read_text()), round(wall, 1))


def summarise(kind: str, r: dict, wall: float | None) -> dict:
    mem = r["memory"]["stages"]
    stages = {k.split(".", 1)[1]: mem[k]["seconds"] for k in mem if k.startswith("method.")}
    info = r["info"]
    return {"kind": kind, "wall_s": wall, "method_s": round(mem["method"]["seconds"], 1),
            "stages_s": {k: round(v, 1) for k, v in stages.items()},
            "clean": r["after"]["clean"], "robustness": r["after"]["robustness"], "original_clean": r["before"]["clean"],
            "original_robustness": r["before"]["robustness"], "best_epoch": info["best_epoch"], "stopped_at_epoch": info.get("stopped_at_epoch"),
            "assess_samples_used": {k: v["samples"] for k, v in info["ranking"].items()},
            "layers_patched": {l["layer"]: l["channels"] for l in info["layers_patched"]},
            "routing_calib": {"clean": info["routing_calib"]["clean"], "perturbed": info["routing_calib"]["perturbed_mean"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--mean", default=None)
    ap.add_argument("--std", default=None)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--assess-stable", type=int, default=1)
    ap.add_argument("--order", default="old,new")
    ap.add_argument("--reuse", action="store_true", help="summarise runs already in bench/work/repair_time instead of repeating them")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deeppatch_repair_time")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = [run(k, args) for k in args.order.split(",")]
    by = {r["kind"]: r for r in rows}
    same_filters = by["old"]["layers_patched"] == by["new"]["layers_patched"] if len(by) == 2 else None
    cmd = "PYTHONPATH=$PWD .venv/bin/python " + " ".join(["bench/deeppatch_repair_time.py", *sys.argv[1:]])
    res = {"command": cmd, "rows": rows, "same_filters": same_filters,
           "time_ratio_new_over_old": round(by["new"]["method_s"] / by["old"]["method_s"], 3) if len(by) == 2 else None}
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = ["# DeepPatch repair time, old vs new (issue 14 item 2)", "", f"`{cmd}`", "",
          "Same data, seed, gate (input) and deployment; 1 torch thread on shared cores (load varies: the two runs are sequential).", "",
          "| run | method s | assess s | train s | calibrate s | best / stopped epoch | clean orig→rep | robust orig→rep | calib routed clean/pert |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["stages_s"]
        md.append(f"| {r['kind']} | {r['method_s']} | {st.get('assess')} | {st.get('train')} | {st.get('calibrate')} | {r['best_epoch']} / "
                  f"{r['stopped_at_epoch'] or '-'} | {100 * r['original_clean']:.2f}→{100 * r['clean']:.2f} | "
                  f"{100 * r['original_robustness']:.2f}→{100 * r['robustness']:.2f} | "
                  f"{100 * r['routing_calib']['clean']:.1f}/{100 * r['routing_calib']['perturbed']:.1f} |")
    md += ["", f"new/old method time: {res['time_ratio_new_over_old']}; same patched filters: {same_filters}",
           "assessment samples used per conv (new): " + ", ".join(f"{k} {v}" for k, v in by.get("new", rows[-1])["assess_samples_used"].items())]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
