"""Train the small CIFAR-10 ResNet that ``bench/archrepair.py`` repairs, and export it to ONNX (legacy exporter,
BatchNorm folded into the convs, as users' exports usually are). Cached under ``bench/work/`` (gitignored).

    .venv/bin/python bench/train_cifar_resnet.py --data-dir ../shared/datasets [--n-train 5000] [--epochs 6]

Architecture (ResNet-style, three stages of one basic block each, as in He et al. 2016's CIFAR ResNets but one
block per stage): stem conv3x3(16)-BN-ReLU; block1 16 ch at 32x32 (identity shortcut); block2 32 ch, stride 2
(1x1 projection shortcut); block3 64 ch, stride 2 (projection); global average pool; dense 10.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from deeppatch import CIFAR_CLASSES, export_to, train_model  # noqa: E402
from memory_models import BasicBlock as Basic  # noqa: E402  (one residual block for the benches' ResNets)
from onnxrepair.data.contract import InputContract  # noqa: E402
from onnxrepair.data.dataset import ArrayDataset  # noqa: E402

CONTRACT = InputContract(scale=255.0, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))



class CifarResNet(nn.Module):
    def __init__(self, w: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block1, self.block2, self.block3 = Basic(w, w, 1), Basic(w, 2 * w, 2), Basic(2 * w, 4 * w, 2)
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def load_cifar(data_dir: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """The same class-balanced subset as ``bench/deeppatch.py``'s ``load_cifar`` (same names, same draw), read in
    one sequential pass over the tarball: its reader extracts members out of order, and every backward seek in a
    gzip stream decompresses from the start again (minutes on shared cores instead of seconds)."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    want = {"train": n_train // 10, "test": n_test // 10}
    rng = np.random.default_rng(seed)
    with tarfile.open(data_dir / "cifar10-jpg.tar.gz", "r:gz") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
    by_key: dict[tuple[str, str], list] = {}
    for m in members:
        by_key.setdefault(tuple(m.name.split("/")[-3:-1]), []).append(m)
    picked: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    order: dict[str, list[str]] = {"train": [], "test": []}
    for split in picked:
        for ci, cls in enumerate(CIFAR_CLASSES):
            ms = by_key.get((split, cls), [])
            for j in rng.permutation(len(ms))[: want[split]]:
                picked[split][ms[j].name] = ci
                order[split].append(ms[j].name)
    images: dict[str, np.ndarray] = {}
    wanted = {**picked["train"], **picked["test"]}
    with tarfile.open(data_dir / "cifar10-jpg.tar.gz", "r|gz") as tf:  # streaming: one pass
        for m in tf:
            if m.name in wanted:
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                images[m.name] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return tuple(ArrayDataset(x=np.stack([images[n] for n in order[s]]), y=np.array([picked[s][n] for n in order[s]], dtype=np.int64),
                              classes=list(CIFAR_CLASSES), name=f"cifar10-{s}") for s in ("train", "test"))


def model_path(work: Path, n_train: int, epochs: int, seed: int) -> Path:
    return work / f"cifar_resnet_n{n_train}_e{epochs}_s{seed}.onnx"


def ensure_model(data_dir: Path, work: Path, n_train: int, epochs: int, seed: int, n_test: int = 1000) -> tuple[Path, dict]:
    """The cached ONNX model and its metadata (test accuracy, training time), training it when missing."""
    path = model_path(work, n_train, epochs, seed)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        return path, json.loads(meta_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    train, test = load_cifar(data_dir, n_train, n_test, seed)
    t = time.perf_counter()
    model = train_model(CifarResNet(), train, CONTRACT, epochs, seed)
    train_s = time.perf_counter() - t
    with torch.no_grad():
        xt = CONTRACT.to_model(CONTRACT.to_unit(test.x))
        acc = float((model(xt).argmax(1).numpy() == test.y).mean())
    export_to(model, CONTRACT.to_model(CONTRACT.to_unit(train.x[:2])), path)
    meta = {"n_train": n_train, "epochs": epochs, "seed": seed, "test_accuracy_torch": acc, "test_images": len(test),
            "train_s": train_s, "optimizer": "Adam 2e-3, one-cycle to 4e-3, batch 64 (bench/deeppatch.py train_model)"}
    meta_path.write_text(json.dumps(meta, indent=2))
    return path, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: shared cores make more threads slower)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path, meta = ensure_model(args.data_dir, args.work, args.n_train, args.epochs, args.seed)
    print(path, json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
