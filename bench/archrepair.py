"""ArchRepair (block-level architecture + weight repair) against its peers on a small CIFAR-10 ResNet, measured on
onnxruntime on a held-out test split.

    .venv/bin/python bench/archrepair.py --data-dir ../shared/datasets [--target gaussian_noise] [--quick]

The model is a 3-block CIFAR ResNet trained by ``bench/train_cifar_resnet.py`` on 10,000 images for 15 epochs (cached
in ``bench/work/``). Every method repairs the same exported file with the same data (the training subset; calibration
= 10 % of it) and failures from one *targeted* corruption at ``--severity``:

* ``archrepair`` -- block-level: the block with the greatest gradient on failures, DARTS cell search + fine-tuning;
* ``archrepair-layer`` -- the same search restricted to one conv of that block (``level=layer``);
* ``block-weights-only`` -- the same block, its weights fine-tuned, no architecture change (``ops=original``);
* ``random-block`` -- the same search on a block drawn at random among the others (ablation of the localisation);
* ``finetune`` -- network-level fine-tuning of every weight on clean + targeted-corruption data.

The repairs get ``--repair-train`` of the model's training images, and ``--n-calib`` held-out calibration images
(training-split images the model never saw, after the ``--n-val`` of ``bench/archrepair_sweep.py``'s validation split;
see :func:`heldout`) for their checkpoint choice: 1,000 by default, so the 0.5 pt clean limit is 5 images.

Each repaired graph goes through the pipeline's stages (prepare, run, export) and is evaluated as an ONNX file:
clean accuracy, each of the 15 CIFAR-10-C corruptions at ``--severity`` and their mean, the targeted one, repair
time (the method stage) and the latency ratio repaired/original at batch 1 and 64. Prints a table and writes
``bench/results/archrepair.json`` with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from deeppatch import eval_sets, evaluate, latency_pair  # noqa: E402
from train_cifar_resnet import CONTRACT, ensure_model, load_cifar  # noqa: E402

from onnxrepair import repair as stages  # noqa: E402
from onnxrepair.methods import get  # noqa: E402
from onnxrepair.perturb.corruptions import CIFAR10C  # noqa: E402


def heldout(data_dir: Path, work: Path, n_train: int, start: int, n: int, seed: int):
    """``n`` CIFAR-10 *training-split* images the model never trained on: per class, the images after the first
    ``(n_train + start) // 10`` of ``load_cifar``'s per-class draw (a larger draw extends a smaller one). ``start`` 0
    is the sweep's validation split, ``start`` = its size the calibration split, so the two never overlap; neither
    holds test images. Cached in ``work``."""
    from onnxrepair.data.dataset import ArrayDataset

    cache = work / f"heldout_n{n_train}_from{start}_k{n}_s{seed}.npz"
    if cache.exists():
        z = np.load(cache)
        return ArrayDataset(x=z["x"], y=z["y"], name=f"cifar10-heldout{start}")
    per = (n_train + start) // 10
    big, _ = load_cifar(data_dir, n_train + start + n, 10, seed)
    rank = np.empty(len(big.y), dtype=np.int64)
    for c in range(10):
        idx = np.flatnonzero(big.y == c)
        rank[idx] = np.arange(len(idx))  # position in the class's draw
    out = big.subset(np.flatnonzero(rank >= per))
    work.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, x=out.x, y=out.y)
    return ArrayDataset(x=out.x, y=out.y, name=f"cifar10-heldout{start}")


def run_method(label: str, method: str, cfg, orig: Path, splits, args, sets, y, work: Path) -> tuple[dict, dict]:
    print(f"[archrepair bench] {label}", file=sys.stderr)
    t = time.perf_counter()
    prep = stages.prepare(orig, method, splits[0], splits=splits, contract=CONTRACT, config=cfg, device=args.device, seed=args.seed)
    out = stages.run(prep)
    repair_s = time.perf_counter() - t
    path = work / f"cifar_resnet_{label}.onnx"
    exported = stages.export(prep, out, exporter="legacy")
    onnx.save(exported.model, str(path))
    row = {**evaluate(path, sets, y), "repair_s": repair_s, "method_s": prep.timings.get("method"), "exporter": exported.exporter}
    lat = latency_pair(orig, path, sets["clean"][:64], args.latency_repeats)
    row["latency_ratio"] = {k: v["ratio"] for k, v in lat.items()}
    row["summary"] = out.summarise()
    return row, out.info


def corruption_view(row: dict, target: str, severity: int) -> dict:
    per = row["per_set"]
    c15 = {c: per[f"{c}:{severity}"] for c in CIFAR10C}
    return {"clean": per["clean"], "target": per[f"{target}:{severity}"], "mean15": float(np.mean(list(c15.values()))),
            "mean_others": float(np.mean([v for c, v in c15.items() if c != target])), "per_corruption": c15}


def table(rows: dict, target: str) -> str:
    head = (f"{'method':<19} {'clean':>6} {'Δclean':>7} {target[:10]:>10} {'Δtarget':>8} {'mean15':>7} {'Δmean':>7} "
            f"{'repair s':>9} {'lat×b1':>7} {'lat×b64':>8}  repaired")
    lines = [head, "-" * len(head)]
    base = rows["original"]
    for m, r in rows.items():
        lr = r.get("latency_ratio", {"batch1": 1.0, "batch64": 1.0})
        lines.append(f"{m:<19} {r['clean']:>6.4f} {100 * (r['clean'] - base['clean']):>+7.2f} {r['target']:>10.4f} "
                     f"{100 * (r['target'] - base['target']):>+8.2f} {r['mean15']:>7.4f} {100 * (r['mean15'] - base['mean15']):>+7.2f} "
                     f"{r.get('repair_s', 0.0):>9.1f} {lr['batch1']:>7.2f} {lr['batch64']:>8.2f}  {r.get('what', '')}")
    return "\n".join(lines)


def verdict(rows: dict, infos: dict) -> dict:
    base, blk = rows["original"], rows["archrepair"]
    gain = lambda r, k: 100 * (r[k] - base[k])  # noqa: E731
    out = {"block_clean_loss_points": -gain(blk, "clean"), "block_clean_loss_ok": -gain(blk, "clean") <= 0.5}
    for peer in ("archrepair-layer", "block-weights-only"):
        out[f"beats_{peer}_on_target"] = gain(blk, "target") > gain(rows[peer], "target")
        out[f"beats_{peer}_on_mean15"] = gain(blk, "mean15") > gain(rows[peer], "mean15")
    ft = rows["finetune"]
    out["repair_time_ratio_block_over_network"] = blk["repair_s"] / ft["repair_s"]
    out["target_gain_points"] = {"archrepair": gain(blk, "target"), "finetune": gain(ft, "target")}
    out["time_half_for_same_gain"] = out["repair_time_ratio_block_over_network"] <= 0.5 and gain(blk, "target") >= gain(ft, "target")
    out.update(equal_gain_time(rows, infos))
    return out


def equal_gain_time(rows: dict, infos: dict) -> dict:
    """Network fine-tuning's time to the block-level repair's gain, on the calibration split (never test): the first
    epoch whose calib corrupted accuracy gained at least what ArchRepair's repaired cell gained on its calib
    corruption (same images, same corruption, its own draw), its time taken as that fraction of the run's
    (epochs cost the same; the one-off evaluation of epoch 0 is counted in)."""
    ca = infos["archrepair"]["calib_accuracy"]
    want = ca["repaired_perturbed"] - ca["original_perturbed"]
    hist = infos["finetune"].get("history", [])
    if not hist:
        return {}
    base = hist[0]["calib_perturbed"]
    epochs = len(hist) - 1
    reach = next((r["epoch"] for r in hist[1:] if r["calib_perturbed"] - base >= want - 1e-9), None)
    out = {"calib_gain_points": {"archrepair": 100 * want, "finetune_per_epoch": [100 * (r["calib_perturbed"] - base) for r in hist]},
           "finetune_epoch_reaching_block_gain": reach}
    if reach is not None and epochs:
        t_net = rows["finetune"]["repair_s"] * reach / epochs
        out["finetune_s_to_block_gain"] = t_net
        out["time_ratio_at_equal_gain"] = rows["archrepair"]["repair_s"] / t_net
        out["time_half_at_equal_gain"] = out["time_ratio_at_equal_gain"] <= 0.5
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "archrepair.json")
    ap.add_argument("--quick", action="store_true", help="smaller model training set and fewer epochs")
    ap.add_argument("--n-train", type=int, default=None, help="CIFAR-10 training images (model training and repair)")
    ap.add_argument("--n-test", type=int, default=1000, help="held-out CIFAR-10 test images")
    ap.add_argument("--repair-train", type=int, default=3000, help="training images the repairs get (a stratified subset)")
    ap.add_argument("--n-calib", type=int, default=1000,
                    help="calibration images (checkpoint choice): training-split images outside the model's training "
                         "subset and the sweep's validation split")
    ap.add_argument("--n-val", type=int, default=1000, help="size of bench/archrepair_sweep.py's validation split (skipped)")
    ap.add_argument("--pretrain-epochs", type=int, default=None)
    ap.add_argument("--target", default="gaussian_noise", help="the corruption the repair targets")
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--search-epochs", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--network-epochs", type=int, default=3, help="epochs of network-level fine-tuning")
    ap.add_argument("--latency-repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on shared cores more threads run slower)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # 10,000 images x 15 epochs (67 % test accuracy; 27 min to train on the busy shared cores, cached): the earlier
    # 5,000 x 6 model (55 %) failed on almost half its own training images, so its repair set was mostly clean errors
    args.n_train = args.n_train or (3000 if args.quick else 10000)
    args.pretrain_epochs = args.pretrain_epochs or (4 if args.quick else 15)
    t0 = time.perf_counter()
    orig, meta = ensure_model(args.data_dir, args.work, args.n_train, args.pretrain_epochs, args.seed)
    tr_all, test = load_cifar(args.data_dir, args.n_train, args.n_test, args.seed)
    train = tr_all.limit(args.repair_train, seed=args.seed + 2)
    # calibration: held-out training-split images after the sweep's validation split (issue 12: 10 % of the repair
    # images were the model's own training images, 92 % clean, and one of 149 was 0.67 pt, over the 0.5 pt limit)
    calib = heldout(args.data_dir, args.work, args.n_train, args.n_val, args.n_calib, args.seed)
    splits = (train, calib, test)
    print(f"[archrepair bench] corrupting {len(test)} test images ({len(CIFAR10C)} corruptions, severity {args.severity})", file=sys.stderr)
    sets = eval_sets(test, CONTRACT, list(CIFAR10C), args.severity, args.seed)
    rows: dict[str, dict] = {"original": {**corruption_view(evaluate(orig, sets, test.y), args.target, args.severity), "what": "-"}}
    infos: dict[str, dict] = {}

    ar = get("archrepair").config_cls
    base = ar(corruptions=(args.target,), severities=(args.severity,), search_epochs=args.search_epochs, finetune_epochs=args.finetune_epochs)
    plan = [("archrepair", "archrepair", base), ("archrepair-layer", "archrepair", dataclasses.replace(base, level="layer")),
            ("block-weights-only", "archrepair", dataclasses.replace(base, ops=("original",)))]
    for label, method, cfg in plan:
        row, info = run_method(label, method, cfg, orig, splits, args, sets, test.y, args.work)
        infos[label] = info
        what = info["repaired_region"]["name"] + ": " + ", ".join(f"{e['edge']} {e['op']}" for e in info["edges"] if "dropped" not in e["op"])
        rows[label] = {**corruption_view(row, args.target, args.severity), **row, "what": what}
        if label == "archrepair":
            others = [b["name"] for b in info["blocks"] if b["name"] != info["chosen_block"]]
            random_block = others[int(np.random.default_rng(args.seed).integers(len(others)))] if others else info["chosen_block"]
            plan.append(("random-block", "archrepair", dataclasses.replace(base, block=random_block)))
    ft = get("finetune").config_cls(epochs=args.network_epochs, corruptions=(args.target,), severities=(args.severity,))
    row, info = run_method("finetune", "finetune", ft, orig, splits, args, sets, test.y, args.work)
    infos["finetune"] = info
    rows["finetune"] = {**corruption_view(row, args.target, args.severity), **row, "what": f"all weights, {args.network_epochs} epochs"}

    cmd = "python bench/archrepair.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = table(rows, args.target)
    result = {"reproduce": cmd, "model": {"path": str(orig.relative_to(ROOT)) if orig.is_relative_to(ROOT) else str(orig), **meta},
              "splits": {"train": len(train), "calib": len(calib), "test": len(test)}, "target": args.target, "severity": args.severity,
              "rows": {m: {k: v for k, v in r.items() if k != "per_set"} for m, r in rows.items()}, "verdict": verdict(rows, infos),
              "infos": {m: {k: v for k, v in i.items() if k not in ("blocks",)} for m, i in infos.items()},
              "args": {k: str(v) for k, v in vars(args).items()}, "total_s": time.perf_counter() - t0,
              "threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"CIFAR-10 ResNet ({meta['n_train']} training images, {meta['epochs']} epochs, test accuracy {meta['test_accuracy_torch']:.4f}); "
          f"target {args.target} severity {args.severity}; {len(test)} held-out images, onnxruntime CPU")
    print(text)
    print("verdict:", json.dumps(result["verdict"]))
    print(f"reproduce: {cmd}\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
