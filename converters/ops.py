"""Converters onnx2torch 1.5.15 lacks, registered through its registry (``add_converter``).

One small converter per (op, since_version). Three kinds:

* **New semantics**: Reduce*-18/20 (axes moved from an attribute to an optional input), Reshape with
  ``allowzero=1``, CastLike-15/19/21, AveragePool-19 (adds ``dilations``), Pad-18 (``axes`` input),
  Split-18 (``num_outputs``), Resize-18/19 (constant scales/sizes, the modes torch's ``interpolate`` shares),
  ScatterND-18 (reduction none/add/mul, as a traceable ``index_put``), AveragePool-7/10/11 with asymmetric
  pads (onnx2torch refuses them; symmetric ones still go to its converter).
* **Reshape with a constant target** (every version, 5-21): onnx2torch's ``OnnxReshape`` branches on the
  *values* of the shape tensor (``torch.any(shape == 0)``), a data-dependent branch the dynamo exporter
  cannot trace. Where the target is a constant we emit :class:`StaticReshape`, whose shape is a Python
  list; a constant leading dim on an input whose dim 0 is symbolic (the batch) becomes ``-1`` so the
  batch stays dynamic. Reshape 5/13/14 were registered by onnx2torch, so those entries are replaced
  (the one place we override instead of add; see :func:`_replace`).
* **Version bumps that only widened the type list** (Cast-19/21, Identity-19/21, Flatten-21, Conv-22,
  ...): the older converter is called as is (:func:`_alias`). Where a newer version added an attribute we
  cannot honour (e.g. dilations != 1 on AveragePool, Cast ``saturate`` on float8) the converter raises
  ``NotImplementedError`` with the reason, which :mod:`converters.to_torch` reports.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult, get_const_value, onnx_mapping_from_node
from torch import nn

log = logging.getLogger(__name__)

Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]


def _const(name: str, graph: OnnxGraph) -> torch.Tensor | None:
    """The value of ``name`` if it is an initializer or a Constant node's output, else None."""
    if not name:
        return None
    try:
        v = get_const_value(name, graph)
    except KeyError:
        return None
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v)


def _only_inputs(node: OnnxNode, n: int) -> OnnxMapping:
    """A mapping that feeds the module only the first ``n`` inputs (the rest were folded as constants)."""
    return OnnxMapping(inputs=tuple(node.input_values[:n]), outputs=node.output_values)


def _alias(op: str, version: int, target: int, check: Callable[[OnnxNode], str | None] | None = None) -> None:
    """Register ``op``-``version`` as the existing ``op``-``target`` converter (same semantics for our types)."""
    base = _CONVERTER_REGISTRY[OperationDescription("", op, target)]

    def conv(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        if check is not None:
            reason = check(node)
            if reason:
                raise NotImplementedError(f"{op}-{version}: {reason}")
        return base(node, graph)

    add_converter(operation_type=op, version=version)(conv)


def _replace(op: str, version: int, fn: Converter) -> None:
    """Replace an onnx2torch converter (its decorator refuses duplicates, so drop the old entry first)."""
    _CONVERTER_REGISTRY.pop(OperationDescription("", op, version), None)
    add_converter(operation_type=op, version=version)(fn)


# ---------------------------------------------------------------- Reshape


class StaticReshape(nn.Module, OnnxToTorchModule):
    """Reshape to a constant target. ``0`` copies the input dim unless ``allowzero``; ``-1`` is inferred."""

    def __init__(self, shape: list[int], allowzero: bool = False) -> None:
        super().__init__()
        self.shape = [int(s) for s in shape]
        self.allowzero = bool(allowzero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.allowzero:
            return torch.reshape(x, self.shape)
        # a Python-level branch on constants, so both exporters trace it as plain Reshape
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(self.shape)]
        return torch.reshape(x, shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, allowzero={self.allowzero}"


class DynamicReshape(nn.Module, OnnxToTorchModule):
    """Reshape to a computed shape (a tensor). Only used where the target is not a constant."""

    def __init__(self, allowzero: bool = False) -> None:
        super().__init__()
        self.allowzero = bool(allowzero)

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = [int(d) for d in shape.tolist()]
        if not self.allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return torch.reshape(x, dims)


def _batch_is_symbolic(name: str, graph: OnnxGraph) -> bool:
    vi = graph.value_info.get(name)
    if vi is None:
        return False
    dims = vi.type.tensor_type.shape.dim
    return len(dims) > 0 and not dims[0].HasField("dim_value")


def _reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    allowzero = int(node.attributes.get("allowzero", 0)) == 1
    shape = _const(node.input_values[1], graph)
    if shape is None:
        return OperationConverterResult(torch_module=DynamicReshape(allowzero), onnx_mapping=onnx_mapping_from_node(node))
    target = [int(s) for s in shape.flatten().tolist()]
    # A batch frozen into the target (exported at a fixed batch): a symbolic input batch means dim 0 is
    # the batch, so let it follow the input.
    if target and target[0] > 0 and -1 not in target and _batch_is_symbolic(node.input_values[0], graph):
        target[0] = -1
    return OperationConverterResult(torch_module=StaticReshape(target, allowzero), onnx_mapping=_only_inputs(node, 1))


for _v in (5, 13, 14):
    _replace("Reshape", _v, _reshape)
for _v in (19, 21):
    add_converter(operation_type="Reshape", version=_v)(_reshape)


# ---------------------------------------------------------------- Reduce* with axes as an input (opset 18)


def _reduce_fn(op: str) -> Callable[..., torch.Tensor]:
    def l1(x, dim, keepdim):
        return torch.sum(torch.abs(x), dim=dim, keepdim=keepdim)

    def l2(x, dim, keepdim):
        return torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim))

    def log_sum(x, dim, keepdim):
        return torch.log(torch.sum(x, dim=dim, keepdim=keepdim))

    def log_sum_exp(x, dim, keepdim):
        return torch.logsumexp(x, dim=dim, keepdim=keepdim)

    def sum_square(x, dim, keepdim):
        return torch.sum(x * x, dim=dim, keepdim=keepdim)

    def mean(x, dim, keepdim):
        return torch.mean(x, dim=dim, keepdim=keepdim)

    def sum_(x, dim, keepdim):
        return torch.sum(x, dim=dim, keepdim=keepdim)

    def amax(x, dim, keepdim):
        return torch.amax(x, dim=dim, keepdim=keepdim)

    def amin(x, dim, keepdim):
        return torch.amin(x, dim=dim, keepdim=keepdim)

    def prod(x, dim, keepdim):
        for d in sorted(dim, reverse=True):
            x = torch.prod(x, dim=d, keepdim=keepdim)
        return x

    return {
        "ReduceL1": l1, "ReduceL2": l2, "ReduceLogSum": log_sum, "ReduceLogSumExp": log_sum_exp,
        "ReduceSumSquare": sum_square, "ReduceMean": mean, "ReduceSum": sum_, "ReduceMax": amax,
        "ReduceMin": amin, "ReduceProd": prod,
    }[op]


class StaticReduce(nn.Module, OnnxToTorchModule):
    """A Reduce* over constant axes (``None`` = all axes)."""

    def __init__(self, op: str, axes: list[int] | None, keepdims: bool) -> None:
        super().__init__()
        self.op = op
        self.axes = axes
        self.keepdims = keepdims
        self._fn = _reduce_fn(op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = list(range(x.dim())) if self.axes is None else [a % x.dim() for a in self.axes]
        return self._fn(x, dim, self.keepdims)

    def extra_repr(self) -> str:
        return f"{self.op}, axes={self.axes}, keepdims={self.keepdims}"


def _reduce18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    op = node.operation_type
    keepdims = bool(node.attributes.get("keepdims", 1))
    noop_empty = bool(node.attributes.get("noop_with_empty_axes", 0))
    axes_name = node.input_values[1] if len(node.input_values) > 1 else ""
    if axes_name:
        axes_t = _const(axes_name, graph)
        if axes_t is None:
            raise NotImplementedError("axes computed from a tensor's values at run time (only constant axes, or axes computed "
                                      "from shapes alone, can be converted)")
        axes: list[int] | None = [int(a) for a in axes_t.flatten().tolist()]
    else:
        axes = None
    if not axes:
        if noop_empty:
            return OperationConverterResult(torch_module=nn.Identity(), onnx_mapping=_only_inputs(node, 1))
        axes = None
    return OperationConverterResult(torch_module=StaticReduce(op, axes, keepdims), onnx_mapping=_only_inputs(node, 1))


for _op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd"):
    add_converter(operation_type=_op, version=18)(_reduce18)
for _op in ("ReduceMax", "ReduceMin"):  # 20 only widened types (bool)
    add_converter(operation_type=_op, version=20)(_reduce18)


# ---------------------------------------------------------------- CastLike


class CastLike(nn.Module, OnnxToTorchModule):
    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.dtype)


class CastTo(nn.Module, OnnxToTorchModule):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


def _cast_like(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    like = _const(node.input_values[1], graph)
    if like is not None:  # the usual case (onnxscript writes CastLike(x, const)): a static cast
        return OperationConverterResult(torch_module=CastTo(like.dtype), onnx_mapping=_only_inputs(node, 1))
    return OperationConverterResult(torch_module=CastLike(), onnx_mapping=onnx_mapping_from_node(node))


for _v in (15, 19, 21):
    add_converter(operation_type="CastLike", version=_v)(_cast_like)


# ---------------------------------------------------------------- AveragePool with asymmetric pads


class AsymmetricAvgPool(nn.Module, OnnxToTorchModule):
    """AveragePool whose begin/end pads differ (SAME padding with an odd total, as Keras ``padding='same'``
    writes it): zero-pad, average, and with ``count_include_pad=0`` divide by the share of real pixels in each
    window (the same pooling run over a padded mask of ones), which is ONNX's divisor."""

    def __init__(self, kernel: list[int], strides: list[int], pads: list[int], count_include_pad: bool) -> None:
        super().__init__()
        r = len(kernel)
        self.kernel, self.strides, self.count_include_pad = list(kernel), list(strides), bool(count_include_pad)
        # ONNX [b1.., bn, e1.., en] -> F.pad's last-dim-first (b_n, e_n, ..., b_1, e_1)
        self.pad = [v for i in reversed(range(r)) for v in (int(pads[i]), int(pads[i + r]))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = {1: torch.nn.functional.avg_pool1d, 2: torch.nn.functional.avg_pool2d, 3: torch.nn.functional.avg_pool3d}[len(self.kernel)]
        mean = pool(torch.nn.functional.pad(x, self.pad), self.kernel, self.strides)
        if self.count_include_pad:
            return mean
        share = pool(torch.nn.functional.pad(torch.ones_like(x[:1, :1]), self.pad), self.kernel, self.strides)
        return mean / share


def _avg_pool_asymmetric_or(base: Converter) -> Converter:
    def conv(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        a = node.attributes
        pads = list(a.get("pads", []))
        r = len(pads) // 2
        if (not pads or pads[:r] == pads[r:] or _text(a.get("auto_pad"), "NOTSET") not in ("NOTSET", "")
                or int(a.get("ceil_mode", 0)) or any(int(d) != 1 for d in a.get("dilations", []) or [])):
            return base(node, graph)  # onnx2torch's own converter (symmetric pads), or its refusal
        strides = list(a.get("strides", [1] * r))
        return OperationConverterResult(
            torch_module=AsymmetricAvgPool(list(a["kernel_shape"]), strides, pads, bool(int(a.get("count_include_pad", 0)))),
            onnx_mapping=onnx_mapping_from_node(node))

    return conv


for _v in (7, 10, 11):
    _replace("AveragePool", _v, _avg_pool_asymmetric_or(_CONVERTER_REGISTRY[OperationDescription("", "AveragePool", _v)]))


# ---------------------------------------------------------------- pools / pads with new attributes


def _no_dilation(node: OnnxNode) -> str | None:
    d = node.attributes.get("dilations")
    return f"dilations={list(d)} not supported" if d and any(int(v) != 1 for v in d) else None


def _no_saturate_float8(node: OnnxNode) -> str | None:
    to = int(node.attributes.get("to", 1))
    return "float8 targets not supported" if to in (17, 18, 19, 20, 23, 24, 25) else None


def _pad_no_axes_no_wrap(node: OnnxNode) -> str | None:
    if len(node.input_values) > 3 and node.input_values[3]:
        return "the axes input (opset 18) is not supported"
    mode = node.attributes.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return "mode='wrap' not supported" if mode == "wrap" else None


_alias("AveragePool", 19, 11, _no_dilation)
_alias("AveragePool", 22, 11, _no_dilation)
_alias("Pad", 18, 13, _pad_no_axes_no_wrap)
_alias("Pad", 19, 13, _pad_no_axes_no_wrap)
_alias("Pad", 21, 13, _pad_no_axes_no_wrap)
_alias("Cast", 19, 13, _no_saturate_float8)
_alias("Cast", 21, 13, _no_saturate_float8)

# version bumps that only added types (bfloat16, float8, int4, ...): the older converter is correct
for _op, _vs, _t in (
    ("Identity", (19, 21), 16), ("Constant", (19, 21), 13), ("ConstantOfShape", (20, 21), 9),
    ("Flatten", (21,), 13), ("Transpose", (21,), 13), ("Unsqueeze", (21,), 13), ("Shape", (19, 21), 15),
    ("Equal", (19,), 13), ("Conv", (22,), 11), ("ConvTranspose", (22,), 11), ("MaxPool", (22,), 12),
    ("GlobalAveragePool", (22,), 1), ("Dropout", (22,), 13), ("HardSigmoid", (22,), 6), ("HardSwish", (22,), 14),
    ("Elu", (22,), 6), ("Selu", (22,), 6), ("Softplus", (22,), 1), ("InstanceNormalization", (22,), 6),
    ("GreaterOrEqual", (16,), 12), ("LessOrEqual", (16,), 12),
):
    for _v in _vs:
        if OperationDescription("", _op, _v) not in _CONVERTER_REGISTRY:
            _alias(_op, _v, _t)


# ---------------------------------------------------------------- Split-18 (num_outputs), Resize-18/19, ScatterND-18


class StaticSplit(nn.Module, OnnxToTorchModule):
    """Split along ``axis`` into constant ``sizes``, or into ``num_outputs`` chunks of ceil(d / n) (opset 18:
    the last chunk may be smaller), the chunk size read from the input's shape at run time."""

    def __init__(self, axis: int, sizes: list[int] | None, num_outputs: int) -> None:
        super().__init__()
        self.axis = int(axis)
        self.sizes = sizes
        self.num_outputs = int(num_outputs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.sizes is not None:
            return tuple(torch.split(x, self.sizes, dim=self.axis))
        d = x.shape[self.axis]
        return tuple(torch.split(x, (d + self.num_outputs - 1) // self.num_outputs, dim=self.axis))

    def extra_repr(self) -> str:
        return f"axis={self.axis}, sizes={self.sizes}, num_outputs={self.num_outputs}"


def _split18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axis = int(node.attributes.get("axis", 0))
    n_out = len(node.output_values)
    split_name = node.input_values[1] if len(node.input_values) > 1 else ""
    sizes = None
    if split_name:
        t = _const(split_name, graph)
        if t is None:
            raise NotImplementedError("Split-18 with split sizes computed from a tensor's values at run time")
        sizes = [int(v) for v in t.flatten().tolist()]
    elif "num_outputs" in node.attributes and int(node.attributes["num_outputs"]) != n_out:
        raise NotImplementedError(f"num_outputs={node.attributes['num_outputs']} but {n_out} outputs")
    return OperationConverterResult(torch_module=StaticSplit(axis, sizes, n_out), onnx_mapping=_only_inputs(node, 1))


add_converter(operation_type="Split", version=18)(_split18)


class StaticResize(nn.Module, OnnxToTorchModule):
    """``F.interpolate`` with constant output size or scale factors over the spatial dims."""

    def __init__(self, mode: str, size: list[int] | None, scale: list[float] | None, align_corners: bool | None) -> None:
        super().__init__()
        self.mode, self.size, self.scale, self.align_corners = mode, size, scale, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, size=self.size, scale_factor=self.scale, mode=self.mode, align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, size={self.size}, scale={self.scale}, align_corners={self.align_corners}"


_TORCH_MODE = {("nearest", 1): "nearest", ("nearest", 2): "nearest", ("nearest", 3): "nearest", ("linear", 1): "linear",
               ("linear", 2): "bilinear", ("linear", 3): "trilinear", ("cubic", 2): "bicubic"}


def _text(v, default: str) -> str:
    v = default if v is None else v
    return v.decode() if isinstance(v, bytes) else str(v)


def _resize18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Resize-18/19 where torch's interpolate means the same thing; every other setting is refused with why."""
    a = node.attributes
    mode = _text(a.get("mode"), "nearest")
    ctm = _text(a.get("coordinate_transformation_mode"), "half_pixel")
    nearest = _text(a.get("nearest_mode"), "round_prefer_floor")
    if int(a.get("antialias", 0)):
        raise NotImplementedError("antialias=1 not supported")
    if a.get("axes"):
        raise NotImplementedError("the axes attribute not supported")
    if _text(a.get("keep_aspect_ratio_policy"), "stretch") != "stretch":
        raise NotImplementedError("keep_aspect_ratio_policy other than stretch not supported")
    if mode == "nearest":
        if (ctm, nearest) != ("asymmetric", "floor"):  # what torch's 'nearest' computes
            raise NotImplementedError(f"mode=nearest with coordinate_transformation_mode={ctm}, nearest_mode={nearest} not supported "
                                      "(torch's nearest is asymmetric + floor)")
        align = None
    elif mode in ("linear", "cubic"):
        if ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise NotImplementedError(f"mode={mode} with coordinate_transformation_mode={ctm} not supported")
        if mode == "cubic" and abs(float(a.get("cubic_coeff_a", -0.75)) + 0.75) > 1e-6:
            raise NotImplementedError("cubic_coeff_a other than -0.75 not supported")
        if int(a.get("exclude_outside", 0)):
            raise NotImplementedError("exclude_outside=1 not supported")
        align = ctm == "align_corners"
    else:
        raise NotImplementedError(f"mode={mode} not supported")
    vals = [_const(node.input_values[i], graph) if i < len(node.input_values) and node.input_values[i] else None for i in (1, 2, 3)]
    for i, name in ((1, "roi"), (2, "scales"), (3, "sizes")):
        if i < len(node.input_values) and node.input_values[i] and vals[i - 1] is None:
            raise NotImplementedError(f"{name} computed from a tensor's values at run time")
    roi, scales, sizes = vals
    if roi is not None and roi.numel() and ctm == "tf_crop_and_resize":
        raise NotImplementedError("roi not supported")
    size = scale = None
    if sizes is not None and sizes.numel():
        sizes_l = [int(v) for v in sizes.flatten().tolist()]
        size = sizes_l[2:]
    elif scales is not None and scales.numel():
        sc = [float(v) for v in scales.flatten().tolist()]
        if sc[:2] != [1.0, 1.0]:
            raise NotImplementedError(f"scales {sc} resize the batch or channel dimension")
        scale = sc[2:]
    else:
        raise NotImplementedError("neither scales nor sizes given")
    rank = len(size if size is not None else scale)
    tmode = _TORCH_MODE.get((mode, rank))
    if tmode is None:
        raise NotImplementedError(f"mode={mode} on {rank} spatial dims not supported")
    return OperationConverterResult(torch_module=StaticResize(tmode, size, scale, align), onnx_mapping=_only_inputs(node, 1))


for _v in (18, 19):
    add_converter(operation_type="Resize", version=_v)(_resize18)


class ScatterND(nn.Module, OnnxToTorchModule):
    """ONNX ScatterND with reduction none / add / mul as a tensor-indexed ``index_put`` (traceable by both
    exporters, unlike a Python-list index)."""

    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        k = indices.shape[-1]
        flat = indices.reshape(-1, k)
        idx = tuple(flat[:, i] for i in range(k))
        upd = updates.reshape(flat.shape[0], *data.shape[k:])
        out = data.clone()
        if self.reduction == "none":
            return out.index_put(idx, upd)
        if self.reduction == "add":
            return out.index_put(idx, upd, accumulate=True)
        return out.index_put(idx, out[idx] * upd)  # mul (indices are unique, as the spec requires)


def _scatter_nd(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    reduction = _text(node.attributes.get("reduction"), "none")
    if reduction not in ("none", "add", "mul"):
        raise NotImplementedError(f"reduction={reduction} not supported")
    return OperationConverterResult(torch_module=ScatterND(reduction), onnx_mapping=onnx_mapping_from_node(node))


add_converter(operation_type="ScatterND", version=18)(_scatter_nd)


def registered_here() -> list[tuple[str, int]]:
    """(op, version) pairs this module registered or replaced, for ``inspect`` and tests."""
    return sorted(_REGISTERED)


_REGISTERED: set[tuple[str, int]] = set()
for _d in _CONVERTER_REGISTRY:
    fn = _CONVERTER_REGISTRY[_d]
    if getattr(fn, "__module__", "") == __name__:
        _REGISTERED.add((_d.operation_type, _d.version))

__all__ = ["StaticReshape", "DynamicReshape", "StaticReduce", "CastLike", "CastTo", "StaticSplit", "StaticResize", "ScatterND", "AsymmetricAvgPool", "registered_here"]
