"""ORT latency of a DeepPatch-repaired file vs its original: the micro-benchmark behind ``onnxrepair.graph.patching``'s layout.

    .venv/bin/python bench/deeppatch_latency.py                       # repair (1 epoch) + time both fixtures
    .venv/bin/python bench/deeppatch_latency.py --reuse               # time the files from the last run only
    .venv/bin/python bench/deeppatch_latency.py --pair A.onnx B.onnx  # time any original/repaired pair

Repairs through the CLI/registry (``onnxrepair repair --method deeppatch --epochs 1``) into
``bench/work/latency/`` and reports repaired/original latency ratios at batch 1 and 64: median of interleaved
repeats (the two sessions alternate, so load on shared cores hits both alike), with 1 intra-op thread and with
ORT's default threads. ``--ops`` prints the node types ORT left after its own graph optimisation
(``SessionOptions.optimized_model_filepath``), i.e. what it fused.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = ("torch_lenet_legacy11", "torch_resnet_bn_legacy17")
DATA = ROOT / "fixtures" / "data" / "mnist_small.npz"
WORK = ROOT / "bench" / "work" / "latency"


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def input_name(path: Path) -> str:
    return session(path, 1).get_inputs()[0].name


def fit_input(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """``x`` when it fits the model's input, else uniform [0, 1) noise of the model's shape (latency only)."""
    shape = [d if isinstance(d, int) else None for d in sess.get_inputs()[0].shape[1:]]
    if len(shape) == x.ndim - 1 and all(d is None or d == s for d, s in zip(shape, x.shape[1:])):
        return x
    return np.random.default_rng(0).random((64, *[d or 1 for d in shape]), dtype=np.float32)


def latency(orig: Path, new: Path, x: np.ndarray, repeats: int, threads: int) -> dict:
    sa, sb = session(orig, threads), session(new, threads)
    na, nb = sa.get_inputs()[0].name, sb.get_inputs()[0].name
    x = fit_input(sa, x)
    out = {}
    for b in (1, 64):
        xb = np.ascontiguousarray(x[:b])
        for _ in range(5):
            sa.run(None, {na: xb}), sb.run(None, {nb: xb})
        ta, tb = [], []
        reps = repeats if b == 1 else max(repeats // 4, 10)
        for _ in range(reps):
            for s, n, acc in ((sa, na, ta), (sb, nb, tb)):
                t = time.perf_counter()
                s.run(None, {n: xb})
                acc.append(time.perf_counter() - t)
        out[f"b{b}"] = {"orig_ms": float(np.median(ta) * 1e3), "rep_ms": float(np.median(tb) * 1e3),
                        "ratio": float(np.median(tb) / np.median(ta))}
    return out


def fused_ops(path: Path) -> dict:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "opt.onnx"
        session(path, 1, p)
        m = onnx.load(str(p))
    return dict(collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in m.graph.node))


def repair_one(name: str, out: Path, epochs: int) -> float:
    from onnxrepair.cli import main
    t = time.perf_counter()
    rc = main(["repair", str(ROOT / "fixtures" / "models" / f"{name}.onnx"), "--method", "deeppatch", "--data", str(DATA),
               "-o", str(out), "--epochs", str(epochs), "--provider", "cpu", "--force", "--quiet"])
    if rc != 0 or not out.exists():
        raise SystemExit(f"repair of {name} failed (rc={rc})")
    return time.perf_counter() - t


def report(name: str, orig: Path, new: Path, x: np.ndarray, args) -> dict:
    row = {"model": name}
    for threads in (1, 0):
        row[f"threads={threads or 'default'}"] = latency(orig, new, x, args.repeats, threads)
    if args.ops:
        row["ops_orig"], row["ops_repaired"] = fused_ops(orig), fused_ops(new)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", action="store_true", help="time bench/work/latency/*.onnx from an earlier run")
    ap.add_argument("--pair", nargs=2, metavar=("ORIG", "REPAIRED"))
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--ops", action="store_true", help="node types after ORT's optimisation")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    x = (np.load(DATA)["x"][:64].astype(np.float32) / 255.0)
    if x.ndim == 3:
        x = x[:, None]
    rows = []
    if args.pair:
        rows.append(report("pair", Path(args.pair[0]), Path(args.pair[1]), x, args))
    else:
        WORK.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            orig, new = ROOT / "fixtures" / "models" / f"{name}.onnx", WORK / f"{name}_deeppatch.onnx"
            rs = None if args.reuse else repair_one(name, new, args.epochs)
            row = report(name, orig, new, x, args)
            row["repair_s"] = rs
            rows.append(row)
    for r in rows:
        print(f"{r['model']}" + (f"  (repair {r['repair_s']:.1f}s)" if r.get("repair_s") else ""))
        for t in ("threads=1", "threads=default"):
            print(f"  {t:<16}" + "  ".join(f"b{b}: {r[t][f'b{b}']['orig_ms']:.3f} -> {r[t][f'b{b}']['rep_ms']:.3f} ms  x{r[t][f'b{b}']['ratio']:.2f}"
                                          for b in (1, 64)))
        if args.ops:
            print("  ORT-optimised ops, original:", r["ops_orig"])
            print("  ORT-optimised ops, repaired:", r["ops_repaired"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
