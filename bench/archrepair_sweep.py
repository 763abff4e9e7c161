"""Choose ArchRepair's settings on a validation split, never on test images.

    .venv/bin/python bench/archrepair_sweep.py --data-dir ../shared/datasets --n-train 10000 --pretrain-epochs 15 \\
        --configs 'base:;kd1:kd=1;arch:arch_lr=0.03,warm_logit=1,none_logit=0'

Same model, repair data and calibration split as ``bench/archrepair.py`` (``--repair-train`` of the model's training
images; ``--n-calib`` held-out calibration images); the **validation** images are the ``--n-val`` CIFAR-10
*training-split* images outside the model's training subset that come before the calibration ones
(``bench/archrepair.py``'s ``heldout``): the model never trained on them, the repair never sees them, and they are
not test images. Each config (``label:``
then ``field=value`` pairs of :class:`ArchRepairConfig`, ``;`` between configs; values as on the command line,
``+`` between tuple items) runs the method in torch (no export; the bench measures the exported files) and is scored
on the validation images: clean, the targeted corruption and the mean over the 15 CIFAR-10-C corruptions at
``--severity``. Rule: among configs losing at most 0.5 points of validation clean accuracy, the highest mean of
(target gain, mean-15 gain); the table says which. Writes JSON + a table next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from archrepair import heldout  # noqa: E402
from train_cifar_resnet import CONTRACT, ensure_model, load_cifar  # noqa: E402

from onnxrepair import methods  # noqa: E402
from onnxrepair.nn import first_output  # noqa: E402
from onnxrepair.perturb.corruptions import CIFAR10C  # noqa: E402


def val_sets(val, target: str, severity: int, seed: int) -> dict[str, torch.Tensor]:
    from onnxrepair.perturb import corruptions as reg

    unit = CONTRACT.to_unit(val.x)
    out = {"clean": unit}
    for c in CIFAR10C:
        out[c] = reg.apply(c, unit, severity, seed)
    return {k: CONTRACT.to_model(v) for k, v in out.items()}


@torch.no_grad()
def scores(model, sets: dict[str, torch.Tensor], y: np.ndarray, target: str) -> dict[str, float]:
    yt = torch.as_tensor(y)
    acc = {}
    for k, x in sets.items():
        out = torch.cat([first_output(model(x[i : i + 500])) for i in range(0, len(x), 500)])
        acc[k] = float((out.argmax(1) == yt).float().mean())
    return {"clean": acc["clean"], "target": acc[target], "mean15": float(np.mean([acc[c] for c in CIFAR10C]))}


def parse_configs(text: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        label, _, rest = part.partition(":")
        opts = {}
        for kv in filter(None, (s.strip() for s in rest.split(","))):
            k, _, v = kv.partition("=")
            opts[k.strip()] = v.strip().replace("+", ",")
        out.append((label.strip(), opts))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "archrepair_sweep.json")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--repair-train", type=int, default=3000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--n-calib", type=int, default=1000, help="held-out calibration images, after the validation ones")
    ap.add_argument("--target", default="gaussian_noise")
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--common", default="", help="options every config gets (field=value,...)")
    ap.add_argument("--configs", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import converters
    from onnxrepair.methods import RepairInputs

    orig, meta = ensure_model(args.data_dir, args.work, args.n_train, args.pretrain_epochs, args.seed)
    tr_all, _ = load_cifar(args.data_dir, args.n_train, 10, args.seed)
    val = heldout(args.data_dir, args.work, args.n_train, 0, args.n_val, args.seed)
    train = tr_all.limit(args.repair_train, seed=args.seed + 2)
    calib = heldout(args.data_dir, args.work, args.n_train, args.n_val, args.n_calib, args.seed)
    t = time.perf_counter()
    sets = val_sets(val, args.target, args.severity, args.seed)
    print(f"[sweep] {len(val)} validation images, corrupted in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    conv = converters.convert(str(orig))
    base_scores = scores(conv.gm.eval(), sets, val.y, args.target)
    spec = methods.get("archrepair")
    common = dict(parse_configs("c:" + args.common)[0][1]) if args.common else {}
    common = {"corruptions": args.target, "severities": str(args.severity), **common}
    rows = [{"label": "original", **base_scores, "seconds": 0.0, "options": {}}]
    for label, opts in parse_configs(args.configs):
        o = {**common, **opts}
        cfg = methods.make_config(spec, o)
        inputs = RepairInputs(model=converters.convert(str(orig)).gm, contract=CONTRACT, train=train, calib=calib,
                              output_kind="logits", device=torch.device("cpu"), seed=args.seed)
        t = time.perf_counter()
        out = spec.fn(inputs, cfg)
        sec = time.perf_counter() - t
        sc = scores(out.model.eval(), sets, val.y, args.target)
        info = out.info
        row = {"label": label, **sc, "seconds": sec, "options": opts,
               "edges": ", ".join(f"{e['edge']} {e['op']}" for e in info["edges"] if "dropped" not in e["op"]),
               "search_best_epoch": info.get("search_best_epoch"), "finetune_best_epoch": info.get("finetune_best_epoch"),
               "alpha_trajectory": info.get("alpha_trajectory"), "op_grad": [h.get("op_grad") for h in info["history"]["search"]],
               "calib": info["calib_accuracy"], "timings": info["seconds"]}
        rows.append(row)
        print(f"[sweep] {label}: clean {sc['clean']:.4f} target {sc['target']:.4f} mean15 {sc['mean15']:.4f} "
              f"{sec:.0f}s {row['edges']}", file=sys.stderr)
    b = rows[0]
    for r in rows[1:]:
        r["d_clean"] = 100 * (r["clean"] - b["clean"])
        r["d_target"] = 100 * (r["target"] - b["target"])
        r["d_mean15"] = 100 * (r["mean15"] - b["mean15"])
        r["eligible"] = r["d_clean"] >= -0.5
        r["value"] = (r["d_target"] + r["d_mean15"]) / 2
    cand = [r for r in rows[1:] if r["eligible"]] or rows[1:]
    best = max(cand, key=lambda r: r["value"])["label"] if cand else None
    head = f"{'config':<14} {'clean':>6} {'Δclean':>7} {'Δtarget':>8} {'Δmean15':>8} {'value':>6} {'sec':>5}  cell / options"
    lines = [f"validation: {len(val)} CIFAR-10 training-split images outside the model's training subset; target {args.target} "
             f"severity {args.severity}; common {common}", head, "-" * len(head)]
    lines.append(f"{'original':<14} {b['clean']:>6.4f} {0:>+7.2f} {0:>+8.2f} {0:>+8.2f} {'':>6} {0:>5.0f}")
    for r in rows[1:]:
        mark = "*" if r["label"] == best else ("" if r["eligible"] else "x")
        lines.append(f"{r['label'] + mark:<14} {r['clean']:>6.4f} {r['d_clean']:>+7.2f} {r['d_target']:>+8.2f} {r['d_mean15']:>+8.2f} "
                     f"{r['value']:>6.2f} {r['seconds']:>5.0f}  {r['edges']} | {r['options']}")
    lines.append("* chosen: highest mean of Δtarget and Δmean15 among configs losing ≤ 0.5 pt clean (x: lost more)")
    cmd = "python bench/archrepair_sweep.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines.append(f"reproduce: {cmd}")
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(args.out.read_text()) if args.out.exists() else {}
    prev.setdefault("runs", [])
    prev["runs"].append({"reproduce": cmd, "model": meta, "rows": rows, "chosen": best, "common": common})
    args.out.write_text(json.dumps(prev, indent=2, default=str))
    with open(args.out.with_suffix(".txt"), "a") as f:
        f.write(text + "\n\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
