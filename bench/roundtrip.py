"""Round-trip benchmark: a ResNet-50-sized model built in torch and a Keras fixture.

    .venv/bin/python bench/roundtrip.py [--exporter auto|dynamo|legacy] [--batch 8] [--out bench/results/roundtrip.json]

Per model: export from torch (ResNet-50 only; torchvision ``resnet50(weights=None)``, random weights, no
download), read + check (``converters.read``), convert (onnx2torch + passes), re-export (simplified; node counts
original/exported/simplified), validate on onnxruntime (batch 1 and ``--batch``). Prints a table of seconds per stage and fidelity, writes JSON. Timings are wall-clock on this
machine in one run; compare them as ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _bench(name: str, path: Path, exporter: str, batch: int, export_s: float | None) -> dict:
    from converters import convert, export_like, read
    from onnxrepair.validate import validate

    t = time.perf_counter()
    loaded = read(path)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    conv = convert(loaded)
    convert_s = time.perf_counter() - t
    t = time.perf_counter()
    res = export_like(conv, exporter=exporter)
    reexport_s = time.perf_counter() - t
    t = time.perf_counter()
    r = validate(path, res.model.SerializeToString(), batches=(1, batch), provider="auto")
    validate_s = time.perf_counter() - t
    w = r.worst
    return {
        "model": name, "file_mb": round(path.stat().st_size / 2**20, 2),
        "parameters": sum(p.numel() for p in conv.gm.parameters()),
        "torch_export_s": export_s, "load_s": load_s, "convert_s": convert_s, "reexport_s": reexport_s, "validate_s": validate_s,
        "exporter": res.exporter, "opset": res.opset, "source_opset": loaded.opset, "fallback_reason": res.fallback_reason,
        "provider": r.provider, "nodes_original": len(loaded.model.graph.node), "nodes_exported": res.nodes_exported,
        "nodes_simplified": res.nodes_simplified,
        "max_abs": w["max_abs"], "needed_atol": w["required_atol"], "argmax_agreement": w["argmax_agreement"], "passed": r.passed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "roundtrip.json")
    ap.add_argument("--keras", type=Path, default=ROOT / "fixtures" / "models" / "keras_cnn_nhwc_tf2onnx.onnx")
    args = ap.parse_args(argv)

    import torch
    import torchvision

    rows = []
    with tempfile.TemporaryDirectory() as td:
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None).eval()
        path = Path(td) / "resnet50.onnx"
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        export_s = time.perf_counter() - t
        rows.append(_bench("resnet50 (torch legacy, opset 17)", path, args.exporter, args.batch, export_s))
        del model
    rows.append(_bench(f"{args.keras.stem} (tf2onnx)", args.keras, args.exporter, args.batch, None))

    from rich.console import Console
    from rich.table import Table

    t = Table(title="round trip: seconds per stage and fidelity")
    cols = ["model", "params", "torch export", "load", "convert", "re-export", "validate", "exporter", "nodes", "max abs", "needed atol", "argmax", "ok"]
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(r["model"], f"{r['parameters']:,}", "-" if r["torch_export_s"] is None else f"{r['torch_export_s']:.2f}",
                  f"{r['load_s']:.2f}", f"{r['convert_s']:.2f}", f"{r['reexport_s']:.2f}", f"{r['validate_s']:.2f}",
                  f"{r['exporter']}@{r['opset']}", f"{r['nodes_original']}/{r['nodes_exported']}/{r['nodes_simplified']}", f"{r['max_abs']:.2e}", f"{r['needed_atol']:.2e}", f"{100 * r['argmax_agreement']:.0f}%",
                  "PASSED" if r["passed"] else "FAILED")
    Console(width=200).print(t)
    doc = {"machine": {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                       "cpu_count": __import__("os").cpu_count()}, "batch": args.batch, "exporter": args.exporter, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
