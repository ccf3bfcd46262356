"""The README's code blocks stay checkable: each runnable block runs (or says why not), the directives of
scripts/check_readme.py refer to blocks that exist, and its shape check tells a changed output from a new run."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_readme", REPO / "scripts" / "check_readme.py")
check_readme = importlib.util.module_from_spec(spec)
sys.modules["check_readme"] = check_readme
spec.loader.exec_module(check_readme)


def test_every_readme_block_runs_or_says_why_not():
    blocks = check_readme.parse_blocks((REPO / "README.md").read_text())
    names, last_runnable = set(), None
    for block in blocks:
        where = f"README line {block.line}"
        if "output" in block.options or "files" in block.options:
            assert last_runnable is not None, f"{where}: an output block after no runnable block"
        elif block.lang in check_readme.RUNNABLE:
            assert block.options.get("after", "(none)") in names | {"(none)"}, f"{where}: after= names no block before"
            last_runnable = None if "skip" in block.options else block
            if "skip" in block.options:
                assert isinstance(block.options["skip"], str) and block.options["skip"], f"{where}: skip needs a reason"
        names.add(block.name)
    runnable = [b for b in blocks if b.lang in check_readme.RUNNABLE and "skip" not in b.options]
    assert len(runnable) >= 6


def test_shape_ignores_numbers_keys_and_folders_but_not_words():
    shape = check_readme.shape
    assert shape("wr_abcdefghijklmnopqrstuvwxyz012 in /tmp/x/y/best.pt: 0.6164 (model 23f806aa63c954ae-0b259c40)") \
        == shape("wr_ZZZZZZZZZZZZZZZZZZZZZZZZZZZ in /home/you/wildreid-try/best.pt: 0.93 (model 404b4598f7bf60cd-1a2b3c4d)")
    assert shape('{"decision": "match"}') != shape('{"decision": "uncertain"}')


def test_check_runs_console_blocks_and_compares_each_command(tmp_path):
    text = ("```console\n$ echo score 0.5\nscore 0.25\n$ printf 'a\\nb\\n'\na\n```\n\n"
            "<!-- readme-check: name=make -->\n```bash\necho done 3 > out.txt\necho 7 rows\n```\n"
            "<!-- readme-check: output -->\n```\n4 rows\n```\n<!-- readme-check: files=out.txt -->\n```\ndone 1\n```\n")
    results, remade = check_readme.check(check_readme.parse_blocks(text), slow=False, timeout=60, root=tmp_path)
    console, bash, output, files = results
    assert console["status"] == "failed" and console["shape_matches"] is False  # `b` is printed but not shown
    assert remade[0] == ["$ echo score 0.5", "score 0.5", "$ printf 'a\\nb\\n'", "a", "b"]
    assert bash["status"] == "passed" and bash["exit_status"] == 0
    assert output["status"] == "passed" and output["numbers_equal"] is False and remade[2] == ["7 rows"]
    assert files["status"] == "passed" and remade[3] == ["done 3"]
