"""Tabular data: numeric CSV reader, protected-attribute resolution, and encoders for the raw
Adult, German credit and COMPAS files.

A tabular model takes a float32 feature vector; the CSV this module reads is already numeric,
one header row, features in the model's order (CSV column order minus the target, unless
``feature_columns`` says otherwise). Protected attributes stay *in* the feature vector (fairness
methods flip them in the input) and are also copied to ``extra["protected:<col>"]``.

Encoding recipe (``encode_adult`` / ``encode_german`` / ``encode_compas``), the same for all three:

* protected attributes are binarised, 1 = the group usually called privileged:
  ``sex`` 1 = male, ``race`` 1 = white (COMPAS: Caucasian), ``age`` 1 = older than 25 (German);
* continuous features are standardised (mean 0, std 1 over the encoded rows); heavy-tailed counts
  (capital gain/loss, priors, credit amount) are ``log1p``-ed first;
* categoricals are one-hot over their most frequent values (at most ``k`` per column, the rest in
  ``<col>=other``), so the feature count stays modest (Adult 32, German 52, COMPAS 8 features);
  ``categorical="ordinal"`` instead codes each as one integer column, 0 = the most frequent value,
  over all its values (integer coding as in the ADF/FMT benchmark data; Adult 12, German 20 features);
* the label is the favourable outcome as 1: Adult ``income`` 1 = >50K, German ``credit`` 1 = good,
  COMPAS ``no_recid`` 1 = did *not* reoffend within two years (``1 - two_year_recid``);
* rows with missing values (``?`` in Adult) are dropped; COMPAS uses ProPublica's filter
  (|days_b_screening_arrest| <= 30, is_recid != -1, c_charge_degree != 'O', score_text != 'N/A').
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, UsageError
from .protected import ProtectedSpec
from .dataset import ArrayDataset

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "protected:"


# --------------------------------------------------------------------------- reading
def load_csv(
    path: str | os.PathLike,
    target: str,
    protected: Sequence[str] | None = None,
    feature_columns: Sequence[str] | None = None,
) -> ArrayDataset:
    """Read a numeric CSV with a header into an :class:`ArrayDataset`.

    ``x`` is float32 (N, F) in ``feature_columns`` order (default: every column except ``target``,
    in file order); ``y`` is int64 class indices taken from ``target`` (non-negative integers);
    each protected column is checked (present, not constant) and copied to
    ``extra["protected:<col>"]``. Raises :class:`DataError` with a one-line reason otherwise.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file")
    with open(p, newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{p}: empty CSV (no header row)") from None
        rows = [r for r in reader if r and any(c.strip() for c in r)]
    if len(set(header)) != len(header):
        dup = sorted(k for k, v in Counter(header).items() if v > 1)
        raise DataError(f"{p}: duplicate column names: {', '.join(dup)}")
    if target not in header:
        raise DataError(f"{p}: target column {target!r} not found; columns: {', '.join(header)}")
    feats = list(feature_columns) if feature_columns is not None else [h for h in header if h != target]
    missing = [c for c in feats if c not in header]
    if missing:
        raise DataError(f"{p}: feature columns not in the CSV: {', '.join(missing)}")
    if target in feats:
        raise DataError(f"{p}: the target {target!r} cannot also be a feature column")
    if not rows:
        raise DataError(f"{p}: no data rows")
    bad = [i + 2 for i, r in enumerate(rows) if len(r) != len(header)]
    if bad:
        raise DataError(f"{p}: {len(bad)} row(s) do not have {len(header)} fields (first at line {bad[0]})")
    try:
        table = np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise DataError(f"{p}: every value must be numeric (encode categoricals first): {e}") from None
    if not np.isfinite(table).all():
        i, j = np.argwhere(~np.isfinite(table))[0]
        raise DataError(f"{p}: non-finite value in column {header[j]!r} at line {i + 2}")
    col = {h: i for i, h in enumerate(header)}
    yv = table[:, col[target]]
    if (yv != np.round(yv)).any() or (yv < 0).any():
        raise DataError(f"{p}: target {target!r} must hold non-negative integer class indices")
    y = yv.astype(np.int64)
    x = table[:, [col[c] for c in feats]].astype(np.float32)
    ds = ArrayDataset(x=x, y=y, columns=feats, name=p.stem)
    for c in protected or []:
        if c not in feats:
            raise DataError(f"{p}: protected column {c!r} is not a feature column; columns: {', '.join(feats)}")
        v = x[:, feats.index(c)]
        if np.unique(v).size < 2:
            raise DataError(f"{p}: protected column {c!r} is constant ({v[0]:g}); it cannot define two groups")
        ds.extra[PROTECTED_PREFIX + c] = v.copy()
    return ds


def resolve_protected(
    dataset: ArrayDataset,
    column: str,
    privileged: float | None = None,
    unprivileged: float | None = None,
):
    """The :class:`~onnxrepair.data.protected.ProtectedSpec` for ``column`` of ``dataset``.

    Binary column: the privileged value defaults to the larger one (1 in the encodings here), the
    unprivileged to the other. A column with more than two values needs both values chosen.
    """
    cols = dataset.columns or []
    if column not in cols:
        raise DataError(f"protected column {column!r} not found; columns: {', '.join(cols) or 'none'}")
    idx = cols.index(column)
    values = np.unique(dataset.x[:, idx])
    shown = ", ".join(f"{v:g}" for v in values[:10]) + (" ..." if len(values) > 10 else "")
    if len(values) < 2:
        raise DataError(f"protected column {column!r} is constant ({shown}); it cannot define two groups")
    for name, v in (("privileged", privileged), ("unprivileged", unprivileged)):
        if v is not None and not np.any(np.isclose(values, float(v))):
            raise DataError(f"--{name} {v:g} does not occur in protected column {column!r} (values: {shown})")
    if len(values) == 2:
        lo, hi = float(values[0]), float(values[1])
        if privileged is None and unprivileged is None:
            privileged, unprivileged = hi, lo
        elif privileged is None:
            privileged = hi if math.isclose(float(unprivileged), lo) else lo
        elif unprivileged is None:
            unprivileged = lo if math.isclose(float(privileged), hi) else hi
    elif privileged is None or unprivileged is None:
        raise DataError(
            f"protected column {column!r} is not binary ({len(values)} values: {shown}); "
            "choose the pair with --privileged and --unprivileged"
        )
    if math.isclose(float(privileged), float(unprivileged)):
        raise DataError(f"privileged and unprivileged values of {column!r} are the same ({float(privileged):g})")
    return ProtectedSpec(column=column, index=idx, privileged=float(privileged), unprivileged=float(unprivileged))


def check_fits_model(dataset: ArrayDataset, n_features: int | None, n_outputs: int | None) -> None:
    """Refuse data whose feature count differs from the model input, or whose target has more classes
    than the model has outputs (``None`` = unknown, not checked)."""
    f = dataset.x.shape[1] if dataset.x.ndim == 2 else None
    if n_features is not None and f != n_features:
        raise DataError(f"{dataset.name or 'data'}: {f} feature columns but the model takes {n_features} features")
    if n_outputs is not None and dataset.y is not None and len(dataset.y):
        k = int(dataset.y.max()) + 1
        if n_outputs > 1 and k > n_outputs:
            raise DataError(f"{dataset.name or 'data'}: target has {k} classes but the model has {n_outputs} outputs")
        if n_outputs == 1 and k > 2:
            raise DataError(f"{dataset.name or 'data'}: target has {k} classes but the model has a single (binary) output")


# --------------------------------------------------------------------------- encoding
class _Encoder:
    """Accumulates encoded columns in order, then writes them with the label last."""

    def __init__(self, categorical: str = "onehot") -> None:
        if categorical not in ("onehot", "ordinal"):
            raise UsageError(f"categorical encoding must be onehot or ordinal, not {categorical!r}")
        self.categorical = categorical
        self.cols: list[tuple[str, np.ndarray]] = []
        self.recipe: list[str] = []

    def binary(self, name: str, values: np.ndarray, doc: str) -> None:
        self.cols.append((name, values.astype(np.float64)))
        self.recipe.append(f"{name}: {doc}")

    def continuous(self, name: str, values: np.ndarray, log1p: bool = False) -> None:
        v = values.astype(np.float64)
        if log1p:
            v = np.log1p(np.maximum(v, 0))
        mu, sd = v.mean(), v.std()
        self.cols.append((name, (v - mu) / (sd if sd > 0 else 1.0)))
        self.recipe.append(f"{name}: {'log1p, ' if log1p else ''}standardised (mean {mu:.4g}, std {sd:.4g})")

    def categorical_column(self, name: str, values: Sequence[str], k: int) -> None:
        """One-hot over the ``k`` most frequent values (+ other), or one ordinal column (see the module doc)."""
        counts = Counter(values)
        ranked = [v for v, _ in sorted(counts.items(), key=lambda t: (-t[1], t[0]))]
        if self.categorical == "ordinal":
            code = {v: i for i, v in enumerate(ranked)}
            self.cols.append((name, np.array([code[v] for v in values], dtype=np.float64)))
            self.recipe.append(f"{name}: ordinal by frequency, " + ", ".join(f"{i} = {v}" for v, i in code.items()))
            return
        keep = ranked[:k]
        rest = len(counts) > len(keep)
        arr = np.asarray(values, dtype=object)
        for v in keep:
            self.cols.append((f"{name}={v}", (arr == v).astype(np.float64)))
        if rest:
            self.cols.append((f"{name}=other", (~np.isin(arr, keep)).astype(np.float64)))
        self.recipe.append(f"{name}: one-hot over {', '.join(keep)}{' + other' if rest else ''}")

    def write(self, path: str | os.PathLike, label_name: str, label: np.ndarray, rows: np.ndarray | None = None) -> Path:
        from ..io import atomic_path

        names = [n for n, _ in self.cols] + [label_name]
        mat = np.column_stack([v for _, v in self.cols] + [label.astype(np.float64)])
        if rows is not None:
            mat = mat[rows]
        dest = Path(path)
        with atomic_path(dest) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            for r in mat:
                w.writerow([_fmt(v) for v in r])
        return dest


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


ADULT_COLS = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country", "income",
]


def read_adult(raw_dir: str | os.PathLike, include_test: bool = True) -> list[dict[str, str]]:
    """Raw Adult rows as dicts (``adult.data`` then ``adult.test``), rows with ``?`` dropped."""
    d = Path(raw_dir)
    files = [d / "adult.data"] + ([d / "adult.test"] if include_test else [])
    out = []
    for fp in files:
        if not fp.exists():
            raise UsageError(f"{fp}: no such file (expected the raw UCI Adult files)")
        with open(fp) as f:
            for line in f:
                parts = [s.strip() for s in line.strip().split(",")]
                if len(parts) != len(ADULT_COLS) or "?" in parts:
                    continue  # the junk first line of adult.test, blank lines, missing values
                row = dict(zip(ADULT_COLS, parts))
                row["income"] = row["income"].rstrip(".")
                out.append(row)
    return out


def encode_adult(raw_dir: str | os.PathLike, out: str | os.PathLike, *, include_test: bool = True, rows: np.ndarray | None = None,
                 categorical: str = "onehot") -> list[str]:
    """Encode UCI Adult to a numeric CSV (label ``income``); returns the recipe lines."""
    r = read_adult(raw_dir, include_test)
    g = lambda k: [row[k] for row in r]  # noqa: E731
    e = _Encoder(categorical)
    for c in ("age", "education-num", "hours-per-week"):
        e.continuous(c, np.array(g(c), dtype=float))
    for c in ("capital-gain", "capital-loss"):
        e.continuous(c, np.array(g(c), dtype=float), log1p=True)
    e.binary("sex", np.array([v == "Male" for v in g("sex")]), "1 = Male, 0 = Female")
    e.binary("race", np.array([v == "White" for v in g("race")]), "1 = White, 0 = other races")
    e.binary("native-country", np.array([v == "United-States" for v in g("native-country")]), "1 = United-States")
    e.categorical_column("workclass", g("workclass"), 4)
    e.categorical_column("marital-status", g("marital-status"), 3)
    e.categorical_column("occupation", g("occupation"), 8)
    e.categorical_column("relationship", g("relationship"), 5)
    y = np.array([v == ">50K" for v in g("income")])
    e.write(out, "income", y, rows)
    return e.recipe + ["income: 1 = >50K (favourable), 0 = <=50K", "dropped: fnlwgt, education (education-num kept)"]


GERMAN_COLS = [
    "checking", "duration", "credit_history", "purpose", "credit_amount", "savings", "employment",
    "installment_rate", "personal_status", "other_debtors", "residence_since", "property", "age",
    "other_installment", "housing", "existing_credits", "job", "people_liable", "telephone", "foreign_worker", "credit",
]


def encode_german(raw_dir: str | os.PathLike, out: str | os.PathLike, *, rows: np.ndarray | None = None, categorical: str = "onehot") -> list[str]:
    """Encode Statlog German credit to a numeric CSV (label ``credit``); returns the recipe lines."""
    fp = Path(raw_dir) / "german.data"
    if not fp.exists():
        raise UsageError(f"{fp}: no such file (expected the raw UCI german.data)")
    r = [dict(zip(GERMAN_COLS, line.split())) for line in open(fp) if line.strip()]
    g = lambda k: [row[k] for row in r]  # noqa: E731
    e = _Encoder(categorical)
    for c in ("duration", "installment_rate", "residence_since", "existing_credits", "people_liable"):
        e.continuous(c, np.array(g(c), dtype=float))
    e.continuous("credit_amount", np.array(g("credit_amount"), dtype=float), log1p=True)
    e.binary("age", np.array(g("age"), dtype=float) > 25, "1 = older than 25, 0 = 25 or younger (replaces the raw age)")
    # A91 male divorced/separated, A92 female, A93 male single, A94 male married/widowed, A95 female single
    e.binary("sex", np.array([v in ("A91", "A93", "A94") for v in g("personal_status")]), "1 = male (A91/A93/A94), 0 = female (A92/A95)")
    e.binary("telephone", np.array([v == "A192" for v in g("telephone")]), "1 = has a telephone (A192)")
    e.binary("foreign_worker", np.array([v == "A201" for v in g("foreign_worker")]), "1 = foreign worker (A201)")
    for c, k in (("checking", 4), ("credit_history", 5), ("purpose", 5), ("savings", 5), ("employment", 5),
                 ("other_debtors", 3), ("property", 4), ("other_installment", 3), ("housing", 3), ("job", 4)):
        e.categorical_column(c, g(c), k)
    y = np.array([v == "1" for v in g("credit")])
    e.write(out, "credit", y, rows)
    return e.recipe + ["credit: 1 = good (favourable), 0 = bad"]


def encode_compas(raw_dir: str | os.PathLike, out: str | os.PathLike, *, rows: np.ndarray | None = None, categorical: str = "onehot") -> list[str]:
    """Encode ProPublica COMPAS two-year recidivism to a numeric CSV (label ``no_recid``)."""
    fp = Path(raw_dir) / "compas-scores-two-years.csv"
    if not fp.exists():
        raise UsageError(f"{fp}: no such file (expected ProPublica's compas-scores-two-years.csv)")
    with open(fp, newline="") as f:
        rd = csv.reader(f)
        header = next(rd)
        first = {}
        for i, h in enumerate(header):  # the file repeats some column names; keep the first
            first.setdefault(h, i)
        r = []
        for row in rd:
            d = {h: row[i] for h, i in first.items()}
            try:
                days = float(d["days_b_screening_arrest"])
            except ValueError:
                continue
            if abs(days) > 30 or d["is_recid"] == "-1" or d["c_charge_degree"] == "O" or d["score_text"] == "N/A":
                continue
            r.append(d)
    g = lambda k: [row[k] for row in r]  # noqa: E731
    e = _Encoder(categorical)  # COMPAS has no categorical beyond binary ones: the same either way
    e.continuous("age", np.array(g("age"), dtype=float))
    for c in ("priors_count", "juv_fel_count", "juv_misd_count", "juv_other_count"):
        e.continuous(c, np.array(g(c), dtype=float), log1p=True)
    e.binary("c_charge_degree", np.array([v == "F" for v in g("c_charge_degree")]), "1 = felony, 0 = misdemeanour")
    e.binary("sex", np.array([v == "Male" for v in g("sex")]), "1 = Male, 0 = Female")
    e.binary("race", np.array([v == "Caucasian" for v in g("race")]), "1 = Caucasian, 0 = other races")
    y = np.array([v == "0" for v in g("two_year_recid")])
    e.write(out, "no_recid", y, rows)
    return e.recipe + ["no_recid: 1 = no recidivism within two years (favourable) = 1 - two_year_recid",
                       "ProPublica filter: |days_b_screening_arrest| <= 30, is_recid != -1, c_charge_degree != O, score_text != N/A",
                       "decile_score and other COMPAS outputs are not features"]


ENCODERS = {"adult": encode_adult, "german": encode_german, "compas": encode_compas}
TARGETS = {"adult": "income", "german": "credit", "compas": "no_recid"}
PROTECTED = {"adult": ("sex", "race"), "german": ("age", "sex"), "compas": ("race", "sex")}
