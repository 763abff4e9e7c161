"""Re-score the DARE bench's exported files on more test images, transfer protocol and clean only.

    .venv/bin/python bench/dare_rescore.py --data-dir ../shared/datasets --runs LABEL=PREFIX [LABEL=PREFIX ...]
        [--seeds 0,1,2] [--n-eval 1000] [--pgd-steps 5] [--cw-steps 10]

``bench/dare.py`` scores every model on ``--n-eval`` test images because white-box attacks are crafted on every
model; the transfer examples are crafted once per seed, on the original, so they are cheap to score on all of the
cached test images. For each seed this crafts FGSM, PGD-L∞ and CW-L2 (the bench's budgets and attack code) on the
seed's ``final.onnx`` for the first ``--n-eval`` cached test images (``test.limit(n, seed=0)``, so the bench's
images are among them) and scores on onnxruntime the original and every file ``<seed dir>/<PREFIX>_seed<s>_<method>.onnx``
that a ``bench/dare.py --out .../<PREFIX>.json`` run exported (``{s}`` in PREFIX is the seed, for one run per seed). Nothing is chosen here: the files are the ones the
bench chose on its calibration rows. Writes ``--out`` (JSON) and its ``.txt`` table (mean ± std over seeds).
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
sys.path.insert(0, str(ROOT / "bench"))

from dare import ATTACKS, BUDGETS, craft  # noqa: E402
from dare_history import CONTRACTS  # noqa: E402
from deeppatch import ort_accuracy, session  # noqa: E402
from onnxrepair.data.dataset import ArrayDataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")  # unused: the cached split is read
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "dare")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--runs", nargs="+", required=True,
                    help="LABEL=PREFIX: the files of the bench run written to PREFIX.json ({s} stands for the seed)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--pgd-steps", type=int, default=5)
    ap.add_argument("--cw-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dare_cifar10_transfer1000.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    contract, budget = CONTRACTS[a.dataset], BUDGETS[a.dataset]
    d = np.load(a.work / a.dataset / "data.npz")
    test = ArrayDataset(x=d["test_x"], y=d["test_y"]).limit(a.n_eval, seed=0)
    unit, y = contract.to_unit(test.x), torch.as_tensor(test.y)
    x_clean = contract.to_model(unit).numpy()
    runs = dict(r.split("=", 1) for r in a.runs)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    per_seed = {}
    import converters

    for s in seeds:
        sdir = a.work / a.dataset / f"seed{s}"
        original = converters.convert(sdir / "final.onnx").gm.eval()
        adv = {k: craft(k, original, contract, budget, s, unit, y, a) for k in ATTACKS}
        files = {"original": sdir / "final.onnx"}
        for label, prefix in runs.items():
            for f in sorted(sdir.glob(f"{prefix.replace('{s}', str(s))}_seed{s}_*.onnx")):
                files[f"{label}:{f.stem.split(f'_seed{s}_', 1)[1]}"] = f
        rows = {}
        for name, f in files.items():
            sess = session(f)
            rows[name] = {"clean": ort_accuracy(sess, x_clean, test.y), **{k: ort_accuracy(sess, adv[k], test.y) for k in ATTACKS}}
            print(f"[seed {s}] {name}: " + " ".join(f"{k} {v:.3f}" for k, v in rows[name].items()), file=sys.stderr)
        per_seed[s] = rows
    names = [n for n in per_seed[seeds[0]] if all(n in per_seed[s] for s in seeds)]
    cols = ["clean", *ATTACKS]
    stat = {n: {c: (float(np.mean(v := [per_seed[s][n][c] for s in seeds])), float(np.std(v, ddof=1)) if len(seeds) > 1 else 0.0)
                for c in cols} for n in names}
    cmd = ".venv/bin/python " + " ".join(["bench/dare_rescore.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# {cmd}", f"# transfer protocol on {len(test)} test images per seed (crafted once on the seed's original), seeds {seeds}; "
             f"eps Linf {budget['linf']:.4g} (PGD {a.pgd_steps} steps), CW L2 {budget['l2']} ({a.cw_steps} steps); mean ± std over seeds",
             "| model | clean % | trans fgsm % | trans pgd % | trans cw % |", "|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{100 * stat[n][c][0]:5.1f} ± {100 * stat[n][c][1]:4.1f}" for c in cols) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.write_text(json.dumps({"command": cmd, "n_eval": len(test), "seeds": seeds, "runs": runs, "per_seed": per_seed,
                                 "aggregate": stat, "total_s": time.perf_counter() - t0}, indent=1, default=float))
    a.out.with_suffix(".txt").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
