"""Benchmarks and scripts import names from the library inside functions, where a rename goes unnoticed
until someone runs them (hours later, on a lent GPU): every such name must exist."""

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = sorted([*REPO.glob("*.py"), *(REPO / "benchmarks").glob("*.py"), *(REPO / "sdxl_ztsnr").glob("*.py")])


def _library_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every ``from sdxl_ztsnr... import name`` in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sdxl_ztsnr":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_library_name_a_file_imports_exists(path):
    missing = []
    for line, module_name, name in _library_imports(path):
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")  # a submodule
            except ImportError:
                missing.append(f"{path.name}:{line}: {module_name} has no {name}")
    assert not missing, "\n".join(missing)


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from sdxl_ztsnr.training import no_such_name\n", encoding="utf-8")
    assert _library_imports(sample) == [(2, "sdxl_ztsnr.training", "no_such_name")]
    assert not hasattr(importlib.import_module("sdxl_ztsnr.training"), "no_such_name")


# --- the layering: scripts over the library, no script imports another, no circle in the library ---------------

SCRIPTS = {path.stem for path in REPO.glob("*.py")}


def _imported_modules(path: Path) -> set[str]:
    """Every module the file imports, at any depth (``from sdxl_ztsnr import x`` counts as sdxl_ztsnr.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            if node.module == "sdxl_ztsnr":
                found |= {f"sdxl_ztsnr.{alias.name}" for alias in node.names}
    return found


def _library_graph() -> dict[str, set[str]]:
    modules = {f"sdxl_ztsnr.{p.stem}" for p in (REPO / "sdxl_ztsnr").glob("*.py") if p.stem != "__init__"}
    return {
        module: _imported_modules(REPO / "sdxl_ztsnr" / f"{module.split('.')[1]}.py") & modules
        for module in modules
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first search)."""
    found, state = [], dict.fromkeys(graph, "new")

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state[target] == "open":
                found.append([*path[path.index(target) :], target])
            elif state[target] == "new":
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if state[node] == "new":
            visit(node, [node])
    return found


@pytest.mark.parametrize("path", sorted(REPO.glob("*.py")), ids=lambda p: p.name)
def test_no_script_imports_another_script(path):
    assert not _imported_modules(path) & (SCRIPTS - {path.stem})


def test_no_import_circle_in_the_library():
    assert _cycles(_library_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
