"""What a new user meets first: help that names only files that exist, messages that say what was meant,
read-only commands that create nothing, files readable like any other, and a word when serve starts empty."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from reid.cli import build_parser, main
from reid.io import write_text

REPO = Path(__file__).resolve().parents[1]


def _help_texts(parser: argparse.ArgumentParser):
    yield parser.description or ""
    for action in parser._actions:
        yield action.help or ""
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield choice.help or ""
            for sub in action.choices.values():
                yield from _help_texts(sub)


def test_help_names_only_files_that_exist():
    named = {m for text in _help_texts(build_parser())
             for m in re.findall(r"[\w.-]+(?:/[\w.-]+)+\.(?:py|md|yaml|txt)", text)}
    assert "reid/species/routing.py" in named  # identify-batch --routes points at the format's documentation
    assert [path for path in named if not (REPO / path).is_file()] == []


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("command", [["keys", "list"], ["keys", "revoke", "--name", "alice"]])
def test_keys_on_a_mistyped_store_create_nothing(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    assert main([*command[:2], "--store", "typo-store", *command[2:]]) == 2
    err = capsys.readouterr().err
    assert "no store at 'typo-store'" in err and "keys create" in err
    assert _tree(tmp_path) == []


def test_serve_warns_on_a_new_store_and_on_one_without_individuals(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    store = tmp_path / "store"
    assert main(["serve", "--store", str(store), "--checkpoint", str(tiny_checkpoint)]) == 0
    assert "held no store: a new, empty one was created" in capsys.readouterr().err
    assert main(["keys", "create", "--store", str(store), "--name", "team"]) == 0
    capsys.readouterr()
    assert main(["serve", "--store", str(store), "--checkpoint", str(tiny_checkpoint)]) == 0
    err = capsys.readouterr().err
    assert "has no individuals" in err and "API key" not in err


def test_a_run_folder_given_as_a_checkpoint_names_its_checkpoints(tmp_path, tiny_checkpoint, synth_csv, capsys):
    for fold in (0, 1):
        (tmp_path / "cv" / f"fold_{fold}").mkdir(parents=True)
        (tmp_path / "cv" / f"fold_{fold}" / "best.pt").write_bytes(tiny_checkpoint.read_bytes())
    assert main(["evaluate", "--checkpoint", str(tmp_path / "cv"), "--data", str(synth_csv),
                 "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a checkpoint file (a `reid cv` run folder)" in err
    assert str(tmp_path / "cv" / "fold_1" / "best.pt") in err and "not found" not in err


def test_calibrate_given_a_checkpoint_names_its_run_folder(tmp_path, tiny_checkpoint, capsys):
    best = tmp_path / "cv" / "fold_0" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(tiny_checkpoint.read_bytes())
    assert main(["calibrate", "--run", str(best)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and f"probably '{tmp_path / 'cv'}'" in err and "best.pt/oof" not in err


def test_written_files_get_the_usual_mode_not_a_private_one(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "results.csv", "a,b\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "results.csv").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--run", "r", "--precision", "1"], "--precision: 1.0 must lie between 0 and 1 (both excluded)"),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--out", "o", "--k-reciprocal", "--k1", "0"],
     "--k1: 0 is too small: give at least 1"),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--out", "o", "--lambda", "1.5"],
     "--lambda: 1.5 must lie between 0 and 1"),
    (["embed", "--checkpoint", "c", "--data", "d", "--out", "o", "--chunk", "ten"], "--chunk: 'ten' is not a whole number"),
])
def test_out_of_range_numbers_get_a_usage_error_not_a_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
