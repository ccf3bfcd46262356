"""The labelled-photo table: one row per image (path, identity, optional viewpoint/encounter/species).

Every problem is reported with the file and the CSV line number (header = line 1), so a user can
open the file and fix it.
"""
from __future__ import annotations

import difflib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from reid.errors import DataError

REQUIRED = ("path", "identity")
TEXT_COLUMNS = ("path", "identity", "viewpoint", "encounter", "species")
ROW = "row"  # added column: the CSV line number of each image
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SHOWN = 5  # bad rows listed in one message
PROGRESS_FROM = 200  # smaller tables are checked in a blink: no progress bar
DECODE_THREADS = min(8, os.cpu_count() or 1)  # Pillow decodes without the GIL
# what Pillow raises for a missing, truncated or corrupt file, depending on the format
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_table(source: str | Path, root: str | Path | None = None, check_images: bool = False) -> pd.DataFrame:
    """Read a CSV (columns path, identity, ...) or a folder with one sub-folder per identity.

    Columns: `path` (absolute), `identity` (str), `viewpoint`/`encounter`/`species` (str) when the
    CSV has them, its other columns as read, and `row`, the CSV line number (CSV sources only).
    Relative CSV paths start at `root`, else at the CSV's folder; `root` does not apply to folders.
    With `check_images`, every image is also decoded once, to fail now rather than mid-training.
    """
    source = Path(source)
    if source.is_dir():
        table = _table_from_folders(source)
    elif source.is_file():
        table = _table_from_csv(source, Path(root) if root is not None else source.parent)
    else:
        raise DataError(f"'{source}' not found: give a CSV file (path, identity, ...) or a folder "
                        "with one sub-folder per individual")
    _check_files_exist(table, source)
    if check_images:
        _check_images_decode(table, source)
    return table


# ------------------------------------------------------------------------------------ CSV
def _table_from_csv(csv: Path, root: Path) -> pd.DataFrame:
    table = _read_csv(csv)
    _check_columns(table, csv)
    # pandas numbers rows from 0 and the header is line 1 (blank lines are kept until now for this)
    table[ROW] = range(2, len(table) + 2)
    table = table[~_blank_rows(table)].reset_index(drop=True)
    if table.empty:
        raise DataError(f"{csv} has a header but no rows; add one row per image")
    for column in TEXT_COLUMNS:
        if column in table.columns:
            table[column] = table[column].str.strip()
    _check_no_empty_cells(table, csv)
    root = os.path.abspath(root)
    table["path"] = [os.path.abspath(os.path.join(root, path)) for path in table["path"]]
    _check_no_duplicates(table, csv)
    return table


def _read_csv(csv: Path) -> pd.DataFrame:
    """All of the file as written: text columns verbatim (an identity called 'NA' stays 'NA'),
    other columns typed by pandas with empty cells as missing."""
    if csv.stat().st_size == 0:
        raise DataError(f"{csv} is empty; it needs a header row (path,identity,...) and one row per image")
    try:
        header = pd.read_csv(csv, nrows=0, encoding="utf-8-sig").columns
        text = [name for name in header if name.strip() in TEXT_COLUMNS]
        table = pd.read_csv(csv, encoding="utf-8-sig", dtype={name: str for name in text}, keep_default_na=False,
                            na_values={name: [""] for name in header if name not in text}, skip_blank_lines=False)
    except ValueError as exc:  # pandas' parser errors and UnicodeDecodeError are ValueErrors
        raise DataError(f"{csv} is not a readable CSV file ({exc}); save it as comma-separated UTF-8 text "
                        "with a header row") from None
    table.columns = [name.strip() for name in table.columns]
    return table


def _check_columns(table: pd.DataFrame, csv: Path) -> None:
    found = list(table.columns)
    if ROW in found:
        raise DataError(f"{csv}: the column name '{ROW}' is reserved for the CSV line number; rename that column")
    for column in REQUIRED:
        if column not in found:
            raise DataError(f"{csv}: missing required column '{column}'{_column_hint(column, found)}; "
                            f"columns found: {', '.join(found) or 'none'}")


def _column_hint(missing: str, found: list[str]) -> str:
    close = difflib.get_close_matches(missing, found, n=1)
    if close:
        return f" (did you mean '{close[0]}'? rename it)"
    separator = next((s for s in (";", "\t", "|") if len(found) == 1 and s in found[0]), None)
    if separator:
        return f" (the file seems separated by {separator!r}; save it comma-separated)"
    return ""


def _blank_rows(table: pd.DataFrame) -> pd.Series:
    """Rows without a single value: blank lines, and the empty rows spreadsheets append."""
    blank = pd.Series(True, index=table.index)
    for name in table.columns.drop(ROW):
        blank &= table[name].isna() | (table[name].astype(str).str.strip() == "")
    return blank


def _check_no_empty_cells(table: pd.DataFrame, csv: Path) -> None:
    for column in REQUIRED:
        empty = table.loc[table[column] == "", ROW].tolist()
        if empty:
            raise DataError(f"{csv}: empty '{column}' on {_lines(empty)}; fill in the {column} of every row "
                            "or remove the row")


def _check_no_duplicates(table: pd.DataFrame, csv: Path) -> None:
    duplicated = table.loc[table["path"].duplicated(keep=False), ROW].tolist()
    if duplicated:
        raise DataError(f"{csv}: the same image is listed on {_lines(duplicated)}; keep one row per image")


def _lines(lines: list[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:SHOWN])
    more = f" and {len(lines) - SHOWN} more" if len(lines) > SHOWN else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more}"


# -------------------------------------------------------------------------------- folders
def _table_from_folders(folder: Path) -> pd.DataFrame:
    """`folder/<identity>/**/<image>`; hidden files (e.g. macOS '._x.jpg' copies) are skipped."""
    csvs = sorted(p.name for p in folder.glob("*.csv"))
    if csvs:
        # a CSV dataset's folder would otherwise load with its image folder as the only individual
        raise DataError(f"{folder} holds {', '.join(csvs)}: pass the CSV file itself, or move it out of the "
                        "folder to read the folder as one sub-folder per individual")
    rows = [(str(file.resolve()), identity.name)
            for identity in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            for file in sorted(identity.rglob("*"))
            if file.suffix.lower() in IMAGE_SUFFIXES and not _hidden(file.relative_to(identity))]
    if not rows:
        raise DataError(f"{folder}: no images found; expected {folder}/<identity>/<image>.jpg "
                        f"(image types: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return pd.DataFrame(rows, columns=["path", "identity"])


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)


# --------------------------------------------------------------------------------- images
def _check_files_exist(table: pd.DataFrame, source: Path) -> None:
    missing = [i for i, path in enumerate(table["path"]) if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{len(missing)} of {len(table)} image files listed in {source} not found:"
                        f"{_describe(table, missing, source)}\nfix the paths (relative paths start at the "
                        "CSV's folder, or at the root given) or remove those rows")


def _check_images_decode(table: pd.DataFrame, source: Path) -> None:
    paths = table["path"].tolist()
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        readable = list(tqdm(pool.map(_decodes, paths), total=len(paths), desc="checking images", unit="img",
                             leave=False, disable=True if len(paths) < PROGRESS_FROM else None))
    bad = [i for i, ok in enumerate(readable) if not ok]
    if bad:
        raise DataError(f"{len(bad)} of {len(table)} image files listed in {source} cannot be read as images:"
                        f"{_describe(table, bad, source)}\nreplace those files or remove their rows")


def _decodes(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
    except DECODE_ERRORS:
        return False
    return True


def _describe(table: pd.DataFrame, rows: list[int], source: Path) -> str:
    """The first few bad files, one a line, each with its CSV line when there is a CSV."""
    def where(i: int) -> str:
        line = f" ({source.name} line {table.at[i, ROW]})" if ROW in table.columns else ""
        return f"{table.at[i, 'path']}{line}"

    more = f"\n  ... and {len(rows) - SHOWN} more" if len(rows) > SHOWN else ""
    return "\n  " + "\n  ".join(where(i) for i in rows[:SHOWN]) + more
