"""The allocator setting: taken by glibc, a no-op elsewhere, applied by the app only when asked."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest

import tta_server.app as app_module
from tta_server.allocator import keep_freed_memory
from tta_server.settings import Settings


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_both_thresholds() -> None:
    assert keep_freed_memory() is True
    # a second call is harmless (the app may be built more than once in one process)
    assert keep_freed_memory() is True


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2.4"))
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: called.append("CDLL"))
    assert keep_freed_memory() is False
    assert called == []


def test_no_libc_found_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert keep_freed_memory() is False


@pytest.mark.parametrize("enabled", [True, False])
def test_the_app_applies_the_setting(settings: Settings, monkeypatch: pytest.MonkeyPatch, enabled: bool) -> None:
    calls: list[bool] = []

    def record() -> bool:
        calls.append(True)
        return True

    monkeypatch.setattr(app_module, "keep_freed_memory", record)
    app_module.create_app(settings.model_copy(update={"keep_freed_memory": enabled}))
    assert calls == ([True] if enabled else [])
