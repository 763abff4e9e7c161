"""The input contract: how raw data becomes model input.

Internally every image batch is *unit NCHW*: float32 in [0, 1], channels first. Perturbations act
there (before normalisation, as in the literature). ``InputContract.to_model`` then applies
mean/std and the model's layout (NCHW, NHWC, or flattened), so gradients flow through the
preprocessing and attack budgets are in pixel units.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Sequence

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads on first use: `onnxrepair --help` and data loading need none of it
    import torch
    from torch import nn

METADATA_KEY = "onnxrepair.input_contract"
LAYOUTS = ("nchw", "nhwc", "flat", "tabular")


@dataclass
class InputContract:
    layout: str = "nchw"  # model input layout: nchw | nhwc | flat (flattened image) | tabular
    scale: float = 1.0  # raw values are divided by this to reach [0, 1] (255 for 8-bit images)
    mean: tuple[float, ...] | None = None  # per channel, applied after scaling
    std: tuple[float, ...] | None = None
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the unit-NCHW form, for flat models
    source: str = "default"  # flags | config | metadata | guessed | default: where the contract came from
    notes: list[str] = field(default_factory=list)
    guessed: tuple[str, ...] = ()  # fields that were guessed (finalised from the data by finalize_contract)
    encoding: dict | None = None  # CSV: raw columns -> features (one-hot, dropped, label values); stored with the model

    @property
    def is_image(self) -> bool:
        return self.layout != "tabular"

    def to_unit(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw data in the dataset's channel-first form -> float32 in [0, 1] (images) or as-is (tabular)."""
        import torch

        t = torch.as_tensor(np.asarray(raw)) if not isinstance(raw, torch.Tensor) else raw
        t = t.to(torch.float32)
        if self.scale != 1.0:
            t = t / self.scale
        return t

    def to_model(self, unit: torch.Tensor) -> torch.Tensor:
        """Unit NCHW (or tabular rows) -> the tensor the model takes. Differentiable."""
        import torch

        if not self.is_image:
            return unit
        x = unit
        if self.mean is not None:
            m = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = x - m
        if self.std is not None:
            s = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = x / s
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        elif self.layout == "flat":
            x = x.reshape(x.shape[0], -1)
        return x.contiguous()

    def module(self) -> nn.Module:
        from ._torch_contract import _Preprocess

        return _Preprocess(self)

    def key(self) -> tuple:
        """What decides the model input: contracts with equal keys feed identical tensors."""
        return (self.layout, self.scale, self.mean, self.std, self.image_shape if self.layout == "flat" else None)

    def numpy_feeder(self, dtype: np.dtype = np.float32) -> "NumpyFeeder":
        """The lean clean path: raw batch -> model input in numpy, into a reused buffer (see :class:`NumpyFeeder`)."""
        return NumpyFeeder(self, dtype)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("notes")
        d.pop("guessed")
        if d.get("encoding") is None:
            d.pop("encoding")  # contracts without one read as before
        return json.dumps(d)

    @classmethod
    def from_json(cls, s: str) -> "InputContract":
        d = json.loads(s)
        for k in ("mean", "std", "image_shape"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class NumpyFeeder:
    """``to_model(to_unit(raw))`` for unperturbed data, in numpy, with no torch round-trip.

    Scale, mean and std are fused into one per-channel multiply-add, ``x·a + b`` with
    ``a = 1/(scale·std)`` and ``b = −mean/std``, written straight into a preallocated buffer (the
    uint8 → float conversion happens inside the multiply); NHWC models get the transpose folded into
    the same pass. The result equals the torch path to float32 rounding (≤ a few ULP), not bit for bit:
    the torch path divides three times, this multiplies once and adds once.
    ``__call__(raw, out=None)`` returns the filled buffer; pass ``out`` to reuse one across batches.
    """

    def __init__(self, contract: InputContract, dtype: np.dtype = np.float32) -> None:
        self.contract = contract
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise ValueError(f"the numpy feeder makes float inputs, not {self.dtype}")
        scale = float(contract.scale)
        mean = np.asarray(contract.mean if contract.mean is not None else (0.0,), dtype=np.float64)
        std = np.asarray(contract.std if contract.std is not None else (1.0,), dtype=np.float64)
        if not contract.is_image:
            mean, std = np.zeros(1), np.ones(1)  # tabular rows: only the scale applies (as to_unit does)
        self.mult = (1.0 / (scale * std)).astype(self.dtype)  # (C,) or (1,)
        self.offset = (-mean / std).astype(self.dtype)
        self.plain = bool(np.all(self.offset == 0))

    def shape(self, raw_shape: tuple) -> tuple:
        n = raw_shape[0]
        lay = self.contract.layout
        if lay == "nhwc" and len(raw_shape) == 4:
            return (n, raw_shape[2], raw_shape[3], raw_shape[1])
        if lay == "flat" and len(raw_shape) == 4:
            return (n, int(np.prod(raw_shape[1:])))
        return tuple(raw_shape)

    def __call__(self, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        shp = self.shape(raw.shape)
        if out is None or out.shape != shp or out.dtype != self.dtype:
            out = np.empty(shp, dtype=self.dtype)
        lay = self.contract.layout
        if raw.ndim == 4:
            if lay == "nhwc":
                src, dst, cshape = raw.transpose(0, 2, 3, 1), out, (1, 1, 1, -1)  # channel is last: (C,) broadcasts
            else:  # nchw, or flat written through its NCHW view (same memory order)
                src, dst, cshape = raw, out.reshape(raw.shape), (1, -1, 1, 1)
            a = self.mult.reshape(cshape) if self.mult.size > 1 else self.mult[0]
            b = self.offset.reshape(cshape) if self.offset.size > 1 else self.offset[0]
        else:
            src, dst, a, b = raw, out, self.mult[0], self.offset[0]
        np.multiply(src, a, out=dst, casting="unsafe")
        if not self.plain:
            np.add(dst, b, out=dst)
        return out


def __getattr__(name: str):
    """``ModelWithContract`` and ``_Preprocess`` are torch modules, defined in :mod:`._torch_contract` so that
    importing the contract does not import torch."""
    if name in ("ModelWithContract", "_Preprocess"):
        from . import _torch_contract

        return getattr(_torch_contract, name)
    raise AttributeError(name)


def parse_floats(s: str | Sequence[float] | None) -> tuple[float, ...] | None:
    if s is None or s == "":
        return None
    if isinstance(s, str):
        return tuple(float(eval_fraction(v)) for v in s.split(","))
    return tuple(float(v) for v in s)


def eval_fraction(v: str) -> float:
    """'8/255' -> 0.0313..., '0.5' -> 0.5 (no eval())."""
    v = v.strip()
    if "/" in v:
        a, b = v.split("/", 1)
        return float(a) / float(b)
    return float(v)


# --------------------------------------------------------------------------------------------
# Where a contract comes from: flags > TOML config > the model's metadata_props > a guess from
# the model's input shape (and the data's dtype/range). Every guess is said in ``notes``.
# --------------------------------------------------------------------------------------------

CONFIG_KEYS = ("layout", "scale", "mean", "std", "image_shape")


def _dim(d) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def guess_layout(model_shape: Sequence, data_shape: Sequence[int] | None = None) -> tuple[str | None, str]:
    """Layout from the model's input shape (batch dim included; symbolic dims as str/None).

    Returns ``(layout or None, reason)``; None means ambiguous — the caller must ask for --layout.
    ``data_shape`` is one raw sample, channel-first (C, H, W) or (F,).
    """
    dims = [_dim(d) for d in model_shape]
    if len(dims) == 4:
        c_first, c_last = dims[1], dims[3]
        first = c_first in (1, 3, 4)
        last = c_last in (1, 3, 4)
        if data_shape is not None and len(data_shape) == 3:
            c = data_shape[0]
            first = first and c_first == c and (dims[2], dims[3]) in ((data_shape[1], data_shape[2]), (None, None), (data_shape[1], None), (None, data_shape[2]))
            last = last and c_last == c and (dims[1], dims[2]) in ((data_shape[1], data_shape[2]), (None, None), (data_shape[1], None), (None, data_shape[2]))
        if first and not last:
            return "nchw", f"model input {_fmt(model_shape)} has {c_first} channels in axis 1"
        if last and not first:
            return "nhwc", f"model input {_fmt(model_shape)} has {c_last} channels in the last axis"
        return None, f"model input {_fmt(model_shape)} could be NCHW or NHWC"
    if len(dims) == 2:
        f = dims[1]
        if data_shape is not None and len(data_shape) == 3:
            n = int(np.prod(data_shape))
            if f is None or f == n:
                return "flat", f"model input {_fmt(model_shape)} takes {n} = {'x'.join(map(str, data_shape))} flattened pixels"
            return None, f"model input {_fmt(model_shape)} takes {f} features but images are {'x'.join(map(str, data_shape))}"
        return "tabular", f"model input {_fmt(model_shape)} takes feature rows"
    return None, f"model input {_fmt(model_shape)} is neither an image batch (4-D) nor rows (2-D)"


def guess_scale(sample: np.ndarray) -> tuple[float, str]:
    """Pixel scale from the data: uint8 or values above 1 → 255, else 1."""
    if sample.dtype == np.uint8:
        return 255.0, "data is uint8, so raw values are divided by 255"
    finite = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    mx = float(finite.max()) if finite.size else 0.0
    if mx > 1.0 + 1e-6:
        return 255.0, f"data values reach {mx:g} > 1, so raw values are divided by 255"
    return 1.0, "data values lie in [0, 1], so they are used as-is (scale 1)"


def _fmt(shape: Sequence) -> str:
    return "[" + ",".join("N" if (d is None or isinstance(d, str)) and i == 0 else str(d if d is not None else "?") for i, d in enumerate(shape)) + "]"


def load_config(path: str) -> dict:
    """Read the contract keys from a TOML file (top level or an ``[input]`` table)."""
    import tomllib

    from ..errors import UsageError

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    table = doc.get("input", doc)
    unknown = sorted(k for k in table if k not in CONFIG_KEYS and not isinstance(table[k], dict))
    if unknown:
        raise UsageError(f"{path}: unknown input-contract keys {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}")
    return {k: table[k] for k in CONFIG_KEYS if k in table}


def contract_from_metadata(model) -> InputContract | None:
    """The contract stored in an ``onnx.ModelProto``'s metadata_props, or None."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            c = InputContract.from_json(p.value)
            c.source = "metadata"
            return c
    return None


def contract_to_metadata(model, contract: InputContract) -> None:
    """Store ``contract`` in ``model.metadata_props`` (replacing an earlier one)."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            p.value = contract.to_json()
            return
    model.metadata_props.add(key=METADATA_KEY, value=contract.to_json())


def resolve_contract(
    model_shape: Sequence,
    sample: np.ndarray | None = None,
    *,
    layout: str | None = None,
    scale: float | None = None,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    config: str | dict | None = None,
    metadata: InputContract | None = None,
) -> InputContract:
    """Build the contract: explicit values > config file > model metadata > guess.

    ``model_shape`` is the model's first input shape (batch dim included); ``sample`` a few raw rows of
    the dataset (channel-first) used to guess the scale and check the layout. Raises UsageError when a
    needed value is ambiguous and not given.
    """
    from ..errors import UsageError

    cfg = load_config(config) if isinstance(config, str) else dict(config or {})
    explicit = {k: v for k, v in dict(layout=layout, scale=scale, mean=mean, std=std).items() if v not in (None, "")}
    notes: list[str] = []
    base = metadata or InputContract(source="guessed")
    values = {
        "layout": base.layout if metadata else None,
        "scale": base.scale if metadata else None,
        "mean": base.mean,
        "std": base.std,
        "image_shape": base.image_shape,
    }
    sources = {k: ("metadata" if metadata else None) for k in values}
    for src, d in (("config", cfg), ("flags", explicit)):
        for k, v in d.items():
            values[k] = v
            sources[k] = src
    data_shape = tuple(sample.shape[1:]) if sample is not None and sample.ndim >= 2 else None
    if values["layout"] is None:
        lay, why = guess_layout(model_shape, data_shape)
        if lay is None:
            raise UsageError(f"cannot tell the input layout: {why}; pass --layout nchw|nhwc (or set it in --config)")
        values["layout"], sources["layout"] = lay, "guessed"
        notes.append(f"layout {lay} guessed: {why}")
    lay = str(values["layout"]).lower()
    if lay not in LAYOUTS:
        raise UsageError(f"unknown layout {values['layout']!r}; choose one of {', '.join(LAYOUTS)}")
    if values["scale"] is None:
        if sample is not None and lay != "tabular":
            s, why = guess_scale(sample)
            notes.append(f"scale {s:g} guessed: {why}")
        else:
            s = 1.0
        values["scale"], sources["scale"] = s, "guessed"
    scale_v = float(eval_fraction(values["scale"]) if isinstance(values["scale"], str) else values["scale"])
    if scale_v <= 0:
        raise UsageError(f"--scale must be positive, got {scale_v:g}")
    mean_v, std_v = parse_floats(values["mean"]), parse_floats(values["std"])
    if std_v is not None and any(v == 0 for v in std_v):
        raise UsageError("--std values must be non-zero")
    if lay != "tabular" and mean_v is None and std_v is None and sources["mean"] is None:
        notes.append("no mean/std given: the model is fed pixels in [0, 1] (pass --mean/--std if it was trained normalised)")
    if data_shape is not None and len(data_shape) == 3:
        for nm, v in (("mean", mean_v), ("std", std_v)):
            if v is not None and len(v) not in (1, data_shape[0]):
                raise UsageError(f"--{nm} has {len(v)} values but the images have {data_shape[0]} channels")
    image_shape = values["image_shape"]
    if image_shape is None:
        dims = [_dim(d) for d in model_shape]
        if len(dims) == 4 and lay in ("nchw", "nhwc"):
            chw = dims[1:4] if lay == "nchw" else [dims[3], dims[1], dims[2]]
            if all(chw):
                image_shape = tuple(chw)
        if image_shape is None and data_shape is not None and len(data_shape) == 3:
            image_shape = data_shape
    used = {s for s in sources.values() if s}
    source = "+".join(s for s in ("flags", "config", "metadata", "guessed") if s in used) or "default"
    return InputContract(
        layout=lay,
        scale=scale_v,
        mean=mean_v,
        std=std_v,
        image_shape=tuple(int(v) for v in image_shape) if image_shape is not None else None,
        source=source,
        notes=notes,
        # mean/std left unset on an image model count as guessed ("no normalisation"): evaluate warns when that guess scores near chance
        guessed=tuple(k for k, v in sources.items() if v == "guessed") + (("mean", "std") if lay != "tabular" and mean_v is None and std_v is None and sources["mean"] is None and sources["std"] is None else ()),
        encoding=metadata.encoding if metadata is not None else None,
    )


def finalize_contract(contract: InputContract, sample: np.ndarray) -> InputContract:
    """Settle what was guessed without data (scale; tabular vs flattened image) now that data is loaded.

    ``sample`` is a few raw rows (channel-first). Returns the same object, updated, with notes.
    """
    if "scale" in contract.guessed and contract.layout != "tabular" and sample.size:
        s, why = guess_scale(sample)
        if s != contract.scale:
            contract.scale = s
        contract.notes = [n for n in contract.notes if not n.startswith("scale ")] + [f"scale {s:g} guessed: {why}"]
        contract.guessed = tuple(g for g in contract.guessed if g != "scale")
    if contract.layout == "tabular" and "layout" in contract.guessed and sample.ndim == 4:
        contract.layout = "flat"
        contract.image_shape = tuple(int(v) for v in sample.shape[1:])
        contract.notes.append("layout flat: the model takes rows and the data are images, fed flattened")
        if "scale" in contract.guessed:
            return finalize_contract(contract, sample)
    return contract
