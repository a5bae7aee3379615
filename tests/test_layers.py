"""The layers (docs/python-api.md, "Python API"): the fleet and the page stand on the
runtime through its declared names only, and the runtime never imports them."""

from __future__ import annotations

import ast
import os

import pytest

import uniphant
from test_uniphant import REPO

pytestmark = pytest.mark.unit

LAYERS = ("uniphant_fleet.py", os.path.join("workers", "uniphant", "web.py"),
          os.path.join("workers", "uniphant", "manager.py"))


def _tree(relative: str) -> ast.Module:
    with open(os.path.join(REPO, relative), encoding="utf-8") as f:
        return ast.parse(f.read(), relative)


def _runtime_names_used(tree: ast.Module) -> set:
    """Every name of uniphant.py that a module takes: `from uniphant import X`
    and `uniphant.X`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "uniphant":
            names.update(alias.name for alias in node.names)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "uniphant"):
            names.add(node.attr)
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_uses_only_the_declared_names_of_the_runtime(layer):
    declared = set(uniphant.__all__) | set(uniphant.EXTENSION_API) | {"Config", "WorkerFunction"}
    assert _runtime_names_used(_tree(layer)) - declared == set()


def test_every_declared_name_exists_and_is_public():
    for name in (*uniphant.__all__, *uniphant.EXTENSION_API):
        assert hasattr(uniphant, name), name
        assert not name.startswith("_"), name
    assert not set(uniphant.__all__) & set(uniphant.EXTENSION_API)


def test_the_runtime_never_imports_the_fleet_or_the_page():
    imported = set()
    for node in ast.walk(_tree("uniphant.py")):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported & {"uniphant_fleet", "web", "manager"} == set()


def test_the_runtime_reads_top_to_bottom():
    """A name is defined above its first use (methods aside)."""
    tree = _tree("uniphant.py")
    defined = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.setdefault(name.id, node.lineno)
    early = set()
    for node in tree.body:
        inner = [node] if not isinstance(node, ast.ClassDef) else [
            n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for part in inner:
            for name in ast.walk(part):
                if isinstance(name, ast.Name) and defined.get(name.id, 0) > name.lineno:
                    early.add(name.id)
    assert early == set()
