"""Import rules a newcomer can rely on (docs/pipeline.md): only kanc.codegen imports triton; kanc.runtime never
imports kanc.passes; the profile report's renderers (summary, page) do not import the report module at run time."""

from __future__ import annotations

import ast
from pathlib import Path

import kanc

PACKAGE = Path(kanc.__file__).parent


def _runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs (imports under ``if TYPE_CHECKING:`` are for type checkers only)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and ast.unparse(stmt.test).endswith("TYPE_CHECKING")
        for inner in stmt.body
        for node in ast.walk(inner)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _modules(under: str = "") -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py"))


def test_only_codegen_imports_triton():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in _modules()
        if "codegen" not in path.relative_to(PACKAGE).parts
        and any(name.split(".")[0] == "triton" for name in _runtime_imports(path))
    ]
    assert offenders == []


def test_runtime_never_imports_passes():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in _modules("runtime")
        if any(name.startswith("kanc.passes") for name in _runtime_imports(path))
    ]
    assert offenders == []


def test_report_renderers_do_not_import_the_report():
    for name in ("summary.py", "page.py"):
        imports = _runtime_imports(PACKAGE / "runtime" / name)
        assert not any(i.startswith("kanc.runtime.report") for i in imports), name
