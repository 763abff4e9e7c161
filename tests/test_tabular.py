"""Numeric CSV reader, protected-attribute resolution, bad input, and the raw-data encoders."""

import os
from pathlib import Path

import numpy as np
import pytest

from onnxrepair.data.tabular import ENCODERS, PROTECTED, TARGETS, check_fits_model, load_csv, resolve_protected
from onnxrepair.errors import DataError, UsageError

ROOT = Path(__file__).resolve().parents[1]
RAW = Path(os.environ.get("ONNXREPAIR_DATASETS", ROOT.parent / "shared" / "datasets"))  # the raw files, where a checkout sits beside them


def _csv(tmp_path, text, name="d.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_csv_order_and_protected(tmp_path):
    p = _csv(tmp_path, "a,sex,label,b\n1,0,1,2.5\n3,1,0,4\n")
    ds = load_csv(p, "label", ["sex"])
    assert ds.columns == ["a", "sex", "b"]
    assert ds.x.dtype == np.float32 and ds.x.shape == (2, 3)
    np.testing.assert_array_equal(ds.y, [1, 0])
    np.testing.assert_array_equal(ds.extra["protected:sex"], [0, 1])
    ds2 = load_csv(p, "label", feature_columns=["b", "a"])
    np.testing.assert_array_equal(ds2.x[:, 0], [2.5, 4])


def test_missing_and_constant_protected(tmp_path):
    p = _csv(tmp_path, "a,sex,label\n1,1,1\n3,1,0\n")
    with pytest.raises(DataError, match="not a feature column"):
        load_csv(p, "label", ["race"])
    with pytest.raises(DataError, match="constant"):
        load_csv(p, "label", ["sex"])


def test_bad_files(tmp_path):
    assert load_csv(_csv(tmp_path, "a,label\nx,1\n"), "label").columns == ["a=x"]  # text is one-hot encoded, not refused
    with pytest.raises(DataError, match="target column"):
        load_csv(_csv(tmp_path, "a,label\n1,1\n"), "income")
    with pytest.raises(DataError, match="integer class"):
        load_csv(_csv(tmp_path, "a,label\n1,0.5\n"), "label")
    with pytest.raises(DataError, match="fields"):
        load_csv(_csv(tmp_path, "a,label\n1,1,3\n"), "label")
    with pytest.raises(UsageError):
        load_csv(tmp_path / "nope.csv", "label")


def test_resolve_protected(tmp_path):
    ds = load_csv(_csv(tmp_path, "race,sex,label\n0,1,1\n1,0,0\n2,1,1\n"), "label")
    s = resolve_protected(ds, "sex")
    assert (s.index, s.privileged, s.unprivileged) == (1, 1.0, 0.0)
    s = resolve_protected(ds, "sex", privileged=0)
    assert (s.privileged, s.unprivileged) == (0.0, 1.0)
    with pytest.raises(DataError, match="not binary"):
        resolve_protected(ds, "race")
    s = resolve_protected(ds, "race", privileged=2, unprivileged=0)
    assert (s.index, s.privileged, s.unprivileged) == (0, 2.0, 0.0)
    with pytest.raises(DataError, match="does not occur"):
        resolve_protected(ds, "race", privileged=7, unprivileged=0)
    with pytest.raises(DataError, match="not found"):
        resolve_protected(ds, "age")
    const = load_csv(_csv(tmp_path, "sex,label\n1,1\n1,0\n", "c.csv"), "label")
    with pytest.raises(DataError, match="constant"):
        resolve_protected(const, "sex")


def test_fits_model(tmp_path):
    ds = load_csv(_csv(tmp_path, "a,b,label\n0,1,1\n1,0,2\n"), "label")
    check_fits_model(ds, 2, 3)
    with pytest.raises(DataError, match="features"):
        check_fits_model(ds, 3, 3)
    with pytest.raises(DataError, match="3 classes"):
        check_fits_model(ds, 2, 2)


def test_fixture_csvs_load():
    for name in ("adult", "german", "compas"):  # the committed subsets (fixtures/make_tabular_fixtures.py); Bank has none
        ds = load_csv(ROOT / "fixtures" / "data" / f"{name}_train.csv", TARGETS[name], list(PROTECTED[name]))
        assert set(np.unique(ds.y)) == {0, 1}
        for c in PROTECTED[name]:
            assert set(np.unique(ds.extra[f"protected:{c}"])) == {0.0, 1.0}


@pytest.mark.skipif(not (RAW / "german" / "german.data").exists(), reason="raw datasets not present")
def test_german_encoder(tmp_path):
    recipe = ENCODERS["german"](RAW / "german", tmp_path / "g.csv")
    ds = load_csv(tmp_path / "g.csv", "credit", ["age", "sex"])
    assert len(ds) == 1000 and ds.y.mean() == pytest.approx(0.7)  # UCI: 700 good, 300 bad
    # standardised continuous column
    d = ds.x[:, ds.columns.index("duration")]
    assert abs(d.mean()) < 1e-3 and d.std() == pytest.approx(1, abs=1e-3)
    assert any(r.startswith("sex:") for r in recipe)
    ENCODERS["german"](RAW / "german", tmp_path / "o.csv", categorical="ordinal")
    od = load_csv(tmp_path / "o.csv", "credit", ["age", "sex"])
    assert od.x.shape == (1000, 20) and od.y.tolist() == ds.y.tolist()
    assert set(np.unique(od.x[:, od.columns.index("purpose")])) == set(range(10))  # A40..A410, all ten kept


def test_encoder_categorical_onehot_and_ordinal(tmp_path):
    from onnxrepair.data.tabular import _Encoder

    vals = ["b", "a", "b", "c", "b", "a"]
    one = _Encoder("onehot")
    one.categorical_column("col", vals, 2)
    assert [n for n, _ in one.cols] == ["col=b", "col=a", "col=other"]
    assert one.cols[0][1].tolist() == [1, 0, 1, 0, 1, 0] and one.cols[2][1].tolist() == [0, 0, 0, 1, 0, 0]
    ordi = _Encoder("ordinal")
    ordi.categorical_column("col", vals, 2)  # k does not cut an ordinal column: every value keeps its own code
    assert [n for n, _ in ordi.cols] == ["col"]
    assert ordi.cols[0][1].tolist() == [0, 1, 0, 2, 0, 1]  # 0 = most frequent, ties by value
    assert ordi.recipe == ["col: ordinal by frequency, 0 = b, 1 = a, 2 = c"]
    with pytest.raises(UsageError, match="onehot or ordinal"):
        _Encoder("binary")


def test_aif360_scheme_onehot_of_every_value_and_minmax_fitted_on_given_rows():
    from onnxrepair.data.tabular import _Encoder

    e = _Encoder(fit=np.array([0, 1, 3]))
    e.onehot_all("col", ["b", "a", "c", "a", "zz"])
    # one column per value that occurs, sorted, each row exactly one 1
    assert [n for n, _ in e.cols] == ["col=a", "col=b", "col=c", "col=zz"]
    hot = np.column_stack([v for _, v in e.cols])
    assert hot.sum(1).tolist() == [1, 1, 1, 1, 1] and hot[:, 0].tolist() == [0, 1, 0, 1, 0]
    e.minmax("num", np.array([0.0, 10.0, 99.0, 5.0, -5.0]))  # rows 2 and 4 are not fit rows: they do not set the scale
    np.testing.assert_allclose(e.cols[-1][1], [0.0, 1.0, 9.9, 0.5, -0.5])
    again = _Encoder(fit=np.array([0, 1, 3]))
    again.minmax("num", np.array([0.0, 10.0, -1e6, 5.0, 1e6]))  # whatever the other rows hold
    np.testing.assert_allclose(again.cols[-1][1][[0, 1, 3]], [0.0, 1.0, 0.5])
    whole = _Encoder()
    whole.minmax("num", np.array([0.0, 10.0, 99.0, 5.0, -5.0]))
    assert whole.cols[-1][1].min() == 0 and whole.cols[-1][1].max() == 1


def test_paper_split_is_an_unstratified_seeded_70_30_partition():
    from onnxrepair.data.tabular import paper_split

    tr, te = paper_split(1000)
    assert len(te) == 300 and len(tr) == 700
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(1000))
    # scikit-learn's train_test_split(test_size=0.3, random_state=2022): the first ceil(0.3 n) of RandomState(2022).permutation(n)
    perm = np.random.RandomState(2022).permutation(1000)
    assert te.tolist() == perm[:300].tolist() and tr.tolist() == perm[300:].tolist()
    assert len(paper_split(7)[1]) == 3  # ceil(2.1)
    assert paper_split(1000, seed=1)[1].tolist() != te.tolist()
    with pytest.raises(UsageError):
        paper_split(10, 1.5)


@pytest.mark.skipif(not (RAW / "german" / "german.data").exists(), reason="raw datasets not present")
def test_aif360_german_encoding_every_category_and_minmax_on_training_rows(tmp_path):
    from onnxrepair.data.tabular import GERMAN_COLS, paper_split

    recipe = ENCODERS["german"](RAW / "german", tmp_path / "g.csv", scheme="aif360", fit_rows=lambda n: paper_split(n)[0])
    ds = load_csv(tmp_path / "g.csv", "credit", ["sex", "age"])
    assert ds.x.shape == (1000, 58)  # AIF360's GermanDataset: 58 features
    raw = [dict(zip(GERMAN_COLS, line.split())) for line in open(RAW / "german" / "german.data") if line.strip()]
    tr, te = paper_split(1000)
    for c in ("purpose", "credit_history", "checking", "telephone"):
        values = sorted({r[c] for r in raw})
        cols = [f"{c}={v}" for v in values]
        assert [n for n in ds.columns if n.startswith(f"{c}=")] == cols  # every value, no "other"
        hot = ds.x[:, [ds.columns.index(n) for n in cols]]
        assert (hot.sum(1) == 1).all()
        assert all(hot[i, values.index(r[c])] == 1 for i, r in enumerate(raw))
    assert len([n for n in ds.columns if n.startswith("purpose=")]) == 10
    for c in ("duration", "credit_amount"):
        v = np.array([float(r[c]) for r in raw])
        lo, hi = v[tr].min(), v[tr].max()
        col = ds.x[:, ds.columns.index(c)]
        np.testing.assert_allclose(col, (v - lo) / (hi - lo), atol=1e-5)  # the scale of the training rows only
        assert col[tr].min() == 0 and col[tr].max() == pytest.approx(1)
    assert ds.x[:, ds.columns.index("age")].tolist() == [float(float(r["age"]) > 25) for r in raw]
    assert any("min-max on 700 rows" in r for r in recipe)
    with pytest.raises(UsageError, match="compact or aif360"):
        ENCODERS["german"](RAW / "german", tmp_path / "x.csv", scheme="aif")


@pytest.mark.skipif(not (RAW / "bank" / "bank-additional.csv").exists() or not (RAW / "compas").exists(), reason="raw datasets not present")
def test_aif360_feature_counts_and_labels(tmp_path):
    """The artefact's feature counts (issue 15): COMPAS 401, Bank 57; COMPAS's label is reoffending (class 1)."""
    from onnxrepair.data.tabular import TARGETS_AIF360, paper_split

    got = {}
    for name in ("compas", "bank"):
        ENCODERS[name](RAW / name, tmp_path / f"{name}.csv", scheme="aif360", fit_rows=lambda n: paper_split(n)[0])
        ds = load_csv(tmp_path / f"{name}.csv", TARGETS_AIF360[name], list(PROTECTED[name]))
        got[name] = ds
    assert got["compas"].x.shape[1] == 401 and got["bank"].x.shape[1] == 57
    assert len(got["bank"]) == 3090  # 4,119 rows less those holding "unknown"
    assert 0.4 < got["compas"].y.mean() < 0.5  # ~45 % reoffend: class 1 is reoffending, not its complement
    ENCODERS["bank"](RAW / "bank", tmp_path / "bc.csv")
    compact = load_csv(tmp_path / "bc.csv", "y", ["age"])
    assert len(compact) == 4119 and set(np.unique(compact.x[:, compact.columns.index("age")])) == {0.0, 1.0}
