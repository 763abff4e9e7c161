"""Registry of repair methods.

A method is one module under ``onnxrepair/methods/`` that registers itself with
:func:`register`. It receives the converted graph, the data and a typed config, and returns the
repaired module plus what it learned. It never touches ONNX: the pipeline in
:mod:`onnxrepair.repair` converts, exports and validates. The CLI's ``repair --method NAME`` and
``methods`` commands are generated from this registry, so adding a method never edits the CLI:
a method's options are its config dataclass's fields (``--field-name value`` on the command line).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..data.contract import InputContract
from ..data.dataset import ArrayDataset
from ..data.protected import ProtectedSpec
from ..errors import UsageError
from ..memory import Memory
from ..progress import SILENT, Reporter


@dataclass
class RepairInputs:
    model: nn.Module  # converted graph (torch.fx.GraphModule), eval mode, original weights: deep-copy before editing
    contract: InputContract
    train: ArrayDataset  # training data for the method
    calib: ArrayDataset | None  # for checkpoint choice / gate calibration; never the held-out split
    output_kind: str  # "logits" | "probs" (model ends in Softmax)
    device: torch.device
    seed: int = 0
    progress: Reporter = SILENT
    protected: ProtectedSpec | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # declared extra inputs, loaded by the pipeline (e.g. DARE's history)
    # the memory budget and meter (onnxrepair.memory): methods size their stacked / captured passes with
    # ``memory.fit`` and measure their own steps with ``memory.stage``; the pipeline sets the per-sample cost
    memory: Memory = field(default_factory=Memory)


@dataclass
class MethodOutput:
    """What a method returns: the repaired graph, what it learned, and how to say it in a few lines.

    ``summary`` holds the method's own lines for the CLI (which layers, which gate, which epoch and why); the
    CLI prints them without knowing the method. ``info`` goes whole into the JSON report."""

    model: nn.Module  # takes the original model input, returns the original outputs
    info: dict[str, Any] = field(default_factory=dict)  # layers touched, skipped (with reasons), routing, ...
    summary: list[str] = field(default_factory=list)

    def summarise(self) -> list[str]:
        """The method's lines, else what every method reports in the same keys."""
        if self.summary:
            return list(self.summary)
        lines = []
        for key, what in (("layers_trained", "layers trained"), ("layers_patched", "layers patched")):
            if key in self.info:
                lines.append(f"{what}: {len(self.info[key])}")
        if "best_epoch" in self.info:
            lines.append(f"epoch kept: {self.info['best_epoch']} (0 = the original)")
        return lines


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[RepairInputs, Any], MethodOutput]
    config_cls: type
    task: str  # "robustness" | "fairness"
    summary: str
    needs: str  # what data it takes, for `onnxrepair methods`
    paper: str = ""
    inputs: str = "image"  # the models it repairs, by input contract: "image" | "tabular" | "any"
    extra_inputs: tuple[tuple[str, str], ...] = ()  # (config field, kind): what the pipeline loads (onnxrepair.extras)


_REGISTRY: dict[str, MethodSpec] = {}
EXTRA_KINDS = ("models",)  # what the pipeline can load for a method (onnxrepair.extras)


def register(name: str, *, config: type, task: str, summary: str, needs: str, paper: str = "", inputs: str | None = None,
             extra_inputs: dict[str, str] | None = None):
    """Register a method. ``inputs`` defaults by task: robustness methods repair image models (they
    blur, corrupt or attack images), fairness methods tabular ones; the pipeline refuses other models.

    ``extra_inputs`` maps a config field to a kind of input the pipeline loads and hands in as
    ``RepairInputs.extras[field]`` (kinds in :mod:`onnxrepair.extras`; ``"models"``: ONNX files, converted)."""
    for fld, kind in (extra_inputs or {}).items():
        if kind not in EXTRA_KINDS:
            raise ValueError(f"extra input {fld!r}: kind must be one of {EXTRA_KINDS}, not {kind!r}")
        if fld not in {f.name for f in dataclasses.fields(config)}:
            raise ValueError(f"extra input {fld!r} is not a field of {config.__name__}")
    if task not in ("robustness", "fairness"):
        raise ValueError(f"task must be robustness or fairness, not {task!r}")
    inputs = inputs or ("image" if task == "robustness" else "tabular")
    if inputs not in ("image", "tabular", "any"):
        raise ValueError(f"inputs must be image, tabular or any, not {inputs!r}")

    def deco(fn: Callable[[RepairInputs, Any], MethodOutput]):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} already registered")
        _REGISTRY[name] = MethodSpec(name, fn, config, task, summary, needs, paper, inputs, tuple((extra_inputs or {}).items()))
        return fn

    return deco


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def available() -> dict[str, MethodSpec]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def check_inputs(spec: MethodSpec, is_image: bool) -> None:
    """UsageError when ``spec`` does not repair models with this kind of input, naming those that do."""
    kind = "image" if is_image else "tabular"
    if spec.inputs not in ("any", kind):
        fits = [n for n, s in available().items() if s.inputs in ("any", kind)]
        raise UsageError(f"method {spec.name!r} repairs {spec.inputs} models; this model's input contract is {kind} "
                         f"(methods for {kind} models: {', '.join(fits) or 'none'})")


def get(name: str) -> MethodSpec:
    methods = available()
    if name not in methods:
        raise UsageError(f"unknown method {name!r}; known methods: {', '.join(methods) or 'none'}")
    return methods[name]


def config_fields(spec: MethodSpec) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(spec.config_cls) if not f.name.startswith("_")]


def make_config(spec: MethodSpec, options: dict[str, str]) -> Any:
    """Build the method's config from ``{"field_name": "text"}``, coercing to the field types."""
    known = {f.name: f for f in config_fields(spec)}
    kwargs: dict[str, Any] = {}
    for key, raw in options.items():
        k = key.replace("-", "_")
        if k not in known:
            opts = ", ".join("--" + n.replace("_", "-") for n in known) or "none"
            raise UsageError(f"method {spec.name!r} has no option --{key.replace('_', '-')}; its options: {opts}")
        kwargs[k] = _coerce(known[k], raw, spec.name)
    return spec.config_cls(**kwargs)


def _coerce(f: dataclasses.Field, raw: str, method: str) -> Any:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" ", "")
    try:
        if t in ("int",):
            return int(raw)
        if t in ("float",):
            from ..data.contract import eval_fraction

            return eval_fraction(raw)
        if t in ("bool",):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t.startswith("tuple[str") or t.startswith("list[str"):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        if t.startswith("tuple[float") or t.startswith("list[float"):
            from ..data.contract import eval_fraction

            return tuple(eval_fraction(s) for s in raw.split(",") if s.strip())
        if t.startswith("tuple[int") or t.startswith("list[int"):
            return tuple(int(s) for s in raw.split(",") if s.strip())
        return raw
    except ValueError:
        raise UsageError(f"method {method!r}: --{f.name.replace('_', '-')} expects {t}, got {raw!r}") from None
