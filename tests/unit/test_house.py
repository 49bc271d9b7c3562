"""The house stays readable: small modules, short functions, a design page that names them all.

The import contract itself (layers only downward, no cycles, the submission path)
is checked by `lint-imports` in `make test`; these are the rules it cannot see.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "relayq"
DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_over_600_lines() -> None:
    long = {str(p.relative_to(SRC)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_over_80_lines() -> None:
    long = {}
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(SRC)}:{node.name}"] = n
    assert long == {}


def test_the_design_page_names_every_module() -> None:
    """Each folder's paragraph in docs/design.md names each of its modules, and the
    one-screen diagram names them too: a new module cannot go unexplained."""
    import re

    text = DESIGN.read_text()
    diagram = text.split("```")[1]
    paragraphs = {m.group(1): m.group(0) for m in
                  re.finditer(r"^- \*\*`(\w+)/`.*?(?=^- \*\*`|^## )", text, re.M | re.S)}
    missing = []
    for p in _modules():
        if p.parent == SRC or p.name == "__init__.py":
            continue
        folder, stem = p.parent.name, p.stem
        if f"`{stem}`" not in paragraphs.get(folder, "") or not re.search(
                rf"\b{re.escape(stem)}\b", diagram):
            missing.append(f"{folder}/{stem}")
    assert missing == []
