"""Robustness evaluation of ONNX models on onnxruntime.

``evaluate_models`` scores one or several ONNX files on *identical* inputs: every perturbed batch is made
once (seeded per corruption, severity and batch) and fed to every model, so a before/after comparison is fair.
Figures, per model:

* clean accuracy and per-class accuracy;
* accuracy per corruption × severity and their mean (mCA, the mean corruption accuracy of Hendrycks &
  Dietterich 2019 without AlexNet normalisation);
* DeepPatch's robustness accuracy (Wei et al. 2023): accuracy over the clean set plus its six Gaussian-blurred
  copies (σ ∈ {0.5, 1, 1.5, 2, 2.5, 3}), and the accuracy per σ;
* adversarial accuracy per attack × ε. Attacks are white-box and crafted **per model on that model's own
  converted torch graph** (onnx2torch), through the input contract so ε is in pixel units; the adversarial
  images are then scored on onnxruntime. (So models are compared on attacks against themselves, not on the
  same adversarial images.) ``attack_source="first"`` instead crafts them once on the first model and scores the
  same adversarial images on every model (transfer).

Everything the models see is scored by onnxruntime; torch only generates inputs.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.checks import check_all
from .data.contract import InputContract, ModelWithContract, contract_from_metadata, resolve_contract
from .data.dataset import ArrayDataset
from .errors import DataError, ModelError, UsageError
from .perturb import corruptions as C
from .perturb.attacks import ATTACKS, make_attack, resolve_attacks
from .perturb.blur import DEEPPATCH_SIGMAS, gaussian_blur
from .progress import SILENT, Reporter
from .runtime import ORT_TO_NP, Session, make_session, torch_dtype

log = logging.getLogger(__name__)

DEFAULT_EPS_LINF: tuple[float, ...] = (8 / 255,)
DEFAULT_EPS_L2: tuple[float, ...] = (0.5,)


@dataclass
class ModelResult:
    name: str
    path: str | None
    provider: str
    contract: dict
    n: int
    clean: float
    per_class: dict[str, float] = field(default_factory=dict)
    corruptions: dict[str, dict[int, float]] = field(default_factory=dict)
    mca: float | None = None
    blur: dict[float, float] = field(default_factory=dict)
    robustness: float | None = None  # DeepPatch: clean + 6 blurred copies
    adversarial: dict[str, dict[float, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    models: list[ModelResult]
    dataset: str
    n: int
    seed: int
    corruptions: list[str]
    severities: list[int]
    attacks: list[str]
    eps: dict[str, list[float]]
    seconds: float
    images_scored: int  # model evaluations performed on onnxruntime (all models, all copies)
    notes: list[str] = field(default_factory=list)
    attack_source: str = "each"  # "each": white-box per model; "first": crafted on the first model, scored on all
    warnings: list[str] = field(default_factory=list)  # loud: e.g. near-chance accuracy under a guessed contract

    @property
    def images_per_s(self) -> float:
        return self.images_scored / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["images_per_s"] = self.images_per_s
        for m in d["models"]:  # JSON keys must be strings
            m["corruptions"] = {k: {str(s): a for s, a in v.items()} for k, v in m["corruptions"].items()}
            m["blur"] = {f"{s:g}": a for s, a in m["blur"].items()}
            m["adversarial"] = {k: {f"{e:.6g}": a for e, a in v.items()} for k, v in m["adversarial"].items()}
        return d


# ----------------------------------------------------------------------------- model handles


@dataclass
class _Model:
    name: str
    path: str | None
    session: Session
    contract: InputContract
    in_name: str
    in_dtype: np.dtype
    in_shape: tuple
    num_outputs: int | None
    torch_model: ModelWithContract | None = None
    unit_contract: InputContract | None = None  # the same model input from the run's shared unit tensor (see unit_equivalent)


def _model_shape_from_session(s: Session) -> tuple:
    return tuple(s.sess.get_inputs()[0].shape)


def _num_outputs(s: Session) -> int | None:
    shp = s.sess.get_outputs()[0].shape
    return shp[-1] if shp and isinstance(shp[-1], int) else None


def open_model(model: str | os.PathLike | Session, provider: str = "auto") -> tuple[str, str | None, Session]:
    if isinstance(model, Session):
        return "model", None, model
    p = Path(model)
    if not p.exists():
        raise UsageError(f"{p}: no such file")
    return p.stem, str(p), make_session(p, provider)


def model_contract(path: str | None, session: Session, dataset: ArrayDataset, given: InputContract | None = None) -> InputContract:
    """The contract for one model: ``given`` if any, else the model's metadata, else a guess."""
    if given is not None:
        return given
    meta = None
    if path is not None:
        import onnx

        try:
            meta = contract_from_metadata(onnx.load(path, load_external_data=False))
        except Exception:  # metadata is advisory; the session already loaded the file
            meta = None
    return resolve_contract(_model_shape_from_session(session), dataset.x[:64], metadata=meta)


def _torch_model(m: _Model) -> ModelWithContract:
    if m.path is None:
        raise UsageError("attacks need the model file (to convert it to torch), not only a session")
    from converters import convert

    return ModelWithContract(convert(m.path).gm, m.unit_contract or m.contract).eval()


def unit_equivalent(contract: InputContract, ref_scale: float) -> InputContract:
    """The contract that gives ``contract``'s model input from a unit tensor made with ``ref_scale``.

    Models are compared on one shared unit tensor (raw / ref_scale) that every corruption and attack acts on. A
    model whose contract divides raw values by another scale s sees ``raw / s = unit * f`` with ``f = ref_scale / s``;
    ``((unit * f) - mean) / std = (unit - mean / f) / (std / f)``, so its mean and std are rescaled instead of the
    data. Per-model contracts (from each model's metadata or its own ``--config``) can thus differ in scale too.
    """
    import dataclasses

    f = ref_scale / contract.scale
    if f == 1.0:
        return contract
    mean = tuple(v / f for v in contract.mean) if contract.mean is not None else None
    std = tuple(v / f for v in contract.std) if contract.std is not None else (1.0 / f,)
    return dataclasses.replace(contract, scale=ref_scale, mean=mean, std=std, notes=[])


# ----------------------------------------------------------------------------- the evaluator


def evaluate_models(
    models: Sequence[str | os.PathLike | Session],
    dataset: ArrayDataset,
    contract: InputContract | Sequence[InputContract | None] | None = None,
    *,
    corruptions: str | Sequence[str] = (),
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    blur: bool = True,
    attacks: str | Sequence[str] = (),
    eps: Sequence[float] = DEFAULT_EPS_LINF,
    eps_l2: Sequence[float] = DEFAULT_EPS_L2,
    attack_steps: int | None = None,
    attack_limit: int | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    provider: str = "auto",
    device: str | torch.device | None = None,
    seed: int = 0,
    names: Sequence[str] | None = None,
    progress: Reporter = SILENT,
    attack_source: str = "each",
) -> EvalReport:
    """Evaluate ``models`` (paths or :class:`Session`) on ``dataset`` under the same perturbed inputs.

    ``contract``: one for all models, one per model, or None (read from each model's metadata_props, else
    guessed from its input shape). ``corruptions``: names or groups ("all", "deeppatch"); severities outside a
    corruption's range are skipped. ``eps`` is for L∞ attacks, ``eps_l2`` for L2 attacks (pixel units).
    ``attack_limit`` caps the images attacked (attacks cost far more than inference). ``device`` runs the
    corruptions and attacks (default: CUDA when available). Raises DataError / UsageError / ModelError with
    one clear line when data and model do not fit.

    ``attack_source``: "each" (default) crafts white-box attacks per model on its own graph; "first" crafts them
    once on the first model and scores those same adversarial images on every model (the transfer protocol,
    e.g. of DARE's evaluation: a repaired model judged on the original's adversarial examples).
    """
    t_start = time.perf_counter()
    if not models:
        raise UsageError("no model given")
    if attack_source not in ("each", "first"):
        raise UsageError(f"attack source must be 'each' or 'first', not {attack_source!r}")
    corr_names = C.resolve_names(list(corruptions) if not isinstance(corruptions, str) else corruptions)
    attack_names = resolve_attacks(list(attacks) if not isinstance(attacks, str) else attacks)
    sev = sorted({int(s) for s in severities})
    if corr_names and not sev:
        raise UsageError("no severities given")
    if len(dataset) == 0:
        raise DataError("the dataset is empty")
    ds = dataset.limit(limit, seed=seed)
    if ds.x.ndim != 4 and (corr_names or blur or attack_names):
        raise DataError(f"corruptions, blur and attacks need images (N, C, H, W); the data is {ds.x.shape}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    contracts = list(contract) if isinstance(contract, (list, tuple)) else [contract] * len(models)
    if len(contracts) != len(models):
        raise UsageError(f"{len(contracts)} contracts for {len(models)} models")
    ms: list[_Model] = []
    for i, (mdl, con) in enumerate(zip(models, contracts)):
        name, path, sess = open_model(mdl, provider)
        if names is not None:
            name = names[i]
        elif any(m.name == name for m in ms):
            name = f"{name}#{i + 1}"
        con = model_contract(path, sess, ds, con)
        shape = _model_shape_from_session(sess)
        check_all(ds, con, shape, _num_outputs(sess), model_name=name)
        inp = sess.sess.get_inputs()[0]
        ms.append(_Model(name, path, sess, con, inp.name, np.dtype(ORT_TO_NP.get(inp.type, np.float32)), shape, _num_outputs(sess)))

    # one unit tensor for all models: raw / the scale the data's range calls for, when a model uses it, else the first model's
    from .data.contract import guess_scale

    data_scale = guess_scale(ds.x[:256])[0] if ds.x.ndim == 4 else ms[0].contract.scale
    ref_scale = data_scale if any(m.contract.scale == data_scale for m in ms) else ms[0].contract.scale
    for m in ms:
        m.unit_contract = unit_equivalent(m.contract, ref_scale)
    n = len(ds)
    y_all = ds.y
    steps_per_batch = 1 + len(corr_names) * len(sev) + (len(DEEPPATCH_SIGMAS) if blur else 0)
    nb = (n + batch_size - 1) // batch_size
    clean_pred = {m.name: np.empty(n, dtype=np.int64) for m in ms}
    corr_correct = {m.name: {c: {s: 0 for s in sev if s in C.SEVERITIES[c]} for c in corr_names} for m in ms}
    blur_correct = {m.name: {s: 0 for s in DEEPPATCH_SIGMAS} for m in ms}
    secs = {m.name: {"clean": 0.0, "corruptions": 0.0, "blur": 0.0, "attacks": 0.0} for m in ms}
    t_gen = {"corruptions": 0.0, "blur": 0.0}
    scored = 0

    def predict(m: _Model, unit: torch.Tensor, cache: dict) -> np.ndarray:
        # models whose contracts make the same input share one feed (keyed by value, not identity: the CLI
        # builds one contract object per model)
        key = (m.unit_contract.key(), m.in_dtype, m.session.binds)
        feed = cache.get(key)
        if feed is None:
            feed = m.unit_contract.to_model(unit).detach()
            if m.session.binds:  # stays where it is (on the GPU): onnxruntime's I/O binding reads it in place
                feed = feed.to(torch_dtype(m.in_dtype)).contiguous()
            else:
                feed = np.ascontiguousarray(feed.cpu().numpy(), dtype=m.in_dtype)
            cache[key] = feed
        out = m.session.run({m.in_name: feed})[0]
        return m.session.classes(out)

    # --- clean pass: the lean path (numpy only, one feed per contract group, next batch prepared while
    # onnxruntime runs this one; ORT releases the GIL, so the two overlap)
    with progress.task("clean", total=nb) as advance:
        for lo, hi, preds, dt in _clean_predictions(ms, ds.x, batch_size, device=dev):
            for m in ms:
                clean_pred[m.name][lo:hi] = preds[m.name]
                secs[m.name]["clean"] += dt[m.name]
                scored += hi - lo
            advance()

    if corr_names or blur:
        with progress.task("perturbed", total=nb * (steps_per_batch - 1)) as advance:
            for b, raw in enumerate(_prefetched(ds.x, batch_size)):
                lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
                yb = y_all[lo:hi]
                # all models share the unit tensor; contracts differ only in to_model
                unit_dev = ms[0].unit_contract.to_unit(raw).to(dev)
                for c in corr_names:
                    for s in sev:
                        if s not in C.SEVERITIES[c]:
                            continue
                        t0 = time.perf_counter()
                        xc = C.apply(c, unit_dev, s, seed=C.seed_for(seed, c, s, b))
                        t_gen["corruptions"] += time.perf_counter() - t0
                        cache = {}
                        for m in ms:
                            t0 = time.perf_counter()
                            corr_correct[m.name][c][s] += int((predict(m, xc, cache) == yb).sum())
                            secs[m.name]["corruptions"] += time.perf_counter() - t0
                            scored += hi - lo
                        advance()
                if blur:
                    for sg in DEEPPATCH_SIGMAS:
                        t0 = time.perf_counter()
                        xb = gaussian_blur(unit_dev, sg)
                        t_gen["blur"] += time.perf_counter() - t0
                        cache = {}
                        for m in ms:
                            t0 = time.perf_counter()
                            blur_correct[m.name][sg] += int((predict(m, xb, cache) == yb).sum())
                            secs[m.name]["blur"] += time.perf_counter() - t0
                            scored += hi - lo
                        advance()

    adv_acc: dict[str, dict[str, dict[float, float]]] = {m.name: {} for m in ms}
    adv_n = 0
    if attack_names:
        ads = ds.limit(attack_limit, seed=seed) if attack_limit else ds
        adv_n = len(ads)
        plan = [(a, e) for a in attack_names for e in (eps_l2 if ATTACKS[a].norm == "l2" else eps)]
        abs_ = min(batch_size, 256)
        crafters = ms if attack_source == "each" else ms[:1]
        with progress.task("attacking", total=len(crafters) * len(plan) * ((adv_n + abs_ - 1) // abs_)) as advance:
            for src in crafters:
                t0 = time.perf_counter()
                tm = _torch_model(src).to(dev)
                targets = [src] if attack_source == "each" else ms  # "first": the same adversarial images for every model
                for a, e in plan:
                    correct = {m.name: 0 for m in targets}
                    for lo in range(0, adv_n, abs_):
                        hi = min(adv_n, lo + abs_)
                        xu = src.unit_contract.to_unit(ads.x[lo:hi]).to(dev)
                        yt = torch.as_tensor(ads.y[lo:hi], device=dev)
                        atk = make_attack(a, tm, e, steps=attack_steps, seed=C.seed_for(seed, a, 0, lo))
                        xa = atk(xu, yt)
                        cache: dict = {}
                        for m in targets:
                            t1 = time.perf_counter()
                            correct[m.name] += int((predict(m, xa, cache) == ads.y[lo:hi]).sum())
                            if m is not src:
                                secs[m.name]["attacks"] += time.perf_counter() - t1
                            scored += hi - lo
                        advance()
                    for m in targets:
                        adv_acc[m.name].setdefault(a, {})[float(e)] = correct[m.name] / adv_n
                secs[src.name]["attacks"] += time.perf_counter() - t0

    results = []
    classes = ds.classes or [str(i) for i in range(int(y_all.max()) + 1)]
    for m in ms:
        pred = clean_pred[m.name]
        ok = pred == y_all
        per_class = {}
        for ci, cname in enumerate(classes):
            sel = y_all == ci
            if sel.any():
                per_class[cname] = float(ok[sel].mean())
        corr = {c: {s: v / n for s, v in d.items()} for c, d in corr_correct[m.name].items()}
        all_acc = [a for d in corr.values() for a in d.values()]
        bl = {s: v / n for s, v in blur_correct[m.name].items()} if blur else {}
        rob = (int(ok.sum()) + sum(blur_correct[m.name].values())) / (n * (1 + len(DEEPPATCH_SIGMAS))) if blur else None
        results.append(
            ModelResult(
                name=m.name,
                path=m.path,
                provider=m.session.provider,
                contract={**asdict(m.contract)},
                n=n,
                clean=float(ok.mean()),
                per_class=per_class,
                corruptions=corr,
                mca=float(np.mean(all_acc)) if all_acc else None,
                blur=bl,
                robustness=rob,
                adversarial=adv_acc[m.name],
                seconds={k: round(v, 4) for k, v in secs[m.name].items()},
            )
        )
    notes = [f"{m.name}: {note}" for m in ms for note in m.contract.notes]
    notes += [f"{m.name}: the model's batch is fixed at {m.session.fixed_batch}; fed in chunks of {m.session.fixed_batch}"
              for m in ms if m.session.fixed_batch is not None and m.session.fixed_batch != batch_size]
    if attack_names and attack_source == "each":
        notes.append(f"attacks crafted per model on its own converted torch graph (white-box), scored on onnxruntime; {adv_n} images attacked")
    elif attack_names:
        notes.append(f"attacks crafted once on {ms[0].name}'s converted torch graph and the same adversarial images scored on every model "
                     f"(transfer; white-box for {ms[0].name} only), on onnxruntime; {adv_n} images attacked")
    warnings = [w for m, r in zip(ms, results) if (w := chance_warning(m.name, m.contract, r.clean, y_all)) is not None]
    rep = EvalReport(
        models=results,
        dataset=ds.name,
        n=n,
        seed=seed,
        corruptions=corr_names,
        severities=sev,
        attacks=attack_names,
        eps={"linf": [float(e) for e in eps], "l2": [float(e) for e in eps_l2]} if attack_names else {},
        seconds=time.perf_counter() - t_start,
        images_scored=scored,
        notes=notes,
        attack_source=attack_source,
        warnings=warnings,
    )
    rep.generation_seconds = t_gen  # type: ignore[attr-defined]  (bench reads it; not part of the JSON)
    return rep


# ----------------------------------------------------------------------------- a wrong contract looks like a bad model


def chance_level(y: np.ndarray) -> float:
    """What always answering the most frequent class scores."""
    return float(np.bincount(y).max() / len(y)) if len(y) else 0.0


def chance_warning(name: str, contract: InputContract, clean: float, y: np.ndarray | None) -> str | None:
    """A loud line when an image model scores near chance on labelled data under a contract that was (partly)
    guessed: that is far more often wrong preprocessing than a broken model."""
    scale_guessed = any(n.startswith("scale ") and " guessed" in n for n in contract.notes)  # finalize_contract settles it from the data
    if y is None or not len(y) or not contract.is_image or not (scale_guessed or {"mean", "std", "scale"} & set(contract.guessed)):
        return None
    chance = chance_level(y)
    if clean > chance + 0.2 * (1.0 - chance):
        return None
    norm = "no mean/std" if contract.mean is None and contract.std is None else f"mean {contract.mean}, std {contract.std}"
    return (f"{name} scores {100 * clean:.2f} % (chance {100 * chance:.2f} %) under a guessed input contract ({contract.layout}, "
            f"scale {contract.scale:g}, {norm}): the preprocessing is probably wrong, not the model; rerun with --find-contract "
            "or give --scale/--mean/--std/--layout")


# the model-side transforms --find-contract tries: what the model expects of pixels in [0, 1] (mean, std)
CONTRACT_CANDIDATES: dict[str, tuple[tuple[float, ...] | None, tuple[float, ...] | None]] = {
    "[0,1]": (None, None),
    "[0,255]": ((0.0,), (1 / 255,)),
    "[-1,1]": ((0.5,), (0.5,)),
    "ImageNet mean/std": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "CIFAR-10 mean/std": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "MNIST mean/std": ((0.1307,), (0.3081,)),
}


def find_contract(
    model: str | os.PathLike | Session,
    dataset: ArrayDataset,
    base: InputContract,
    *,
    sample: int = 512,
    seed: int = 0,
    provider: str = "auto",
) -> tuple[InputContract, list[dict]]:
    """Try the usual preprocessing candidates on a stratified labelled sample and return the best contract and
    every candidate's accuracy (best first).

    Candidates: the model takes pixels in [0, 1], in [0, 255], in [-1, 1], or normalised with ImageNet, CIFAR-10
    or MNIST mean/std (those matching the image's channel count), each in NCHW and NHWC where the model accepts
    that shape. The data side (raw values -> [0, 1], ``base.scale``) stays as guessed from the data's range, so
    corruptions and attack budgets keep their pixel meaning; "a model that takes 0-255 pixels" is std 1/255.
    Ties keep the earlier candidate (the base contract's layout, [0, 1] first).
    """
    import dataclasses

    if dataset.y is None:
        raise UsageError("--find-contract needs labelled data")
    if dataset.x.ndim != 4:
        raise UsageError("--find-contract searches image preprocessing; the data are not images")
    _, _, sess = open_model(model, provider)
    ds = dataset.limit(sample, seed=seed)
    c = ds.x.shape[1]
    layouts = [base.layout] + [lay for lay in ("nchw", "nhwc") if lay != base.layout]
    dtype = np.dtype(ORT_TO_NP.get(sess.sess.get_inputs()[0].type, np.float32))
    tried: list[dict] = []
    best: InputContract | None = None
    best_acc = -1.0
    for lay in layouts:
        for label, (mean, std) in CONTRACT_CANDIDATES.items():
            if mean is not None and len(mean) not in (1, c):
                continue
            cand = dataclasses.replace(base, layout=lay, mean=mean, std=std, notes=[], guessed=())
            try:
                feed = np.ascontiguousarray(cand.to_model(cand.to_unit(ds.x)).numpy(), dtype=dtype)
                pred = sess.classes(sess.run({sess.input_names[0]: feed})[0])
            except Exception:  # the model does not take this layout: not a candidate
                continue
            acc = float((pred == ds.y).mean())
            tried.append({"preprocessing": label, "layout": lay, "mean": mean, "std": std, "accuracy": acc})
            if acc > best_acc:
                best, best_acc = cand, acc
    if best is None:
        raise UsageError("--find-contract: the model took none of the candidate inputs")
    tried.sort(key=lambda t: -t["accuracy"])
    top = tried[0]
    nxt = f"; next best {tried[1]['preprocessing']} ({tried[1]['layout']}) {100 * tried[1]['accuracy']:.2f} %" if len(tried) > 1 else ""
    best.source = "found"
    best.notes = [f"contract found by --find-contract: model takes {top['preprocessing']} ({top['layout']}), scale {best.scale:g}; "
                  f"{100 * top['accuracy']:.2f} % on {len(ds)} labelled images{nxt}"]
    return best, tried


def _feeder(m: _Model, device: torch.device | None = None):
    """The numpy feeder for float inputs; the torch path for the rare model that takes integers. A session that
    binds device tensors (CUDA) gets the raw batch moved to ``device`` once and preprocessed there."""
    if device is not None and m.session.binds:
        return lambda raw, out=None: m.contract.to_model(m.contract.to_unit(torch.from_numpy(np.ascontiguousarray(raw)).to(device))).to(torch_dtype(m.in_dtype))
    if np.issubdtype(m.in_dtype, np.floating):
        return m.contract.numpy_feeder(m.in_dtype)
    return lambda raw, out=None: np.ascontiguousarray(m.contract.to_model(m.contract.to_unit(raw)).numpy(), dtype=m.in_dtype)


def _prefetched(x, batch_size: int):
    """Yield ``x`` in batches, reading batch i+1 in a thread while the caller works on batch i: a lazy image
    array (:mod:`onnxrepair.data.lazy`) decodes the next batch while this one is perturbed and scored."""
    from .data.lazy import is_lazy

    n = len(x)
    if not is_lazy(x):  # slices of an array cost nothing
        for lo in range(0, n, batch_size):
            yield x[lo : lo + batch_size]
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="onnxrepair-prefetch")
    try:
        nxt = pool.submit(x.__getitem__, slice(0, batch_size))
        for lo in range(0, n, batch_size):
            raw = nxt.result()
            if lo + batch_size < n:
                nxt = pool.submit(x.__getitem__, slice(lo + batch_size, lo + 2 * batch_size))
            yield raw
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _clean_predictions(ms: Sequence[_Model], x: np.ndarray, batch_size: int, prefetch: bool = True, device: torch.device | None = None):
    """Yield ``(lo, hi, {name: predictions}, {name: seconds})`` per batch of unperturbed ``x``.

    Each group of models whose contracts make the same input gets one feed per batch, built by the
    contract's :class:`~onnxrepair.data.contract.NumpyFeeder` into one of two preallocated buffers; a
    one-slot prefetch thread fills the other buffer with batch i+1 while onnxruntime scores batch i.
    The ping-pong is safe: batch i+2 is only submitted after batch i's runs have returned. Sessions that bind
    device tensors (CUDA, :attr:`~onnxrepair.runtime.Session.binds`) get the raw batch moved to ``device`` and
    preprocessed there instead, and onnxruntime reads it in place.
    """
    n = len(x)
    groups: dict[tuple, list[_Model]] = {}
    for m in ms:
        groups.setdefault((m.contract.key(), m.in_dtype.str, m.session.binds), []).append(m)
    feeders = [(_feeder(g[0], device), g) for g in groups.values()]
    bufs: list[list[np.ndarray | None]] = [[None, None] for _ in feeders]

    def prep(b: int) -> list[np.ndarray]:
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        raw = x[lo:hi]
        out = []
        for k, (feeder, _) in enumerate(feeders):
            buf = feeder(raw, bufs[k][b % 2])
            bufs[k][b % 2] = buf
            out.append(buf)
        return out

    nb = (n + batch_size - 1) // batch_size
    pool = ThreadPoolExecutor(1, thread_name_prefix="onnxrepair-prefetch") if prefetch and nb > 1 else None
    try:
        nxt = pool.submit(prep, 0) if pool else None
        for b in range(nb):
            lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
            t0 = time.perf_counter()
            feeds = nxt.result() if pool else prep(b)
            if pool and b + 1 < nb:
                nxt = pool.submit(prep, b + 1)
            t_prep = (time.perf_counter() - t0) / len(ms)  # waiting on the prefetch is shared by every model
            preds: dict[str, np.ndarray] = {}
            secs: dict[str, float] = {}
            for feed, (_, g) in zip(feeds, feeders):
                for m in g:
                    t0 = time.perf_counter()
                    preds[m.name] = m.session.classes(m.session.run({m.in_name: feed})[0])
                    secs[m.name] = time.perf_counter() - t0 + t_prep
            yield lo, hi, preds, secs
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
