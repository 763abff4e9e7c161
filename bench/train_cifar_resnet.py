"""Train the small CIFAR-10 ResNet that ``bench/archrepair.py`` repairs, and export it to ONNX (legacy exporter,
BatchNorm folded into the convs, as users' exports usually are). Cached under ``bench/work/`` (gitignored).

    .venv/bin/python bench/train_cifar_resnet.py --data-dir ../shared/datasets [--n-train 5000] [--epochs 6]
    .venv/bin/python bench/train_cifar_resnet.py --data-dir ../shared/datasets --full [--epochs 10] [--width 16]

``--full``: the properly trained base (``bench/deeppatch_pareto.py``): all CIFAR-10 training images but a held-out
validation split of 500 per class (45,000 train / 5,000 validation, seeded), random crop (4-pixel zero padding) and
horizontal flip, SGD (momentum 0.9, Nesterov, weight decay 5e-4) under a one-cycle learning rate peaking at 0.2,
batch 128. Test accuracy is measured on all 10,000 test images. The decoded images are cached as one ``.npz``.

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

import numpy as np
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


# ------------------------------------------------------------------ the full-data base (--full)
def load_cifar_all(data_dir: Path, work: Path) -> dict[str, np.ndarray]:
    """All 60,000 images, decoded once in one streaming pass over the tarball and cached as ``cifar10_all.npz``:
    ``x_train``/``y_train`` (50,000, in class then file-name order) and ``x_test``/``y_test`` (10,000)."""
    import io
    import tarfile

    from PIL import Image

    cache = work / "cifar10_all.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    found: dict[str, list[tuple[str, np.ndarray, int]]] = {"train": [], "test": []}
    with tarfile.open(data_dir / "cifar10-jpg.tar.gz", "r|gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if not (m.isfile() and m.name.endswith(".jpg") and len(parts) >= 3 and parts[-3] in found):
                continue
            img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
            found[parts[-3]].append((m.name, np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), CIFAR_CLASSES.index(parts[-2])))
    out = {}
    for split, items in found.items():
        items.sort(key=lambda t: (t[2], t[0]))
        out[f"x_{split}"] = np.stack([t[1] for t in items])
        out[f"y_{split}"] = np.array([t[2] for t in items], dtype=np.int64)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def train_val_split(y: np.ndarray, per_class: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the held-out validation images (``per_class`` of each class, seeded)."""
    rng = np.random.default_rng(seed)
    val = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]))
    return np.setdiff1d(np.arange(len(y)), val), val


def crop_flip(xb: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding, then a random horizontal flip, per image."""
    n, _, h, w = xb.shape
    xp = nn.functional.pad(xb, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(3)
    return out


def full_model_path(work: Path, width: int, epochs: int, seed: int) -> Path:
    return work / f"cifar_resnet_full_w{width}_e{epochs}_s{seed}.onnx"


def ensure_full_model(data_dir: Path, work: Path, width: int = 16, epochs: int = 10, seed: int = 0,
                      batch: int = 128, peak_lr: float = 0.2) -> tuple[Path, dict]:
    """The cached full-data base (see ``--full``) and its metadata, training it when missing."""
    path = full_model_path(work, width, epochs, seed)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        return path, json.loads(meta_path.read_text())
    data = load_cifar_all(data_dir, work)
    tr, val = train_val_split(data["y_train"], seed=seed)
    x, y = torch.as_tensor(data["x_train"][tr]), torch.as_tensor(data["y_train"][tr])
    norm = lambda xb: CONTRACT.to_model(CONTRACT.to_unit(xb))  # noqa: E731
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CifarResNet(width)
    decay = [p for p in model.parameters() if p.ndim > 1]
    other = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": other, "weight_decay": 0.0}],
                          lr=peak_lr, momentum=0.9, nesterov=True)
    steps = (len(y) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, peak_lr, total_steps=epochs * steps, pct_start=0.25)
    t = time.perf_counter()
    log = []
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        tot = 0.0
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            xb = crop_flip(norm(x[idx].numpy()), gen)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        val_acc = _accuracy(model, data["x_train"][val], data["y_train"][val])
        log.append({"epoch": ep + 1, "train_loss": tot / len(y), "val_accuracy": val_acc, "elapsed_s": time.perf_counter() - t})
        print(json.dumps(log[-1]), file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t
    acc = _accuracy(model, data["x_test"], data["y_test"])
    export_to(model, norm(data["x_train"][:2]), path)
    meta = {"width": width, "parameters": sum(p.numel() for p in model.parameters()), "epochs": epochs, "seed": seed,
            "n_train": int(len(tr)), "n_val": int(len(val)), "test_accuracy_torch": acc, "test_images": int(len(data["y_test"])),
            "val_accuracy_torch": log[-1]["val_accuracy"], "train_s": train_s, "torch_threads": torch.get_num_threads(),
            "optimizer": f"SGD momentum 0.9 nesterov, wd 5e-4 (weights), one-cycle peak {peak_lr}, batch {batch}, crop(4)+flip",
            "log": log}
    meta_path.write_text(json.dumps(meta, indent=2))
    return path, meta


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, bs: int = 500) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(CONTRACT.to_model(CONTRACT.to_unit(x[i : i + bs]))).argmax(1) for i in range(0, len(x), bs)])
    return float((pred.numpy() == y).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=None, help="6 (subset) or 10 (--full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="the full-data, augmented, SGD base (see the docstring)")
    ap.add_argument("--width", type=int, default=16, help="--full: stem width (16: 78k parameters)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: shared cores make more threads slower)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.full:
        path, meta = ensure_full_model(args.data_dir, args.work, args.width, args.epochs or 10, args.seed)
        meta = {k: v for k, v in meta.items() if k != "log"}
    else:
        path, meta = ensure_model(args.data_dir, args.work, args.n_train, args.epochs or 6, args.seed)
    print(path, json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
