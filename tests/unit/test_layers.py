"""Imports point down the layers of docs/architecture.md, never up.

1. the app, the CLIs and the HTTP routes; 2. settings; 3. serving and evaluation; 4. state,
models, zoo, metrics, devices; 5. adapters. A lower layer importing a higher one (the state
layer reading the server's settings, say) is what this test refuses; imports are read with
``ast``, so a lazy import inside a function counts too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_store_layers import imported_modules

REPO = Path(__file__).resolve().parents[2]
TOP = ("tta_server.app", "tta_server.api", "tta_server.cli")
CLIS = {"tta_server/evaluation/cli.py", "tta_server/training/cli.py"}

LOWER = {
    "serving": (*TOP, "tta_server.settings"),
    "evaluation": (*TOP, "tta_server.settings"),
    "training": (*TOP, "tta_server.settings"),
    "state": (*TOP, "tta_server.settings", "tta_server.serving", "tta_server.evaluation"),
    "zoo": (*TOP, "tta_server.settings", "tta_server.serving", "tta_server.evaluation", "tta_server.state"),
    "models.py": (*TOP, "tta_server.settings", "tta_server.serving", "tta_server.evaluation", "tta_server.state"),
    "metrics.py": (*TOP, "tta_server.settings", "tta_server.serving", "tta_server.state", "tta_server.models"),
    "devices.py": ("tta_server",),
}


@pytest.mark.parametrize("part", sorted(LOWER))
def test_lower_layers_never_import_higher_ones(part: str) -> None:
    root = REPO / "tta_server" / part
    files = [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))
    assert files and all(f.exists() for f in files)
    for path in files:
        relative = path.relative_to(REPO).as_posix()
        if relative in CLIS:
            continue  # a command line is the top layer, whatever folder it lives in
        bad = sorted(m for m in imported_modules(path) if m.startswith(LOWER[part]))
        assert not bad, f"{relative} imports {bad}"
