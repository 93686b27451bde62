"""Every torch, Triton and transformers name the package writes resolves in the installed versions.

Much of seesaw_ds runs only on a GPU (CUDA graphs, streams, pinned and mapped memory, the Triton kernel) and
a GPU is lent rarely: a misspelt or version-missing name there would first show as a failed GPU check. This
reads the sources, not the running code, so it covers those paths on a CPU: each ``torch.a.b`` / ``tl.a``
attribute chain and each ``from torch... import name``. (Run under the GPU machine's torch 2.11 and
transformers 5.17 on 2026-12-07: all resolve.)"""
from __future__ import annotations

import ast
import importlib

import pytest
from helpers import REPO

ROOTS = ("torch", "triton", "transformers")
SOURCES = sorted((REPO / "seesaw_ds").rglob("*.py")) + [REPO / "tests" / "gpu" / "check.py",
                                                        REPO / "tests" / "gpu" / "profile_decode.py"]


def _resolve(dotted: str):
    """The object ``dotted`` names, importing submodules on the way; raises if a part is missing."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for index, name in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:index + 1]))
    return obj


def _chain(node: ast.Attribute) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _names(tree: ast.AST) -> set[str]:
    aliases = {"tl": "triton.language"}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ROOTS:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] in ROOTS)
        elif isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None), ast.Attribute):
            chain = _chain(node)
            if chain and (chain[0] in ROOTS or chain[0] in aliases):
                head = aliases.get(chain[0], chain[0])
                names.add(".".join([head, *chain[1:]]))
    return names


def _parsed(source: str) -> ast.AST:
    """The syntax tree, each node knowing its parent (``_names`` keeps only whole attribute chains)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    return tree


def test_every_library_name_in_the_sources_resolves():
    missing = []
    for path in SOURCES:
        tree = _parsed(path.read_text())
        for dotted in sorted(_names(tree)):
            try:
                _resolve(dotted)
            except Exception as error:  # noqa: BLE001 - AttributeError or ImportError: either is the finding
                missing.append(f"{path.relative_to(REPO)}: {dotted} ({type(error).__name__})")
    assert not missing, "\n".join(missing)


def test_the_check_finds_a_missing_name():
    names = _names(_parsed("import torch\ntorch.cuda.graph\ntorch.cuda.no_such_graph_api\n"))
    assert names == {"torch", "torch.cuda.graph", "torch.cuda.no_such_graph_api"}
    _resolve("torch.cuda.graph")
    with pytest.raises((AttributeError, ImportError)):
        _resolve("torch.cuda.no_such_graph_api")
