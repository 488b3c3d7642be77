"""The public API: every name in ``__all__`` exists once, and the core never
imports ``patterns`` (the layering rule of docs/architecture.md)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import mesh
import patterns

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", [mesh, patterns])
def test_all_is_unique_and_resolves(module: object) -> None:
    names = list(module.__all__)  # type: ignore[attr-defined]  # (its order: ruff RUF022)
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(module, name), f"{module!r}.{name} is in __all__ but missing"


def test_core_never_imports_patterns() -> None:
    offenders = []
    for path in (ROOT / "mesh").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "mesh").parts:
            continue  # the command line is the application layer, above both
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            offenders += [f"{path}: {m}" for m in mods if m.split(".")[0] == "patterns"]
    assert not offenders
