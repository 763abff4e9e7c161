"""Capture the values of named fx nodes for a batch of inputs, in batches, without gradients."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str], reduce: Callable[[str, torch.Tensor], Any] | None = None) -> None:
        super().__init__(gm)
        self.names, self.seen, self.reduce = names, {}, reduce

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = out if self.reduce is None else self.reduce(n.name, out)
        return out


@torch.no_grad()
def capture(
    gm: fx.GraphModule,
    names: list[str],
    x: torch.Tensor,
    batch_size: int = 4096,
    reduce: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Values of fx nodes ``names`` for input ``x``, concatenated over batches of ``batch_size``.

    ``reduce(name, value)`` is applied per batch before anything is kept (a per-sample statistic instead of a
    whole feature map), so memory grows with what is kept, not with the activations."""
    missing = set(names) - {n.name for n in gm.graph.nodes}
    if missing:
        raise ValueError(f"no such node(s) in the graph: {', '.join(sorted(missing))}")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for i in range(0, len(x), batch_size):
        rec = _Recorder(gm, set(names), reduce)
        rec.run(x[i : i + batch_size])
        for k in names:
            parts[k].append(rec.seen[k])
    return {k: torch.cat(v) for k, v in parts.items()}
