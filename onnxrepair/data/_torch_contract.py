"""The torch side of the input contract (kept apart so that ``onnxrepair.data.contract`` imports without torch)."""

from __future__ import annotations

import torch
from torch import nn

from .contract import InputContract


class _Preprocess(nn.Module):
    def __init__(self, contract: InputContract) -> None:
        super().__init__()
        self.contract = contract

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        return self.contract.to_model(unit)


class ModelWithContract(nn.Module):
    """unit-NCHW input -> model output; what attacks and training differentiate through."""

    def __init__(self, model: nn.Module, contract: InputContract) -> None:
        super().__init__()
        self.model = model
        self.contract = contract

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        out = self.model(self.contract.to_model(unit))
        return out[0] if isinstance(out, (tuple, list)) else out
