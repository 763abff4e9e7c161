"""DARE vs adversarial fine-tuning per attack vs plain fine-tuning, both attack protocols, measured on onnxruntime.

    .venv/bin/python bench/dare.py --data-dir ../shared/datasets [--dataset mnist|cifar10] [--seeds 0,1,2]

The model and its training history come from :mod:`bench.dare_history` (trained when ``--work`` holds no history
with the same settings; ``--retrain`` trains again): the model trains on half the images, the other half is the
*pool* every method gets. Each seed has its own model and history, trained with that seed (``--shared-history``:
every seed repairs seed 0's). For each seed, the pool is split into the methods' training rows (90 %) and calibration
rows (10 %), and every method runs through the pipeline's own stages (prepare -> run -> export), as
``onnxrepair repair`` would:

* ``dare`` — ``--history <seed dir>/history`` (the later half of the epochs mined), its lr/steps chosen on the
  calibration rows by clean + FGSM accuracy, the FGSM examples crafted once on the original model (``--dare-select
  transfer``, the paper's protocol; ``whitebox`` crafts them on each tuned epoch);
* ``adv-ft-fgsm``, ``adv-ft-pgd``, ``adv-ft-cw`` — ``adversarial-training --attack ...``: full fine-tuning on each
  attack's examples crafted on the fly (the paper's peers: adversarial fine-tuning on each attack's examples);
* ``finetune`` — plain fine-tuning of all weights on the clean pool (``--perturb-prob 0``).

Equal clean cost: every method chooses its checkpoint on the calibration rows under a retention limit, and an epoch
whose calibration clean accuracy is more than that below the original's is not eligible; among the eligible epochs
(the original included) the best (clean + attack accuracy) / 2 on the calibration rows wins (the same rule for
every method). DARE's limit is ``--max-clean-drop`` (default 0.5 points, the pipeline's retention limit, its
``--select-max-drop``). With ``--equal-clean-cost`` DARE runs first and each peer's limit becomes what DARE lost on
the calibration rows (measured on the exported files, on onnxruntime), at least ``--max-clean-drop``: the peers may
spend exactly DARE's clean cost, no more. The peers' learning rate is tuned on the same rows: each peer runs with
every lr of ``--peer-lrs`` (SGD, momentum 0.9; the default 0.003 alone) and the run whose kept epoch has the best
calibration score wins (ties to the first lr). DARE's own grid: ``--dare-lrs`` x ``--dare-cuts`` (``--cut-layer``,
e.g. ``default,features_features_10_max_pool``) x ``--dare-keeps`` (``--slice-keep``, e.g. ``0.95,0.5``), every cell
scored per epoch on the calibration rows. Nothing is chosen on the test images. ``--calib-share`` sets the
calibration rows' share of the pool (default 0.1). A diagnostics table gives, per method, the clean change on the
calibration rows and on the test images and the share of test predictions equal to the original's (how far the
repair moved the model). Repair time counts every grid cell and every peer lr.

Each exported file is scored on onnxruntime (CPU) on ``--n-eval`` test images:

* clean accuracy;
* **transfer** (the paper's protocol): FGSM, PGD-L∞ and CW-L2 examples crafted once per seed on the ORIGINAL model,
  the same images scored on every model;
* **white-box**: each attack crafted on each model's own graph (the repaired torch graph the file was exported from),
  scored on its file — what an attacker with the file does;
* **corruptions**: the 15 CIFAR-10-C corruptions (:data:`onnxrepair.perturb.corruptions.CIFAR10C`) at one severity
  (``--c-severity``, default 3; 0 skips them), applied once per seed to the same test images and scored on every
  model; the table shows their mean (``c10c mean``), the JSON each corruption's accuracy. (The corruptions take
  1- or 3-channel images, so MNIST gets the column too; on MNIST it is the same 15 corruptions, not a published set.)
* repair wall time (prepare + method, so DARE's checkpoint conversion is counted).

Cells are mean ± std over seeds; a tie for a column's best stars every tied repair and is no repair's win. The seeds vary the model and its history (initialisation and shuffling of its
training), the pool's calibration split, the methods' shuffling and the attacks' random starts; the pool and test
images are the same for every seed.
The paper's targets: DARE's clean-accuracy change >= 0, and DARE the best mean in >= 60 % of transfer cells.
Prints the table and the reproduce command, writes ``bench/results/dare.json`` and ``dare.txt``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dare_history import CONTRACTS, ensure_data, ensure_history, history_ready  # noqa: E402
from deeppatch import ort_accuracy, session  # noqa: E402
from onnxrepair import repair as stages  # noqa: E402
from onnxrepair.data.contract import InputContract, ModelWithContract  # noqa: E402
from onnxrepair.data.dataset import ArrayDataset  # noqa: E402
from onnxrepair.methods import get, make_config  # noqa: E402
from onnxrepair.perturb.attacks import CW, FGSM, PGD  # noqa: E402
from onnxrepair.perturb.corruptions import CIFAR10C, apply as corrupt  # noqa: E402

ATTACKS = ("fgsm", "pgd", "cw")
METHODS = ("dare", "adv-ft-fgsm", "adv-ft-pgd", "adv-ft-cw", "finetune")
BUDGETS = {  # L∞ eps for FGSM / PGD (pixel units), L2 eps for CW
    "mnist": {"linf": 0.1, "l2": 1.5},
    "cifar10": {"linf": 8 / 255, "l2": 0.5},
}


def attack(name: str, model: torch.nn.Module, contract: InputContract, budget: dict, seed: int, args):
    wrapped = ModelWithContract(model, contract)
    if name == "fgsm":
        return FGSM(wrapped, budget["linf"], seed=seed)
    if name == "pgd":
        return PGD(wrapped, budget["linf"], steps=args.pgd_steps, alpha=budget["linf"] / 4, seed=seed)
    return CW(wrapped, budget["l2"], steps=args.cw_steps, seed=seed)


def craft(name: str, model, contract, budget, seed, unit: torch.Tensor, y: torch.Tensor, args) -> np.ndarray:
    atk = attack(name, model, contract, budget, seed, args)
    adv = torch.cat([atk(unit[i : i + 128], y[i : i + 128]) for i in range(0, len(y), 128)])
    return contract.to_model(adv).numpy()


def method_options(method: str, args, budget: dict, history: Path, max_drop: float | None = None, lr: float | None = None) -> tuple[str, dict[str, str]]:
    """The method and its options; ``max_drop`` overrides ``--max-clean-drop`` (the equal-clean-cost limit of the
    peers), ``lr`` is one value of ``--peer-lrs``."""
    drop = str(args.max_clean_drop if max_drop is None else max_drop)
    if method == "dare":
        return "dare", {"history": str(history), "eps": str(budget["linf"]), "epochs": str(args.dare_epochs),
                        "select_size": "256", "lrs": args.dare_lrs, "select_max_drop": drop,
                        "select_protocol": args.dare_select, "cut_layer": args.dare_cuts, "slice_keep": args.dare_keeps}
    lr_opt = {} if lr is None else {"lr": repr(lr)}
    if method == "finetune":
        return "finetune", {"epochs": str(args.epochs), "batch_size": "64", "perturb_prob": "0", "max_clean_drop": drop, **lr_opt}
    atk = method.rsplit("-", 1)[1]
    opts = {"attack": atk, "epochs": str(args.epochs), "batch_size": "64", "calib_attack_size": "128",
            "max_clean_drop": drop, **lr_opt}
    if atk == "cw":
        opts.update(eps=str(budget["l2"]), steps=str(args.peer_cw_steps))
    else:
        opts.update(eps=str(budget["linf"]), steps=str(args.peer_pgd_steps), step_size=str(budget["linf"] / 4))
    return "adversarial-training", opts


def peer_value(info: dict) -> float:
    """A peer run's calibration score at the epoch it kept: the training loop's own (clean + perturbed or attacked) / 2."""
    return float(info["history"][info["best_epoch"]]["mixed"])


def run_seed(seed: int, work: Path, pool: ArrayDataset, test: ArrayDataset, contract: InputContract, args) -> dict:
    """``work``: the seed's history directory (final.onnx, history/)."""
    import converters

    budget = BUDGETS[args.dataset]
    final = work / "final.onnx"
    train, calib = pool.split(args.calib_share, seed=seed)
    unit = contract.to_unit(test.x)
    y = torch.as_tensor(test.y)
    x_clean = contract.to_model(unit).numpy()
    original = converters.convert(final).gm.eval()
    transfer = {a: craft(a, original, contract, budget, seed, unit, y, args) for a in ATTACKS}  # crafted once, on the original
    corrupted = ({c: contract.to_model(corrupt(c, unit, args.c_severity, seed=seed)).numpy() for c in CIFAR10C}
                 if args.c_severity else {})  # corrupted once per seed, shared by every model
    rows: dict[str, dict] = {}
    preds: dict[str, np.ndarray] = {}

    def score(name: str, path: Path, model, repair_s: float, info: dict | None = None) -> None:
        sess = session(path)
        pred = np.concatenate([sess.run(None, {"input": x_clean[i : i + 256]})[0].argmax(1) for i in range(0, len(x_clean), 256)])
        preds[name] = pred
        row = {"clean": ort_accuracy(sess, x_clean, test.y), "repair_s": repair_s,
               "agree_original": float((pred == preds["original"]).mean()),  # how far the repair moved the model's decisions
               "transfer": {a: ort_accuracy(sess, transfer[a], test.y) for a in ATTACKS},
               "whitebox": {a: (ort_accuracy(sess, transfer[a], test.y) if name == "original"
                                else ort_accuracy(sess, craft(a, model, contract, budget, seed, unit, y, args), test.y)) for a in ATTACKS}}
        if corrupted:
            row["c10c"] = {c: ort_accuracy(sess, xc, test.y) for c, xc in corrupted.items()}
            row["c10c_mean"] = float(np.mean(list(row["c10c"].values())))
        if info is not None:
            row["info"] = info
        rows[name] = row
        print(f"[seed {seed}] {name}: clean {row['clean']:.3f} transfer " + " ".join(f"{a} {row['transfer'][a]:.3f}" for a in ATTACKS)
              + " white-box " + " ".join(f"{a} {row['whitebox'][a]:.3f}" for a in ATTACKS) + (f" c10c mean {row['c10c_mean']:.3f}" if corrupted else "") + f" ({repair_s:.0f} s)", file=sys.stderr)

    score("original", final, original, 0.0)
    calib_x = contract.to_model(contract.to_unit(calib.x)).numpy()
    calib_acc = lambda path: ort_accuracy(session(path), calib_x, calib.y)  # noqa: E731  (the full calibration split)
    rows["original"]["calib_clean"] = calib_acc(final)
    peer_drop = None  # the equal-clean-cost limit of the peers, set by DARE's calibration drop
    for method in args.methods:
        drop = peer_drop if (method != "dare" and peer_drop is not None) else None
        lrs = [None] if method == "dare" else [float(v) for v in args.peer_lrs.split(",") if v.strip()]
        t = time.perf_counter()
        tried = []
        for lr in lrs:  # the peers' lr chosen on the calibration rows (their own score at their kept epoch), ties to the first
            name, opts = method_options(method, args, budget, work / "history", drop, lr)
            cfg = make_config(get(name), opts)
            prep = stages.prepare(final, name, train, splits=(train, calib, test), contract=contract, config=cfg, device="cpu", seed=seed)
            out = stages.run(prep)
            if lr is not None:
                tried.append({"lr": lr, "best_epoch": out.info["best_epoch"], "calib_mixed": peer_value(out.info),
                              "calib_clean": out.info["history"][out.info["best_epoch"]]["calib_clean"]})
            if len(tried) <= 1 or tried[-1]["calib_mixed"] > max(r["calib_mixed"] for r in tried[:-1]) + 1e-12:
                kept = (prep, out)
        prep, out = kept
        repair_s = time.perf_counter() - t  # the whole lr grid (DARE: its whole cut x share x lr grid)
        exported = stages.export(prep, out, exporter="legacy")
        path = work / f"{args.model_prefix}_seed{seed}_{method}.onnx"  # named after --out: runs never overwrite each other's files
        onnx.save(exported.model, str(path))
        keep = ("cut", "cut_shape", "mining", "targets", "tuning", "choice", "slice", "history", "best_epoch", "attack")
        info = {k: v for k, v in out.info.items() if k in keep}
        if "choice" in info:
            info["choice"] = {**info["choice"], "runs": [{k: v for k, v in r.items() if k != "loss"} for r in info["choice"]["runs"]]}
        if tried:
            info["lr_grid"] = tried
            info["lr"] = tried[[r["calib_mixed"] for r in tried].index(max(r["calib_mixed"] for r in tried))]["lr"]
            info["max_clean_drop"] = args.max_clean_drop if drop is None else drop
        score(method, path, out.model.eval(), repair_s, info)
        rows[method]["calib_clean"] = calib_acc(path)
        if method == "dare" and args.equal_clean_cost:
            # the peers may lose what DARE lost on the calibration rows, at least the retention limit
            peer_drop = max(args.max_clean_drop, 100 * (rows["original"]["calib_clean"] - rows["dare"]["calib_clean"]))
    return rows


def aggregate(per_seed: list[dict]) -> dict:
    names = list(per_seed[0])
    out = {}
    for n in names:
        def ms(get):
            v = np.array([get(r[n]) for r in per_seed], dtype=float)
            return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}
        out[n] = {"clean": ms(lambda r: r["clean"]), "repair_s": ms(lambda r: r["repair_s"]),
                  "transfer": {a: ms(lambda r, a=a: r["transfer"][a]) for a in ATTACKS},
                  "whitebox": {a: ms(lambda r, a=a: r["whitebox"][a]) for a in ATTACKS}}
        if all("c10c_mean" in r[n] for r in per_seed):
            out[n]["c10c_mean"] = ms(lambda r: r["c10c_mean"])
            out[n]["c10c"] = {c: ms(lambda r, c=c: r["c10c"][c]) for c in per_seed[0][n]["c10c"]}
    return out


def choices(per_seed: list[dict], seeds: list[int]) -> str:
    """One line per seed: what DARE mined and chose, and the epoch each peer kept (all chosen on calibration rows)."""
    lines = []
    for s, rows in zip(seeds, per_seed):
        parts = []
        for m, r in rows.items():
            info = r.get("info") or {}
            cal = (f", calib clean {100 * (r['calib_clean'] - rows['original']['calib_clean']):+.1f}"
                   if "calib_clean" in r and "calib_clean" in rows.get("original", {}) else "")
            if "mining" in info:
                mi, ch = info["mining"], info.get("choice", {})
                grid = f" cut {ch['cut']} share {ch['slice_keep']:g}" if "cut" in ch else ""
                parts.append(f"dare accepted {mi['accepted']}/{mi['pool']},{grid} lr {ch.get('lr')} epoch {ch.get('epoch')}{cal}")
            elif "best_epoch" in info:
                lr = f" lr {info['lr']:g}" if "lr" in info else ""
                lim = f" (limit {info['max_clean_drop']:.2g})" if "max_clean_drop" in info else ""
                parts.append(f"{m}{lr} epoch {info['best_epoch']}{cal}{lim}")
        if parts:
            lines.append(f"# seed {s}: " + "; ".join(parts))
    return "\n".join(lines)


def diagnostics(per_seed: list[dict]) -> str:
    """Per method, mean over seeds: clean change on the calibration rows (what every choice saw) and on the test
    images, and the share of test images whose predicted class equals the original model's (how far it moved)."""
    if not all("calib_clean" in r.get("original", {}) for r in per_seed):
        return ""
    lines = ["| model | calib clean change pts | test clean change pts | test predictions = original's % |", "|---|---|---|---|"]
    for m in per_seed[0]:
        if m == "original":
            continue
        cal = np.array([100 * (r[m]["calib_clean"] - r["original"]["calib_clean"]) for r in per_seed])
        tst = np.array([100 * (r[m]["clean"] - r["original"]["clean"]) for r in per_seed])
        agr = np.array([100 * r[m].get("agree_original", np.nan) for r in per_seed])
        lines.append(f"| {m} | {cal.mean():+.1f} ({' '.join(f'{v:+.1f}' for v in cal)}) | {tst.mean():+.1f} "
                     f"({' '.join(f'{v:+.1f}' for v in tst)}) | {agr.mean():.1f} |")
    return "\n".join(lines)


def table(agg: dict) -> tuple[str, dict]:
    methods = [m for m in agg if m != "original"]
    def top(get) -> set[str]:  # every repair whose mean equals the column's best (a tie is no one's win)
        hi = max(get(m) for m in methods)
        return {m for m in methods if get(m) >= hi - 1e-12}

    best = {p: {a: top(lambda m, p=p, a=a: agg[m][p][a]["mean"]) for a in ATTACKS} for p in ("transfer", "whitebox")}
    has_c = all("c10c_mean" in agg[m] for m in agg)
    best_c = top(lambda m: agg[m]["c10c_mean"]["mean"]) if has_c else set()
    sole = lambda b: b == {"dare"}  # noqa: E731
    cell = lambda d: f"{100 * d['mean']:5.1f} ± {100 * d['std']:4.1f}"
    head = f"| {'model':12s} | {'clean %':13s} | " + " | ".join(f"{p[:5]} {a:4s} %{'':4s}" for p in ("transfer", "whitebox") for a in ATTACKS) + f" | {'c10c mean %':14s} | repair s |"
    lines = [head, "|" + "---|" * (len(ATTACKS) * 2 + 4)]
    for m in agg:
        parts = [cell(agg[m]["clean"])]
        for p in ("transfer", "whitebox"):
            for a in ATTACKS:
                mark = "*" if m in best[p][a] else " "
                parts.append(cell(agg[m][p][a]) + mark)
        parts.append(cell(agg[m]["c10c_mean"]) + ("*" if m in best_c else " ") if has_c else f"{'n/a':14s}")
        lines.append(f"| {m:12s} | " + " | ".join(parts) + f" | {agg[m]['repair_s']['mean']:8.1f} |")
    base = agg["original"]["clean"]["mean"]
    verdict = {
        "dare_clean_change_points": 100 * (agg["dare"]["clean"]["mean"] - base) if "dare" in agg else None,
        "dare_best_transfer_cells": sum(sole(best["transfer"][a]) for a in ATTACKS),
        "dare_best_whitebox_cells": sum(sole(best["whitebox"][a]) for a in ATTACKS),
        "dare_tied_best_transfer_cells": sum("dare" in best["transfer"][a] and not sole(best["transfer"][a]) for a in ATTACKS),
        "transfer_margin_points": {a: 100 * (agg["dare"]["transfer"][a]["mean"] - max(agg[m]["transfer"][a]["mean"] for m in methods if m != "dare"))
                                   for a in ATTACKS} if "dare" in agg and len(methods) > 1 else None,
        "cells_per_protocol": len(ATTACKS),
        "dare_best_c10c_mean": sole(best_c) if has_c else None,
        "c10c_mean_change_points": ({m: 100 * (agg[m]["c10c_mean"]["mean"] - agg["original"]["c10c_mean"]["mean"]) for m in methods}
                                    if has_c else None),
        "clean_change_points": {m: 100 * (agg[m]["clean"]["mean"] - base) for m in methods},
    }
    verdict["target_clean_change_ge_0"] = verdict["dare_clean_change_points"] is not None and verdict["dare_clean_change_points"] >= 0
    verdict["target_best_in_60pct_transfer_cells"] = verdict["dare_best_transfer_cells"] >= 0.6 * len(ATTACKS)
    lines.append("* = best mean among the repairs in that column (a tie stars every tied repair and counts as no win)"
                 + ("" if has_c else "; c10c mean n/a: this run did not score the corruptions"))
    return "\n".join(lines), verdict


def merge(paths: list[Path], out: Path | None) -> int:
    """One table from result JSONs that ran the same command for different seeds (e.g. one process per seed, each
    started when its history was trained): per-seed rows concatenated in seed order, then aggregated as one run."""
    runs = [json.loads(p.read_text()) for p in paths]
    strip = lambda r: {k: v for k, v in r["settings"].items() if k not in ("seeds", "out", "merge", "shared_history", "model_prefix")}  # noqa: E731
    if any(strip(r) != strip(runs[0]) for r in runs):
        raise SystemExit("dare.py --merge: the runs differ in settings other than --seeds/--out")
    shared = any(r["settings"].get("shared_history") for r in runs)
    if shared and any(not r["settings"].get("shared_history") and r["seeds"] != [0] for r in runs):
        # seed 0 repairs seed 0's history with or without --shared-history; any other seed would differ
        raise SystemExit("dare.py --merge: runs with and without --shared-history mixed beyond seed 0")
    if shared:
        runs.sort(key=lambda r: not r["settings"].get("shared_history"))  # the command and setup lines of a shared run
    pairs = sorted((s, row) for r in runs for s, row in zip(r["seeds"], r["per_seed"]))
    seeds = [s for s, _ in pairs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"dare.py --merge: a seed appears twice ({seeds})")
    per_seed = [row for _, row in pairs]
    agg = aggregate(per_seed)
    txt, verdict = table(agg)
    cmd = runs[0]["command"].replace(f"--seeds {runs[0]['settings']['seeds']}", "--seeds " + ",".join(map(str, seeds)))
    if runs[0]["settings"].get("out"):
        cmd = cmd.replace(f" --out {runs[0]['settings']['out']}", "")
    cmd_note = f"(run as {len(runs)} processes, one per seed, merged with bench/dare.py --merge)"
    setup = runs[0]["setup"].replace(f"seeds {runs[0]['seeds']}", f"seeds {seeds}")
    hists = {k: v for r in runs for k, v in r.get("histories", {}).items()}
    setup = setup.split("\n# seed ")[0] + "\n# " + "; ".join(
        f"seed {s} test acc per epoch " + " ".join(f"{100 * e['test_accuracy']:.1f}" for e in hists[str(s)]["epochs"])
        for s in seeds if str(s) in hists)
    out = out or paths[0].with_name(f"dare_{runs[0]['dataset']}.json")
    payload = {**runs[0], "command": cmd, "merged_from": [str(p) for p in paths], "seeds": seeds, "histories": hists,
               "per_seed": per_seed, "aggregate": agg, "verdict": verdict, "table": txt, "setup": setup,
               "total_s": sum(r["total_s"] for r in runs)}
    out.write_text(json.dumps(payload, indent=1, default=float))
    diag = diagnostics(per_seed)
    text = ("# " + cmd + "  " + cmd_note + "\n" + setup + "\n" + txt + "\n" + (diag + "\n" if diag else "") + choices(per_seed, seeds)
            + "\n" + json.dumps(verdict) + "\n")
    out.with_suffix(".txt").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "dare")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/dare_<dataset>.json")
    ap.add_argument("--dataset", choices=sorted(CONTRACTS), default="cifar10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-train", type=int, default=4000, help="images the model trains on; the pool gets as many")
    ap.add_argument("--history-epochs", type=int, default=12)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--history-lr", type=float, default=2e-3)
    ap.add_argument("--no-augment", dest="augment", action="store_false", help="train the history without flips and crops")
    ap.add_argument("--shared-history", action="store_true", help="every seed repairs seed 0's model and history")
    ap.add_argument("--max-clean-drop", type=float, default=0.5,
                    help="checkpoint choice of every method: calibration clean-accuracy points an epoch may lose (100: no limit)")
    ap.add_argument("--n-eval", type=int, default=300, help="test images scored (clean and attacked)")
    ap.add_argument("--pool-size", type=int, default=0,
                    help="pool images every method gets (a random subset, the same for every seed; 0: the whole pool)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="result JSONs of the same command run one seed each: write their merged table and exit")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of every peer")
    ap.add_argument("--peer-lrs", default="0.003",
                    help="the peers' SGD learning rates (comma list): each peer runs each, the best calibration score wins")
    ap.add_argument("--equal-clean-cost", action="store_true",
                    help="the peers' clean-drop limit is DARE's calibration clean drop (at least --max-clean-drop); DARE runs first")
    ap.add_argument("--calib-share", type=float, default=0.1, help="share of the pool held out as calibration rows")
    ap.add_argument("--dare-cuts", default="", help="DARE's --cut-layer: one cut or a grid (e.g. default,features_10)")
    ap.add_argument("--dare-keeps", default="0.95", help="DARE's --slice-keep: one share or a grid (e.g. 0.95,0.5)")
    ap.add_argument("--dare-epochs", type=int, default=10)
    ap.add_argument("--dare-lrs", default="1e-5,1e-4,1e-3")
    ap.add_argument("--dare-select", choices=("transfer", "whitebox"), default="transfer",
                    help="DARE's lr/steps choice on the calibration rows: FGSM crafted once on the original (transfer, the "
                         "paper's protocol) or on each tuned epoch (whitebox)")
    ap.add_argument("--pgd-steps", type=int, default=10, help="evaluation PGD steps")
    ap.add_argument("--cw-steps", type=int, default=30, help="evaluation CW steps")
    ap.add_argument("--peer-pgd-steps", type=int, default=5)
    ap.add_argument("--peer-cw-steps", type=int, default=10)
    ap.add_argument("--c-severity", type=int, default=3, help="CIFAR-10-C severity for the corruption column (0: skip)")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--summarise", type=Path, default=None, help="print the table of a (partial) result JSON and exit")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.summarise is not None:
        done = json.loads(args.summarise.read_text())
        txt, verdict = table(aggregate(done["per_seed"]))
        print("# " + done["command"] + f"  (seeds done: {done.get('seeds_done', done.get('seeds'))})")
        print(txt)
        print(json.dumps(verdict))
        return 0
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    torch.set_num_threads(1)  # shared cores
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    kw = dict(n_train=args.n_train, n_test=max(args.n_eval, 1000), epochs=args.history_epochs, width=args.width,
              lr=args.history_lr, augment=args.augment)
    data = None
    dirs = {}
    for s in sorted({0} if args.shared_history else set(seeds)):
        if (args.retrain or not history_ready(args.dataset, args.work, seed=s, **kw)) and data is None:
            data = ensure_data(args.dataset, args.data_dir, args.work, n_train=kw["n_train"], n_test=kw["n_test"])
        dirs[s] = ensure_history(args.dataset, args.data_dir, args.work, seed=s, retrain=args.retrain, data=data, **kw)
    hists = {s: json.loads((d / "history.json").read_text()) for s, d in dirs.items()}
    hist = hists[min(hists)]
    d = np.load(args.work / args.dataset / "data.npz")
    contract = CONTRACTS[args.dataset]
    pool = ArrayDataset(x=d["pool_x"], y=d["pool_y"], name=f"{args.dataset}-pool").limit(args.pool_size or None, seed=0)
    test = ArrayDataset(x=d["test_x"], y=d["test_y"], name=f"{args.dataset}-test").limit(args.n_eval, seed=0)
    cmd = ".venv/bin/python " + " ".join(["bench/dare.py", *(argv if argv is not None else sys.argv[1:])])
    out = args.out or ROOT / "bench" / "results" / f"dare_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args.model_prefix = out.stem
    per_seed = []
    for s in seeds:
        per_seed.append(run_seed(s, dirs[0 if args.shared_history else s], pool, test, contract, args))
        partial = out.with_name(out.stem + ".partial.json")  # what is done so far, if a run is cut short
        partial.write_text(json.dumps({"command": cmd, "seeds_done": seeds[: len(per_seed)], "per_seed": per_seed}, indent=1, default=float))
    agg = aggregate(per_seed)
    txt, verdict = table(agg)
    print("# " + cmd)
    per_epoch = "; ".join(f"seed {s} test acc per epoch " + " ".join(f"{100 * r['test_accuracy']:.1f}" for r in h["epochs"])
                          for s, h in sorted(hists.items()))
    setup = (f"# {args.dataset}: SmallCNN width {hist['width']} trained on {hist['train']} images for {len(hist['epochs'])} epochs "
             f"(Adam lr {hist['lr']:g}, {'flip+crop' if hist.get('augment') else 'no'} augmentation), "
             + ("one shared history (seed 0)" if args.shared_history else "one history per seed, trained with that seed")
             + f", pool {len(pool)} of {hist['pool']}, {len(test)} test images, seeds {seeds}; eps Linf {BUDGETS[args.dataset]['linf']:.4g}, "
             f"CW L2 {BUDGETS[args.dataset]['l2']}; checkpoint choice of every method on the calibration rows within "
             f"{args.max_clean_drop:g} clean points"
             + (f"; c10c: {len(CIFAR10C)} corruptions at severity {args.c_severity}" if args.c_severity else "; c10c skipped")
             + "\n# " + per_epoch)
    print(setup)
    print(txt)
    print(json.dumps(verdict))
    payload = {"command": cmd, "dataset": args.dataset, "history": hist, "histories": {str(s): h for s, h in hists.items()},
               "shared_history": args.shared_history, "seeds": seeds, "budgets": BUDGETS[args.dataset],
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "per_seed": per_seed, "aggregate": agg, "verdict": verdict, "table": txt, "setup": setup,
               "total_s": time.perf_counter() - t0}
    out.write_text(json.dumps(payload, indent=1, default=float))
    chosen = choices(per_seed, seeds)
    print(chosen)
    diag = diagnostics(per_seed)
    out.with_suffix(".txt").write_text("# " + cmd + "\n" + setup + "\n" + txt + "\n" + (diag + "\n" if diag else "") + chosen + "\n"
                                       + json.dumps(verdict) + "\n")
    out.with_name(out.stem + ".partial.json").unlink(missing_ok=True)
    print(f"wrote {out} ({payload['total_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
