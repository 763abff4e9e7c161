"""Tiny CNNs exported to ONNX and converted back, plus synthetic labelled images, for the DeepPatch tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from converters.export import export_graph
from converters.load import load_model
from converters.to_torch import to_torch
from onnxrepair.data.contract import InputContract
from onnxrepair.data.dataset import ArrayDataset


class TinyCNN(nn.Module):
    def __init__(self, c_in: int = 1, classes: int = 4, bn: bool = True, depthwise: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c_in, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8) if depthwise else nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(8 if depthwise else 12, 16, 3, padding=1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = x.mean((2, 3))
        return self.fc(x)


def synthetic(n: int, seed: int = 0, classes: int = 4, size: int = 12, c: int = 1) -> ArrayDataset:
    """Class = orientation/frequency of a stripe pattern plus noise: blur-sensitive, learnable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    yy, xx = np.mgrid[0:size, 0:size]
    pats = [np.sin(xx * 1.5), np.sin(yy * 1.5), np.sin((xx + yy) * 1.2), np.sin(xx * 0.5) * np.sin(yy * 0.5)]
    x = np.stack([pats[k % len(pats)] for k in y])[:, None].repeat(c, 1)
    x = 0.5 + 0.35 * x + rng.normal(0, 0.15, x.shape)
    return ArrayDataset(x=(np.clip(x, 0, 1) * 255).astype(np.uint8), y=y.astype(np.int64))


def train_tiny(model: nn.Module, data: ArrayDataset, epochs: int = 15, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    contract = InputContract(scale=255.0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(epochs):
        for xb, yb in data.batches(64, shuffle=True, seed=seed):
            loss = nn.functional.cross_entropy(model(contract.to_unit(xb)), torch.as_tensor(yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def to_onnx_and_back(model: nn.Module, path, shape=(1, 1, 12, 12)):
    import onnx

    res = export_graph(model.eval(), [torch.rand(*shape)], ["input"], ["logits"], exporter="legacy")
    onnx.save(res.model, str(path))
    return to_torch(load_model(path))


CONTRACT = InputContract(scale=255.0)


def run_deeppatch(gm, train, calib, **cfg):
    """DeepPatch on ``gm`` through its registry entry, as the pipeline calls it (CPU, seed 0, logits)."""
    from onnxrepair.methods import RepairInputs, get

    spec = get("deeppatch")
    inputs = RepairInputs(model=gm, contract=CONTRACT, train=train, calib=calib, output_kind="logits", device=torch.device("cpu"), seed=0)
    return spec.fn(inputs, spec.config_cls(**cfg))
