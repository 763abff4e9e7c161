"""How stable is DeepPatch's filter ranking against the number of assessment samples? (issue 14, item 2)

    .venv/bin/python bench/deeppatch_assess_stability.py --model bench/work/cifar_resnet_n5000_e6_s0.onnx \\
        --data bench/work/cifar_2000_500.npz --mean 0.49,0.48,0.45 --std 0.25,0.24,0.26

featswap scores of every conv from the first n of N calibration-like images (clean + a random blur each, the
method's own mixture), n = 32, 64, ..., N (``--sizes``; N = 256 by default, what the shared cores allowed); for each n,
the share of each layer's blamed set (top floor(0.25 C)) that is the same as with all N, and the cumulative seconds. Writes bench/results/deeppatch_assess_stability.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.convert import convert  # noqa: E402
from onnxrepair.data.contract import InputContract  # noqa: E402
from onnxrepair.localize.filters import assess_filters, conv_nodes  # noqa: E402
from onnxrepair.perturb.mixture import PerturbSpec, perturb_all  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--mean", default=None)
    ap.add_argument("--std", default=None)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--sizes", default="32,64,96,128,160,192,224,256")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deeppatch_assess_stability")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gm = convert(args.model).gm.eval()
    contract = InputContract(scale=255.0, mean=tuple(map(float, args.mean.split(","))) if args.mean else None,
                             std=tuple(map(float, args.std.split(","))) if args.std else None)
    d = np.load(args.data)
    sizes = [int(s) for s in args.sizes.split(",")]
    x, y = d["x"][-max(sizes):], torch.as_tensor(d["y"][-max(sizes):])
    unit = contract.to_unit(x)
    xc, xp = contract.to_model(unit), contract.to_model(perturb_all(unit, PerturbSpec(), np.random.default_rng(0)))
    layers = [n.name for n, c in conv_nodes(gm) if c.groups == 1]
    # one pass in chunks: the scores are means, so chunk scores times chunk sizes add up to the running sums, and the
    # ranking after the first n samples is exactly what an assessment of those n gives
    chunk = min(sizes)
    acc: dict[str, np.ndarray] = {}
    los: dict[str, np.ndarray] = {}
    snap: dict[int, dict[str, list[int]]] = {}
    secs: dict[int, float] = {}
    t0 = time.perf_counter()
    for lo in range(0, max(sizes), chunk):
        part = assess_filters(gm, xc[lo : lo + chunk], xp[lo : lo + chunk], y[lo : lo + chunk], layers=layers, batch_size=chunk)
        for name, s in part.items():
            acc[name] = acc.get(name, 0) + s.acc_score * s.n_samples
            los[name] = los.get(name, 0) + s.loss_score * s.n_samples
        n = lo + chunk
        if n in sizes:
            snap[n] = {}
            for name in layers:
                k = int(np.floor(args.ratio * len(acc[name])))
                snap[n][name] = [int(i) for i in np.lexsort((-los[name], -acc[name]))[:k]]
            secs[n] = time.perf_counter() - t0
            print(n, f"{secs[n]:.1f}s", flush=True)
    full = snap[max(sizes)]
    rows = []
    for n in sizes:
        per = {name: len(set(snap[n][name]) & set(full[name])) / max(1, len(full[name])) for name in layers}
        rows.append({"samples": n, "seconds_cumulative": round(secs[n], 1), "top_k_overlap_mean": round(float(np.mean(list(per.values()))), 3),
                     "top_k_overlap_min": round(float(min(per.values())), 3), "per_layer": per})
    cmd = "PYTHONPATH=$PWD .venv/bin/python " + " ".join(["bench/deeppatch_assess_stability.py", *sys.argv[1:]])
    args.out.with_suffix(".json").write_text(json.dumps({"command": cmd, "model": str(args.model), "rows": rows}, indent=1))
    md = [f"# DeepPatch filter ranking vs assessment samples", "", f"`{cmd}`", "",
          "Share of each conv's blamed set (top floor(0.25 C) by featswap) that equals the set from all samples; 1 thread, shared cores.", "",
          "| samples | seconds (cumulative) | overlap mean | overlap min |", "|---|---|---|---|"]
    md += [f"| {r['samples']} | {r['seconds_cumulative']} | {r['top_k_overlap_mean']:.3f} | {r['top_k_overlap_min']:.3f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
