"""DeepPatch vs fine-tuning baselines on MNIST-5k and a CIFAR-10 subset, measured on onnxruntime.

    .venv/bin/python bench/deeppatch.py --data-dir /work/shared/datasets [--quick] [--epochs N]

For each dataset: train a small CNN on clean data (or load it from ``--work``), export it to ONNX, then
repair that file with ``deeppatch``, ``finetune`` and ``finetune-last`` (same data mixture, equal epochs),
export each result and evaluate every *file* on onnxruntime (CPU) on a held-out test split:

* standard accuracy (clean),
* robustness accuracy: mean over clean + the 6 blurred copies (sigma in {0.5..3}; DeepPatch §5),
* mean corruption accuracy: the blur set, and the 15 CIFAR-10-C corruptions at one severity when available,
* repair wall time and the latency ratio repaired/original at batch 1 and 64 (median, same run).

Prints one table and writes ``bench/results/deeppatch.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.export import export_graph  # noqa: E402
from onnxrepair.data.contract import InputContract  # noqa: E402
from onnxrepair.data.dataset import ArrayDataset  # noqa: E402
from onnxrepair import repair as stages  # noqa: E402
from onnxrepair.methods import get  # noqa: E402
from onnxrepair.perturb.blur import DEEPPATCH_SIGMAS, gaussian_blur  # noqa: E402

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
METHODS = ("deeppatch", "finetune", "finetune-last")


# ------------------------------------------------------------------ data
def load_mnist(data_dir: Path) -> ArrayDataset:
    with gzip.open(data_dir / "mnist5k" / "mnist_5k.csv.gz", "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = arr[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    return ArrayDataset(x=x, y=arr[:, 784].astype(np.int64), classes=[str(i) for i in range(10)], name="mnist5k")


def load_cifar(data_dir: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """A class-balanced subset of ``cifar10/{train,test}/<class>/NNNN.jpg`` read straight from the tarball."""
    from PIL import Image

    want = {"train": n_train // 10, "test": n_test // 10}
    rng = np.random.default_rng(seed)
    with tarfile.open(data_dir / "cifar10-jpg.tar.gz", "r:gz") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        picked: dict[str, list] = {"train": [], "test": []}
        for split in picked:
            for ci, cls in enumerate(CIFAR_CLASSES):
                ms = [m for m in members if m.name.split("/")[-3:-1] == [split, cls]]
                for j in rng.permutation(len(ms))[: want[split]]:
                    picked[split].append((ms[j], ci))
        # read in archive order: a gzip stream seeks backwards by decompressing again from the start, so reading the
        # picked members out of order costs one decompression per image (minutes for a few thousand images)
        raw = {m.offset: tf.extractfile(m).read() for m in sorted((m for ps in picked.values() for m, _ in ps), key=lambda m: m.offset)}
        out = []
        for split in ("train", "test"):
            xs, ys = [], []
            for m, ci in picked[split]:
                img = Image.open(io.BytesIO(raw[m.offset])).convert("RGB")
                xs.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
                ys.append(ci)
            out.append(ArrayDataset(x=np.stack(xs), y=np.array(ys, dtype=np.int64), classes=list(CIFAR_CLASSES), name=f"cifar10-{split}"))
    return out[0], out[1]


# ------------------------------------------------------------------ models
class SmallCNN(nn.Module):
    def __init__(self, c_in: int, width: int, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def train_model(model: nn.Module, data: ArrayDataset, contract: InputContract, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 4e-3, total_steps=epochs * ((len(data) + 63) // 64))
    for ep in range(epochs):
        model.train()
        for xb, yb in data.batches(64, shuffle=True, seed=seed + ep):
            loss = nn.functional.cross_entropy(model(contract.to_model(contract.to_unit(xb))), torch.as_tensor(yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def export_to(module: nn.Module, example: torch.Tensor, path: Path) -> str:
    res = export_graph(module.eval().cpu(), [example], ["input"], ["logits"], exporter="legacy")
    onnx.save(res.model, str(path))
    return res.exporter


# ------------------------------------------------------------------ evaluation on onnxruntime
def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # latency ratios on shared cores: one thread, same for both files
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_accuracy(sess: ort.InferenceSession, x_model: np.ndarray, y: np.ndarray, bs: int = 256) -> float:
    preds = [sess.run(None, {"input": x_model[i : i + bs]})[0].argmax(1) for i in range(0, len(x_model), bs)]
    return float((np.concatenate(preds) == y).mean())


def eval_sets(test: ArrayDataset, contract: InputContract, corruptions: list[str], severity: int, seed: int) -> dict[str, np.ndarray]:
    unit = contract.to_unit(test.x)
    sets = {"clean": unit}
    for s in DEEPPATCH_SIGMAS:
        sets[f"blur:{s:g}"] = gaussian_blur(unit, s)
    if corruptions:
        from onnxrepair.perturb import corruptions as reg

        for c in corruptions:
            sets[f"{c}:{severity}"] = reg.apply(c, unit, severity, seed)
    return {k: contract.to_model(v).numpy().astype(np.float32) for k, v in sets.items()}


def evaluate(path: Path, sets: dict[str, np.ndarray], y: np.ndarray) -> dict:
    sess = session(path)
    acc = {k: ort_accuracy(sess, v, y) for k, v in sets.items()}
    blur = [acc[k] for k in acc if k.startswith("blur:")]
    corr = [acc[k] for k in acc if k != "clean" and not k.startswith("blur:")]
    return {
        "standard": acc["clean"],
        "robustness": float(np.mean([acc["clean"], *blur])),
        "mean_blur": float(np.mean(blur)),
        "mean_corruption": float(np.mean(corr)) if corr else None,
        "per_set": acc,
    }


def latency_pair(orig: Path, new: Path, x: np.ndarray, repeats: int) -> dict:
    """Interleaved timing of both files (shared, busy cores: alternate so load hits both alike)."""
    sa, sb = session(orig), session(new)
    out: dict = {}
    for b in (1, 64):
        xb = np.ascontiguousarray(x[:b])
        for _ in range(3):
            sa.run(None, {"input": xb}), sb.run(None, {"input": xb})
        ta, tb = [], []
        for _ in range(repeats):
            for sess, acc in ((sa, ta), (sb, tb)):
                t = time.perf_counter()
                sess.run(None, {"input": xb})
                acc.append(time.perf_counter() - t)
        out[f"batch{b}"] = {"original_ms": float(np.median(ta) * 1e3), "repaired_ms": float(np.median(tb) * 1e3),
                            "ratio": float(np.median(tb) / np.median(ta))}
    return out


# ------------------------------------------------------------------ one dataset
def run_dataset(name: str, train: ArrayDataset, calib: ArrayDataset, test: ArrayDataset, contract: InputContract, c_in: int,
                width: int, args, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    orig_path = work / f"{name}_original.onnx"
    example = contract.to_model(contract.to_unit(train.x[:2]))
    t = time.perf_counter()
    if orig_path.exists() and not args.retrain:
        print(f"[{name}] loading {orig_path}", file=sys.stderr)
    else:
        print(f"[{name}] training SmallCNN(width={width}) on {len(train)} images", file=sys.stderr)
        model = train_model(SmallCNN(c_in, width), train, contract, args.pretrain_epochs, args.seed)
        export_to(model, example, orig_path)
    pretrain_s = time.perf_counter() - t
    corruptions = []
    if not args.no_corruptions:
        try:
            from onnxrepair.perturb.corruptions import CIFAR10C

            corruptions = list(CIFAR10C)
        except ImportError:
            pass
    sets = eval_sets(test, contract, corruptions, args.severity, args.seed)
    x_lat = sets["clean"][:64]
    rows = {"original": {**evaluate(orig_path, sets, test.y), "repair_s": 0.0}}
    for method in METHODS:
        spec = get(method)
        cfg = spec.config_cls(epochs=args.epochs, batch_size=args.batch_size)
        if method == "deeppatch":
            cfg = dataclasses.replace(cfg, assess_samples=args.assess_samples, **({"gate": args.gate} if args.gate else {}))
        print(f"[{name}] {method} ({args.epochs} epochs)", file=sys.stderr)
        t = time.perf_counter()
        # the pipeline's own stages, with the bench's splits: what a user runs, measured
        prep = stages.prepare(orig_path, method, train, splits=(train, calib, test), contract=contract, config=cfg,
                              device=args.device, seed=args.seed)
        out = stages.run(prep)
        repair_s = time.perf_counter() - t
        path = work / f"{name}_{method}.onnx"
        exported = stages.export(prep, out, exporter="legacy")
        onnx.save(exported.model, str(path))
        exporter = exported.exporter
        row = {**evaluate(path, sets, test.y), "repair_s": repair_s, "exporter": exporter}
        lat = latency_pair(orig_path, path, x_lat, args.latency_repeats)
        row["latency"] = lat
        row["latency_ratio"] = {k: v["ratio"] for k, v in lat.items()}
        info = {k: v for k, v in out.info.items() if k not in ("history", "ranking")}
        row["info"] = info
        rows[method] = row
    base = rows["original"]
    for m, r in rows.items():
        r["standard_drop_points"] = (base["standard"] - r["standard"]) * 100
        r["robustness_gain_points"] = (r["robustness"] - base["robustness"]) * 100
    return {"dataset": name, "splits": {"train": len(train), "calib": len(calib), "test": len(test)},
            "pretrain_s": pretrain_s, "corruptions": corruptions, "severity": args.severity, "rows": rows}


def table(results: list[dict]) -> str:
    head = f"{'dataset':<8} {'method':<14} {'std acc':>8} {'Δstd pt':>8} {'robust':>8} {'Δrob pt':>8} {'blur':>7} {'corr':>7} {'repair s':>9} {'lat×b1':>7} {'lat×b64':>8} {'→patch clean/pert':>18}"
    lines = [head, "-" * len(head)]
    for res in results:
        for m, r in res["rows"].items():
            lr = r.get("latency_ratio", {"batch1": 1.0, "batch64": 1.0})
            corr = f"{r['mean_corruption']:.4f}" if r["mean_corruption"] is not None else "-"
            route = ""
            if m == "deeppatch":
                rc = r["info"]["routing_calib"]
                route = f"{rc['clean']:.3f}/{rc['perturbed_mean']:.3f}"
            lines.append(
                f"{res['dataset']:<8} {m:<14} {r['standard']:>8.4f} {-r['standard_drop_points']:>+8.2f} {r['robustness']:>8.4f} "
                f"{r['robustness_gain_points']:>+8.2f} {r['mean_blur']:>7.4f} {corr:>7} {r['repair_s']:>9.1f} {lr['batch1']:>7.2f} {lr['batch64']:>8.2f} {route:>18}"
            )
    return "\n".join(lines)


def verdict(res: dict, limit: float = 0.3) -> dict:
    rows = res["rows"]
    dp = rows["deeppatch"]
    keep = [m for m in ("finetune", "finetune-last") if rows[m]["standard_drop_points"] <= limit]
    return {
        "deeppatch_std_drop_ok": dp["standard_drop_points"] <= limit,
        "baselines_within_limit": keep,
        "deeppatch_beats_those_baselines": all(dp["robustness_gain_points"] > rows[m]["robustness_gain_points"] for m in keep),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("/work/shared/datasets"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deeppatch.json")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--quick", action="store_true", help="smaller subsets and fewer epochs (CPU)")
    ap.add_argument("--epochs", type=int, default=None, help="repair epochs, the same for every method")
    ap.add_argument("--pretrain-epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--assess-samples", type=int, default=256)
    ap.add_argument("--gate", default=None, help="deeppatch gate (default: the method's default)")
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--no-corruptions", action="store_true")
    ap.add_argument("--datasets", default="mnist,cifar10")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--latency-repeats", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    q = args.quick
    args.epochs = args.epochs or (3 if q else 10)
    args.pretrain_epochs = args.pretrain_epochs or (4 if q else 10)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    results = []
    contract_gray = InputContract(scale=255.0, mean=(0.5,), std=(0.5,))
    if "mnist" in args.datasets:
        data = load_mnist(args.data_dir)
        rest, test = data.split(0.3, seed=args.seed)
        train, calib = rest.split(0.15, seed=args.seed + 1)
        results.append(run_dataset("mnist", train, calib, test, contract_gray, 1, 8 if q else 16, args, args.work))
    if "cifar10" in args.datasets:
        n_train, n_test = (4000, 1000) if q else (10000, 2000)
        tr_all, test = load_cifar(args.data_dir, n_train, n_test, args.seed)
        train, calib = tr_all.split(0.1, seed=args.seed + 1)
        contract_rgb = InputContract(scale=255.0, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
        results.append(run_dataset("cifar10", train, calib, test, contract_rgb, 3, 16 if q else 32, args, args.work))
    for r in results:
        r["verdict"] = verdict(r)
    txt = table(results)
    print("# .venv/bin/python " + " ".join(sys.argv))  # the command that reproduces this table
    print(txt)
    for r in results:
        print(f"{r['dataset']}: {r['verdict']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(sys.argv), "quick": q, "epochs": args.epochs, "device": args.device,
               "torch_threads": torch.get_num_threads(), "ort_threads": 1, "total_s": time.perf_counter() - t0,
               "results": results, "table": txt}
    args.out.write_text(json.dumps(payload, indent=1, default=float))
    print(f"wrote {args.out} ({payload['total_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
