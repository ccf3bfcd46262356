"""Run every code block of README.md in a fresh temporary folder and check that it prints what the README shows.

    python scripts/check_readme.py            # every block but those marked slow (the install + demo block)
    python scripts/check_readme.py --slow     # also the slow ones (a fresh clone, virtualenv, pip install, demo)
    python scripts/check_readme.py --update   # rewrite the README's printed outputs from this run

A `bash` block runs as one script (`bash -e`: it stops at its first failing command). A `console` block
runs its `$ ` commands in one shell and compares each command's output with the lines under it; a
command ending in `&` (a server) runs in the background, its log is shown once its port answers, and
it is stopped at the end of the block. Ports are replaced by free ones while running (and put back in
the outputs). A comment right before a block's fence tells the script more:

    <!-- readme-check: name=scenes -->          the block's name, for `after`
    <!-- readme-check: after=scenes -->         runs in the folder of block `scenes`, after it (else: a fresh one)
    <!-- readme-check: output -->               a plain block: lines the block run before it prints, in order
    <!-- readme-check: files=a.csv,b.csv -->    a plain block: lines of these files (one blank-line-separated
                                                section per file) of the block run before it
    <!-- readme-check: skip="why" -->           not run (a synopsis, or it needs a GPU or a download)
    <!-- readme-check: slow setup=clone -->     run only with --slow; the folder starts as a copy of the repository

"Shape" compares lines with every number, hex digest, API key and folder prefix replaced by a
placeholder, so timings and scores may differ but the lines, their fields and their order may not;
`numbers_equal` says whether the numbers are the same too. Commands run with this checkout's code
(`reid` and `python` resolve to this interpreter, PYTHONPATH this repository). The last line printed
is JSON: each block's exit status, whether its printed shape matches, and the time it took.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
DIRECTIVE = re.compile(r"<!--\s*readme-check:(.*?)-->")
RUNNABLE = ("bash", "console")
SHOWN_FOLDER = "/home/you/wildreid-try"  # how the README names the folder the examples run in


@dataclass
class Block:
    index: int
    line: int                     # 1-based line of the opening fence
    lang: str
    lines: list[str]
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.options.get("name", f"block{self.index}")


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, each with the readme-check options of the comment before it."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang, start = opening.group(1), opening.group(2), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        directive = DIRECTIVE.search(previous)
        blocks.append(Block(len(blocks), start + 1, lang, body, _options(directive.group(1)) if directive else {}))
        i += 1
    return blocks


def _options(text: str) -> dict:
    options = {}
    for word in shlex.split(text):
        key, _, value = word.partition("=")
        options[key] = value or True
    return options


# ------------------------------------------------------------------------------------------ shapes
def shape(line: str) -> str:
    """A line with what may differ between runs (numbers, digests, keys, folders) replaced by placeholders."""
    line = re.sub(r"wr_[A-Za-z0-9_-]{16,}", "KEY", line.rstrip())
    line = re.sub(r"(?<![\w.])/(?:[\w.~-]+/)+", "/.../", line)
    line = re.sub(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{8,}\b", "HEX", line)
    line = re.sub(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", "0", line)
    return re.sub(r"(?<=\S) {2,}(?=\S)", " ", line)  # padding that moves with the numbers' widths


def numbers(line: str) -> list[str]:
    return re.findall(r"-?\d+(?:\.\d+)?", line)


def screen_lines(output: str) -> list[str]:
    """What a terminal would show: each line as its last carriage return left it (progress bars)."""
    return [line.split("\r")[-1].rstrip() for line in output.replace("\r\n", "\n").split("\n")]


def match_in_order(expected: list[str], actual: list[str]) -> tuple[list[int | None], list[str]]:
    """For each expected line, the index of the actual line of the same shape (found in order), or None."""
    found, problems, at = [], [], 0
    for line in expected:
        want = shape(line)
        hit = next((j for j in range(at, len(actual)) if shape(actual[j]) == want), None)
        found.append(hit)
        if hit is None:
            problems.append(f"not printed: {line!r}")
        else:
            at = hit + 1
    return found, problems


def match_exactly(expected: list[str], actual: list[str]) -> tuple[list[int | None], list[str]]:
    """Line by line: the same number of lines, each of the same shape."""
    expected, actual = _trim(expected), _trim(actual)
    problems = [f"line {k + 1}: README {e!r}, printed {a!r}" for k, (e, a) in enumerate(zip(expected, actual))
                if shape(e) != shape(a)]
    if len(expected) != len(actual):
        problems.append(f"{len(expected)} lines in the README, {len(actual)} printed: "
                        f"{actual[len(expected):] or expected[len(actual):]}")
    return list(range(len(actual))) if not problems else [], problems


def _trim(lines: list[str]) -> list[str]:
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return lines


# ------------------------------------------------------------------------------------------ running
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shims(folder: Path) -> dict:
    """An environment where `reid` and `python` run this checkout's code with this interpreter."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, command in (("reid", f'exec "{sys.executable}" -m reid.cli "$@"'),
                          ("python", f'exec "{sys.executable}" "$@"'), ("python3", f'exec "{sys.executable}" "$@"')):
        (folder / name).write_text(f"#!/bin/sh\n{command}\n")
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
            "COLUMNS": "120"}


def console_commands(block: Block) -> list[tuple[list[str], list[str]]]:
    """(command lines, output lines) of each `$ ` command of a console block."""
    commands: list[tuple[list[str], list[str]]] = []
    continued = False
    for line in block.lines:
        if line.startswith("$ ") and not continued:
            commands.append(([line[2:]], []))
        elif continued:
            commands[-1][0].append(line)
        else:
            commands[-1][1].append(line)
        continued = line.rstrip().endswith("\\") and (continued or line.startswith("$ "))
    return commands


def console_script(commands: list[tuple[list[str], list[str]]], ports: dict[str, str]) -> str:
    """One shell running every command, a marker before each; servers in the background, shown once up."""
    out = ["exec 2>&1", "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT"]
    for k, (lines, _) in enumerate(commands):
        command = _ports("\n".join(lines), ports)
        out.append(f"printf '\\n@@command {k}@@\\n'")
        if command.rstrip().endswith("&"):
            port = re.search(r"--port (\d+)", command)
            log = f".readme-check-{k}.log"
            out.append(f"{command.rstrip()[:-1].rstrip()} > {log} 2>&1 &")
            if port:
                out.append(f"for _ in $(seq 1200); do curl -s -o /dev/null http://127.0.0.1:{port.group(1)}/health "
                           f"&& break; kill -0 $! 2>/dev/null || break; sleep 0.25; done")
            out.append(f"grep -v '\"GET /health ' {log} || true")  # the probe above is not the README's
        else:
            out.append(command)
    return "\n".join(out) + "\n"


def _ports(text: str, ports: dict[str, str]) -> str:
    for readme_port, port in ports.items():
        text = re.sub(rf"(?<=[:\s]){readme_port}\b", port, text)
    return text


def run_block(block: Block, folder: Path, env: dict, timeout: float) -> dict:
    """Run one bash or console block in `folder`; returns its exit status, output and per-command outputs."""
    started = time.perf_counter()
    if block.lang == "console":
        commands = console_commands(block)
        ports = {p: str(free_port()) for p in dict.fromkeys(re.findall(r"--port (\d+)", "\n".join(block.lines)))}
        script = console_script(commands, ports)
    else:
        commands, ports, script = [], {}, "exec 2>&1\n" + "\n".join(block.lines) + "\n"
    proc = subprocess.run(["bash", "-e" if block.lang == "bash" else "+e", "-c", script], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout, errors="replace")
    output = proc.stdout + proc.stderr
    back = {port: readme_port for readme_port, port in ports.items()}
    output = _ports(output, back).replace(str(folder), SHOWN_FOLDER)
    result = {"exit_status": proc.returncode, "seconds": round(time.perf_counter() - started, 1), "output": output}
    if block.lang == "console":
        parts = re.split(r"\n?@@command (\d+)@@\n", output)
        result["per_command"] = {int(parts[i]): parts[i + 1] for i in range(1, len(parts) - 1, 2)}
        result["commands"] = commands
    return result


# ------------------------------------------------------------------------------------------ checking
def check_console(block: Block, run: dict) -> tuple[list[str], list[str]]:
    """(problems, the block's lines re-made from this run) of a console block."""
    problems, remade = [], []
    for k, (lines, expected) in enumerate(run["commands"]):
        actual = _trim(screen_lines(run["per_command"].get(k, "")))
        _, found = match_exactly(expected, actual)
        problems += [f"`{lines[0][:60]}`: {p}" for p in found]
        remade += [("$ " if i == 0 else "") + line for i, line in enumerate(lines)] + actual
    return problems, remade


def check_lines(expected: list[str], actual: list[str]) -> tuple[list[str], list[str], bool]:
    """(problems, expected lines re-made from the matching printed ones, numbers equal) for an output excerpt."""
    found, problems = match_in_order([line for line in expected if line.strip()], actual)
    hits = iter(found)
    remade, same = [], True
    for line in expected:
        if not line.strip():
            remade.append(line)
            continue
        hit = next(hits)
        remade.append(actual[hit] if hit is not None else line)
        same &= hit is not None and numbers(actual[hit]) == numbers(line)
    return problems, remade, same


def check_files(block: Block, folder: Path) -> tuple[list[str], list[str], bool]:
    names = str(block.options["files"]).split(",")
    sections, current = [], []
    for line in block.lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            sections.append(current)
            current = []
    if len(sections) != len(names):
        return [f"{len(names)} files named, {len(sections)} sections shown"], block.lines, False
    problems, remade, same = [], [], True
    for name, section in zip(names, sections):
        path = folder / name
        actual = path.read_text().splitlines() if path.is_file() else []
        found, lines, equal = check_lines(section, actual)
        problems += [f"{name}: {p}" for p in found] if path.is_file() else [f"{name} was not written"]
        remade += ([""] if remade else []) + lines
        same &= equal
    return problems, remade, same


def check(blocks: list[Block], slow: bool, timeout: float, root: Path) -> tuple[list[dict], dict[int, list[str]]]:
    """Every block's result, and the re-made lines of the blocks whose printed output was checked.

    Each block that runs after no other gets a fresh folder under `root`."""
    names = {b.name: b for b in blocks}
    folders: dict[str, Path] = {}
    env = shims(root / "bin")
    results, remade, last_run = [], {}, None
    for block in blocks:
        entry = {"block": block.index, "line": block.line, "lang": block.lang or "text", "name": block.name}
        results.append(entry)
        if "skip" in block.options:
            entry.update(status="skipped", reason=block.options["skip"])
            last_run = None
            continue
        if "output" in block.options or "files" in block.options:
            entry["checks"] = last_run["entry"]["name"] if last_run else None
            if last_run is None:
                entry.update(status="skipped", reason="the block it shows the output of was not run")
                continue
            if "output" in block.options:
                actual = [line for line in screen_lines(last_run["run"]["output"]) if line.strip()]
                problems, lines, same = check_lines(block.lines, actual)
            else:
                problems, lines, same = check_files(block, last_run["folder"])
            entry.update(status="passed" if not problems else "failed", shape_matches=not problems,
                         numbers_equal=same, problems=problems[:10])
            remade[block.index] = lines
            continue
        if block.lang not in RUNNABLE:
            entry["status"] = "text"
            continue
        if "slow" in block.options and not slow:
            entry.update(status="skipped", reason="slow: run with --slow")
            last_run = None
            continue
        after = block.options.get("after")
        if after and after not in folders:
            entry.update(status="failed", problems=[f"after={after}: no block of that name ran before this one"])
            last_run = None
            continue
        folder = folders[after] if after else Path(tempfile.mkdtemp(prefix=f"{block.name}-", dir=root))
        if not after and block.options.get("setup") == "clone":
            _copy_repository(folder)
        folders[block.name] = folder
        if after:
            entry["after"] = names[after].name
        print(f"block {block.index} (README line {block.line}, {block.name}) in {folder} ...", file=sys.stderr,
              flush=True)
        run = run_block(block, folder, env, timeout)
        entry.update(exit_status=run["exit_status"], seconds=run["seconds"])
        problems = [] if run["exit_status"] == 0 else [f"exit status {run['exit_status']}; last output: "
                                                      + " | ".join(_trim(screen_lines(run['output']))[-8:])]
        if block.lang == "console":
            printed, remade[block.index] = check_console(block, run)
            problems += printed
            entry["shape_matches"] = not printed
        entry.update(status="passed" if not problems else "failed", problems=problems[:10])
        last_run = {"entry": entry, "run": run, "folder": folder}
    return results, remade


def _copy_repository(folder: Path) -> None:
    """The repository's tracked and untracked-but-not-ignored files: what a fresh clone of this checkout holds."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)


def update_readme(path: Path, blocks: list[Block], remade: dict[int, list[str]]) -> int:
    """Replace the checked blocks' bodies with what this run printed; returns how many changed."""
    lines = path.read_text().splitlines()
    changed = 0
    for block in sorted(blocks, key=lambda b: -b.line):
        if block.index not in remade or remade[block.index] == block.lines:
            continue
        indent = FENCE.match(lines[block.line - 1]).group(1)
        lines[block.line:block.line + len(block.lines)] = [indent + line if line else line
                                                           for line in remade[block.index]]
        changed += 1
    path.write_text("\n".join(lines) + "\n")
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--slow", action="store_true", help="also the blocks marked slow (install + demo)")
    parser.add_argument("--only", help="comma-separated block names: run these (and the blocks they come after)")
    parser.add_argument("--update", action="store_true", help="rewrite the README's printed outputs from this run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a block may run")
    parser.add_argument("--keep", action="store_true", help="keep the blocks' temporary folders (to look inside)")
    args = parser.parse_args()
    readme = Path(args.readme)
    blocks = parse_blocks(readme.read_text())
    if args.only:
        blocks = _only(blocks, set(args.only.split(",")))
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="readme-check-"))
    try:
        results, remade = check(blocks, args.slow, args.timeout, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for entry in results:
        if entry["status"] == "failed":
            print(f"FAILED block {entry['block']} (line {entry['line']}, {entry['name']}):", file=sys.stderr)
            for problem in entry.get("problems", []):
                print(f"  {problem}", file=sys.stderr)
    changed = update_readme(readme, blocks, remade) if args.update else 0
    passed = all(entry["status"] != "failed" for entry in results)
    print(json.dumps({"passed": passed, "seconds": round(time.perf_counter() - started, 1),
                      "counts": {s: sum(e["status"] == s for e in results) for s in ("passed", "failed", "skipped",
                                                                                     "text")},
                      "updated_blocks": changed, "blocks": results}))
    return 0 if passed else 1


def _only(blocks: list[Block], wanted: set[str]) -> list[Block]:
    """The named blocks, the blocks they run after, and the output blocks that follow each."""
    by_name = {b.name: b for b in blocks}
    keep = set()
    for name in wanted:
        while name:
            keep.add(name)
            name = by_name[name].options.get("after") if name in by_name else None
    chosen, showing = [], False
    for block in blocks:
        if block.name in keep:
            chosen.append(block)
            showing = True
        elif showing and ("output" in block.options or "files" in block.options):
            chosen.append(block)
        else:
            showing = False
    return chosen


if __name__ == "__main__":
    sys.exit(main())
