"""The layers point one way: the service imports the library, never the reverse."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `reid serve` and `reid keys` are the service's own commands, registered by the command line
ALLOWED = {("reid/cli.py", "service.commands")}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def test_no_module_of_the_library_imports_the_service():
    offending = sorted(
        f"{path.relative_to(ROOT).as_posix()} imports {module}"
        for path in (ROOT / "reid").rglob("*.py")
        for module in imported_modules(path)
        if (module == "service" or module.startswith("service."))
        and (path.relative_to(ROOT).as_posix(), module) not in ALLOWED)
    assert offending == []


def test_embedding_and_evaluation_do_not_import_training():
    """Training uses embedding (to validate); the checkpoint format both read lives in reid/checkpoint.py."""
    def imports_of(package: str) -> set[str]:
        return {m for path in (ROOT / "reid" / package).rglob("*.py") for m in imported_modules(path)}

    assert not any(m.startswith("reid.train") for m in imports_of("embedding") | imports_of("evaluation"))
