"""Load an operator's own function named ``module:function`` or ``path/to/file.py:function``
(the simulator's oracles, the moderation check).

A leaf module (it imports nothing of prefloop): each caller passes the error class its own
users see, and the word (``oracle``, ``moderation``) its messages start with.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_function(spec: str, what: str, error: type[Exception]) -> Callable[..., Any]:
    """The callable ``spec`` names; ``error`` (its message starting with ``what``) when the
    module or file cannot be imported, lacks the attribute, or it is not callable."""
    where, _, attribute = spec.rpartition(":")  # rpartition: keeps C:\\... paths whole
    module = _load_file(where, what, error) \
        if where.endswith(".py") or "/" in where or os.sep in where \
        else _import_module(where, what, error)
    function = getattr(module, attribute, None) if attribute else None
    if function is None:
        raise error(f"{what} {spec!r}: {where} has no attribute {attribute!r}")
    if not callable(function):
        raise error(f"{what} {spec!r}: {attribute} is a {type(function).__name__}, "
                    "not a function")
    return function


def _import_module(name: str, what: str, error: type[Exception]) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise error(f"{what} module {name!r} cannot be imported ({exc}); check the name and "
                    "that it is on the Python path") from None
    except Exception as exc:  # the module itself is broken: say so, with the cause
        raise error(f"{what} module {name!r} failed while importing: {exc!r}") from exc


def _load_file(path_text: str, what: str, error: type[Exception]) -> Any:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"prefloop_{what}_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise error(f"{what} file {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise error(f"{what} file {path} failed while importing: {exc!r}") from exc
    return module
