"""Scale-out under torch.distributed (onnxrepair.distributed): two processes on gloo give the single-process result.

* The training loop itself, in two spawned processes sharing a gloo group: SGD with momentum and weight decay on a
  tuple batch (a ``take``-able object + a tensor) with randomness drawn in ``prepare`` and a second parameter set
  synchronised inside the step (ArchRepair's alpha step), ``fit_rows`` (Adam, a weighted loss: slices weigh by
  their rows' total weight; a last batch smaller than the world is taken whole by both ranks) and ``tune_prefix``
  (Adam, masked gradients, restored weights). Both ranks must end bit-identical and equal to one process's weights
  to 1e-5: the only difference allowed is float32 summation order (the gradient is summed per slice, then across
  ranks), which bench/results/ddp.md measures at ~1e-7; with the all-reduce disabled the ranks diverge and this fails.
* The CLI under ``torchrun --nproc-per-node 2`` (finetune and DeepPatch on the committed LeNet and MNIST subset,
  settings where a trained epoch, not the original, is kept): exactly one model and one report are written, the
  model passed validation, each rank trained on half of every batch, and the per-epoch training losses, the kept
  epoch and the held-out figures equal the single-process run's; the two files' outputs on held-out images agree to
  1e-4 x max|logit| with the same argmax (again summation order only; measured ~2e-7). Disabling the all-reduce
  (the ranks' models diverge) or the sharding (each rank trains on every row) makes it fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from onnxrepair import distributed

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "fixtures" / "models" / "torch_lenet_legacy11.onnx"
DATA = ROOT / "fixtures" / "data" / "mnist_small.npz"


def test_shard_range_covers_the_batch_in_contiguous_slices():
    for n in (1, 2, 5, 8, 33):
        parts = [distributed.shard_range(n, r, 2) for r in range(2)]
        if n < 2:
            assert parts == [(0, n), (0, n)]  # too small to split: both ranks take all of it
        else:
            assert parts[0][0] == 0 and parts[0][1] == parts[1][0] and parts[1][1] == n
            assert abs((parts[0][1] - parts[0][0]) - (parts[1][1] - parts[1][0])) <= 1
    assert [distributed.shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]


def test_without_a_process_group_everything_is_a_no_op():
    assert not distributed.active() and distributed.is_main() and distributed.world() == 1
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert distributed.sync_grads([p], 5) == 1.0 and torch.equal(p.grad, torch.full((3,), 2.0))
    batch = (torch.arange(6), [1, 2])
    assert distributed.shard(batch) is batch
    assert distributed.summary() == {"world_size": 1}


# --------------------------------------------------------------------------- the loop, in two spawned processes
@dataclass
class _Rows:  # like ArchRepair's Cached: sliced by take(index)
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor) -> "_Rows":
        return _Rows(self.x[idx], self.y[idx])


def _scenarios() -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Three trainings; returns (initial, final) weights of each. Same seeds on every rank, as the pipeline's."""
    from onnxrepair.train import fit_rows, train_loop
    from onnxrepair.transform import RegressionData, TuningConfig, tune_prefix

    torch.manual_seed(0)
    out: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def weights(*mods) -> list[torch.Tensor]:
        return [p.detach().clone() for m in mods for p in (m.parameters() if isinstance(m, nn.Module) else [m])]

    # 1. SGD + momentum + weight decay, tuple batches, randomness in prepare, a second parameter set synced in the step
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(45, 6, generator=g), torch.randint(0, 3, (45,), generator=g)
    net = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    extra = nn.Parameter(torch.zeros(3))
    start = weights(net, extra)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_extra = torch.optim.Adam([extra], lr=0.05)
    rng = np.random.default_rng(3)

    def batches(epoch: int):
        order = torch.randperm(45, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 45, 16):
            idx = order[i : i + 16]
            yield _Rows(x[idx], y[idx]), x[idx.flip(0)]

    def prepare(batch, step):  # noise drawn for the whole global batch
        rows, other = batch
        noise = torch.as_tensor(rng.normal(0, 0.1, size=tuple(rows.x.shape)), dtype=torch.float32)
        return _Rows(rows.x + noise, rows.y), other

    def step_loss(batch, step):
        rows, other = batch
        opt_extra.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(other) + extra, rows.y[: len(other)]).backward()
        distributed.sync_grads([extra], len(other))
        opt_extra.step()
        return nn.functional.cross_entropy(net(rows.x) + extra.detach(), rows.y)

    train_loop(net, opt, batches, step_loss, epochs=3, n_batches=3, keep="last", prepare=prepare, batch_len=lambda b: len(b[0]))
    out["sgd_tuple_prepare"] = start, weights(net, extra)

    # 2. fit_rows: Adam, weighted cross-entropy; 33 rows in batches of 8 leave a last batch of 1 (both ranks take it)
    g = torch.Generator().manual_seed(2)
    xr = torch.randn(33, 5, generator=g).numpy()
    yr = torch.randint(0, 2, (33,), generator=g).numpy()
    wr = (torch.rand(33, generator=g) * 3 + 0.1).numpy()
    mlp = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    start = weights(mlp)
    mlp = fit_rows(mlp, xr, yr, wr, epochs=3, lr=0.01, batch_size=8, output_kind="logits", device=torch.device("cpu"), seed=0)
    out["fit_rows_weighted_adam"] = start, weights(mlp)

    # 3. tune_prefix: Adam on a masked slice, weights outside it restored every step
    prefix = nn.Sequential(nn.Linear(4, 5))
    g = torch.Generator().manual_seed(4)
    data = RegressionData(torch.randn(30, 4, generator=g), torch.randn(30, 5, generator=g))
    mask = {"0.weight": torch.rand(5, 4, generator=g) > 0.5, "0.bias": torch.ones(5, dtype=torch.bool)}
    start = weights(prefix)
    tune_prefix(prefix, data, mask, TuningConfig(epochs=3, lr=0.01, batch_size=7, restore="step"), device=torch.device("cpu"))
    out["tune_prefix_adam_masked"] = start, weights(prefix)
    return out


def _worker(rank: int, store: str, result: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save({k: v[1] for k, v in _scenarios().items()}, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


def test_train_loop_on_two_ranks_equals_one_process(tmp_path, one_torch_thread):
    import torch.multiprocessing as mp

    result = str(tmp_path / "final")
    mp.spawn(_worker, args=(str(tmp_path / "store"), result), nprocs=2, join=True)
    rank0, rank1 = torch.load(result + ".0"), torch.load(result + ".1")
    for name, (start, ref) in _scenarios().items():
        assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(start, ref)), f"{name} did not train"
        for a, b, c in zip(ref, rank0[name], rank1[name]):
            assert torch.equal(b, c), f"{name}: the ranks ended with different weights"
            diff = float((a - b).abs().max())
            assert diff <= 1e-5, f"{name}: two ranks differ from one process by {diff:.2e}"


# --------------------------------------------------------------------------- the CLI under torchrun
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
CASES = {  # settings under which a trained epoch (not the original) is kept on this fixture
    "finetune": ["--epochs", "2", "--lr", "0.01"],
    "deeppatch": ["--epochs", "2", "--lr", "0.01"],
}


def _args(out: Path, method: str) -> list[str]:
    out.mkdir()
    return ["--threads", "1", "repair", str(MODEL), "--method", method, "--data", str(DATA), "-o", str(out / "model.onnx"),
            "--report", str(out / "report.json"), "--device", "cpu", "--provider", "cpu", "--quiet", *CASES[method]]


@pytest.mark.parametrize("method", sorted(CASES))
def test_torchrun_two_processes_write_one_model_equal_to_one_process(tmp_path, method, one_torch_thread):
    import onnx

    from onnxrepair.cli import main
    from onnxrepair.data.contract import METADATA_KEY, InputContract
    from onnxrepair.runtime import make_session

    # two processes under torchrun (its --standalone rendezvous picks a free port on localhost)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "onnxrepair",
                          *_args(tmp_path / "two", method)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(_args(tmp_path / "one", method)) == 0  # the same command in one process (here, in-process)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["model.onnx", "report.json"]  # one writer, no leftovers
    assert two.stdout.count("PASSED") == 1  # only rank 0 prints the verdict
    onnx.checker.check_model(str(tmp_path / "two" / "model.onnx"))
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert r2["fidelity"]["passed"] and r2["written"] and r2["fidelity"]["tf32"] is False
    d = r2["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and r1["distributed"] == {"world_size": 1}
    per_rank, epochs = d["train_samples_per_rank"], int(CASES[method][1])
    assert sum(per_rank) == r2["splits"]["train"] * epochs  # every training row once per epoch, on one rank only
    assert abs(per_rank[0] - per_rank[1]) <= d["train_steps"]  # each rank took half of each batch

    h1, h2 = r1["info"]["history"], r2["info"]["history"]
    assert r1["info"]["best_epoch"] == r2["info"]["best_epoch"] >= 1  # a trained epoch is what both kept
    for a, b in zip(h1[1:], h2[1:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"epoch {a['epoch']}: training loss differs"
    assert r2["after"]["accuracy"] == r1["after"]["accuracy"] and r2["after"]["blur"] == r1["after"]["blur"]
    assert r1["after"]["accuracy"] != r1["before"]["accuracy"] or r1["after"]["blur"] != r1["before"]["blur"]

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "two" / "model.onnx")).metadata_props}
    contract = InputContract.from_json(meta[METADATA_KEY])
    x = contract.to_model(contract.to_unit(np.load(DATA)["x"][:200])).numpy()
    s1, s2 = (make_session(str(tmp_path / dd / "model.onnx"), "cpu") for dd in ("one", "two"))
    o1, o2 = s1.run({s1.input_names[0]: x})[0], s2.run({s2.input_names[0]: x})[0]
    assert np.abs(o1 - o2).max() <= 1e-4 * max(1.0, float(np.abs(o1).max()))
    assert (o1.argmax(1) == o2.argmax(1)).all()
