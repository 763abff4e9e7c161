"""The house's floors (README "Layout"): nothing imports from a floor above it. Read from the source with ast,
so a new module is checked the day it lands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "onnxrepair"

# module prefix -> prefixes it must never import (a prefix matches the module and everything below it)
VERDICT = ("onnxrepair.validate", "onnxrepair.evaluate", "onnxrepair.fairness")
PIPELINE = ("onnxrepair.repair", "onnxrepair.extras", "onnxrepair.commands", "onnxrepair.cli")
METHOD_SIDE = ("onnxrepair.methods", "onnxrepair.transform", "onnxrepair.train", "onnxrepair.localize", "onnxrepair.graph")
ONNX = ("onnx", "onnxruntime", "converters")
RULES: dict[str, tuple[str, ...]] = {
    "onnxrepair.errors": ("onnxrepair.",),
    # the process group and its collectives: below the training loop, knows nothing of methods, verdicts or ONNX
    "onnxrepair.distributed": METHOD_SIDE + VERDICT + PIPELINE + ONNX + ("onnxrepair.data", "onnxrepair.perturb"),
    "onnxrepair.data": METHOD_SIDE + VERDICT + PIPELINE + ("onnxrepair.perturb",),
    "onnxrepair.perturb": METHOD_SIDE + VERDICT + PIPELINE,
    "onnxrepair.metrics": METHOD_SIDE + VERDICT + PIPELINE,
    "onnxrepair.graph": METHOD_SIDE[:-1] + VERDICT + PIPELINE + ONNX,
    "onnxrepair.localize": METHOD_SIDE[:3] + VERDICT + PIPELINE + ONNX,
    "onnxrepair.train": METHOD_SIDE[:2] + VERDICT + PIPELINE + ONNX,
    "onnxrepair.transform": ("onnxrepair.methods",) + VERDICT + PIPELINE + ONNX,
    # methods know repair, not protobufs, and never judge themselves
    "onnxrepair.methods": VERDICT + PIPELINE + ONNX + ("onnxrepair.runtime",),
    # the verdict is made on the exported file, never from a method's code
    "onnxrepair.validate": METHOD_SIDE + PIPELINE,
    "onnxrepair.evaluate": METHOD_SIDE[:-1] + PIPELINE,
    "onnxrepair.fairness": METHOD_SIDE + PIPELINE,
    "onnxrepair.runtime": METHOD_SIDE + VERDICT + PIPELINE,
    "onnxrepair.repair": ("onnxrepair.commands", "onnxrepair.cli"),
    "onnxrepair.extras": ("onnxrepair.methods", "onnxrepair.commands", "onnxrepair.cli") + VERDICT,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                # "from . import x" may import a submodule x
                out += [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            else:
                out.append(node.module or "")
    return out


def _matches(name: str, prefix: str) -> bool:
    return name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


MODULES = sorted(PKG.rglob("*.py"))


def violations(mod: str, imports: list[str]) -> list[str]:
    rules = [banned for p, banned in RULES.items() if _matches(mod, p)]
    return [f"{mod} imports {imp} (a floor above it: {b})" for banned in rules for imp in imports
            for b in banned if _matches(imp, b) and not _matches(imp, mod)]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_no_import_runs_back_up(path):
    bad = violations(_module_name(path), _imports(path))
    assert not bad, "\n".join(bad)


def test_the_rules_catch_a_back_import():
    """The table is only worth something if a back-import is caught."""
    assert violations("onnxrepair.methods.deeppatch", ["onnxrepair.evaluate"])  # a method judging itself
    assert violations("onnxrepair.methods.fmt", ["onnx"])  # a method touching protobufs
    assert violations("onnxrepair.graph.split", ["onnxrepair.methods"])
    assert violations("onnxrepair.fairness", ["onnxrepair.methods.fmt"])  # the verdict depending on a method
    assert not violations("onnxrepair.methods.fmt", ["onnxrepair.transform", "onnxrepair.graph"])
