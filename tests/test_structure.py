"""The package's layering (pyproject's import-linter contracts) holds, and the contract bites."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root`, with the contracts of root/pyproject.toml."""
    script = Path(sys.executable).parent / "lint-imports"
    assert script.exists(), "import-linter is missing: pip install -e '.[test]'"
    return subprocess.run([str(script), "--no-cache", "--no-logo"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_imports_follow_the_data_flow():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upstream_import_breaks_the_contract(tmp_path):
    """An executor reaching back into the router (data flowing backwards) fails the check."""
    shutil.copytree(REPO / "edgeva", tmp_path / "edgeva", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    executor = tmp_path / "edgeva" / "executor.py"
    executor.write_text(executor.read_text() + "\nfrom edgeva.router import Route  # noqa: E402\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "edgeva.executor -> edgeva.router" in result.stdout


def _private_names_defined_in(tree: ast.AST) -> set[str]:
    """Private names a module gives its own objects: self._x assignments, __slots__, defs, classes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)      # dataclass fields
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
            names.add(node.value)          # __slots__ entries
    return names


def test_no_module_reads_another_modules_private_attributes():
    """`obj._x` outside `self`/`cls` is only allowed on names the same module defines."""
    offenders = []
    for path in sorted((REPO / "edgeva").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        own = _private_names_defined_in(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr not in own:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
    assert not offenders, "private attributes read across modules:\n" + "\n".join(offenders)


def test_no_import_cycles():
    """No two modules import each other, directly or through others, at module level or inside a
    function (a function-level import that dodges a cycle is still a cycle). A package and its
    own submodules are exempt: the package re-exports them."""
    import grimp

    graph = grimp.build_graph("edgeva")
    cycles = [f"{a} -> {b}" for a in sorted(graph.modules) for b in sorted(graph.find_modules_directly_imported_by(a))
              if not (a.startswith(b + ".") or b.startswith(a + ".")) and graph.chain_exists(importer=b, imported=a)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
