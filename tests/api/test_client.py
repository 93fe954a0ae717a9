from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

import tta_client
from tta_client import TTAClient, TTAClientError


def test_client_reads_health_and_models(client: TestClient) -> None:
    api = TTAClient(http=client)
    assert api.health()
    assert api.ready()["status"] == "ready"
    names = [m.name for m in api.models()]
    assert "resnet20" in names


def test_client_raises_api_errors(client: TestClient) -> None:
    api = TTAClient(http=client)
    with pytest.raises(TTAClientError) as info:
        api._get("/v1/missing")
    assert info.value.status == 404 and info.value.code == "not_found"


def test_importing_the_client_does_not_import_torch() -> None:
    code = "import sys, tta_client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert tta_client.__file__ is not None and "clients" in tta_client.__file__
