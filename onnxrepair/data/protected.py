"""Protected attributes: which feature column defines the groups a fairness verdict compares, and the
counterfactual operations on it that both the fairness metrics (individual discrimination) and FMT use.

* :class:`ProtectedSpec` — the column, its position and the privileged / unprivileged values.
* :func:`feature_groups` — one-hot columns ``name=value`` of one categorical attribute form one feature.
* :func:`counterfactual_pairs` — pairs identical except for the protected value, other features drawn from
  their empirical marginals (Zhang et al., TOSEM 2023, FMT's data augmentation).
* :func:`flip_protected` — rows of the two groups with the protected value swapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UsageError


@dataclass
class ProtectedSpec:
    """A protected attribute for fairness work: a feature column of the model input."""

    column: str
    index: int  # position in the model's feature vector
    privileged: float  # value of the privileged group
    unprivileged: float  # value of the other group (binary, or the chosen pair)


def feature_groups(columns: list[str] | None, n_features: int) -> list[list[int]]:
    """Column indices per *feature*: the one-hot columns ``name=value`` of one categorical attribute
    form one group (the encoding of :mod:`onnxrepair.data.tabular`); every other column is its own.
    Without names every column is its own feature."""
    if not columns or len(columns) != n_features:
        return [[j] for j in range(n_features)]
    groups: dict[str, list[int]] = {}
    for j, c in enumerate(columns):
        groups.setdefault(c.split("=", 1)[0] if "=" in c else f"\0{j}", []).append(j)
    return list(groups.values())


def counterfactual_pairs(
    x_train: np.ndarray, spec: ProtectedSpec, n: int, seed: int = 0, groups: list[list[int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs (a, b): a has the privileged value, b the unprivileged one; every other *feature* is
    an independent draw from that feature's values in ``x_train`` (its empirical marginal).

    ``groups`` (from :func:`feature_groups`) keeps the one-hot columns of a categorical feature
    together: they are copied as a block from one training row, so a pair never holds two or no
    categories at once (an input no encoded record can have). Default: every column is a feature."""
    x_train = np.asarray(x_train, dtype=np.float32)
    if x_train.ndim != 2 or not len(x_train):
        raise UsageError("counterfactual pairs need a non-empty (N, F) feature matrix")
    if not 0 <= spec.index < x_train.shape[1]:
        raise UsageError(f"protected index {spec.index} outside the {x_train.shape[1]} features")
    groups = groups or [[j] for j in range(x_train.shape[1])]
    if sorted(j for g in groups for j in g) != list(range(x_train.shape[1])):
        raise ValueError("feature groups must cover every column exactly once")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(x_train), size=(n, len(groups)))
    col_rows = np.empty((n, x_train.shape[1]), dtype=np.int64)
    for gi, g in enumerate(groups):
        col_rows[:, g] = rows[:, gi : gi + 1]
    a = np.take_along_axis(x_train, col_rows, axis=0) if n else np.empty((0, x_train.shape[1]), np.float32)
    a = a.astype(np.float32)
    b = a.copy()
    a[:, spec.index] = spec.privileged
    b[:, spec.index] = spec.unprivileged
    return a, b


def flip_protected(x: np.ndarray | torch.Tensor, spec: ProtectedSpec):
    """Rows of the two groups with the protected value swapped; rows in neither group are dropped."""
    col = x[:, spec.index]
    if isinstance(x, torch.Tensor):
        priv = torch.isclose(col, torch.tensor(spec.privileged, dtype=col.dtype, device=col.device))
        unpriv = torch.isclose(col, torch.tensor(spec.unprivileged, dtype=col.dtype, device=col.device))
    else:
        priv, unpriv = np.isclose(col, spec.privileged), np.isclose(col, spec.unprivileged)
    keep = priv | unpriv
    orig = x[keep]
    flipped = orig.clone() if isinstance(x, torch.Tensor) else orig.copy()
    flipped[:, spec.index] = torch.where(priv[keep], spec.unprivileged, spec.privileged) if isinstance(x, torch.Tensor) else np.where(priv[keep], spec.unprivileged, spec.privileged)
    return orig, flipped


def require_protected_labels(protected: ProtectedSpec | None, train, method: str) -> ProtectedSpec:
    """The protected spec of a method that fine-tunes with labels; a one-line error naming the missing flag."""
    if protected is None:
        raise UsageError(f"{method} needs a protected attribute (--protected COLUMN)")
    if train.y is None:
        raise UsageError(f"{method} fine-tunes with labels: the training data needs a --target column")
    return protected


def require_tabular_protected(protected: ProtectedSpec | None, train, method: str) -> ProtectedSpec:
    """The protected spec of a method that edits a tabular model around its protected input column; a one-line error
    when there is none or the data are not (N, F) rows."""
    if protected is None:
        raise UsageError(f"{method} needs a protected attribute (--protected COLUMN)")
    if train.x.ndim != 2:
        raise UsageError(f"{method} edits tabular models: the data must be (N, F) feature rows")
    return protected
