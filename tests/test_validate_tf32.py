"""Comparisons between a torch module and an exported file run with TF32 off (issue 16), and say so."""

from __future__ import annotations

import numpy as np
import torch
from conftest import fixture_path

import converters
from onnxrepair.io import read_model
from onnxrepair.validate import validate


class _Watch(torch.nn.Module):
    """The converted model, recording torch's TF32 flags each time it runs."""

    def __init__(self, gm: torch.nn.Module) -> None:
        super().__init__()
        self.gm = gm
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return self.gm(x)


def test_torch_side_of_a_comparison_runs_with_tf32_off_and_flags_are_restored():
    path = fixture_path("torch_lenet_legacy11")
    watch = _Watch(converters.convert(read_model(path)).gm)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as a user's session might have them
    try:
        res = validate(str(path), watch, inputs=np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32), batches=(1, 4))
        assert res.passed and res.tf32 is False and res.to_dict()["tf32"] is False
        assert watch.seen and all(s == (False, False) for s in watch.seen)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)  # given back
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
