"""Extra inputs a method declares (``register(..., extra_inputs={"history": "models"})``) and the pipeline
loads for it, so methods still never touch ONNX.

Kind ``"models"``: the config field names ONNX files — a directory, a glob, or a comma-separated list — such as
DARE's training history. :func:`resolve_models` orders them, checks each against the final model and returns a
:class:`ModelSequence`, which converts one checkpoint at a time on demand: a 100-checkpoint history of a ResNet
is never in memory at once.

Every checkpoint is handed to the method as *the final model's graph holding the checkpoint's weights*, so fx
node names (a cut layer, a block) mean the same thing in every checkpoint even when the checkpoints were
exported by another exporter than the final model (a dynamo final model with legacy-exported checkpoints names
its nodes differently). Weights are matched by position and shape; the match is then proven by running both
the checkpoint's own converted graph and the final graph with its weights on a probe batch.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ModelError, UsageError

log = logging.getLogger(__name__)

ORDERS = ("natural", "given", "mtime")


def natural_key(path: Path) -> tuple:
    """'ckpt_10.onnx' after 'ckpt_9.onnx': digit runs compare as numbers."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def find_models(spec: str, order: str = "natural", what: str = "--history") -> list[Path]:
    """ONNX files named by ``spec`` (a directory, a glob, or a comma-separated list), in ``order``."""
    if order not in ORDERS:
        raise UsageError(f"{what}-order must be one of {', '.join(ORDERS)}, not {order!r}")
    if not spec or not spec.strip():
        raise UsageError(f"{what} is empty: give a directory, a glob or a comma-separated list of .onnx files")
    paths: list[Path] = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        p = Path(part)
        if p.is_dir():
            found = sorted(p.glob("*.onnx"))
        elif any(c in part for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(part))
        elif p.exists():
            found = [p]
        else:
            raise UsageError(f"{what}: {part}: no such file or directory")
        paths.extend(f for f in found if f.is_file())
    if not paths:
        raise UsageError(f"{what} {spec!r} names no .onnx file")
    if order == "natural":
        paths.sort(key=natural_key)
    elif order == "mtime":
        paths.sort(key=lambda f: f.stat().st_mtime)
    seen: set[Path] = set()
    unique = []
    for f in paths:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def _float_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters, then floating-point buffers, in registration order (onnx2torch registers in node order)."""
    out = list(module.named_parameters())
    out += [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    return out


def load_weights_by_position(final: nn.Module, other: nn.Module, name: str) -> nn.Module:
    """A copy of ``final`` holding ``other``'s weights, matched by position; UsageError naming the first
    tensor whose shape differs."""
    dst, src = _float_tensors(final), _float_tensors(other)
    if len(dst) != len(src):
        n_dst, n_src = len(list(final.parameters())), len(list(other.parameters()))
        raise UsageError(f"checkpoint {name}: {n_src} parameter tensors after conversion, the final model has {n_dst}: "
                         "not the same architecture")
    for (nd, td), (ns, ts) in zip(dst, src):
        if td.shape != ts.shape:
            raise UsageError(f"checkpoint {name}: parameter {ns} has shape {tuple(ts.shape)} where the final model's "
                             f"{nd} has {tuple(td.shape)}: not the same architecture")
    out = copy.deepcopy(final)
    tensors = dict(_float_tensors(out))
    with torch.no_grad():
        for (nd, _), (_, ts) in zip(dst, src):
            tensors[nd].copy_(ts)
    return out.eval()


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class ModelSequence:
    """ONNX checkpoints as the final model's graph with each checkpoint's weights, converted on demand."""

    paths: list[Path]
    final: nn.Module | None = None  # the final model's converted graph; None: each checkpoint as converted
    skipped: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_paths(cls, paths: list[str | os.PathLike], final: nn.Module | None = None) -> "ModelSequence":
        return cls([Path(p) for p in paths], final)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def convert(self, i: int) -> nn.Module:
        """Checkpoint ``i`` as converted from its own file (its own node names)."""
        import converters

        path = self.paths[i]
        try:
            return converters.convert(path).gm.eval()
        except ModelError as e:
            raise ModelError(f"checkpoint {path}: {e}") from None

    def load(self, i: int) -> nn.Module:
        """Checkpoint ``i`` as the final model's graph with its weights (eval mode, CPU)."""
        own = self.convert(i)
        if self.final is None:
            return own
        return load_weights_by_position(self.final, own, self.paths[i].name)

    def __iter__(self) -> Iterator[tuple[str, nn.Module]]:
        for i in range(len(self)):
            yield self.names[i], self.load(i)


def resolve_models(spec: str, *, final: nn.Module, probe: torch.Tensor, order: str = "natural",
                   what: str = "--history") -> ModelSequence:
    """Find, order and check the checkpoints named by ``spec`` against ``final`` (module doc): a checkpoint
    whose weights equal the final model's is skipped (and said); one that does not map onto the final graph
    is a UsageError naming it. Checkpoints are converted one at a time."""
    paths = find_models(spec, order, what)
    seq = ModelSequence(paths, final)
    kept: list[Path] = []
    final_w = [t for _, t in _float_tensors(final)]
    with torch.no_grad():
        for i, path in enumerate(paths):
            own = seq.convert(i)
            mapped = load_weights_by_position(final, own, path.name)
            if all(torch.equal(a, b) for a, b in zip(final_w, (t for _, t in _float_tensors(mapped)))):
                seq.skipped.append({"checkpoint": path.name, "reason": "same weights as the final model"})
                log.info("%s: same weights as the final model; skipped", path.name)
                continue
            ref, got = _first(own(probe)), _first(mapped(probe))
            if ref.shape != got.shape or not torch.allclose(ref, got, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max()))):
                raise UsageError(f"checkpoint {path.name}: its weights do not map onto the final model's graph by position "
                                 "(outputs differ on a probe batch): not the same architecture")
            kept.append(path)
    if not kept:
        raise UsageError(f"{what} {spec!r}: no checkpoint left once those equal to the final model were skipped")
    seq.paths = kept
    return seq
