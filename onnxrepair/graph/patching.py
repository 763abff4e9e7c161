"""fx graph surgery for DeepPatch (:mod:`onnxrepair.methods.deeppatch`): patching units, the per-sample router and the channel mixer.

For a patched conv ``y = conv(x)`` the graph becomes::

    z      = conv(x, cat[W, W_unit])      # one conv, C_out + k filters (fused_conv); unit weights are deltas
    y, d   = z[:, :C_out], z[:, C_out:]   # original channels, frozen; d = patch - y[:, channels]
    route  = gate(y, d)                   # only after the *first* patched conv: bool (N,)
    m      = float(route).reshape(N,1,1,1)  # once, shared by every patched layer
    y'     = y + conv1x1(d * m, embed)    # embed: fixed one-hot k -> C_out, puts d_j at channels[j]

and every former user of ``y`` reads ``y'``. The unit is parametrised as a *delta* to the filters it replaces,
so the patched channel is ``y[:, c_j] + d_j``. A sample routed to the original path has ``m = 0``: the added
term is exactly zero, it sees exactly the original tensors at every layer, and its output is the original
model's output; a sample routed to the patch sees the replaced channels everywhere. No Concat/Gather/Where on
full activations. The extra cost per input is the unit's k filters, a k -> C_out 1x1 conv per layer, plus the
gate at one layer. The fused conv is used only where C_out + k fits in the padding of C_out to onnxruntime's
NCHWc channel block (``fuse="auto"``); elsewhere the unit is a conv of its own reading the same input.

Measured (``bench/deeppatch_latency.py``: CLI repair with ``--epochs 1`` of the lenet and resnet_bn fixtures on
mnist_small, onnxruntime CPU, median of interleaved runs, 2 shared AVX-512 cores, NCHWc block 16). With the unit
always a separate conv, repaired/original was 2.35x/2.59x (lenet, batch 1/64, 1 intra-op thread) and
2.40x/2.90x (resnet_bn). ORT pads every conv's output channels to its block, so a unit of k <= 4 channels cost
as much as the original conv (profiled). Fusing where it fits (lenet 6+1 and 12+3, resnet_bn 8+2 channels) made
the repaired file 8-10 % faster at batch 1 and 12-20 % at batch 64 (1 thread; default threads 8-11 % and
12-39 %) in a direct interleaved A/B of the two repaired files (``--pair before.onnx after.onnx``); the
original path stays bit exact in torch. Fusing where it spills into a further block (every layer of the
CIFAR bench CNN: 16+4, 32+8) made that file ~20 % slower at batch 64 (1.10x vs 0.89x of the same reference file) -- the Split copies the whole activation
and ORT no longer fuses the Add and a following Relu into the 1x1 conv -- hence "auto", which leaves that CNN
as it was. The block is 8 on AVX2-only hosts, where the 8+2 case spills; not measured. Also tried, in a
stand-alone lenet-like model (ratio to original at batch 64, separate unit 1.74x, fused + Split 1.46x): a
(C_out + k) -> C_out 1x1 conv on ``z * [1, m]`` instead of Split + Add (1.55x), the mask after the embedding
(1.67x), a full-width masked unit (1.56x); replacing the gate's Slice/Sub spatial differences by depthwise
[-1, 1] convs was no faster; for a conv followed by BatchNorm, moving the mix after the BN (``embed`` scaled by
the BN scale, unit unfused) lets ORT fold the BN again but was 6-21 % slower than the fused conv on resnet_bn.
Not kept. What remains: the stats gate (Slice/Sub/Abs/ReduceMean on the first patched conv's full output,
~25-30 % of a repaired file's time at batch 64 in ORT's profile).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

ROUTINGS = ("gate", "patched", "original")
PREFIX = "deeppatch_"
GATE_NAME = PREFIX + "gate"
MASK_NAME = PREFIX + "route_mask"
NCHWC_BLOCK = 16  # onnxruntime's NCHWc channel block on AVX-512 hosts (8 on AVX2)


class ChannelMix(nn.Module):
    """``orig + embed(delta * mask)``: on routed samples the unit's channels replace the blamed ones.

    ``embed`` is a fixed one-hot 1x1 convolution (k -> C_out) that puts delta channel j at channel
    ``channels[j]``. With ``mask = 0`` the added term is exactly zero, so ``orig`` passes through
    bit for bit; with ``mask = 1`` channel ``channels[j]`` becomes ``orig + (unit - orig) = unit``.
    Written with Conv/Mul/Add only: where ``orig`` comes straight from a conv, onnxruntime keeps it in its
    blocked (NCHWc) layout and fuses the Add and a following Relu into the 1x1 conv. A Concat/Gather/Where
    formulation forced layout reorders at every patched layer (measured 2.6x/4.4x latency at batch 1/64 on
    the CIFAR bench CNN).
    """

    def __init__(self, channels: list[int], c_out: int) -> None:
        super().__init__()
        embed = torch.zeros(c_out, len(channels), 1, 1)
        for j, c in enumerate(channels):
            embed[c, j] = 1.0
        self.register_buffer("embed", embed)

    def forward(self, orig: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return orig + nn.functional.conv2d(delta * mask, self.embed)


class RouteMask(nn.Module):
    """bool route (N,) -> float mask (N, 1, 1, 1), computed once and shared by every patched layer."""

    def forward(self, route: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return route.to(like.dtype).reshape(-1, 1, 1, 1)


def stats_features(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, 2C): per channel log mean |x| and log mean |spatial difference| (blur lowers the latter)."""
    a = x.abs().mean(dim=(2, 3))
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(2, 3))
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(2, 3))
    return torch.cat([torch.log(a + eps), torch.log(dh + dw + eps)], dim=1)


class DivisionGate(nn.Module):
    """Per-sample router at the first patched conv. Inputs: the original conv output and the unit's delta.

    * ``kind="disagreement"`` (DeepPatch §4.4, published): fraction of activations in the replaced channels
      whose on/off state after the following normalisation differs between the original and the patched
      path; patched when ``sign * (boundary - stat) > 0`` (``sign=+1``: below the boundary).
    * ``kind="logistic"``: a linear score on standardised features (the statistic plus each channel's
      mean |activation| of the original conv output).
    * ``kind="stats"``: a logistic classifier (linear + squared terms of standardised features) on
      channel-wise statistics of the original conv output — log mean |x| and log mean |spatial
      difference| — trained on clean vs perturbed training images; its threshold is set on calibration
      data so that only a small fraction of clean inputs is routed to the patch. Cheap (reductions over
      one activation map and a 4C-wide dot product) and made of standard ONNX ops.
    """

    def __init__(self, channels: list[int], c_out: int, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
        super().__init__()
        idx = torch.tensor(channels, dtype=torch.long)
        self.register_buffer("idx", idx)
        k = len(channels)
        has_norm = scale is not None
        self.register_buffer("scale", (scale[idx] if has_norm else torch.ones(c_out)[idx]).view(1, k, 1, 1).clone())
        self.register_buffer("shift", (shift[idx] if has_norm else torch.zeros(c_out)[idx]).view(1, k, 1, 1).clone())
        self.kind = "disagreement"
        self.routing = "patched"  # training default; calibrate() switches to "gate"
        self.register_buffer("boundary", torch.tensor(0.5))
        self.register_buffer("sign", torch.tensor(1.0))
        n_feat = 1 + c_out
        self.register_buffer("feat_mean", torch.zeros(n_feat))
        self.register_buffer("feat_std", torch.ones(n_feat))
        self.register_buffer("weight", torch.zeros(n_feat))
        self.register_buffer("bias", torch.tensor(0.0))
        self.register_buffer("stats_mean", torch.zeros(2 * c_out))
        self.register_buffer("stats_std", torch.ones(2 * c_out))
        self.register_buffer("stats_weight", torch.zeros(4 * c_out))
        self.register_buffer("stats_bias", torch.tensor(0.0))

    def statistic(self, orig: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        o = orig.index_select(1, self.idx)
        a = o * self.scale + self.shift
        b = (o + delta) * self.scale + self.shift
        return ((a > 0).to(orig.dtype) - (b > 0).to(orig.dtype)).abs().mean(dim=(1, 2, 3))

    def features(self, orig: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        stat = self.statistic(orig, delta)
        energy = orig.abs().mean(dim=(2, 3))
        return torch.cat([stat[:, None], energy], dim=1)

    def stats_features(self, orig: torch.Tensor) -> torch.Tensor:
        return self.standardised_stats(stats_features(orig))

    def score(self, orig: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """> 0 means "route to the patch". Computes only what the configured kind reads (this runs in the
        exported graph)."""
        if self.kind == "disagreement":
            return self._score_statistic(self.statistic(orig, delta))
        if self.kind == "stats":
            return self._score_stats(stats_features(orig))
        return self._score_features(self.features(orig, delta))

    def reduce(self, orig: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything any gate kind reads, per sample: a few numbers per channel instead of the (orig, delta) maps,
        so calibration keeps O(N * C) per set, not O(N * C * H * W). :meth:`score_reduced` scores it."""
        return {"features": self.features(orig, delta), "stats": stats_features(orig)}

    def score_reduced(self, r: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`score` from :meth:`reduce`'s output (the same formulas, the same values)."""
        if self.kind == "disagreement":
            return self._score_statistic(r["features"][:, 0])
        if self.kind == "stats":
            return self._score_stats(r["stats"])
        return self._score_features(r["features"])

    def standardised_stats(self, raw: torch.Tensor) -> torch.Tensor:
        """[z, z^2] of raw :func:`stats_features` standardised with the fitted mean and std."""
        z = (raw - self.stats_mean) / self.stats_std
        return torch.cat([z, z * z], dim=1)

    def _score_statistic(self, stat: torch.Tensor) -> torch.Tensor:
        return self.sign * (self.boundary - stat)

    def _score_stats(self, raw: torch.Tensor) -> torch.Tensor:
        return self.standardised_stats(raw) @ self.stats_weight + self.stats_bias

    def _score_features(self, feat: torch.Tensor) -> torch.Tensor:
        return ((feat - self.feat_mean) / self.feat_std) @ self.weight + self.bias

    def forward(self, orig: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.routing == "patched":
            return torch.ones_like(orig[:, 0, 0, 0], dtype=torch.bool)
        if self.routing == "original":
            return torch.zeros_like(orig[:, 0, 0, 0], dtype=torch.bool)
        return self.score(orig, delta) > 0


@dataclass
class PatchedLayer:
    layer: str  # fx node name of the original conv
    target: str
    unit: str  # submodule name of the patching unit
    c_out: int
    channels: list[int]
    params: int


def following_norm(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) of an eval-mode BatchNorm2d that is the conv's only user, else None (BN folded)."""
    mods = dict(gm.named_modules())
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(mods[users[0].target], nn.BatchNorm2d):
        bn = mods[users[0].target]
        if bn.running_mean is None:
            return None
        w = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_mean)
        b = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
        scale = w / torch.sqrt(bn.running_var + bn.eps)
        return scale.cpu(), (b - bn.running_mean * scale).cpu()
    return None


def fused_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, wd: torch.Tensor, bd: torch.Tensor | None,
               stride, padding, dilation) -> torch.Tensor:
    """``cat([conv(x), unit(x)], 1)`` as one convolution (C_out + k filters); zero biases where one side has none."""
    if b is None and bd is None:
        bias = None
    else:
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]), bd if bd is not None else wd.new_zeros(wd.shape[0])])
    return nn.functional.conv2d(x, torch.cat([w, wd]), bias, stride, padding, dilation)


def insert_patches(gm: fx.GraphModule, plan: dict[str, list[int]], *, bias: str = "auto",
                   fuse: bool | str = "auto") -> tuple[fx.GraphModule, list[PatchedLayer]]:
    """Add a patching unit for each ``{conv node name: blamed channels}`` in place; returns (gm, layers).

    A unit is parametrised as the *difference* to the filters it replaces (``unit = conv[idx] + delta``),
    initialised to zero: before training the patched path equals the original, and weight decay pulls the
    unit towards the replaced filters rather than towards zero. ``bias``: "auto" (a bias where the conv has one: exported graphs fold BatchNorm into it),
    "yes" or "no" (the paper's units have none). ``fuse``: compute the unit inside the original conv (one conv
    with C_out + k filters, then a channel split): True, False, or "auto" (only where C_out + k fits in the
    padding of C_out to onnxruntime's NCHWc block, see the module docstring).
    """
    mods = dict(gm.named_modules())
    graph = gm.graph
    layers: list[PatchedLayer] = []
    gate_node: fx.Node | None = None
    mask_node: fx.Node | None = None
    for node in list(graph.nodes):
        if node.op != "call_module" or node.name not in plan:
            continue
        conv = mods[node.target]
        assert isinstance(conv, nn.Conv2d) and conv.groups == 1
        channels = list(plan[node.name])
        k = len(channels)
        use_bias = conv.bias is not None if bias == "auto" else bias == "yes"
        unit = nn.Conv2d(conv.in_channels, k, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=1,
                         bias=use_bias, padding_mode=conv.padding_mode)
        with torch.no_grad():
            unit.weight.zero_()
            if use_bias:
                unit.bias.zero_()
        unit = unit.to(conv.weight.device, conv.weight.dtype)
        i = len(layers)
        unit_name, mix_name = f"{PREFIX}unit{i}", f"{PREFIX}mix{i}"
        gm.add_submodule(unit_name, unit)
        gm.add_submodule(mix_name, ChannelMix(channels, conv.out_channels).to(conv.weight.device))
        users = list(node.users)
        fits = conv.out_channels + k <= -(-conv.out_channels // NCHWC_BLOCK) * NCHWC_BLOCK
        if (fuse is True or (fuse == "auto" and fits)) and not node.kwargs and len(node.args) == 1 and conv.padding_mode == "zeros":
            # one conv with C_out + k output channels, sliced: the unit's k channels ride in the original conv's
            # spare NCHWc block instead of costing a conv of their own (see the module docstring)
            with graph.inserting_before(node):  # in program order, then the original conv node is dropped
                attrs = [graph.get_attr(f"{node.target}.weight"),
                         graph.get_attr(f"{node.target}.bias") if conv.bias is not None else None,
                         graph.get_attr(f"{unit_name}.weight"),
                         graph.get_attr(f"{unit_name}.bias") if use_bias else None]
                z = graph.call_function(fused_conv, (node.args[0], *attrs, conv.stride, conv.padding, conv.dilation))
                y = graph.call_function(operator.getitem, (z, (slice(None), slice(None, conv.out_channels))))
                p = graph.call_function(operator.getitem, (z, (slice(None), slice(conv.out_channels, None))))
        else:
            y = node
            with graph.inserting_after(node):
                p = graph.call_module(unit_name, node.args, node.kwargs)
        last = p
        if gate_node is None:
            norm = following_norm(gm, node)
            gate = DivisionGate(channels, conv.out_channels, *(norm if norm else (None, None)))
            gm.add_submodule(GATE_NAME, gate.to(conv.weight.device))
            with graph.inserting_after(p):
                gate_node = graph.call_module(GATE_NAME, (y, p))
            gm.add_submodule(MASK_NAME, RouteMask())
            with graph.inserting_after(gate_node):
                mask_node = graph.call_module(MASK_NAME, (gate_node, y))
            last = mask_node
        with graph.inserting_after(last):
            mixed = graph.call_module(mix_name, (y, p, mask_node))
        for u in users:
            u.replace_input_with(node, mixed)
        if y is not node:
            graph.erase_node(node)
        layers.append(PatchedLayer(node.name, str(node.target), unit_name, conv.out_channels, channels,
                                   sum(q.numel() for q in unit.parameters())))
    graph.lint()
    gm.recompile()
    return gm, layers


def set_routing(gm: nn.Module, routing: str) -> None:
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}")
    gate = getattr(gm, GATE_NAME, None)
    if gate is not None:
        gate.routing = routing


def get_gate(gm: nn.Module) -> DivisionGate | None:
    return getattr(gm, GATE_NAME, None)
