"""``portal/core`` is shared infrastructure: it imports nothing of the domains, the portal's
pages or the API, not even inside a function, so any part of Carnet can build on it."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "portal" / "core"


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "portal":
                found.update(f"portal.{alias.name}" for alias in node.names)
    return found


def test_core_imports_only_core() -> None:
    outside = {
        f"{path.name}: {module}"
        for path in sorted(CORE.glob("*.py"))
        for module in imported_modules(path)
        if module.startswith("portal") and not module.startswith("portal.core")
    }
    assert sorted(outside) == []
