"""ORT latency of DeepPatch-repaired files vs their originals, per deployment form, with accuracy next to it.

    .venv/bin/python bench/deeppatch_latency.py                        # repair + time every variant on every model
    .venv/bin/python bench/deeppatch_latency.py --models keras_cnn --variants mix switch-input
    .venv/bin/python bench/deeppatch_latency.py --pair A.onnx B.onnx   # time any original/repaired pair

Each variant is one ``onnxrepair repair --method deeppatch`` run (same seed, same data, same epochs: the units
are trained identically, only the gate and the deployed graph differ) into ``bench/work/latency/``; its report
gives clean accuracy, robustness (mean over clean + the 6 blurred copies) and routing on the held-out split, measured
on onnxruntime. Latency: onnxruntime CPU, **1 intra-op thread**, original and repaired sessions interleaved A B B A
in one process, at batch 1 (cycling through 32 different images) and batch 64, on clean held-out images and on the
same images blurred (sigma 2, what the patch is for: every row routed). Reported: the ratio of each side's 20th
percentile call time (see :func:`ratio` for why not the median of per-round ratios on oversubscribed cores; both
are in the JSON).

Variants (``--variants``):

* ``mix``: the training graph exported as it is (``--deploy mix``, stats gate): the form before issue 14;
* ``switch-stats``: stats gate on the first patched conv's output, original model cut there (``--switch overlay``);
* ``switch-input``: gate on the model input, whole original model in the main graph (``--gate input``, overlay);
* ``switch-input-excl``: the same gate, each row through one side only (``--switch exclusive``).

Models (``--models``): the Keras CNN fixture (tf2onnx, NHWC), the MNIST LeNet fixture (torch legacy exporter) and
the BN ResNet fixture on ``fixtures/data/mnist_small.npz``, and the CIFAR-10 ResNet of ``bench/train_cifar_resnet.py``
(``cifar_resnet``, 78k parameters) on a 2,000/500-image CIFAR-10 subset when ``--data-dir`` is given.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
FIX = ROOT / "fixtures" / "models"
MNIST = ROOT / "fixtures" / "data" / "mnist_small.npz"
WORK = ROOT / "bench" / "work" / "latency"
MODELS = {"keras_cnn": FIX / "keras_cnn_nhwc_tf2onnx.onnx", "lenet": FIX / "torch_lenet_legacy11.onnx",
          "resnet_bn": FIX / "torch_resnet_bn_legacy17.onnx"}
VARIANTS = {
    "mix": ["--deploy", "mix"],
    "switch-stats": ["--gate", "stats", "--switch", "overlay"],
    "switch-input": ["--gate", "input", "--switch", "overlay"],
    "switch-input-excl": ["--gate", "input", "--switch", "exclusive"],
}


def session(path: Path, threads: int = 1, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def to_layout(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """NCHW images in [0, 1] -> what the model takes (NHWC when its last input dim is the channel count)."""
    shape = sess.get_inputs()[0].shape
    if len(shape) == 4 and shape[-1] == x.shape[1] and shape[1] != x.shape[1]:
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def ratio(orig: Path, new: Path, x: np.ndarray, rounds: int, threads: int = 1) -> dict:
    """Median over rounds of (repaired / original) time, A B B A interleaved; batch 1 cycles through 32 images."""
    sa, sb = session(orig, threads), session(new, threads)
    na, nb = sa.get_inputs()[0].name, sb.get_inputs()[0].name
    out = {}
    for b in (1, 64):
        feeds = [np.ascontiguousarray(x[i : i + 1]) for i in range(32)] if b == 1 else [np.ascontiguousarray(x[:64])]
        for f in feeds[:4]:
            sa.run(None, {na: f}), sb.run(None, {nb: f})
        reps = rounds if b == 1 else max(rounds // 8, 15)
        ta, tb, r = [], [], []
        for i in range(reps):
            f = feeds[i % len(feeds)]
            t0 = time.perf_counter(); sa.run(None, {na: f}); t1 = time.perf_counter()
            sb.run(None, {nb: f}); t2 = time.perf_counter()
            sb.run(None, {nb: f}); t3 = time.perf_counter()
            sa.run(None, {na: f}); t4 = time.perf_counter()
            a, bb = (t1 - t0) + (t4 - t3), (t2 - t1) + (t3 - t2)
            ta.append(a / 2), tb.append(bb / 2), r.append(bb / a)
        # headline: ratio of each side's 20th percentile. On cores oversubscribed 10-15x (as when this ran) a call is
        # preempted with a probability that grows with its length, so the longer (repaired) calls collect more
        # 20-100 ms outliers; in up to half the rounds one lands on the repaired side and the median of per-round
        # ratios is pulled up (measured 14-30x for a file a direct check puts at 2.7x). A low quantile of each
        # side is the undisturbed cost. The median of per-round ratios and the per-side medians are kept too.
        out[f"b{b}"] = {"orig_ms": float(np.percentile(ta, 20) * 1e3), "rep_ms": float(np.percentile(tb, 20) * 1e3),
                        "ratio": float(np.percentile(tb, 20) / np.percentile(ta, 20)),
                        "ratio_median_of_rounds": float(np.median(r)), "ratio_of_medians": float(np.median(tb) / np.median(ta)),
                        "ratio_iqr": [float(np.percentile(r, 25)), float(np.percentile(r, 75))]}
    return out


def ops(path: Path) -> dict:
    """Node types of the file, subgraphs included."""
    acc: collections.Counter = collections.Counter()

    def walk(g):
        for n in g.node:
            acc[n.op_type] += 1
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)

    walk(onnx.load(str(path)).graph)
    return dict(acc)


def cifar_setup(data_dir: Path) -> tuple[Path, Path]:
    """The cached CIFAR ResNet (``bench/train_cifar_resnet.py``) and a 2,000/500 CIFAR-10 subset as npz."""
    import train_cifar_resnet as tcr

    work = ROOT / "bench" / "work"
    model = next(iter(sorted(work.glob("cifar_resnet*.onnx"))), None)
    if model is None:
        raise SystemExit("no cached CIFAR ResNet under bench/work: run bench/train_cifar_resnet.py --data-dir ... first")
    npz = work / "cifar_2000_500.npz"
    if not npz.exists():
        tr, te = tcr.load_cifar(data_dir, 2000, 500, seed=1)
        np.savez_compressed(npz, x=np.concatenate([tr.x, te.x]), y=np.concatenate([tr.y, te.y]))
    return model, npz


def repair(model: Path, data: Path, out: Path, variant: str, epochs: int, extra: list[str]) -> tuple[dict, float]:
    from onnxrepair.cli import main

    rep = out.with_suffix(".json")
    t = time.perf_counter()
    rc = main(["--threads", "1", "repair", str(model), "--method", "deeppatch", "--data", str(data), "-o", str(out), "--report", str(rep),
               "--epochs", str(epochs), "--provider", "cpu", "--force", "--quiet", *VARIANTS[variant], *extra])
    if rc != 0 or not out.exists():
        raise SystemExit(f"repair of {model.name} ({variant}) failed (rc={rc})")
    return json.loads(rep.read_text()), time.perf_counter() - t


def blurred(x_unit: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    import torch

    from onnxrepair.perturb.blur import gaussian_blur

    return gaussian_blur(torch.from_numpy(x_unit), sigma).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", nargs=2, metavar=("ORIG", "REPAIRED"))
    ap.add_argument("--models", nargs="+", default=[*MODELS, "cifar_resnet"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--data-dir", type=Path, default=None, help="shared datasets (for cifar_resnet)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=400, help="A B B A rounds at batch 1 (batch 64: an eighth)")
    ap.add_argument("--reuse", action="store_true", help="time the files of an earlier run, do not repair")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "deeppatch_latency.json")
    ap.add_argument("--md", type=Path, default=ROOT / "bench" / "results" / "deeppatch_latency.md")
    ap.add_argument("--render", action="store_true", help="redraw --md from --json, time nothing")
    args = ap.parse_args()
    if args.render:
        render(args.json, args.md)
        return

    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.pair:
        xs = np.load(MNIST)["x"][-64:].astype(np.float32)[:, None] / 255.0
        sa = session(Path(args.pair[0]))
        for kind, x in (("clean", xs), ("blur2", blurred(xs))):
            rows.append({"model": "pair", "variant": kind, "latency": ratio(Path(args.pair[0]), Path(args.pair[1]), to_layout(sa, x), args.rounds)})
        print(json.dumps(rows, indent=1))
        return
    for name in args.models:
        if name == "cifar_resnet":
            if args.data_dir is None:
                print("cifar_resnet skipped: no --data-dir")
                continue
            model, data = cifar_setup(args.data_dir)
            extra = ["--scale", "255", "--mean", "0.49,0.48,0.45", "--std", "0.25,0.24,0.26"]
        else:
            model, data, extra = MODELS[name], MNIST, []
        d = np.load(data)
        x_unit = d["x"][-64:].astype(np.float32) / 255.0
        x_unit = x_unit[:, None] if x_unit.ndim == 3 else x_unit
        if name == "cifar_resnet":  # the model takes normalised input
            mean, std = np.array([0.49, 0.48, 0.45], np.float32)[:, None, None], np.array([0.25, 0.24, 0.26], np.float32)[:, None, None]
            to_model = lambda u: (u - mean) / std  # noqa: E731
        else:
            to_model = lambda u: u  # noqa: E731
        sa = session(model)
        feeds = {"clean": to_layout(sa, to_model(x_unit)), "blur2": to_layout(sa, to_model(blurred(x_unit)))}
        for v in args.variants:
            out = WORK / f"{name}_{v}.onnx"
            if args.reuse and out.with_suffix(".json").exists():
                rep, secs = json.loads(out.with_suffix(".json").read_text()), None
            elif args.reuse:
                print(f"{name} {v}: no earlier repair to time, skipped")
                continue
            else:
                rep, secs = repair(model, data, out, v, args.epochs, extra)
            info = rep.get("info", {})
            after, before = rep["after"], rep["before"]
            row = {"model": name, "variant": v, "repair_s": secs, "deploy": info.get("deploy"),
                   "clean": {"original": before.get("clean"), "repaired": after.get("clean")},
                   "robustness": {"original": before.get("robustness"), "repaired": after.get("robustness")},
                   "gate_auc": info.get("gate", {}).get("auc"), "routing_calib": info.get("routing_calib"),
                   "latency": {k: ratio(model, out, x, args.rounds) for k, x in feeds.items()}, "ops": ops(out)}
            rows.append(row)
            l = row["latency"]
            print(f"{name:13s} {v:18s} clean {100 * (row['clean']['repaired'] or 0):6.2f} rob {100 * (row['robustness']['repaired'] or 0):6.2f}  "
                  f"clean-in b1 x{l['clean']['b1']['ratio']:.2f} b64 x{l['clean']['b64']['ratio']:.2f}  "
                  f"blurred-in b1 x{l['blur2']['b1']['ratio']:.2f} b64 x{l['blur2']['b64']['ratio']:.2f}", flush=True)
    cmd = "PYTHONPATH=$PWD .venv/bin/python " + " ".join(["bench/deeppatch_latency.py", *sys.argv[1:]])
    meta = {"command": cmd, "host": platform.node(), "cpu_threads_ort": 1, "onnxruntime": ort.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    render(args.json, args.md)


def render(json_path: Path, md_path: Path) -> None:
    """The table of a result JSON (``--render`` redraws it without timing anything)."""
    d = json.loads(json_path.read_text())
    cmd, rows = d["meta"]["command"], d["rows"]
    lines = [f"# DeepPatch deployment latency (issue 14)", "", f"`{cmd}`", "",
             "onnxruntime CPU, 1 intra-op thread, original and repaired interleaved A B B A. Each cell: ratio of each side's "
             "20th-percentile call time / median of per-round ratios (the two estimators disagree where the shared cores "
             "were oversubscribed; see `ratio`), and the original's 20th-percentile ms. "
             "clean/robust: held-out split of the repair report (onnxruntime), robustness = mean over clean + 6 blurred copies.", "",
             "| model | variant | clean orig→rep | robust orig→rep | clean input b1 | clean input b64 | blurred input b1 | blurred input b64 | routed calib clean/pert |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        l, rc = r["latency"], r["routing_calib"] or {}
        f = lambda v: f"{100 * v:.2f}" if isinstance(v, (int, float)) else "?"  # noqa: E731
        cell = lambda c: f"{c['ratio']:.2f}× / {c.get('ratio_median_of_rounds', c['ratio']):.2f}× ({c['orig_ms']:.3f} ms)"  # noqa: E731
        lines.append(f"| {r['model']} | {r['variant']} | {f(r['clean']['original'])}→{f(r['clean']['repaired'])} | "
                     f"{f(r['robustness']['original'])}→{f(r['robustness']['repaired'])} | "
                     + " | ".join(cell(l[k][b]) for k in ("clean", "blur2") for b in ("b1", "b64"))
                     + f" | {f(rc.get('clean'))}/{f(rc.get('perturbed_mean'))} |")
    md_path.write_text("\n".join(lines) + "\n")
    print(md_path.read_text())


if __name__ == "__main__":
    main()
