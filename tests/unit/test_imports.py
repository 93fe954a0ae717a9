"""Packages named like ours exist on PyPI: imports must resolve to this repository."""

from __future__ import annotations

import re
from pathlib import Path

import adapters
import tta_server

REPO = Path(__file__).resolve().parent.parent.parent


def test_packages_resolve_to_this_repository() -> None:
    for module in (adapters, tta_server):
        assert module.__file__ is not None
        assert Path(module.__file__).resolve().is_relative_to(REPO), module.__file__


def test_adapters_do_not_depend_on_the_server() -> None:
    for path in (REPO / "adapters").rglob("*.py"):
        text = path.read_text()
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", text, flags=re.MULTILINE)
        bad = [m for m in imports if m.split(".")[0] in ("tta_server", "fastapi", "starlette", "redis")]
        assert not bad, f"{path.name} imports {bad}"
        assert "os.environ" not in text and "getenv" not in text, f"{path.name} reads environment variables"
