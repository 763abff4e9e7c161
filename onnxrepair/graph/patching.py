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


def input_bank(channels: int) -> torch.Tensor:
    """Fixed 3x3 depthwise filters per input channel: identity, horizontal and vertical difference, Laplacian."""
    ident = torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 0]])
    dx = torch.tensor([[0.0, 0, 0], [0, -1, 1], [0, 0, 0]])
    dy = torch.tensor([[0.0, 0, 0], [0, -1, 0], [0, 1, 0]])
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])
    bank = torch.stack([ident, dx, dy, lap])[:, None]  # (4, 1, 3, 3)
    return bank.repeat(channels, 1, 1, 1)  # (4C, 1, 3, 3), groups=C


class InputGate(nn.Module):
    """A per-sample router that reads the *model input* only (``--gate input``): per input channel, log mean |.|
    of the input and of three fixed 3x3 filters of it (horizontal and vertical difference, Laplacian: what blur
    lowers and noise raises), then the ``stats`` gate's classifier ([z, z^2], balanced logistic, threshold at the
    calibrated clean rate). One depthwise conv on the input instead of reductions over the first patched conv's
    wider map, and no unit output needed, so it runs before anything of the model: the deployment switch then sends
    a batch it routes nowhere through the untouched original graph."""

    def __init__(self, channels: int, nhwc: bool = False) -> None:
        super().__init__()
        self.channels, self.nhwc = channels, nhwc
        self.register_buffer("bank", input_bank(channels))
        self.routing = "gate"
        self.kind = "input"
        n = 4 * channels
        self.register_buffer("stats_mean", torch.zeros(n))
        self.register_buffer("stats_std", torch.ones(n))
        self.register_buffer("stats_weight", torch.zeros(2 * n))
        self.register_buffer("stats_bias", torch.tensor(0.0))
        self.register_buffer("folded_weight", torch.zeros(2 * n))
        self.register_buffer("folded_thr", torch.tensor(0.0))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 4C) raw features of a model-space input batch (N, C, H, W), or (N, H, W, C) for an NHWC model."""
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        # stride 2: the mean over a quarter of the positions estimates the same statistic at a quarter of the cost
        f = nn.functional.conv2d(x, self.bank, stride=2, groups=self.channels)
        return torch.log(f.abs().mean(dim=(2, 3)) + 1e-6)

    def standardised_stats(self, raw: torch.Tensor) -> torch.Tensor:
        z = (raw - self.stats_mean) / self.stats_std
        return torch.cat([z, z * z], dim=1)

    def score_features(self, raw: torch.Tensor) -> torch.Tensor:
        return self.standardised_stats(raw) @ self.stats_weight + self.stats_bias

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier as one (8C,) weight on [f, f^2] of the raw features and a threshold: the standardisation
        folded in, so the deployed gate is Conv, Abs, ReduceMean, Add, Log, Mul, Concat, MatMul, Greater."""
        m, s = self.stats_mean.double(), self.stats_std.double()
        n = m.numel()
        w1, w2 = self.stats_weight[:n].double(), self.stats_weight[n:].double()
        lin = w1 / s - 2 * w2 * m / (s * s)
        quad = w2 / (s * s)
        const = self.stats_bias.double() + (-w1 * m / s + w2 * m * m / (s * s)).sum()
        return torch.cat([lin, quad]).to(self.stats_weight.dtype), (-const).to(self.stats_weight.dtype)

    def forward(self, x: torch.Tensor, _unused: torch.Tensor | None = None) -> torch.Tensor:
        if self.routing == "patched":
            return torch.ones_like(x[:, 0, 0, 0], dtype=torch.bool)
        if self.routing == "original":
            return torch.zeros_like(x[:, 0, 0, 0], dtype=torch.bool)
        return self.route_features(self.features(x))

    def freeze(self) -> None:
        """Store :meth:`folded` (call after fitting and thresholding; routing then reads only the folded form)."""
        w, thr = self.folded()
        self.folded_weight.copy_(w)
        self.folded_thr.copy_(thr)

    def route_features(self, raw: torch.Tensor) -> torch.Tensor:
        """Route from raw features (N, 4C) by the folded classifier (what the exported gate computes)."""
        return torch.cat([raw, raw * raw], dim=1) @ self.folded_weight > self.folded_thr

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


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
    gate = get_gate(gm)
    if gate is not None:
        gate.routing = routing


def get_gate(gm: nn.Module) -> DivisionGate | None:
    """The gate of a patched model, in its training form (an attribute) or inside a :class:`PerSampleSwitch`."""
    g = getattr(gm, GATE_NAME, None)
    if g is None and isinstance(gm, PerSampleSwitch):
        g = getattr(gm.head, GATE_NAME, None)
    return g


# --------------------------------------------------------------------------- deployment: a per-sample switch


def positions(route: torch.Tensor) -> torch.Tensor:
    """Where row i of the batch sits in ``cat([rows not routed, rows routed])``: its inverse permutation."""
    r = route.to(torch.int64)
    n_o = (1 - r).sum()
    return torch.where(route, n_o + torch.cumsum(r, 0) - 1, torch.cumsum(1 - r, 0) - 1)


SWITCH_MODES = ("overlay", "exclusive")


class PerSampleSwitch(nn.Module):
    """``head(x) -> (route, *carried)``; rows not routed get ``first(*carried)``, routed rows ``second(x)``; each
    sub-model runs only on its own rows (a batch that routes nothing runs ``first`` alone). Exported by
    :mod:`converters.switch` (the ``switch_parts`` protocol) as ``If`` nodes with the same three branches."""

    def __init__(self, head: nn.Module, first: nn.Module, second: nn.Module, mode: str = "overlay") -> None:
        super().__init__()
        if mode not in SWITCH_MODES:
            raise ValueError(f"mode must be one of {SWITCH_MODES}")
        self.head, self.first, self.second = head, first, second
        self.switch_mode = mode

    def switch_parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.head, self.first, self.second

    def forward(self, *xs: torch.Tensor):
        h = self.head(*xs)
        route, carried = h[0], tuple(h[1:])
        if self.switch_mode == "overlay":  # the original on every row, the routed rows overwritten
            out = self.first(*carried)
            if not bool(route.any()):
                return out
            ir = torch.nonzero(route)[:, 0]
            b = self.second(*[x.index_select(0, ir) for x in xs])
            if isinstance(out, (tuple, list)):
                return type(out)(u.index_copy(0, ir, v) for u, v in zip(out, b))
            return out.index_copy(0, ir, b)
        if not bool(route.any()):
            return self.first(*carried)
        if bool(route.all()):
            return self.second(*xs)
        io, ir = torch.nonzero(~route)[:, 0], torch.nonzero(route)[:, 0]
        a = self.first(*[c.index_select(0, io) for c in carried])
        b = self.second(*[x.index_select(0, ir) for x in xs])
        pos = positions(route)
        if isinstance(a, (tuple, list)):
            return type(a)(torch.cat([u, v]).index_select(0, pos) for u, v in zip(a, b))
        return torch.cat([a, b]).index_select(0, pos)


class GateHead(nn.Module):
    """model input -> (route, cut, *carried): the original model up to the first patched conv (``carrier``, whose
    first output is that conv's output) and the gate on it. Only gates that read the original output alone
    (``stats``; ``patched``/``original`` routing) can run here: the unit's delta is not computed."""

    def __init__(self, carrier: nn.Module, gate: DivisionGate) -> None:
        super().__init__()
        self.carrier = carrier
        self.add_module(GATE_NAME, gate)

    def forward(self, x: torch.Tensor):
        c = self.carrier(x)
        c = tuple(c) if isinstance(c, (tuple, list)) else (c,)
        return (getattr(self, GATE_NAME)(c[0], c[0]), *c)


class CarryInput(nn.Module):
    """model input -> (gate prefix output, model input): the fallback carrier when the cut's carried values are
    not all batch-first tensors; ``first`` is then the whole original model (the prefix is computed twice)."""

    def __init__(self, prefix: nn.Module) -> None:
        super().__init__()
        self.prefix = prefix

    def forward(self, x: torch.Tensor):
        return self.prefix(x), x


class DropFirst(nn.Module):
    """(cut, x) -> model(x): the original model behind a :class:`CarryInput` head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, cut: torch.Tensor, x: torch.Tensor):
        return self.model(x)


def folded_model(original: fx.GraphModule, trained: fx.GraphModule, layers: list[PatchedLayer]) -> fx.GraphModule:
    """A copy of ``original`` whose patched convs carry the units' filters in place of the blamed ones: exactly the
    trained model's patched path (up to float rounding), at exactly the original's cost."""
    import copy

    out = copy.deepcopy(original)
    with torch.no_grad():
        for l in layers:
            conv = out.get_submodule(l.target)
            unit = trained.get_submodule(l.unit)
            idx = torch.tensor(l.channels, dtype=torch.long, device=conv.weight.device)
            conv.weight.index_add_(0, idx, unit.weight.to(conv.weight.dtype))
            if unit.bias is not None:
                if conv.bias is None:
                    conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device),
                                             requires_grad=False)
                conv.bias.index_add_(0, idx, unit.bias.to(conv.bias.dtype))
    return out


class InputHead(nn.Module):
    """model input -> (route, model input): an :class:`InputGate` in front of the whole original model."""

    def __init__(self, gate: InputGate) -> None:
        super().__init__()
        self.add_module(GATE_NAME, gate)

    def forward(self, x: torch.Tensor):
        return getattr(self, GATE_NAME)(x), x


def switch_model(original: fx.GraphModule, trained: fx.GraphModule, layers: list[PatchedLayer], example: torch.Tensor,
                 input_gate: InputGate | None = None, mode: str = "overlay") -> tuple[PerSampleSwitch, str]:
    """The deployment form of a patched model (see :func:`insert_patches` for the training form): the gate on the
    original first patched conv's output decides per sample; rows it leaves run the rest of the *original*
    model from that conv on, routed rows run :func:`folded_model`. Returns (model, how the original side was cut)."""
    import copy

    from .split import split_at

    folded = folded_model(original, trained, layers).eval()
    if input_gate is not None:
        sw = PerSampleSwitch(InputHead(input_gate), copy.deepcopy(original).eval(), folded, mode).eval()
        sw.add_module(GATE_NAME, input_gate)  # the same module, also where the training form has it (get_gate, hooks)
        return sw, "whole original model (input gate)"
    gate = get_gate(trained)
    orig = copy.deepcopy(original).eval()
    sp = split_at(orig, layers[0].layer)
    carrier = sp._carrier if sp._carrier is not None else sp.prefix
    with torch.no_grad():
        probe = carrier(example[:3] if len(example) >= 3 else example.repeat(3, *([1] * (example.ndim - 1)))[:3])
    probe = probe if isinstance(probe, tuple) else (probe,)
    if all(isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == 3 for v in probe):
        head, first, how = GateHead(carrier, gate), sp.suffix, f"original model cut after {layers[0].layer} ({len(probe) - 1} carried)"
    else:
        head, first = GateHead(CarryInput(sp.prefix), gate), DropFirst(orig)
        how = f"whole original model (values crossing {layers[0].layer} are not all batch-first tensors)"
    sw = PerSampleSwitch(head, first, folded, mode).eval()
    sw.add_module(GATE_NAME, gate)
    return sw, how
