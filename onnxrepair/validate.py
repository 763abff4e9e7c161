"""Judge an exported file on onnxruntime: run a reference and a candidate on the same inputs and compare.

Policy (after Polygraphy's ``--atol/--rtol``): per output, an element fails only if it breaks *both*
``|a - b| <= atol_eff`` and ``|a - b| <= rtol * |ref|``; ``atol_eff = atol * max(1, max|ref|)`` when
``scale_atol`` is on (a tolerance relative to the output's scale), else ``atol``. For every output we report
the smallest ``atol_eff`` that would have passed at the given rtol (``required_atol``). Outputs that look like
class scores (2-D float, more than one column) also need ``argmax`` agreement of at least
``min_argmax_agreement`` (100 % by default). Integer / string outputs (labels) must match exactly.

Inputs are seeded random draws from the reference's input specs (floats in [0, 1)), or user data. Each
comparison runs at batch 1 and at a larger batch, which catches a batch size frozen into a Reshape.
The reference runs with onnxruntime's graph optimisations off; the candidate on the provider chosen
(``auto``/``cpu``/``cuda``) with optimisations on, and the provider that *really* ran is reported.
A torch module can stand in for the candidate (``validate(ref, module)``), for checks before export. For a
model whose classifier tail was split off (``converters.convert.OnnxTail``: label + ZipMap, kept as ONNX) the
module computes only the core; ``tail=`` runs the tail on onnxruntime (CPU) over the module's outputs, so the
candidate's outputs line up name by name with the reference file's.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .errors import DataError, UsageError
from .runtime import Session, make_session

if TYPE_CHECKING:
    import onnx

    from converters.convert import OnnxTail

log = logging.getLogger(__name__)


@dataclass
class Tolerance:
    atol: float = 1e-5
    rtol: float = 1e-4
    scale_atol: bool = True


@dataclass
class OutputComparison:
    name: str
    batch: int
    shape: list[int]
    max_abs: float
    max_rel: float
    scale: float  # max |reference|
    atol_used: float
    rtol: float
    required_atol: float  # smallest atol_eff that would pass at this rtol
    mismatches: int
    elements: int
    argmax_agreement: float | None
    passed: bool
    note: str = ""


@dataclass
class ValidationResult:
    reference: str
    candidate: str
    provider: str  # what really ran the candidate: "cpu" | "cuda" | "torch"
    reference_provider: str
    batches: list[int]
    comparisons: list[OutputComparison] = field(default_factory=list)
    passed: bool = False
    reason: str = ""
    tf32: bool = False  # torch's TF32 matmul/convolution mode while a torch candidate ran: always off (see _full_fp32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def worst(self) -> dict[str, float]:
        return {
            "max_abs": max((c.max_abs for c in self.comparisons), default=0.0),
            "required_atol": max((c.required_atol for c in self.comparisons), default=0.0),
            "argmax_agreement": min((c.argmax_agreement for c in self.comparisons if c.argmax_agreement is not None), default=1.0),
        }


def _as_array(x: Any) -> np.ndarray:
    """ORT outputs may be sequences of maps (skl2onnx ZipMap): turn them into (N, classes) arrays."""
    if isinstance(x, list) and x and isinstance(x[0], dict):
        keys = sorted(x[0])
        return np.array([[m[k] for k in keys] for m in x], dtype=np.float64)
    return np.asarray(x)


def random_inputs(specs, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        # the first dimension is the batch even where the model fixes it: Session.run feeds a fixed batch in chunks
        shape = [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 1) for i, d in enumerate(s.shape)]
        dt = s.dtype if s.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dt, np.floating):
            feeds[s.name] = rng.random(shape).astype(dt)
        elif dt == np.bool_:
            feeds[s.name] = rng.random(shape) > 0.5
        else:
            feeds[s.name] = np.zeros(shape, dtype=dt)
    return feeds


def _slice_inputs(data: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    out = {}
    for k, v in data.items():
        if len(v) < batch:
            raise DataError(f"input {k!r} has {len(v)} rows, need at least {batch} for the batch-{batch} run")
        out[k] = np.ascontiguousarray(v[:batch])
    return out


def compare_arrays(name: str, ref: np.ndarray, cand: np.ndarray, batch: int, tol: Tolerance, min_argmax: float = 1.0,
                   threshold: float | None = None) -> OutputComparison:
    """Compare one output. Several columns: argmax agreement must reach ``min_argmax``. One column with a
    ``threshold`` (0.5 for a Sigmoid probability, 0 for a logit): the decisions ``value > threshold`` must agree
    as well, so a class flip inside the numeric tolerance fails here too."""
    ref, cand = _as_array(ref), _as_array(cand)
    if ref.shape != cand.shape:
        return OutputComparison(name, batch, list(ref.shape), float("inf"), float("inf"), 0.0, 0.0, tol.rtol, float("inf"),
                                int(ref.size), int(ref.size), None, False, f"shape {list(cand.shape)} != reference {list(ref.shape)}")
    if not np.issubdtype(ref.dtype, np.number) or np.issubdtype(ref.dtype, np.integer) or ref.dtype == np.bool_:
        bad = int(np.sum(ref != cand))
        return OutputComparison(name, batch, list(ref.shape), float(bad > 0), float(bad > 0), 0.0, 0.0, 0.0, 0.0 if not bad else float("inf"),
                                bad, int(ref.size), None, bad == 0, "exact match required (non-float output)")
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    diff = np.abs(r - c)
    nan_bad = np.isnan(r) != np.isnan(c)
    diff = np.where(np.isnan(r) & np.isnan(c), 0.0, diff)
    scale = float(np.nanmax(np.abs(r))) if r.size else 0.0
    atol = tol.atol * max(1.0, scale) if tol.scale_atol else tol.atol
    rel_bound = tol.rtol * np.abs(r)
    fails = ((diff > atol) & (diff > rel_bound)) | nan_bad
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    max_rel = float(np.nanmax(diff / np.maximum(np.abs(r), 1e-12))) if diff.size else 0.0
    required = float(np.nanmax(np.maximum(diff - rel_bound, 0.0))) if diff.size else 0.0
    agree = None
    if r.ndim == 2 and r.shape[1] > 1:
        agree = float(np.mean(np.argmax(r, 1) == np.argmax(c, 1)))
    elif threshold is not None and r.size and (r.ndim == 1 or (r.ndim == 2 and r.shape[1] == 1)):
        agree = float(np.mean((r.reshape(-1) > threshold) == (c.reshape(-1) > threshold)))
    ok = not fails.any() and (agree is None or agree >= min_argmax)
    return OutputComparison(name, batch, list(ref.shape), max_abs, max_rel, scale, atol, tol.rtol, required, int(fails.sum()),
                            int(ref.size), agree, bool(ok))


@contextlib.contextmanager
def _full_fp32():
    """TF32 off for torch's CUDA matmuls and cuDNN convolutions while a comparison runs, restored afterwards: on
    Ampere and later TF32 rounds float32 inputs to 10 mantissa bits, which a fidelity tolerance of 1e-5 must not be
    asked to absorb (it would hide a real difference, or fail a faithful export). No effect on the CPU."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run_torch(module, feeds: dict[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    import torch

    module.eval()
    with torch.no_grad(), _full_fp32():
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        out = module(*[torch.from_numpy(v).to(device) for v in feeds.values()])
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o.detach().cpu().numpy() for o in outs][: len(names)]


def _tail_session(tail: OnnxTail | onnx.ModelProto | bytes) -> Session:
    """A CPU session of a classifier tail given as ``OnnxTail``, a standalone ``ModelProto`` or its bytes."""
    import onnx

    if isinstance(tail, onnx.ModelProto):
        tail = tail.SerializeToString()
    elif not isinstance(tail, bytes):
        tail = tail.standalone().SerializeToString()
    return make_session(tail, "cpu", optimize=False)


def _run_torch_tail(module, feeds: dict[str, np.ndarray], tail_sess: Session, names: Sequence[str]) -> list:
    """The module's outputs are the tail's inputs (the core outputs, in order); the tail gives ``names``."""
    core = tail_sess.input_names
    outs = _run_torch(module, feeds, core)
    if len(outs) < len(core):
        raise UsageError(f"the torch module gives {len(outs)} output(s) but the tail reads {len(core)}: {core}")
    return tail_sess.run(dict(zip(core, outs)), names)


def validate(
    reference: str | os.PathLike | bytes,
    candidate: str | os.PathLike | bytes | Any,
    *,
    inputs: Mapping[str, np.ndarray] | np.ndarray | None = None,
    batches: Sequence[int] = (1, 8),
    seed: int = 0,
    provider: str = "auto",
    require_provider: str | None = None,
    tolerance: Tolerance | None = None,
    per_output: Mapping[str, Tolerance] | None = None,
    min_argmax_agreement: float = 1.0,
    tail: OnnxTail | onnx.ModelProto | bytes | None = None,
) -> ValidationResult:
    """Compare ``candidate`` (ONNX path/bytes, or a torch module) with ``reference`` (ONNX) on onnxruntime.

    ``tail`` (torch candidates only): the classifier tail split off the module (an ``OnnxTail`` or its
    ``standalone()`` model), run over the module's outputs so that label and ZipMap outputs are compared too.
    """
    import onnx

    from converters.load import graph_inputs, output_source_op

    tol = tolerance or Tolerance()
    ref_sess = make_session(reference, "cpu", optimize=False)
    is_torch = not isinstance(candidate, (str, bytes, os.PathLike))
    if tail is not None and not is_torch:
        raise UsageError("tail= applies to a torch candidate only; an ONNX candidate carries its own tail")
    cand_sess = None if is_torch else make_session(candidate, provider, require=require_provider)
    tail_sess = _tail_session(tail) if tail is not None else None
    ref_model = onnx.load_from_string(reference) if isinstance(reference, bytes) else onnx.load(str(reference), load_external_data=False)
    specs = graph_inputs(ref_model)
    # a single-column classifier output: its decision threshold, read from the graph like every verdict here
    first_threshold = 0.5 if output_source_op(ref_model) == "Sigmoid" else 0.0
    names = ref_sess.output_names
    iface = cand_sess if cand_sess is not None else tail_sess  # what must give the reference's outputs
    if iface is not None:
        missing = [n for n in names if n not in iface.output_names]
        if missing or (iface is cand_sess and [i for i in ref_sess.input_names if i not in iface.input_names]):
            what = "candidate" if iface is cand_sess else "torch module + tail"
            return ValidationResult(_label(reference), _label(candidate), "torch" if is_torch else iface.provider, ref_sess.provider, list(batches),
                                    passed=False, reason=f"interface differs: reference outputs {names}, inputs {ref_sess.input_names}; "
                                                         f"{what} outputs {iface.output_names}, inputs {iface.input_names}")
    if isinstance(inputs, np.ndarray):
        inputs = {specs[0].name: inputs}
    result = ValidationResult(_label(reference), _label(candidate), "torch" if is_torch else cand_sess.provider, ref_sess.provider, list(batches))
    for b in batches:
        feeds = _slice_inputs(inputs, b) if inputs is not None else random_inputs(specs, b, seed + b)
        ref_out = ref_sess.run(feeds)
        if tail_sess is not None:
            cand_out = _run_torch_tail(candidate, feeds, tail_sess, names)
        else:
            cand_out = _run_torch(candidate, feeds, names) if is_torch else cand_sess.run(feeds, names)
        for i, name in enumerate(names):
            if i >= len(cand_out):
                continue
            t = (per_output or {}).get(name, tol)
            result.comparisons.append(compare_arrays(name, ref_out[i], cand_out[i], b, t, min_argmax_agreement,
                                                     threshold=first_threshold if i == 0 else None))
    result.passed = bool(result.comparisons) and all(c.passed for c in result.comparisons)
    if not result.passed and not result.reason:
        bad = [f"{c.name}@batch{c.batch}" for c in result.comparisons if not c.passed]
        result.reason = "outside tolerance: " + ", ".join(bad) if bad else "nothing compared"
    return result


def _label(x: Any) -> str:
    if isinstance(x, bytes):
        return "<in-memory model>"
    if isinstance(x, (str, os.PathLike)):
        return str(Path(x))
    return type(x).__name__


def print_table(result: ValidationResult, console=None) -> None:
    """The comparison as a rich table, then PASSED/FAILED as the last line."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"{result.candidate} vs {result.reference}  (candidate on {result.provider}, reference on {result.reference_provider}, optimisations off)")
    for col in ("output", "batch", "shape", "max abs", "max rel", "scale", "atol used", "needed atol", "mismatch", "argmax", "ok"):
        t.add_column(col, justify="right" if col not in ("output", "ok") else "left")
    for c in result.comparisons:
        t.add_row(c.name, str(c.batch), "x".join(map(str, c.shape)), f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", f"{c.scale:.3g}",
                  f"{c.atol_used:.3g}", f"{c.required_atol:.3g}", f"{c.mismatches}/{c.elements}",
                  "-" if c.argmax_agreement is None else f"{100 * c.argmax_agreement:.1f}%", "[green]yes[/]" if c.passed else "[red]NO[/]")
    console.print(t)
    if result.reason:
        console.print(result.reason)
    console.print("PASSED" if result.passed else "FAILED", markup=False, highlight=False)


__all__ = ["Tolerance", "OutputComparison", "ValidationResult", "validate", "compare_arrays", "random_inputs", "print_table"]
