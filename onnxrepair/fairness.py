"""Fairness evaluation of exported models on onnxruntime (the verdict is made on the file, never the
torch graph). Metrics: :mod:`onnxrepair.metrics`; counterfactual pairs: :func:`onnxrepair.methods.fmt.counterfactual_pairs`.

Predictions come from the model's first output, read as :func:`onnxrepair.runtime.output_reading`
decides from the graph (a single column is P(class 1) only out of a Sigmoid), once per model, so its
predictions on data rows and on counterfactual pairs are read the same way; a session whose graph is
not at hand falls back to the value range of the data rows.
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


def predict(session: Session, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Predicted classes of ``x`` (:meth:`Session.classes`: one reading of the output per session)."""
    return session.classes(session.run_batched(np.asarray(x, dtype=np.float32), batch_size=batch_size))


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
    ``protected``: a :class:`~onnxrepair.data.protected.ProtectedSpec` for ``dataset``. The same ``n_pairs``
    counterfactual pairs (seeded, sampled from ``dataset``'s per-feature marginals, one-hot columns kept
    together) are used for every model, so IDR is comparable before/after. ``idr_data`` is the flip rate on ``dataset``'s own rows with the
    protected value swapped.
    """
    from .data.protected import counterfactual_pairs, feature_groups, flip_protected

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
        pred = predict(sess, x, batch_size)  # first: without a graph, the data rows fix the reading for the pairs too
        rep = fairness_report(dataset.y, pred, col, protected.privileged, protected.unprivileged, favorable,
                              pair_preds=(predict(sess, pa, batch_size), predict(sess, pb, batch_size)))
        rep["idr_data"] = individual_discrimination_rate(predict(sess, orig, batch_size), predict(sess, flipped, batch_size))
        rep["output_reading"] = sess.reading
        rep["provider"] = sess.provider
        rep["protected"] = {"column": protected.column, "privileged": protected.privileged, "unprivileged": protected.unprivileged}
        results[name] = rep
    return results
