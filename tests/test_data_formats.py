"""Data formats as a new user brings them: headerless and gzip CSVs, text columns, a CSV without --target,
a damaged .npz; the column encoding travels with the repaired model's contract."""

from __future__ import annotations

import gzip

import numpy as np
import onnx
import pytest
from conftest import FIXTURES, fixture_path

from onnxrepair.cli import main
from onnxrepair.commands import _options
from onnxrepair.data.contract import InputContract, contract_from_metadata, contract_to_metadata
from onnxrepair.data.loaders import load_dataset
from onnxrepair.data.tabular import load_csv
from onnxrepair.errors import DataError

LENET = fixture_path("torch_lenet_legacy11")


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_headerless_csv_takes_the_last_column_as_label(tmp_path):
    """Seen: 'duplicate column names: 0, 114, 12, ...' (the first data row read as a header)."""
    p = _write(tmp_path, "h.csv", "0,12,114,1\n5,0,0,0\n0,12,114,1\n")
    ds = load_csv(p)
    assert ds.columns == ["0", "1", "2"] and ds.y.tolist() == [1, 0, 1] and len(ds) == 3
    assert any("headerless CSV" in n and "label is column 3" in n for n in ds.notes)


def test_gzip_csv_is_read(tmp_path):
    """Seen: a .csv.gz -> UnicodeDecodeError."""
    p = tmp_path / "d.csv.gz"
    p.write_bytes(gzip.compress(b"a;b;label\n1;2;0\n3;4;1\n"))  # and a semicolon delimiter
    ds = load_dataset(p, target="label")
    assert ds.x.tolist() == [[1, 2], [3, 4]] and ds.y.tolist() == [0, 1]


def test_headerless_mnist_rows_become_images_for_an_image_model(tmp_path):
    """The shared mnist_5k.csv.gz layout: 784 pixels then the label, no header."""
    x = np.load(FIXTURES / "data" / "mnist_small.npz")
    rows = np.concatenate([x["x"][:50].reshape(50, -1), x["y"][:50, None]], axis=1)
    p = tmp_path / "m.csv.gz"
    p.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode()))
    c = _options.build_contract(LENET)
    ds = _options.load_data(p, c)
    assert ds.x.shape == (50, 1, 28, 28) and ds.x.dtype == np.uint8
    assert (ds.x == x["x"][:50]).all() and c.scale == 255


def test_csv_without_target_lists_columns_and_suggests_the_last(tmp_path):
    """Seen: 'target column None not found'."""
    p = _write(tmp_path, "t.csv", "age,sex,income\n30,1,0\n40,0,1\n")
    with pytest.raises(DataError, match=r"give --target COLUMN; columns: age, sex, income \(the label is often the last: --target income\)"):
        load_csv(p)


def test_text_columns_are_one_hot_and_identifiers_dropped(tmp_path):
    """Seen on raw COMPAS: 'every value must be numeric'."""
    names = "\n".join(f"{i},person{i},{'Male' if i % 2 else 'Female'},{['A', 'B', 'C'][i % 3]},{i % 2}" for i in range(40))
    p = _write(tmp_path, "raw.csv", "id,name,sex,race,two_year_recid,decile_score\n".replace(",decile_score", "") + names + "\n")
    ds = load_csv(p, "two_year_recid")
    assert ds.columns == ["id", "sex=Female", "sex=Male", "race=A", "race=B", "race=C"]
    assert ds.x[1].tolist() == [1, 0, 1, 0, 1, 0]
    assert any("'name' dropped: 40 distinct text values" in n for n in ds.notes)
    with pytest.raises(DataError, match=r"protected column 'sex' is text, one-hot encoded as sex=Female, sex=Male; name one of those"):
        load_csv(p, "two_year_recid", ["sex"])
    assert load_csv(p, "two_year_recid", ["sex=Male"]).extra["protected:sex=Male"].tolist()[:2] == [0, 1]


def test_text_labels_and_repeated_column_names(tmp_path):
    p = _write(tmp_path, "l.csv", "a,a,y\n1,2,yes\n3,4,no\n")
    ds = load_csv(p, "y")
    assert ds.columns == ["a", "a.1"] and ds.y.tolist() == [1, 0] and ds.classes == ["no", "yes"]


def test_encoding_travels_in_the_contract_and_is_applied_to_evaluation_data(tmp_path):
    """The training CSV fixes the columns; a test CSV with the values in another order (and one unseen value)
    gets the same columns because the encoding comes from the model's metadata."""
    train = _write(tmp_path, "train.csv", "x,colour,y\n1,red,0\n2,green,1\n3,blue,0\n")
    test = _write(tmp_path, "test.csv", "x,colour,y\n4,blue,1\n5,purple,0\n")
    c = InputContract(layout="tabular")
    tr = _options.load_data(train, c, target="y")
    assert c.encoding is not None and tr.columns == ["x", "colour=blue", "colour=green", "colour=red"]
    model = onnx.load(str(fixture_path("adult_mlp")), load_external_data=False)
    contract_to_metadata(model, c)
    back = contract_from_metadata(model)
    assert back.encoding == c.encoding
    fresh = load_csv(test, "y")
    assert fresh.columns == ["x", "colour=blue", "colour=purple"]  # what a new encoding would give: a mismatch
    te = _options.load_data(test, back)  # the target comes from the encoding too
    assert te.columns == tr.columns
    assert te.x.tolist() == [[4, 1, 0, 0], [5, 0, 0, 0]]
    assert any("1 row(s) hold values not in the encoding" in n for n in back.notes)


def test_damaged_npz_is_bad_data_exit_2(tmp_path, capsys):
    """Seen: 'internal error: BadZipFile' (exit 4)."""
    good = (FIXTURES / "data" / "mnist_small.npz").read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good[: len(good) // 3])
    rc = main(["evaluate", str(LENET), "--data", str(bad), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and err.startswith(f"error: {bad}: not a readable .npz")


def _png(path, w, h, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (w, h), 128).save(path)


def test_image_folder_says_what_it_found(tmp_path):
    for c, k in (("cat", 3), ("dog", 2)):
        for i in range(k):
            _png(tmp_path / c / f"{i}.png", 8, 6)
    ds = load_dataset(tmp_path)
    assert ds.x.shape == (5, 3, 6, 8)
    assert ds.notes[0] == f"image folder {tmp_path}: 2 class folder(s): cat (3), dog (2); 5 images of 8x6 (RGB)"


def test_image_folder_refuses_non_images_and_loose_files(tmp_path):
    """Seen: any directory taken as an image folder (a folder of plot PNGs became 3 'classes')."""
    _png(tmp_path / "a" / "0.png", 8, 8)
    (tmp_path / "a" / "results.json").write_text("{}")
    with pytest.raises(DataError, match=r"1 entry is not image files \(e.g. results.json\)"):
        load_dataset(tmp_path)
    (tmp_path / "a" / "results.json").unlink()
    _png(tmp_path / "plot.png", 8, 8)
    with pytest.raises(DataError, match="1 image\\(s\\) lie beside the class folders"):
        load_dataset(tmp_path)
    flat = tmp_path / "flat"
    _png(flat / "x.png", 8, 8)
    with pytest.raises(DataError, match=r"no class folders .* \(found 1 file\(s\) in it, e.g. x.png"):
        load_dataset(flat)


def test_image_folder_checks_sizes_from_headers_before_decoding(tmp_path, monkeypatch):
    _png(tmp_path / "a" / "0.png", 380, 560)
    _png(tmp_path / "b" / "0.png", 380, 560)
    _png(tmp_path / "b" / "1.png", 640, 480)
    import numpy

    decoded = []
    real = numpy.asarray
    monkeypatch.setattr("onnxrepair.data.loaders.np.asarray", lambda *a, **k: decoded.append(1) or real(*a, **k))
    with pytest.raises(DataError, match=r"images of 2 sizes \(380x560 \(2\), 640x480 \(1\)\)"):
        load_dataset(tmp_path)
    assert decoded == []  # refused from the headers alone
    monkeypatch.undo()
    ds = load_dataset(tmp_path, resize=(28, 28))
    assert ds.x.shape == (3, 3, 28, 28) and "images resized to the model's 28x28" in ds.notes
