"""Train the model whose training history DARE's bench mines: one ONNX per epoch, as a user's checkpoints would be.

    .venv/bin/python bench/dare_history.py --data-dir ../shared/datasets [--dataset cifar10|mnist] [--n-train 5000] [--epochs 15]
        [--width 32] [--augment] [--seeds 0,1,2]

The published setup (Zhang et al., ASE 2022 / TOSEM 2023): train on half of the training images and mine the other
half. Here a class-balanced subset of ``2·n_train`` CIFAR-10 training images (or MNIST-5k rows) is cut in two
stratified halves (always with data seed 0, so every training seed sees the same images): ``train`` trains
:class:`bench.deeppatch.SmallCNN` (conv-BN-ReLU blocks, global average pooling, one Linear) for ``--epochs`` epochs
with Adam at a constant lr (no schedule, so the last epoch is an ordinary one, as in a run stopped at a fixed
epoch count); ``--augment`` adds random horizontal flips and 4-pixel padded random crops (the usual CIFAR
augmentation). ``pool`` is never trained on and is what DARE and its peers get. ``test`` is CIFAR-10's test split
(MNIST: held-out rows). One history per training seed (initialisation and shuffling), so a bench seed gets its
own model and history. Written under ``--work`` (gitignored ``bench/work/``):

    <work>/<dataset>/data.npz                      pool_x, pool_y, test_x, test_y (uint8 images, int64 labels)
    <work>/<dataset>/seed<s>/history/epoch_<k>.onnx   the weights after epoch k (legacy exporter)
    <work>/<dataset>/seed<s>/final.onnx            the last epoch's weights: the model to repair
    <work>/<dataset>/seed<s>/history.json          accuracy per epoch on 1,000 pool images and the test images, settings

:func:`ensure_history` reuses a history whose recorded settings equal the requested ones and trains it otherwise.
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

from deeppatch import SmallCNN, export_to, load_cifar, load_mnist  # noqa: E402  (bench/deeppatch.py: one loader, one CNN)
from onnxrepair.data.contract import InputContract  # noqa: E402
from onnxrepair.data.dataset import ArrayDataset  # noqa: E402

CONTRACTS = {
    "cifar10": InputContract(scale=255.0, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26)),
    "mnist": InputContract(scale=255.0, mean=(0.5,), std=(0.5,)),
}


def load(dataset: str, data_dir: Path, n_train: int, n_test: int, seed: int) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
    """(train half, pool half, test)."""
    if dataset == "cifar10":
        both, test = load_cifar(data_dir, 2 * n_train, n_test, seed)
    else:
        data = load_mnist(data_dir)
        rest, test = data.split(n_test / len(data), seed=seed)
        both = rest.limit(2 * n_train, seed=seed)
    train, pool = both.split(0.5, seed=seed + 1)
    return train, pool, test


def flip_crop(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flip and a random 32×32 crop of the 4-pixel zero-padded image, per image (uint8 NCHW)."""
    n, _, h, w = x.shape
    flip = rng.random(n) < 0.5
    x = np.where(flip[:, None, None, None], x[..., ::-1], x)
    pad = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    dy, dx = rng.integers(0, 9, n), rng.integers(0, 9, n)
    return np.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model: nn.Module, data: ArrayDataset, contract: InputContract) -> float:
    model.eval()
    pred = torch.cat([model(contract.to_model(contract.to_unit(xb))).argmax(1) for xb, _ in data.batches(512)])
    return float((pred.numpy() == data.y).mean())


def settings(dataset: str, *, n_train: int, n_test: int, epochs: int, width: int, lr: float, augment: bool, seed: int) -> dict:
    return {"dataset": dataset, "n_train": n_train, "n_test": n_test, "epochs": epochs, "width": width, "lr": lr,
            "augment": augment, "seed": seed, "data_seed": 0}


def history_dir(work: Path, dataset: str, seed: int) -> Path:
    return work / dataset / f"seed{seed}"


def ensure_data(dataset: str, data_dir: Path, work: Path, *, n_train: int, n_test: int) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
    """(train, pool, test) with data seed 0; pool and test are cached in ``<work>/<dataset>/data.npz`` (train is re-read)."""
    out = work / dataset
    out.mkdir(parents=True, exist_ok=True)
    train, pool, test = load(dataset, data_dir, n_train, n_test, 0)
    key = np.array([n_train, n_test])
    cached = out / "data.npz"
    if cached.exists():
        d = np.load(cached)
        if "key" in d and np.array_equal(d["key"], key):
            return train, pool, test
    np.savez_compressed(cached, pool_x=pool.x, pool_y=pool.y, test_x=test.x, test_y=test.y, key=key)
    return train, pool, test


def make_history(dataset: str, data_dir: Path, work: Path, *, n_train: int, n_test: int, epochs: int, width: int,
                 lr: float, seed: int, augment: bool = False, data: tuple | None = None) -> Path:
    out = history_dir(work, dataset, seed)
    (out / "history").mkdir(parents=True, exist_ok=True)
    for old in (out / "history").glob("*.onnx"):
        old.unlink()
    contract = CONTRACTS[dataset]
    train, pool, test = data or ensure_data(dataset, data_dir, work, n_train=n_train, n_test=n_test)
    torch.manual_seed(seed)
    model = SmallCNN(int(train.x.shape[1]), width)
    opt = torch.optim.Adam(model.parameters(), lr)
    example = contract.to_model(contract.to_unit(train.x[:2]))
    rng = np.random.default_rng(seed)
    pool_probe = pool.limit(1000, seed=0)  # per-epoch pool accuracy on 1,000 pool images: the full pool costs a quarter of an epoch
    rows = []
    t0 = time.perf_counter()
    for ep in range(1, epochs + 1):
        model.train()
        for xb, yb in train.batches(64, shuffle=True, seed=seed * 1000 + ep):
            if augment:
                xb = flip_crop(xb, rng)
            loss = nn.functional.cross_entropy(model(contract.to_model(contract.to_unit(xb))), torch.as_tensor(yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        export_to(model, example, out / "history" / f"epoch_{ep}.onnx")
        rows.append({"epoch": ep, "pool_accuracy": accuracy(model, pool_probe, contract), "test_accuracy": accuracy(model, test, contract)})
        print(f"[{dataset} seed {seed}] epoch {ep}: pool {rows[-1]['pool_accuracy']:.3f} test {rows[-1]['test_accuracy']:.3f}", file=sys.stderr)
    export_to(model, example, out / "final.onnx")
    (out / "history.json").write_text(json.dumps({
        "settings": settings(dataset, n_train=n_train, n_test=n_test, epochs=epochs, width=width, lr=lr, augment=augment, seed=seed),
        "dataset": dataset, "train": len(train), "pool": len(pool), "test": len(test), "epochs": rows, "width": width,
        "lr": lr, "seed": seed, "augment": augment, "train_s": time.perf_counter() - t0, "contract": contract.to_json()}, indent=1))
    return out



def history_ready(dataset: str, work: Path, *, seed: int, **kw) -> bool:
    """Whether ``work`` holds the seed's history trained with these settings (and the pool/test split)."""
    out = history_dir(work, dataset, seed)
    meta = out / "history.json"
    return (meta.exists() and (out / "final.onnx").exists() and (work / dataset / "data.npz").exists()
            and json.loads(meta.read_text()).get("settings") == settings(dataset, seed=seed, **kw))


def ensure_history(dataset: str, data_dir: Path, work: Path, *, seed: int, retrain: bool = False, data: tuple | None = None,
                   **kw) -> Path:
    """The seed's history directory: reused when :func:`history_ready`, trained otherwise."""
    if not retrain and history_ready(dataset, work, seed=seed, **kw):
        return history_dir(work, dataset, seed)
    return make_history(dataset, data_dir, work, seed=seed, data=data, **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "dare")
    ap.add_argument("--dataset", choices=sorted(CONTRACTS), default="cifar10")
    ap.add_argument("--n-train", type=int, default=4000, help="images the model trains on; the pool gets as many")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--augment", action="store_true", help="random flips and padded crops while training")
    ap.add_argument("--seeds", default="0", help="one history per training seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retrain", action="store_true", help="train even when a history with these settings exists")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    kw = dict(n_train=a.n_train, n_test=a.n_test, epochs=a.epochs, width=a.width, lr=a.lr, augment=a.augment)
    data = ensure_data(a.dataset, a.data_dir, a.work, n_train=a.n_train, n_test=a.n_test)
    for s in [int(v) for v in a.seeds.split(",") if v.strip()]:
        out = ensure_history(a.dataset, a.data_dir, a.work, seed=s, retrain=a.retrain, data=data, **kw)
        print(f"history {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
