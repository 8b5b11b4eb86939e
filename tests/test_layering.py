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


def test_production_code_never_imports_the_test_helpers():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in _modules()
        if path.name != "testing.py" and any(name.startswith("kanc.testing") for name in _imports_anywhere(path))
    ]
    assert offenders == []


# Packages whose modules may share private names among themselves: none (the kernels' shared @triton.jit helpers
# are public names of kanc/codegen/kernels/jit_common.py).
_PRIVATE_WITHIN: tuple[str, ...] = ()


def _imports_anywhere(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth and under any condition (TYPE_CHECKING included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private_imports(path: Path) -> list[str]:
    """``from kanc.x import _name`` and ``kanc.x._name`` in ``path``, where kanc.x is another module."""
    own, tree = _module_name(path), ast.parse(path.read_text())
    modules = {}  # local name -> the kanc module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kanc") and not node.level:
            if node.module != own and not _shared_within(own, node.module):
                found += [f"{node.module}.{a.name}" for a in node.names if _private(a.name)]
            modules |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):  # `import kanc.x as m` binds m to kanc.x; `import kanc.x` binds kanc
            modules |= {a.asname: a.name for a in node.names if a.asname}
            modules |= {a.name.split(".")[0]: a.name.split(".")[0] for a in node.names if not a.asname}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = ast.unparse(node.value)
            head, _, rest = base.partition(".")
            target = modules.get(head, "") + (f".{rest}" if rest else "")
            if target.startswith("kanc") and target != own and not _shared_within(own, target):
                found.append(f"{target}.{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _shared_within(own: str, other: str) -> bool:
    return any(own.startswith(p + ".") and other.startswith(p + ".") for p in _PRIVATE_WITHIN)


def test_no_module_imports_another_modules_private_names():
    offenders = {str(path.relative_to(PACKAGE)): found for path in _modules() if (found := _private_imports(path))}
    assert offenders == {}
