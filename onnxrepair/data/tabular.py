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

``scheme="aif360"`` is the encoding of AIF360's standard data sets, which the FMT authors' artefact trains on
(``bench/fairness.py --protocol paper``), with Bank Marketing as a fourth data set:

* every value of every categorical column one-hot (``col=value``, values sorted; Adult 98 features, German 58,
  COMPAS 401, Bank 57 on the full file — the 10 % sample here has the same 57), the columns AIF360 keeps
  (Adult keeps ``education``; COMPAS adds ``age_cat`` and ``c_charge_desc``; rows with a missing value dropped,
  Bank's ``unknown`` included);
* continuous columns min-max scaled with the minimum and maximum of the *training rows* only
  (``fit_rows``: their indices, or a function of the row count giving them, e.g. :func:`paper_split`), so test
  rows may fall outside [0, 1]; no log1p;
* AIF360's protected values, 1 = privileged: Adult ``sex`` male, ``race`` white; German ``sex`` male, ``age``
  older than 25; COMPAS ``sex`` *female*, ``race`` Caucasian; Bank ``age`` 25 or older (AIF360's
  ``BankDataset``; in the 10 % sample 78 of 3,090 complete rows are younger);
* labels as the artefact uses them: Adult, German and Bank favourable = 1 as above; COMPAS ``reoffend`` =
  ``two_year_recid`` (the artefact flips AIF360's COMPAS label, so *reoffending* is class 1 and the metrics'
  "favourable" class; its |EOD| is then the |ΔFPR| of the no-recidivism label).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

from ..errors import DataError, UsageError
from .protected import ProtectedSpec
from .dataset import ArrayDataset

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "protected:"


# --------------------------------------------------------------------------- reading
MAX_ONEHOT = 32  # a text column with more distinct values is an identifier, a date or free text: dropped, said in a note


def _read_rows(p: Path) -> list[list[str]]:
    """All non-empty rows of a CSV file, plain or gzip-compressed (by content, not by name), with the delimiter
    sniffed among , ; tab | (Adult's ", " included: spaces after a delimiter are skipped)."""
    import gzip
    import io

    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{p}: a damaged gzip file ({e})") from None
    if b"\x00" in raw[:4096]:
        raise DataError(f"{p}: not a text CSV (binary content)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # every byte decodes; a CSV of European names often is Latin-1
    head = "\n".join(text.splitlines()[:20])
    try:
        delim = csv.Sniffer().sniff(head, delimiters=",;\t|").delimiter
    except csv.Error:
        delim = ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, skipinitialspace=True)
    return [[c.strip() for c in r] for r in reader if r and any(c.strip() for c in r)]


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def plan_encoding(header: list[str], rows: list[list[str]], target: str, *, headerless: bool) -> dict | None:
    """How raw CSV columns become features: numeric columns as they are, text columns one-hot (``col=value``,
    sorted values), columns that cannot be features dropped with the reason; a text target mapped to class
    indices (sorted values). None when every column is numeric and complete (the CSV is used as it is)."""
    col = {h: i for i, h in enumerate(header)}
    features, dropped = [], {}
    for h in header:
        if h == target:
            continue
        vals = [r[col[h]] for r in rows]
        filled = [v for v in vals if v != ""]
        if filled and all(_is_number(v) for v in filled):
            if len(filled) < len(vals):
                dropped[h] = f"{len(vals) - len(filled)} missing value(s)"
            else:
                features.append({"column": h, "kind": "numeric"})
            continue
        distinct = sorted(set(vals))
        if len(distinct) > MAX_ONEHOT:
            dropped[h] = f"{len(distinct)} distinct text values (an identifier, a date or free text?)"
        else:
            features.append({"column": h, "kind": "onehot", "values": distinct})
    tv = [r[col[target]] for r in rows]
    labels = None if all(_is_number(v) for v in tv) else sorted(set(tv))
    if not dropped and labels is None and all(f["kind"] == "numeric" for f in features) and not headerless:
        return None
    return {"columns": header, "headerless": headerless, "target": target, "features": features, "dropped": dropped, "labels": labels}


def _encode(p: Path, header: list[str], rows: list[list[str]], enc: dict) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """(x, feature names, y, notes) of ``rows`` under ``enc`` (see :func:`plan_encoding`)."""
    col = {h: i for i, h in enumerate(header)}
    missing = [f["column"] for f in enc["features"] if f["column"] not in col] + ([enc["target"]] if enc["target"] not in col else [])
    if missing:
        raise DataError(f"{p}: columns the model's encoding needs are missing: {', '.join(missing)}")
    parts, names, notes = [], [], []
    for f in enc["features"]:
        vals = [r[col[f["column"]]] for r in rows]
        if f["kind"] == "numeric":
            try:
                parts.append(np.array([float(v) for v in vals], dtype=np.float64)[:, None])
            except ValueError:
                bad = next(v for v in vals if not _is_number(v))
                raise DataError(f"{p}: column {f['column']!r} must be numeric (as in the data the encoding was made from); found {bad!r}") from None
            names.append(f["column"])
        else:
            arr = np.asarray(vals, dtype=object)
            parts.append(np.stack([(arr == v) for v in f["values"]], axis=1).astype(np.float64))
            names += [f"{f['column']}={v}" for v in f["values"]]
            unseen = int((~np.isin(arr, f["values"])).sum())
            if unseen:
                notes.append(f"column {f['column']!r}: {unseen} row(s) hold values not in the encoding (all zeros)")
    x = np.concatenate(parts, axis=1) if parts else np.empty((len(rows), 0))
    tv = [r[col[enc["target"]]] for r in rows]
    if enc.get("labels"):
        idx = {v: i for i, v in enumerate(enc["labels"])}
        unknown = sorted(set(tv) - set(idx))
        if unknown:
            raise DataError(f"{p}: target {enc['target']!r} holds values the encoding does not know: {', '.join(unknown[:5])}")
        y = np.array([idx[v] for v in tv], dtype=np.float64)
    else:
        try:
            y = np.array([float(v) for v in tv], dtype=np.float64)
        except ValueError:
            raise DataError(f"{p}: target {enc['target']!r} must be numeric here (as in the data the encoding was made from)") from None
    return x, names, y, notes


def encoding_notes(enc: dict) -> list[str]:
    out = []
    if enc.get("headerless"):
        out.append(f"headerless CSV: columns numbered 0..{len(enc['columns']) - 1}; the label is column {enc['target']} (the last, unless --target says otherwise)")
    hot = [f"{f['column']} ({len(f['values'])})" for f in enc["features"] if f["kind"] == "onehot"]
    if hot:
        out.append("text columns one-hot encoded (values): " + ", ".join(hot))
    for c, why in enc.get("dropped", {}).items():
        out.append(f"column {c!r} dropped: {why}")
    if enc.get("labels"):
        out.append(f"target {enc['target']!r}: " + ", ".join(f"{i} = {v}" for i, v in enumerate(enc["labels"])))
    return out


def load_csv(
    path: str | os.PathLike,
    target: str | None = None,
    protected: Sequence[str] | None = None,
    feature_columns: Sequence[str] | None = None,
    encoding: dict | None = None,
) -> ArrayDataset:
    """Read a CSV (plain or gzip; delimiter , ; tab or |) into an :class:`ArrayDataset`.

    A first row that is all numbers means there is no header: columns are named ``0``..``n-1`` and the label
    is the last one unless ``target`` names another. Otherwise ``target`` is required (the message lists the
    columns). Text columns are one-hot encoded and columns that cannot be features are dropped
    (:func:`plan_encoding`); the encoding is returned in ``ds.encoding`` so a repaired model can store it and
    evaluation can apply the same (pass it as ``encoding``). ``x`` is float32 (N, F) in ``feature_columns``
    order (default: the encoded columns in file order); ``y`` int64 class indices. Each protected column is
    checked (present, not constant) and copied to ``extra["protected:<col>"]``.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file")
    rows = _read_rows(p)
    if not rows:
        raise DataError(f"{p}: empty CSV (no header row)")
    headerless = encoding["headerless"] if encoding is not None else all(_is_number(c) for c in rows[0])
    if headerless:
        header = [str(i) for i in range(len(rows[0]))]
    else:
        header, rows = rows[0], rows[1:]
    renamed = []
    if len(set(header)) != len(header):  # raw COMPAS repeats decile_score and priors_count: number them as pandas does
        seen: Counter = Counter()
        for i, h in enumerate(header):
            if seen[h]:
                header[i] = f"{h}.{seen[h]}"
                renamed.append(header[i])
            seen[h] += 1
    if target is None:
        if encoding is not None:
            target = encoding["target"]
        elif headerless:
            target = header[-1]
        else:
            raise DataError(f"{p}: which column is the label? give --target COLUMN; columns: {', '.join(header)} "
                            f"(the label is often the last: --target {header[-1]})")
    if target not in header:
        raise DataError(f"{p}: target column {target!r} not found; columns: {', '.join(header)}")
    if not rows:
        raise DataError(f"{p}: no data rows")
    bad = [i + 1 + (not headerless) for i, r in enumerate(rows) if len(r) != len(header)]
    if bad:
        raise DataError(f"{p}: {len(bad)} row(s) do not have {len(header)} fields (first at line {bad[0]})")
    enc = encoding if encoding is not None else plan_encoding(header, rows, target, headerless=headerless)
    notes: list[str] = []
    if enc is None:
        try:
            table = np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
        except ValueError as e:  # pragma: no cover (plan_encoding found every column numeric)
            raise DataError(f"{p}: every value must be numeric: {e}") from None
        cols_all = list(header)
        colidx = {h: i for i, h in enumerate(header)}
        yv = table[:, colidx[target]]
        x_all = np.delete(table, colidx[target], axis=1)
        names = [h for h in header if h != target]
    else:
        x_all, names, yv, extra_notes = _encode(p, header, rows, enc)
        notes = encoding_notes(enc) + extra_notes
        cols_all = names
    if not np.isfinite(x_all).all():
        i, j = np.argwhere(~np.isfinite(x_all))[0]
        raise DataError(f"{p}: non-finite value in column {names[j]!r} at data row {i + 1}")
    feats = list(feature_columns) if feature_columns is not None else names
    missing = [c for c in feats if c not in names]
    if target in feats:
        raise DataError(f"{p}: the target {target!r} cannot also be a feature column")
    if missing:
        raise DataError(f"{p}: feature columns not in the CSV: {', '.join(missing)}")
    if (yv != np.round(yv)).any() or (yv < 0).any():
        raise DataError(f"{p}: target {target!r} must hold non-negative integer class indices (or text labels)")
    y = yv.astype(np.int64)
    x = x_all[:, [names.index(c) for c in feats]].astype(np.float32)
    ds = ArrayDataset(x=x, y=y, columns=feats, name=p.name.split(".")[0], classes=list(enc["labels"]) if enc and enc.get("labels") else None)
    if renamed:
        notes.append(f"repeated column names numbered: {', '.join(renamed)}")
    ds.encoding, ds.notes = enc, notes
    for c in protected or []:
        if c not in feats:
            hot = [n for n in feats if n.startswith(f"{c}=")]
            if hot:
                raise DataError(f"{p}: protected column {c!r} is text, one-hot encoded as {', '.join(hot)}; "
                                f"name one of those (e.g. --protected '{hot[0]}')")
            why = (enc or {}).get("dropped", {}).get(c)
            raise DataError(f"{p}: protected column {c!r} is not a feature column" + (f" (dropped: {why})" if why else f"; columns: {', '.join(feats)}"))
        v = x[:, feats.index(c)]
        if np.unique(v).size < 2:
            raise DataError(f"{p}: protected column {c!r} is constant ({v[0]:g}); it cannot define two groups")
        ds.extra[PROTECTED_PREFIX + c] = v.copy()
    del cols_all
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
def paper_split(n: int, test_size: float = 0.3, seed: int = 2022) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices as scikit-learn's ``train_test_split(test_size=..., random_state=seed)`` draws them
    (unstratified, shuffled): ``RandomState(seed).permutation(n)``, the first ``ceil(test_size·n)`` are the test rows."""
    if not 0 < test_size < 1 or n < 2:
        raise UsageError(f"cannot split {n} rows with test size {test_size}")
    perm = np.random.RandomState(seed).permutation(n)
    n_test = math.ceil(test_size * n)
    return perm[n_test:], perm[:n_test]


class _Encoder:
    """Accumulates encoded columns in order, then writes them with the label last.

    ``fit``: row indices the min-max scaling is fitted on (default all rows)."""

    def __init__(self, categorical: str = "onehot", fit: np.ndarray | None = None) -> None:
        if categorical not in ("onehot", "ordinal"):
            raise UsageError(f"categorical encoding must be onehot or ordinal, not {categorical!r}")
        self.categorical = categorical
        self.fit = fit
        self.cols: list[tuple[str, np.ndarray]] = []
        self.recipe: list[str] = []

    def minmax(self, name: str, values: np.ndarray) -> None:
        """(v − min) / (max − min) with min and max over the fit rows only."""
        v = values.astype(np.float64)
        ref = v if self.fit is None else v[self.fit]
        lo, hi = float(ref.min()), float(ref.max())
        self.cols.append((name, (v - lo) / (hi - lo if hi > lo else 1.0)))
        self.recipe.append(f"{name}: min-max on {'all' if self.fit is None else len(ref)} rows (min {lo:.4g}, max {hi:.4g})")

    def onehot_all(self, name: str, values: Sequence[str]) -> None:
        """One column per value that occurs (sorted), as AIF360's ``pd.get_dummies``."""
        arr = np.asarray(values, dtype=object)
        vals = sorted(set(values))
        for v in vals:
            self.cols.append((f"{name}={v}", (arr == v).astype(np.float64)))
        self.recipe.append(f"{name}: one-hot over all {len(vals)} values")

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


FitRows = Union[np.ndarray, Callable[[int], np.ndarray], None]  # indices, or a function of the row count


def _fit_rows(fit_rows, n: int) -> np.ndarray | None:
    """The training-row indices the scaling is fitted on: given, or computed from the row count."""
    if fit_rows is None:
        return None
    idx = np.asarray(fit_rows(n) if callable(fit_rows) else fit_rows, dtype=np.int64)
    if not len(idx) or idx.min() < 0 or idx.max() >= n:
        raise UsageError(f"fit rows must be indices among the {n} encoded rows")
    return idx


def _check_scheme(scheme: str) -> None:
    if scheme not in ("compact", "aif360"):
        raise UsageError(f"encoding scheme must be compact or aif360, not {scheme!r}")


def encode_adult(raw_dir: str | os.PathLike, out: str | os.PathLike, *, include_test: bool = True, rows: np.ndarray | None = None,
                 categorical: str = "onehot", scheme: str = "compact", fit_rows: FitRows = None) -> list[str]:
    """Encode UCI Adult to a numeric CSV (label ``income``); returns the recipe lines."""
    _check_scheme(scheme)
    r = read_adult(raw_dir, include_test)
    g = lambda k: [row[k] for row in r]  # noqa: E731
    if scheme == "aif360":
        e = _Encoder(fit=_fit_rows(fit_rows, len(r)))
        for c in ("age", "education-num", "capital-gain", "capital-loss", "hours-per-week"):
            e.minmax(c, np.array(g(c), dtype=float))
        e.binary("race", np.array([v == "White" for v in g("race")]), "1 = White (privileged), 0 = other races")
        e.binary("sex", np.array([v == "Male" for v in g("sex")]), "1 = Male (privileged), 0 = Female")
        for c in ("workclass", "education", "marital-status", "occupation", "relationship", "native-country"):
            e.onehot_all(c, g(c))
        e.write(out, "income", np.array([v == ">50K" for v in g("income")]), rows)
        return e.recipe + ["income: 1 = >50K (favourable), 0 = <=50K", "dropped: fnlwgt (AIF360's AdultDataset)"]
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


def encode_german(raw_dir: str | os.PathLike, out: str | os.PathLike, *, rows: np.ndarray | None = None, categorical: str = "onehot",
                  scheme: str = "compact", fit_rows: FitRows = None) -> list[str]:
    """Encode Statlog German credit to a numeric CSV (label ``credit``); returns the recipe lines."""
    _check_scheme(scheme)
    fp = Path(raw_dir) / "german.data"
    if not fp.exists():
        raise UsageError(f"{fp}: no such file (expected the raw UCI german.data)")
    r = [dict(zip(GERMAN_COLS, line.split())) for line in open(fp) if line.strip()]
    g = lambda k: [row[k] for row in r]  # noqa: E731
    if scheme == "aif360":
        e = _Encoder(fit=_fit_rows(fit_rows, len(r)))
        for c in ("duration", "credit_amount", "installment_rate", "residence_since", "existing_credits", "people_liable"):
            e.minmax(c, np.array(g(c), dtype=float))
        e.binary("sex", np.array([v in ("A91", "A93", "A94") for v in g("personal_status")]), "1 = male (A91/A93/A94, privileged), 0 = female")
        e.binary("age", np.array(g("age"), dtype=float) > 25, "1 = older than 25 (privileged), 0 = 25 or younger")
        for c in ("checking", "credit_history", "purpose", "savings", "employment", "other_debtors", "property",
                  "other_installment", "housing", "job", "telephone", "foreign_worker"):
            e.onehot_all(c, g(c))
        e.write(out, "credit", np.array([v == "1" for v in g("credit")]), rows)
        return e.recipe + ["credit: 1 = good (favourable), 0 = bad", "dropped: personal_status (sex taken from it)"]
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


def encode_compas(raw_dir: str | os.PathLike, out: str | os.PathLike, *, rows: np.ndarray | None = None, categorical: str = "onehot",
                  scheme: str = "compact", fit_rows: FitRows = None) -> list[str]:
    """Encode ProPublica COMPAS two-year recidivism to a numeric CSV (label ``no_recid``; ``reoffend`` under ``aif360``)."""
    _check_scheme(scheme)
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
            if scheme == "aif360" and not d["c_charge_desc"]:
                continue  # AIF360 drops rows with a missing value among the columns it keeps
            r.append(d)
    g = lambda k: [row[k] for row in r]  # noqa: E731
    if scheme == "aif360":
        e = _Encoder(fit=_fit_rows(fit_rows, len(r)))
        for c in ("age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count"):
            e.minmax(c, np.array(g(c), dtype=float))
        e.binary("sex", np.array([v == "Female" for v in g("sex")]), "1 = Female (AIF360's privileged value), 0 = Male")
        e.binary("race", np.array([v == "Caucasian" for v in g("race")]), "1 = Caucasian (privileged), 0 = other races")
        for c in ("age_cat", "c_charge_degree", "c_charge_desc"):
            e.onehot_all(c, g(c))
        e.write(out, "reoffend", np.array([v == "1" for v in g("two_year_recid")]), rows)
        return e.recipe + ["reoffend: 1 = reoffended within two years (= two_year_recid; the FMT artefact's flip of AIF360's label, "
                           "so class 1 is the metrics' favourable class)",
                           "ProPublica filter as AIF360: |days_b_screening_arrest| <= 30, is_recid != -1, c_charge_degree != O, score_text != N/A; "
                           "rows without c_charge_desc dropped"]
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


BANK_NUMERIC = ("duration", "campaign", "pdays", "previous", "emp.var.rate", "cons.price.idx", "cons.conf.idx", "euribor3m", "nr.employed")
BANK_CATEGORICAL = ("job", "marital", "education", "default", "housing", "loan", "contact", "month", "day_of_week", "poutcome")


def encode_bank(raw_dir: str | os.PathLike, out: str | os.PathLike, *, rows: np.ndarray | None = None, categorical: str = "onehot",
                scheme: str = "compact", fit_rows: FitRows = None) -> list[str]:
    """Encode UCI Bank Marketing (``bank-additional.csv``, the 10 % sample; ``bank-additional-full.csv`` when present)
    to a numeric CSV (label ``y``, 1 = subscribed). Protected ``age``: 1 = 25 or older (AIF360's ``BankDataset``
    cut). ``compact``: continuous standardised, categoricals top-k one-hot with ``unknown`` a value like any other;
    ``aif360``: rows holding ``unknown`` dropped, every value one-hot, continuous min-max on the fit rows."""
    _check_scheme(scheme)
    d = Path(raw_dir)
    fp = d / "bank-additional-full.csv" if (d / "bank-additional-full.csv").exists() else d / "bank-additional.csv"
    if not fp.exists():
        raise UsageError(f"{fp}: no such file (expected UCI's bank-additional.csv)")
    with open(fp, newline="") as f:
        r = list(csv.DictReader(f, delimiter=";"))
    dropped = 0
    if scheme == "aif360":
        n0 = len(r)
        r = [row for row in r if "unknown" not in row.values()]
        dropped = n0 - len(r)
    g = lambda k: [row[k] for row in r]  # noqa: E731
    age = np.array(g("age"), dtype=float) >= 25
    y = np.array([v == "yes" for v in g("y")])
    if scheme == "aif360":
        e = _Encoder(fit=_fit_rows(fit_rows, len(r)))
        e.binary("age", age, "1 = 25 or older (privileged), 0 = younger")
        for c in BANK_NUMERIC:
            e.minmax(c, np.array(g(c), dtype=float))
        for c in BANK_CATEGORICAL:
            e.onehot_all(c, g(c))
        e.write(out, "y", y, rows)
        return e.recipe + ["y: 1 = subscribed a term deposit (favourable)", f"{dropped} rows holding 'unknown' dropped (AIF360's na_values)",
                           f"read {fp.name}"]
    e = _Encoder(categorical)
    e.binary("age", age, "1 = 25 or older (privileged), 0 = younger")
    for c in BANK_NUMERIC:
        e.continuous(c, np.array(g(c), dtype=float), log1p=c in ("duration", "campaign", "previous"))
    for c, k in (("job", 6), ("marital", 3), ("education", 5), ("default", 2), ("housing", 2), ("loan", 2), ("contact", 2),
                 ("month", 6), ("day_of_week", 5), ("poutcome", 3)):
        e.categorical_column(c, g(c), k)
    e.write(out, "y", y, rows)
    return e.recipe + ["y: 1 = subscribed a term deposit (favourable)", f"read {fp.name}"]


ENCODERS = {"adult": encode_adult, "german": encode_german, "compas": encode_compas, "bank": encode_bank}
TARGETS = {"adult": "income", "german": "credit", "compas": "no_recid", "bank": "y"}
PROTECTED = {"adult": ("sex", "race"), "german": ("age", "sex"), "compas": ("race", "sex"), "bank": ("age",)}
TARGETS_AIF360 = {**TARGETS, "compas": "reoffend"}  # the artefact's COMPAS label (reoffending = class 1)
