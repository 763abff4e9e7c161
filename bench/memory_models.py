"""Models for ``bench/memory.py``: a full-width CIFAR ResNet-18 (11.2M parameters, 32x32) and a torchvision-layout
ResNet-50 (25.6M, 224x224), random weights (seeded), BatchNorm kept, exported with PyTorch's legacy exporter.

Random weights are enough where only memory and time are measured: the activations a repair holds depend on the
architecture and the input size, not on what the weights learned. BatchNorm running statistics are set from a
forward pass on random images so activations stay in a sane range through the depth.

    .venv/bin/python bench/memory_models.py --out bench/work/models [--resnet50]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import onnx
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.export import export_graph  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class CifarResNet18(nn.Module):
    """The common CIFAR ResNet-18 (3x3 stem, no max-pool, widths 64-128-256-512, [2, 2, 2, 2] blocks)."""

    def __init__(self, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        layers, c = [], w
        for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)]):
            for j in range(2):
                layers.append(BasicBlock(c, w * mult, stride if j == 0 else 1))
                c = w * mult
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layers(x).mean((2, 3)))


def _settle_bn(model: nn.Module, shape: tuple[int, ...], seed: int) -> nn.Module:
    """Running statistics from a few random batches (momentum None: a plain average), then eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(*shape, generator=g))
    return model.eval()


def make(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    if name.startswith("resnet18_cifar"):  # resnet18_cifar (full width 64), resnet18_cifar_w32 (half width, the model), _w16
        width = int(name.rsplit("_w", 1)[1]) if "_w" in name else 64
        return _settle_bn(CifarResNet18(width=width), (32, 3, 32, 32), seed), (1, 3, 32, 32)
    if name == "resnet50_224":
        import torchvision

        return _settle_bn(torchvision.models.resnet50(num_classes=10), (8, 3, 224, 224), seed), (1, 3, 224, 224)
    raise ValueError(name)


def export(name: str, out_dir: Path, seed: int = 0) -> Path:
    path = out_dir / f"{name}.onnx"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    model, shape = make(name, seed)
    res = export_graph(model, [torch.rand(*shape)], ["input"], ["logits"], exporter="legacy")
    onnx.save(res.model, str(path))
    return path


def history(name: str, out_dir: Path, n: int = 3, seed: int = 0) -> Path:
    """A training history for DARE made by the bench itself: ``n`` checkpoints of the model ``make(name, seed)``
    exports, each its weights plus seeded Gaussian noise of 1 % (checkpoint 0) down to 1/n % of each tensor's
    spread, BatchNorm statistics kept, exported like the model (``ckpt{i}.onnx``); checkpoint ``i`` also favours class
    ``i``: its output layer's bias for that class is raised far above the logits of a random input, so that DARE's
    mining accepts inputs of those classes even on a random-weight model whose noisy copies all predict one class (the
    ResNet-50's did: no input accepted, nothing tuned). Only memory and time are measured: DARE holds, converts and runs
    these like any history."""
    d = out_dir / f"{name}_history"
    if d.exists() and len(list(d.glob("*.onnx"))) == n:
        return d
    d.mkdir(parents=True, exist_ok=True)
    model, shape = make(name, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(n):
        ck = copy.deepcopy(model)
        with torch.no_grad():
            for p in ck.parameters():
                if p.numel() > 1:
                    p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.01 * (n - i) / n)
            head = [m for m in ck.modules() if isinstance(m, torch.nn.Linear)][-1]
            logits = ck.eval()(torch.rand(2, *shape[1:], generator=g))
            head.bias[i % head.out_features] += 10 * float(logits.abs().max()) + 100.0  # above any logit of real inputs too
        res = export_graph(ck.eval(), [torch.rand(*shape)], ["input"], ["logits"], exporter="legacy")
        onnx.save(res.model, str(d / f"ckpt{i}.onnx"))
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "work" / "models")
    ap.add_argument("--resnet50", action="store_true")
    ap.add_argument("--half", action="store_true", help="also the half-width ResNet-18 of issue 19")
    a = ap.parse_args(argv)
    for name in ["resnet18_cifar"] + (["resnet18_cifar_w32"] if a.half else []) + (["resnet50_224"] if a.resnet50 else []):
        p = export(name, a.out)
        n = sum(int(t.dims[0]) if len(t.dims) == 1 else int(torch.tensor(list(t.dims)).prod()) for t in onnx.load(str(p)).graph.initializer)
        print(f"{p}  ({n / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
