"""resalign/_native.pyi lists exactly what the extension module exports."""

from __future__ import annotations

import ast
from pathlib import Path

import resalign
from resalign import _native

STUB = Path(resalign.__file__).with_name("_native.pyi")


def stub_names():
    tree = ast.parse(STUB.read_text())
    names, methods = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        if isinstance(node, ast.ClassDef):
            methods[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    return names, methods


def test_stub_matches_module():
    names, methods = stub_names()
    exported = {n for n in dir(_native) if not n.startswith("_")} | {"__version__"}
    assert names == exported
    for cls, members in methods.items():
        assert members <= set(dir(getattr(_native, cls))), cls
        public = {m for m in dir(getattr(_native, cls)) if not m.startswith("_")}
        assert public <= members, cls
