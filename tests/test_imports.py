"""Every module of the package imports: a broken import (or undefined name at import time)
fails the suite even when no other test touches the module."""

from __future__ import annotations

import importlib
import pkgutil
import runpy
import sys

import pytest

import prefloop


def _fail(name: str) -> None:
    raise ImportError(f"cannot import package {name} while walking prefloop")


# walk_packages imports each package to look inside it; onerror turns a failure into an error.
MODULES = sorted(info.name for info in pkgutil.walk_packages(prefloop.__path__, "prefloop.",
                                                               onerror=_fail))


def test_walk_finds_the_packages() -> None:
    """The walk reaches every subpackage (so the test below is not vacuous)."""
    for name in ("prefloop.config", "prefloop.cli", "prefloop.storage.store",
                 "prefloop.serving.context", "prefloop.app.chat", "prefloop.trainer"):
        assert name in MODULES


@pytest.mark.parametrize("name", [m for m in MODULES if m != "prefloop.__main__"])
def test_module_imports(name: str) -> None:
    """The module imports without error."""
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_python_dash_m_prefloop_runs_the_cli(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m prefloop --help` reaches the click group (imported by running it)."""
    monkeypatch.setattr(sys, "argv", ["prefloop", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("prefloop", run_name="__main__")
    assert info.value.code == 0
    assert "Usage:" in capsys.readouterr().out
