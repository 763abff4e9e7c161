"""DeepPatch from a 78k-parameter CIFAR ResNet to an 11M-parameter CIFAR ResNet-18 (issue 14 item 4), on CPU.

    .venv/bin/python bench/deeppatch_scale.py --data-dir /work/shared/datasets

Same settings for both models (the pipeline's own stages, 1 torch thread): ``--n-repair`` CIFAR-10 training images,
one epoch, ``--assess-samples`` calibration images for the filter assessment, gate ``input``, deploy ``switch``
(DeepPatch's defaults otherwise). Per run: assessment, training and calibration seconds (DeepPatch's own
``info.seconds``), the whole repair's wall time, and the latency ratio repaired/original of the exported files on
onnxruntime (CPU, 1 thread, A B B A interleaved, 20th percentile of each side) at batch 1 and 64, clean inputs.

Models: the 78k ResNet of ``bench/train_cifar_resnet.py`` (the ``--full`` base when cached, else the subset one: the
costs measured here do not depend on what the weights learned) and ``bench/memory_models.py``'s ResNet-18 (random
weights, BatchNorm statistics settled, exported by PyTorch's legacy exporter): training a ResNet-18 does not fit the
shared CPU, and time and latency depend on the architecture, not on the weights; its accuracies are meaningless.

Filter assessment is measured two ways: ``featswap`` (DeepPatch's, cost ~ filters x suffix per sample) and ``taylor``
(its first-order estimate, ~3 model passes per sample). On the ResNet-18, featswap's full run does not fit the
budget, so its cost is measured on ``--featswap-probe`` samples (all convs, ``assess_filters`` directly) and scaled
linearly to ``--assess-samples`` (the cost is exactly linear in the number of samples).
"""

from __future__ import annotations

import argparse
import dataclasses
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

from onnxrepair import repair as stages  # noqa: E402
from onnxrepair.data.dataset import ArrayDataset  # noqa: E402
from onnxrepair.methods import get  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work" / "scale"


def models() -> dict[str, Path]:
    import memory_models

    work = ROOT / "bench" / "work"
    small = sorted(work.glob("cifar_resnet_full_w16_*.onnx")) or sorted(work.glob("cifar_resnet_n*.onnx"))
    if not small:
        raise SystemExit("no cached 78k CIFAR ResNet under bench/work: run bench/train_cifar_resnet.py first")
    return {"resnet78k": small[0], "resnet18": memory_models.export("resnet18_cifar", work / "models")}


def splits(data_dir: Path, n_repair: int, n_calib: int) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
    import train_cifar_resnet as tcr

    data = tcr.load_cifar_all(data_dir, ROOT / "bench" / "work")
    tr, held = tcr.train_val_split(data["y_train"], seed=0)
    rng = np.random.default_rng(0)
    pick, held = np.sort(rng.permutation(tr)[:n_repair]), rng.permutation(held)
    part = lambda idx, name: ArrayDataset(x=data["x_train"][idx], y=data["y_train"][idx], classes=list(tcr.CIFAR_CLASSES), name=name)  # noqa: E731
    return part(pick, "repair"), part(np.sort(held[:n_calib]), "calib"), part(np.sort(held[n_calib : n_calib + 64]), "held")


def latency(orig: Path, new: Path, x: np.ndarray, rounds: dict[int, int]) -> dict:
    from deeppatch_latency import session

    sa, sb = session(orig), session(new)
    na, nb = sa.get_inputs()[0].name, sb.get_inputs()[0].name
    out = {}
    for b, reps in rounds.items():
        f = np.ascontiguousarray(x[:b])
        sa.run(None, {na: f}), sb.run(None, {nb: f})
        ta, tb = [], []
        for _ in range(reps):
            t0 = time.perf_counter(); sa.run(None, {na: f}); t1 = time.perf_counter()
            sb.run(None, {nb: f}); t2 = time.perf_counter()
            sb.run(None, {nb: f}); t3 = time.perf_counter()
            sa.run(None, {na: f}); t4 = time.perf_counter()
            ta.append(((t1 - t0) + (t4 - t3)) / 2), tb.append(((t2 - t1) + (t3 - t2)) / 2)
        out[f"b{b}"] = {"orig_ms": float(np.percentile(ta, 20) * 1e3), "rep_ms": float(np.percentile(tb, 20) * 1e3),
                        "ratio": float(np.percentile(tb, 20) / np.percentile(ta, 20))}
    return out


def repair_once(name: str, model: Path, data: tuple, assess: str, args) -> dict:
    repair, calib, held = data
    cfg = dataclasses.replace(get("deeppatch").config_cls(), epochs=1, assess=assess, assess_samples=args.assess_samples,
                              assess_batch=args.assess_batch, batch_size=args.batch_size, gate="input", deploy="switch")
    t = time.perf_counter()
    prep = stages.prepare(model, "deeppatch", repair, splits=(repair, calib, held), config=cfg, device="cpu", seed=0)
    out = stages.run(prep)
    wall = time.perf_counter() - t
    path = WORK / f"{name}_{assess}.onnx"
    onnx.save(stages.export(prep, out, exporter="legacy").model, str(path))
    x = prep.contract.to_model(prep.contract.to_unit(held.x)).numpy().astype(np.float32)
    lat = latency(model, path, x, {1: args.rounds_b1, 64: args.rounds_b64})
    info = out.info
    return {"model": name, "file": str(model.relative_to(ROOT)), "assess": assess, "params_original": info["params_original"],
            "params_added": info["params_added"], "layers_patched": len(info["layers_patched"]), "seconds": info["seconds"],
            "repair_wall_s": wall, "latency": lat, "latency_ratio": {k: v["ratio"] for k, v in lat.items()},
            "routing_calib": info["routing_calib"], "calib_accuracy": info.get("calib_accuracy")}


def featswap_probe(model: Path, data: tuple, n: int) -> dict:
    """featswap's assessment cost on ``n`` samples, all convs, measured directly (no training)."""
    from converters.convert import convert
    from onnxrepair.data.contract import InputContract
    from onnxrepair.localize.filters import assess_filters, conv_nodes
    from onnxrepair.perturb.blur import gaussian_blur

    gm = convert(str(model)).gm.eval()
    contract = InputContract(scale=255.0, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    repair = data[1]
    unit = contract.to_unit(repair.x[:n])
    clean, pert = contract.to_model(unit), contract.to_model(gaussian_blur(unit, 2.0))
    y = torch.as_tensor(repair.y[:n])
    t = time.perf_counter()
    assess_filters(gm, clean, pert, y, method="featswap", batch_size=n)
    s = time.perf_counter() - t
    return {"samples": n, "seconds": s, "filters": sum(c.out_channels for _, c in conv_nodes(gm)), "per_sample_s": s / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("/work/shared/datasets"))
    ap.add_argument("--n-repair", type=int, default=512)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--assess-samples", type=int, default=64)
    ap.add_argument("--assess-batch", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--featswap-probe", type=int, default=2, help="ResNet-18 featswap: samples actually assessed")
    ap.add_argument("--rounds-b1", type=int, default=40)
    ap.add_argument("--rounds-b64", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "deeppatch_scale")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    WORK.mkdir(parents=True, exist_ok=True)
    data = splits(args.data_dir, args.n_repair, args.n_calib)
    paths = models()
    runs = []
    for name, assess in (("resnet78k", "featswap"), ("resnet78k", "taylor"), ("resnet18", "taylor")):
        r = repair_once(name, paths[name], data, assess, args)
        runs.append(r)
        print(json.dumps({k: r[k] for k in ("model", "assess", "seconds", "repair_wall_s", "latency_ratio")}), file=sys.stderr, flush=True)
    probe = featswap_probe(paths["resnet18"], data, args.featswap_probe)
    probe["extrapolated_assess_s"] = probe["per_sample_s"] * args.assess_samples
    small_probe = featswap_probe(paths["resnet78k"], data, args.featswap_probe)
    by = {(r["model"], r["assess"]): r for r in runs}
    a, b = by[("resnet78k", "taylor")], by[("resnet18", "taylor")]
    growth = {"params": b["params_original"] / a["params_original"],
              **{f"{k}_s": b["seconds"][k] / max(a["seconds"][k], 1e-9) for k in ("assess", "train", "calibrate", "total")},
              "latency_ratio_b1": [a["latency_ratio"]["b1"], b["latency_ratio"]["b1"]],
              "latency_ratio_b64": [a["latency_ratio"]["b64"], b["latency_ratio"]["b64"]],
              "featswap_per_sample_s": probe["per_sample_s"] / small_probe["per_sample_s"]}
    lines = [f"`{' '.join(['.venv/bin/python', *sys.argv])}`", "",
             f"{args.n_repair} repair images, 1 epoch, {args.assess_samples} assessment samples, batch {args.batch_size}, gate input, "
             "deploy switch, 1 torch thread, onnxruntime CPU 1 thread; shared cores (load noted in the bench notes).", "",
             "| model | params | assess | assess s | train s | calibrate s | method s | repair wall s | latency b1 | latency b64 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["seconds"]
        lines.append(f"| {r['model']} | {r['params_original'] / 1e6:.2f}M | {r['assess']} | {s['assess']:.1f} | {s['train']:.1f} | "
                     f"{s['calibrate']:.1f} | {s['total']:.1f} | {r['repair_wall_s']:.1f} | {r['latency_ratio']['b1']:.2f}× | {r['latency_ratio']['b64']:.2f}× |")
    lines.append(f"| resnet18 | {b['params_original'] / 1e6:.2f}M | featswap (probe: {probe['samples']} samples, "
                 f"{probe['seconds']:.1f} s; x{args.assess_samples}) | ~{probe['extrapolated_assess_s']:.0f} (extrapolated) | | | | | | |")
    lines += ["", f"featswap per sample: {small_probe['per_sample_s']:.3f} s (78k, {small_probe['filters']} filters) -> "
              f"{probe['per_sample_s']:.1f} s (ResNet-18, {probe['filters']} filters): x{growth['featswap_per_sample_s']:.0f}",
              f"growth 78k -> ResNet-18 (taylor): parameters x{growth['params']:.0f}, assess x{growth['assess_s']:.1f}, "
              f"train x{growth['train_s']:.1f}, calibrate x{growth['calibrate_s']:.1f}, method x{growth['total_s']:.1f}"]
    txt = "\n".join(lines)
    print(txt)
    args.out.with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                                                         "runs": runs, "featswap_probe": {"resnet18": probe, "resnet78k": small_probe},
                                                         "growth": growth}, indent=1, default=float))
    args.out.with_suffix(".md").write_text("# DeepPatch at scale: 78k CIFAR ResNet -> 11M ResNet-18 (issue 14 item 4)\n\n" + txt + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
