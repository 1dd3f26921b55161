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
