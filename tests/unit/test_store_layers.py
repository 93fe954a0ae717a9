"""Layering of the state package: tta_server.state never imports the server's settings (or the HTTP layer).

Settings import the state layer (``Settings.store_options()`` builds ``StoreOptions``); the
reverse would make the state layer depend on every server option and risk import cycles.
Imports are read with ``ast``, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

STATE = Path(__file__).resolve().parents[2] / "tta_server" / "state"
FORBIDDEN = ("tta_server.settings", "tta_server.api", "tta_server.app", "tta_server.serving")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_state_package_does_not_import_settings_or_the_server() -> None:
    files = sorted(STATE.rglob("*.py"))
    assert len(files) > 5
    for path in files:
        bad = sorted(m for m in imported_modules(path) if m.startswith(FORBIDDEN))
        assert not bad, f"{path.relative_to(STATE.parent)} imports {bad}"


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from tta_server import settings\n    import tta_server.settings as s\n")
    assert {"tta_server.settings"} <= imported_modules(sample)
