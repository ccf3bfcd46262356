import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid.data.table import load_table
from reid.errors import DataError


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(folder / name)


def _csv(tmp_path, rows, header="path,identity,encounter"):
    path = tmp_path / "meta.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_csv_paths_resolve_against_the_csv_folder(tmp_path):
    _images(tmp_path / "img", ["a.png", "b.png"])
    table = load_table(_csv(tmp_path, ["img/a.png,zebra1,e1", "img/b.png,zebra2,e2"]), check_images=True)
    assert table["path"].tolist() == [str(tmp_path / "img/a.png"), str(tmp_path / "img/b.png")]
    assert table["identity"].tolist() == ["zebra1", "zebra2"] and table["line"].tolist() == [2, 3]


def test_folder_per_identity(tmp_path):
    _images(tmp_path / "marcela", ["1.jpg", "2.jpg"])
    _images(tmp_path / "pedro" / "2024", ["3.png"])
    (tmp_path / "notes.txt").write_text("ignored")
    table = load_table(tmp_path)
    assert table["identity"].tolist() == ["marcela", "marcela", "pedro"]


def test_missing_column_suggests_the_close_name(tmp_path):
    with pytest.raises(DataError, match=r"missing required column 'identity' \(did you mean 'identiy'"):
        load_table(_csv(tmp_path, ["a.png,x"], header="path,identiy"))


def test_missing_file_names_file_and_line(tmp_path):
    _images(tmp_path, ["a.png"])
    with pytest.raises(DataError, match=r"gone\.png \(meta\.csv line 3\)"):
        load_table(_csv(tmp_path, ["a.png,x,e1", "gone.png,y,e2"]))


def test_unreadable_image_names_file_and_line(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"cannot be read as images:\n  .*broken\.jpg \(meta\.csv line 3\)"):
        load_table(_csv(tmp_path, ["a.png,x,e1", "broken.jpg,y,e2"]), check_images=True)


def test_empty_cell_and_duplicates(tmp_path):
    _images(tmp_path, ["a.png"])
    with pytest.raises(DataError, match="empty 'identity' on line 2"):
        load_table(_csv(tmp_path, ["a.png,,e1"]))
    with pytest.raises(DataError, match="same image path appears on lines 2, 3"):
        load_table(_csv(tmp_path, ["a.png,x,e1", "a.png,x,e1"]))


def test_not_found_source(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_table(tmp_path / "nope.csv")


def test_nyala_metadata_loads(nyala_csv):
    table = load_table(nyala_csv)
    assert len(table) == 1205 and table["identity"].nunique() == 179
    assert {"viewpoint", "encounter"} <= set(table.columns)
