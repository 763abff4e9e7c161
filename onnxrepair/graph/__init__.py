"""The converted model as a graph: cut it into prefix and suffix (:mod:`.split`), capture activations
(:mod:`.capture`), and edit it (:mod:`.edit`; DeepPatch's gated units in :mod:`.patching`). Knows torch.fx,
not ONNX and not any repair method's policy."""

from .capture import capture
from .split import Layer, Split, ancestors, cut_candidates, is_activation, linear_layers, resolve_node, split_at

__all__ = ["Layer", "Split", "ancestors", "capture", "cut_candidates", "is_activation", "linear_layers", "resolve_node", "split_at"]
