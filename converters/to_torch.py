"""ONNX -> editable, trainable ``torch.fx.GraphModule`` through onnx2torch.

The converters onnx2torch lacks are registered in :mod:`converters.ops` (imported here for its
side effect), through onnx2torch's own registry.
"""

from __future__ import annotations

import onnx
import torch
from onnx2torch import convert as _o2t_convert
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
from torch import fx

from .errors import ModelError, UnsupportedOpsError

from . import ops as _ops  # noqa: F401  (registers the extra converters)
from .load import DEFAULT_DOMAIN, LoadedModel, OpKey


def _registry_domain(domain: str) -> str:
    return "" if domain == DEFAULT_DOMAIN else domain


def is_supported(key: OpKey) -> bool:
    return OperationDescription(_registry_domain(key.domain), key.op_type, key.version) in _CONVERTER_REGISTRY


def unsupported_ops(inventory: list[OpKey]) -> list[OpKey]:
    """Every distinct op of the inventory that no registered converter handles."""
    return sorted({k for k in inventory if not is_supported(k)})


def to_torch(loaded: LoadedModel, model: onnx.ModelProto | None = None) -> fx.GraphModule:
    """Convert to a GraphModule; raise :class:`UnsupportedOpsError` naming *every* op no converter handles,
    or every node a converter refuses (op, opset version, node name, reason)."""
    model = model if model is not None else loaded.model
    missing = unsupported_ops(loaded.inventory)
    if missing:
        raise UnsupportedOpsError([(k.domain, k.op_type, k.version) for k in missing], str(loaded.path),
                                  nodes={(k.domain, k.op_type, k.version): loaded.nodes_of.get(k, []) for k in missing})
    try:
        gm = _o2t_convert(model)
    except NotImplementedError as e:
        refused = refused_nodes(model)
        if refused:
            raise UnsupportedOpsError(list(refused), str(loaded.path), nodes={k: v[0] for k, v in refused.items()},
                                      reasons={k: v[1] for k, v in refused.items()}) from e
        raise ModelError(f"{loaded.path}: conversion failed: {e}") from e
    gm.eval()
    return gm


def refused_nodes(model: onnx.ModelProto) -> dict[tuple[str, str, int], tuple[list[str], str]]:
    """Run each node's converter alone and collect those that refuse: ``{(domain, op, version): (node names, reason)}``.

    onnx2torch stops at the first refusal and its message names neither the node nor the opset; this runs only
    after a conversion failed, to report all of them at once.
    """
    from onnx2torch.node_converters.registry import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    from .load import normalise_domain, resolve_version

    model = safe_shape_inference(model)
    graph = OnnxGraph(model.graph)
    opsets = {o.domain: o.version for o in model.opset_import}
    out: dict[tuple[str, str, int], tuple[list[str], str]] = {}
    for _, node in graph.nodes.items():
        try:
            conv = get_converter(domain=node.domain, operation_type=node.operation_type, version=opsets.get(node.domain, 1))
            conv(node, graph)
        except NotImplementedError as e:
            dom = normalise_domain(node.domain)
            k = (dom, node.operation_type, resolve_version(dom, node.operation_type, opsets.get(node.domain, 1)))
            names, reason = out.get(k, ([], str(e).splitlines()[0] if str(e) else "not implemented"))
            out[k] = ([*names, node.name or node.unique_name], reason)
        except Exception:  # noqa: BLE001 -- other failures surface in the full conversion's own message
            continue
    return out


def trainable_parameters(gm: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in gm.named_parameters() if p.requires_grad}
