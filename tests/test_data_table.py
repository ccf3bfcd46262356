import numpy as np
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
    table = load_table(_csv(tmp_path, ["img/a.png,zebra1,e1", "./img/b.png,zebra2,e2"]), check_images=True)
    assert table["path"].tolist() == [str(tmp_path / "img/a.png"), str(tmp_path / "img/b.png")]
    assert table["identity"].tolist() == ["zebra1", "zebra2"] and table["row"].tolist() == [2, 3]
    assert table.index.tolist() == [0, 1]


def test_relative_csv_location_still_gives_absolute_paths(tmp_path, monkeypatch):
    _images(tmp_path / "data", ["a.png"])
    _csv(tmp_path / "data", ["a.png,x,e1"])
    monkeypatch.chdir(tmp_path)
    assert load_table("data/meta.csv")["path"].tolist() == [str(tmp_path / "data" / "a.png")]


def test_root_overrides_the_csv_folder(tmp_path):
    _images(tmp_path / "photos", ["a.png"])
    (tmp_path / "tables").mkdir()
    table = load_table(_csv(tmp_path / "tables", ["a.png,x,e1"]), root=tmp_path / "photos")
    assert table["path"].tolist() == [str(tmp_path / "photos" / "a.png")]


def test_text_kept_verbatim_other_columns_typed_blank_lines_skipped(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    csv = tmp_path / "meta.csv"
    # an identity called NA must not become missing; blank and all-empty rows do not shift line numbers
    csv.write_text("path , identity,viewpoint,width,note\n a.png ,NA,left,10,\n\n,,,,\nb.png,7,right,12,hi\n")
    table = load_table(csv)
    assert table["identity"].tolist() == ["NA", "7"] and table["row"].tolist() == [2, 5]
    assert table["path"].tolist() == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert table["width"].tolist() == [10, 12] and table["note"].isna().tolist() == [True, False]


def test_folder_per_identity(tmp_path):
    _images(tmp_path / "marcela", ["1.jpg", "2.jpg", ".hidden.jpg"])
    _images(tmp_path / "pedro" / "2024", ["3.png"])
    (tmp_path / "marcela" / "notes.txt").write_text("ignored")
    table = load_table(tmp_path)
    assert table["identity"].tolist() == ["marcela", "marcela", "pedro"]
    assert table["path"].tolist() == [str(tmp_path / "marcela" / "1.jpg"), str(tmp_path / "marcela" / "2.jpg"),
                                      str(tmp_path / "pedro" / "2024" / "3.png")]


def test_folder_holding_a_csv_asks_for_the_csv(tmp_path):
    _images(tmp_path / "images" / "x", ["1.jpg"])
    _csv(tmp_path, ["images/x/1.jpg,x,e1"])
    with pytest.raises(DataError, match="pass the CSV file itself"):
        load_table(tmp_path)


def test_empty_folder(tmp_path):
    (tmp_path / "someone").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_table(tmp_path)


def test_missing_column_suggests_the_close_name(tmp_path):
    with pytest.raises(DataError, match=r"missing required column 'identity' \(did you mean 'identiy'.*"
                                        r"columns found: path, identiy"):
        load_table(_csv(tmp_path, ["a.png,x"], header="path,identiy"))


def test_semicolon_separated_file_gets_a_hint(tmp_path):
    with pytest.raises(DataError, match="separated by ';'"):
        load_table(_csv(tmp_path, ["a.png;x"], header="path;identity"))


def test_missing_file_names_file_and_line(tmp_path):
    _images(tmp_path, ["a.png"])
    with pytest.raises(DataError, match=r"1 of 2 image files .* not found:\n  .*gone\.png \(meta\.csv line 3\)"):
        load_table(_csv(tmp_path, ["a.png,x,e1", "gone.png,y,e2"]))


def test_many_missing_files_show_the_first_few_and_the_count(tmp_path):
    with pytest.raises(DataError, match=r"(?s)^8 of 8 image files.*m4\.png \(meta\.csv line 6\)\n  \.\.\. and 3 more"):
        load_table(_csv(tmp_path, [f"m{i}.png,x,e" for i in range(8)]))


def test_unreadable_image_names_file_and_line(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"cannot be read as images:\n  .*broken\.jpg \(meta\.csv line 3\)"):
        load_table(_csv(tmp_path, ["a.png,x,e1", "broken.jpg,y,e2"]), check_images=True)
    assert len(load_table(tmp_path / "meta.csv")) == 2  # without the check only existence is tested


def test_truncated_image_is_unreadable(tmp_path):
    _images(tmp_path, ["a.png"])
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png \(meta\.csv line 2\)"):
        load_table(_csv(tmp_path, ["cut.png,x,e1"]), check_images=True)


def test_empty_cells(tmp_path):
    _images(tmp_path, ["a.png"])
    with pytest.raises(DataError, match="empty 'identity' on line 2; fill in"):
        load_table(_csv(tmp_path, ["a.png, ,e1"]))
    with pytest.raises(DataError, match="empty 'path' on line 3"):
        load_table(_csv(tmp_path, ["a.png,x,e1", ",y,e2"]))


def test_duplicated_paths_even_when_spelled_differently(tmp_path):
    _images(tmp_path, ["a.png"])
    with pytest.raises(DataError, match="same image is listed on lines 2, 3"):
        load_table(_csv(tmp_path, ["a.png,x,e1", "./a.png,x,e1"]))


def test_encounter_with_several_identities_is_allowed(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    table = load_table(_csv(tmp_path, ["a.png,x,herd", "b.png,y,herd"]))
    assert table["encounter"].tolist() == ["herd", "herd"]


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"path,identity\n", "no rows"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00", "not a readable CSV"),
])
def test_unusable_csv_files(tmp_path, content, message):
    (tmp_path / "meta.csv").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_table(tmp_path / "meta.csv")


def test_reserved_row_column(tmp_path):
    with pytest.raises(DataError, match="'row' is reserved"):
        load_table(_csv(tmp_path, ["a.png,x,1"], header="path,identity,row"))


def test_not_found_source(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_table(tmp_path / "nope.csv")


def test_nyala_metadata_loads(nyala_csv):
    table = load_table(nyala_csv, check_images=True)
    assert len(table) == 1205 and table["identity"].nunique() == 179
    assert {"viewpoint", "encounter", "row"} <= set(table.columns)
    assert table["row"].iloc[0] == 2 and table["path"].iloc[0].startswith(str(nyala_csv.parent))
