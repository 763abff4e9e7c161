"""Train the model whose training history DARE's bench mines: one ONNX per epoch, as a user's checkpoints would be.

    .venv/bin/python bench/dare_history.py --data-dir ../shared/datasets [--dataset cifar10|mnist] [--n-train 2000] [--epochs 8]

The published setup (Zhang et al., ASE 2022 / TOSEM 2023): train on half of the training images and mine the other
half. Here a class-balanced subset of ``2·n_train`` CIFAR-10 training images (or MNIST-5k rows) is cut in two
stratified halves: ``train`` trains :class:`bench.deeppatch.SmallCNN` (conv-BN-ReLU blocks, global average pooling,
one Linear) for ``--epochs`` epochs with Adam; ``pool`` is never trained on and is what DARE and its peers get.
``test`` is CIFAR-10's test split (MNIST: held-out rows). Written under ``--work`` (gitignored ``bench/work/``):

    <work>/<dataset>/history/epoch_<k>.onnx   the weights after epoch k (legacy exporter)
    <work>/<dataset>/final.onnx               the last epoch's weights: the model to repair
    <work>/<dataset>/data.npz                 pool_x, pool_y, test_x, test_y (uint8 images, int64 labels)
    <work>/<dataset>/history.json             accuracy per epoch on the pool and the test images, settings
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


@torch.no_grad()
def accuracy(model: nn.Module, data: ArrayDataset, contract: InputContract) -> float:
    model.eval()
    pred = torch.cat([model(contract.to_model(contract.to_unit(xb))).argmax(1) for xb, _ in data.batches(512)])
    return float((pred.numpy() == data.y).mean())


def make_history(dataset: str, data_dir: Path, work: Path, *, n_train: int, n_test: int, epochs: int, width: int,
                 lr: float, seed: int) -> Path:
    out = work / dataset
    (out / "history").mkdir(parents=True, exist_ok=True)
    for old in (out / "history").glob("*.onnx"):
        old.unlink()
    contract = CONTRACTS[dataset]
    train, pool, test = load(dataset, data_dir, n_train, n_test, seed)
    np.savez_compressed(out / "data.npz", pool_x=pool.x, pool_y=pool.y, test_x=test.x, test_y=test.y)
    torch.manual_seed(seed)
    model = SmallCNN(int(train.x.shape[1]), width)
    opt = torch.optim.Adam(model.parameters(), lr)
    example = contract.to_model(contract.to_unit(train.x[:2]))
    rows = []
    t0 = time.perf_counter()
    for ep in range(1, epochs + 1):
        model.train()
        for xb, yb in train.batches(64, shuffle=True, seed=seed + ep):
            loss = nn.functional.cross_entropy(model(contract.to_model(contract.to_unit(xb))), torch.as_tensor(yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        export_to(model, example, out / "history" / f"epoch_{ep}.onnx")
        rows.append({"epoch": ep, "pool_accuracy": accuracy(model, pool, contract), "test_accuracy": accuracy(model, test, contract)})
        print(f"[{dataset}] epoch {ep}: pool {rows[-1]['pool_accuracy']:.3f} test {rows[-1]['test_accuracy']:.3f}", file=sys.stderr)
    export_to(model, example, out / "final.onnx")
    (out / "history.json").write_text(json.dumps({
        "dataset": dataset, "train": len(train), "pool": len(pool), "test": len(test), "epochs": rows, "width": width,
        "lr": lr, "seed": seed, "train_s": time.perf_counter() - t0, "contract": contract.to_json()}, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "dare")
    ap.add_argument("--dataset", choices=sorted(CONTRACTS), default="cifar10")
    ap.add_argument("--n-train", type=int, default=2000, help="images the model trains on; the pool gets as many")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = make_history(a.dataset, a.data_dir, a.work, n_train=a.n_train, n_test=a.n_test, epochs=a.epochs, width=a.width, lr=a.lr, seed=a.seed)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
