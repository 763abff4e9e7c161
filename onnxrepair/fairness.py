"""Fairness evaluation of exported models on onnxruntime (the verdict is made on the file, never the
torch graph). Metrics: :mod:`onnxrepair.metrics`; counterfactual pairs: :func:`onnxrepair.methods.fmt.counterfactual_pairs`.

Predictions come from the model's first output, read the way :func:`output_reading` says: integer
labels as they are, several columns by argmax (logits or probabilities alike), a single column as
P(class 1) > 0.5 when it comes out of a Sigmoid, else as a logit > 0. The reading is decided from the
graph, once per model, so a model's predictions on data rows and on counterfactual pairs are read the
same way; only a session whose graph is not at hand falls back to the value range of the data rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from .data.dataset import ArrayDataset
from .errors import DataError
from .metrics import fairness_report, individual_discrimination_rate
from .runtime import Session, make_session

ModelRef = Union[str, os.PathLike, Session]


def output_reading(session: Session) -> str | None:
    """How the first output gives a class: ``label`` (an integer output: the classes themselves),
    ``scores`` (several columns: argmax), ``probability`` (one column out of a Sigmoid, through
    reshapes), ``logit`` (one column from anything else); ``None`` when a single column's origin
    cannot be read because the session was not made from a file or bytes."""
    out = session.sess.get_outputs()[0]
    if "int" in out.type:
        return "label"
    last = out.shape[-1] if len(out.shape) >= 2 else 1
    if not isinstance(last, int):
        return None  # symbolic class dimension: only the values can tell
    if last > 1:
        return "scores"
    if session.source is None:
        return None
    import onnx

    from converters.load import output_source_op

    src = session.source
    model = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(src, load_external_data=False)
    return "probability" if output_source_op(model) == "Sigmoid" else "logit"


def reading_from_values(out: np.ndarray) -> str:
    """The fallback of :func:`output_reading`: judge by the values (one column in [0, 1] = probability)."""
    if np.issubdtype(out.dtype, np.integer):
        return "label"
    out = out.reshape(len(out), -1)
    if out.shape[1] > 1:
        return "scores"
    return "probability" if out.size and out.min() >= 0 and out.max() <= 1 else "logit"


def labels_from_output(out: np.ndarray, reading: str) -> np.ndarray:
    if reading == "label":
        return out.reshape(len(out)).astype(np.int64)
    out = out.reshape(len(out), -1)
    if reading == "scores":
        return out.argmax(axis=1).astype(np.int64)
    return (out[:, 0] > (0.5 if reading == "probability" else 0.0)).astype(np.int64)


def predict(session: Session, x: np.ndarray, batch_size: int = 1024, reading: str | None = None) -> np.ndarray:
    """Predicted classes of ``x``; ``reading`` as :func:`output_reading` returns it (found when not given)."""
    out = session.run_batched(np.asarray(x, dtype=np.float32), batch_size=batch_size)
    return labels_from_output(out, reading or output_reading(session) or reading_from_values(out))


def _named(models: ModelRef | Sequence[ModelRef] | Mapping[str, ModelRef]) -> dict[str, ModelRef]:
    if isinstance(models, Mapping):
        return dict(models)
    if isinstance(models, (str, os.PathLike, Session)):
        models = [models]
    out: dict[str, ModelRef] = {}
    for i, m in enumerate(models):
        key = str(m) if not isinstance(m, Session) else f"model{i}"
        out[key if key not in out else f"{key}#{i}"] = m  # the same file twice still gives two entries
    return out


class FairnessResults(dict):
    """``{name: metrics}`` in input order; ``res[0]`` / ``res[1]`` also index by position."""

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


def evaluate_fairness(
    models: ModelRef | Sequence[ModelRef] | Mapping[str, ModelRef],
    dataset: ArrayDataset,
    protected,
    provider: str = "auto",
    seed: int = 0,
    n_pairs: int = 5000,
    favorable: int = 1,
    batch_size: int = 1024,
) -> FairnessResults:
    """Accuracy, SPD, AAOD, EOD (signed and absolute) and IDR for each model, on onnxruntime.

    ``models``: a path, a :class:`Session`, a list of them (keys = paths) or a ``{name: model}`` dict;
    the result is keyed the same way and also indexable by position (``res[0]``).
    ``protected``: a :class:`~onnxrepair.methods.ProtectedSpec` for ``dataset``. The same ``n_pairs``
    counterfactual pairs (seeded, sampled from ``dataset``'s per-feature marginals, one-hot columns kept
    together) are used for every model, so IDR is comparable before/after. ``idr_data`` is the flip rate on ``dataset``'s own rows with the
    protected value swapped.
    """
    from .methods.fmt import counterfactual_pairs, feature_groups, flip_protected

    if dataset.y is None:
        raise DataError("fairness evaluation needs labels (a --target column)")
    if dataset.x.ndim != 2:
        raise DataError("fairness evaluation needs tabular (N, F) rows")
    x = np.asarray(dataset.x, dtype=np.float32)
    col = x[:, protected.index]
    pa, pb = counterfactual_pairs(x, protected, n_pairs, seed, feature_groups(dataset.columns, x.shape[1]))
    orig, flipped = flip_protected(x, protected)
    results = FairnessResults()
    for name, ref in _named(models).items():
        sess = ref if isinstance(ref, Session) else make_session(Path(ref), provider)
        n_in = sess.sess.get_inputs()[0].shape
        if len(n_in) == 2 and isinstance(n_in[1], int) and n_in[1] != x.shape[1]:
            raise DataError(f"{name}: the model takes {n_in[1]} features but the data has {x.shape[1]}")
        out = sess.run_batched(x, batch_size=batch_size)
        reading = output_reading(sess) or reading_from_values(out)  # one reading per model, for rows and pairs alike
        pred = labels_from_output(out, reading)
        rep = fairness_report(dataset.y, pred, col, protected.privileged, protected.unprivileged, favorable,
                              pair_preds=(predict(sess, pa, batch_size, reading), predict(sess, pb, batch_size, reading)))
        rep["idr_data"] = individual_discrimination_rate(predict(sess, orig, batch_size, reading), predict(sess, flipped, batch_size, reading))
        rep["output_reading"] = reading
        rep["provider"] = sess.provider
        rep["protected"] = {"column": protected.column, "privileged": protected.privileged, "unprivileged": protected.unprivileged}
        results[name] = rep
    return results
