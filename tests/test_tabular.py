"""Numeric CSV reader, protected-attribute resolution, bad input, and the raw-data encoders."""

from pathlib import Path

import numpy as np
import pytest

from onnxrepair.data.tabular import ENCODERS, PROTECTED, TARGETS, check_fits_model, load_csv, resolve_protected
from onnxrepair.errors import DataError, UsageError

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT.parent / "shared" / "datasets"


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
    for name in ENCODERS:
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
