"""Peak memory of ``onnxrepair evaluate`` on an image folder of 50,000 images against a 5,000-image subset of it.

Image folders are read lazily (``onnxrepair.data.lazy``): rows are decoded when a batch needs them, by a bounded
thread pool, with a bounded cache, so the peak resident memory (``/usr/bin/time -f %M``) of evaluating the 50k
folder should be close to that of the 5k folder (target ratio: close to 1). With ``--baseline-pythonpath DIR``
(a checkout of the code before lazy loading, e.g. ``git worktree add /tmp/eager <commit>``) the same commands run
on that code too, for contrast: it decoded every image into one array at load.

    PYTHONPATH=$PWD .venv/bin/python bench/lazy_data.py --folder /tmp/cifar10-jpg/cifar10/train \\
        --data-dir /work/shared/datasets [--baseline-pythonpath /tmp/eager]

The model is the small CIFAR-10 ResNet of ``bench/train_cifar_resnet.py`` (trained and cached under bench/work on
first use; ``--model`` takes another 32x32 RGB model, with ``--contract-flags``). The 5k folder is made of symlinks
to the first 500 files (sorted names) of each class. Each measurement is one ``onnxrepair --threads 1 evaluate``
process: clean accuracy plus one corruption at one severity (two passes over the data), CPU provider.
Writes bench/results/lazy_data.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CIFAR_FLAGS = ["--scale", "255", "--mean", "0.49,0.48,0.45", "--std", "0.25,0.24,0.26"]  # train_cifar_resnet.CONTRACT


def subset_folder(src: Path, dst: Path, per_class: int) -> Path:
    """``dst/<class>/`` holding symlinks to the first ``per_class`` files (sorted names) of each class of ``src``."""
    for cdir in sorted(d for d in src.iterdir() if d.is_dir()):
        out = dst / cdir.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(cdir.iterdir())[:per_class]:
            link = out / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return dst


def measure(model: Path, folder: Path, code: Path, flags: list[str], corruption: str) -> dict:
    """One ``onnxrepair evaluate`` process on the code at ``code``: peak RSS (KB, /usr/bin/time), wall seconds, report."""
    with tempfile.TemporaryDirectory() as tmp:
        rss_file, report = Path(tmp) / "rss", Path(tmp) / "report.json"
        cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), sys.executable, "-m", "onnxrepair", "--threads", "1", "evaluate", str(model),
               "--data", str(folder), "--provider", "cpu", "--device", "cpu", "--no-blur", "--corruptions", corruption, "--severities", "3",
               "-q", "--report", str(report), *flags]
        env = {**os.environ, "PYTHONPATH": str(code)}
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(code))
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"evaluate failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        rep = json.loads(report.read_text())
        peak_kb = int(rss_file.read_text().strip().splitlines()[-1])
    m = rep["models"][0]
    return {"images": rep["n"], "peak_rss_mb": round(peak_kb / 1024, 1), "wall_s": round(wall, 2), "evaluate_s": round(rep["seconds"], 2),
            "images_per_s": round(rep["images_per_s"], 1), "clean": m["clean"], "corruption": m["corruptions"]}


def import_baseline(model: Path, code: Path) -> float:
    """Peak RSS (MB) of a process that only imports what ``evaluate`` imports and opens the model's session: the
    floor under every row (torch's CUDA build alone holds several hundred MB)."""
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        code_line = ("import onnxrepair.cli, onnxrepair.evaluate, converters; from onnxrepair.runtime import make_session; "
                     f"make_session({str(model)!r}, 'cpu')")
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), sys.executable, "-c", code_line],
                       env={**os.environ, "PYTHONPATH": str(code)}, check=True, cwd=str(code))
        return round(int(rss_file.read_text().strip().splitlines()[-1]) / 1024, 1)


def git_commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/cifar10-jpg/cifar10/train"), help="the full image folder (CIFAR-10 train: 50k)")
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"), help="for training the default model")
    ap.add_argument("--model", type=Path, default=None, help="a 32x32 RGB classifier (default: bench/train_cifar_resnet.py's)")
    ap.add_argument("--contract-flags", default=None, help="evaluate's input-contract flags for --model (default: the CIFAR ResNet's)")
    ap.add_argument("--per-class", type=int, default=500, help="files per class in the subset folder (500: 5k for CIFAR-10)")
    ap.add_argument("--corruption", default="gaussian_noise", help="one corruption at severity 3: a second pass over the data")
    ap.add_argument("--baseline-pythonpath", type=Path, default=None, help="also run the code checked out here (the eager loader)")
    ap.add_argument("--baseline-commit", default=None, help="the commit the baseline checkout holds (recorded; a git archive has no .git)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lazy_data")
    args = ap.parse_args(argv)

    if args.model is None:
        import torch

        torch.set_num_threads(1)
        from train_cifar_resnet import ensure_model

        model, _ = ensure_model(args.data_dir, args.work, 5000, 6, 0)
        flags = CIFAR_FLAGS
    else:
        model, flags = args.model, (args.contract_flags or "").split()
    small = subset_folder(args.folder, args.work / f"{args.folder.name}_{args.per_class}_per_class", args.per_class)
    codes = [("lazy", ROOT)] + ([("eager", args.baseline_pythonpath.resolve())] if args.baseline_pythonpath else [])
    rows = []
    floor = {}
    for label, code in codes:
        floor[label] = import_baseline(model, code)
        print(f"{label}: imports + session {floor[label]} MB", flush=True)
        for name, folder in (("subset", small), ("full", args.folder)):
            r = measure(model, folder, code, flags, args.corruption)
            r["above_imports_mb"] = round(r["peak_rss_mb"] - floor[label], 1)
            commit = args.baseline_commit if label == "eager" and args.baseline_commit else git_commit(code)
            r.update(loader=label, commit=commit, folder=name, path=str(folder))
            print(json.dumps(r), flush=True)
            rows.append(r)
    ratios = {}
    for label, _ in codes:
        full = next(r for r in rows if r["loader"] == label and r["folder"] == "full")
        sub = next(r for r in rows if r["loader"] == label and r["folder"] == "subset")
        ratios[label] = {"images": full["images"] / sub["images"], "peak_rss": round(full["peak_rss_mb"] / sub["peak_rss_mb"], 3),
                         "above_imports": round(full["above_imports_mb"] / max(sub["above_imports_mb"], 1e-9), 2),
                         "wall": round(full["wall_s"] / sub["wall_s"], 2)}
    cmd = "PYTHONPATH=$PWD .venv/bin/python bench/lazy_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": cmd, "model": str(model), "contract_flags": flags, "corruption": f"{args.corruption} severity 3", "imports_and_session_mb": floor, "rows": rows,
           "ratio_full_to_subset": ratios, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "cache_mb_default": 64, "decode_workers": "min(4, CPUs available)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Peak memory of `onnxrepair evaluate`: 50k-image folder vs a 5k subset", "",
             f"Model: `{model.name}` (32x32 RGB). Each row is one `onnxrepair --threads 1 evaluate` process, CPU provider, clean accuracy "
             f"plus {args.corruption} at severity 3 (two passes over the images); peak RSS from `/usr/bin/time -f %M`.", "",
             "'above imports' subtracts the peak of a process that only imports what evaluate imports and opens the session "
             f"({', '.join(f'{k}: {v} MB' for k, v in floor.items())}; torch's CUDA build is most of it).", "",
             "| loader (commit) | folder | images | peak RSS MB | above imports MB | wall s | evaluate s | images/s | clean acc |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['loader']} ({r['commit']}) | {r['folder']} | {r['images']} | {r['peak_rss_mb']} | {r['above_imports_mb']} | {r['wall_s']} | "
                     f"{r['evaluate_s']} | {r['images_per_s']} | {r['clean']:.4f} |")
    lines += ["", "Ratio full / subset (10x the images):", ""]
    lines += [f"- {k}: peak RSS x{v['peak_rss']} (above imports x{v['above_imports']}), wall time x{v['wall']}" for k, v in ratios.items()]
    lines += ["", "Reproduce:", "", f"    {cmd}", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
