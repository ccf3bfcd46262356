"""The labelled-photo table: one row per image (path, identity, optional viewpoint/encounter/species).

Every problem is reported with the file and the CSV line number (header = line 1), so a user can
open the file and fix it.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from reid.errors import DataError

REQUIRED = ("path", "identity")
OPTIONAL = ("viewpoint", "encounter", "species")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
SHOWN = 5  # bad rows listed in one message


def load_table(source: str | Path, root: str | Path | None = None, check_images: bool = False) -> pd.DataFrame:
    """Columns: path (absolute), identity, any optional ones present, `line` (CSV line number)."""
    source = Path(source)
    if source.is_dir():
        table = _table_from_folders(source)
    elif source.is_file():
        table = _table_from_csv(source, Path(root) if root else source.parent)
    else:
        raise DataError(f"'{source}' not found: give a CSV file (path, identity, ...) or a folder "
                        "with one sub-folder per individual")
    _check_files(table, source)
    if check_images:
        _check_decodes(table, source)
    return table


def _table_from_csv(csv: Path, root: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{csv}: not a readable CSV ({exc}); save it as comma-separated UTF-8 text with a header "
                        "row") from None
    table.columns = [c.strip() for c in table.columns]
    for column in REQUIRED:
        if column not in table.columns:
            close = difflib.get_close_matches(column, table.columns, n=1)
            hint = f" (did you mean '{close[0]}'? rename it)" if close else ""
            raise DataError(f"{csv}: missing required column '{column}'{hint}; columns found: "
                            f"{', '.join(table.columns) or 'none'}")
    if table.empty:
        raise DataError(f"{csv}: no rows; add one row per image")
    table.insert(len(table.columns), "line", range(2, len(table) + 2))
    for column in REQUIRED:
        table[column] = table[column].str.strip()
        empty = table.loc[table[column] == "", "line"].tolist()
        if empty:
            raise DataError(f"{csv}: empty '{column}' on {_lines(empty)}; every row needs a {column}")
    duplicated = table.loc[table["path"].duplicated(keep=False), "line"].tolist()
    if duplicated:
        raise DataError(f"{csv}: the same image path appears on {_lines(duplicated)}; keep one row per image")
    table["path"] = [str(p if p.is_absolute() else (root / p)) for p in map(Path, table["path"])]
    return table.reset_index(drop=True)


def _table_from_folders(folder: Path) -> pd.DataFrame:
    rows = [(str(file.resolve()), identity.name)
            for identity in sorted(p for p in folder.iterdir() if p.is_dir())
            for file in sorted(identity.rglob("*")) if file.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise DataError(f"{folder}: no images found; expected {folder}/<identity>/<image>.jpg")
    table = pd.DataFrame(rows, columns=["path", "identity"])
    table["line"] = 0  # no CSV: messages name the file alone
    return table


def _lines(lines: list[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:SHOWN])
    more = f" and {len(lines) - SHOWN} more" if len(lines) > SHOWN else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more}"


def _describe(table: pd.DataFrame, rows: list[int], source: Path) -> str:
    where = [f"{table.at[i, 'path']}" + (f" ({source.name} line {table.at[i, 'line']})" if table.at[i, 'line'] else "")
             for i in rows[:SHOWN]]
    more = f"\n  ... and {len(rows) - SHOWN} more" if len(rows) > SHOWN else ""
    return "\n  " + "\n  ".join(where) + more


def _check_files(table: pd.DataFrame, source: Path) -> None:
    missing = [i for i, path in enumerate(table["path"]) if not Path(path).is_file()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) listed in {source} not found:{_describe(table, missing, source)}"
                        "\nfix the paths (relative paths start at the CSV's folder, or at --root) or remove the rows")


def _check_decodes(table: pd.DataFrame, source: Path) -> None:
    bad = []
    for i, path in enumerate(tqdm(table["path"], desc="checking images", unit="img", leave=False,
                                  disable=True if len(table) < 500 else None)):
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            bad.append(i)
    if bad:
        raise DataError(f"{len(bad)} image file(s) listed in {source} cannot be read as images:"
                        f"{_describe(table, bad, source)}\nreplace or remove them")
