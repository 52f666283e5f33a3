"""The layers are written down: import-linter's contracts (pyproject.toml, run by `just test`) and, here, that no
private name crosses a module boundary in the packages."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("prism", "evaluation", "experiments", "reports")


def private_names_crossing(root: Path) -> list[str]:
    """`from pkg.module import _name` and `module._name` on an imported package module, file:line each."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{root.name}/{path.relative_to(root)}:{node.lineno}: from {node.module} import {alias.name}")
                    modules[alias.asname or alias.name] = node.module
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES:
                        modules[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{root.name}/{path.relative_to(root)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("package", [*PACKAGES, "bench"])
def test_no_private_name_crosses_a_module_boundary(package):
    assert private_names_crossing(ROOT / package) == []


def test_the_check_finds_private_imports_and_attributes(tmp_path):
    (tmp_path / "a.py").write_text("from prism.config.loader import _show\nimport prism.runtime as rt\nrt._x\n"
                                   "from prism.config import load_config\nrt.mean_or_nan\n")
    assert private_names_crossing(tmp_path) == [
        f"{tmp_path.name}/a.py:1: from prism.config.loader import _show", f"{tmp_path.name}/a.py:3: rt._x"]
