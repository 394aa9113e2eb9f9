"""Write a file or folder whole or not at all: into a temporary name beside it, renamed into
place when complete.

A leaf module (it imports nothing of prefloop), so the trainer, serving and storage all use
the same rule: a reader never sees half a model, adapter or export.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_prefix(target: Path) -> str:
    """The name prefix of ``target``'s temporary copies (``.NAME.tmp-``): what a cleanup
    after a crash looks for."""
    return f".{target.name}.tmp-"


@contextmanager
def atomic_path(target: Path, *, folder: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; when the block ends without error
    rename it to ``target``, else remove it.

    ``folder``: the temporary path is a new empty folder (``0o755`` once renamed, like any
    folder), else a file path not yet created. ``replace``: an existing ``target`` is
    replaced; otherwise finding one raises :class:`FileExistsError` and nothing is renamed.
    The folder ``target`` goes in must exist.
    """
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), dir=target.parent))
    else:  # the caller creates it, so it gets the usual permissions (mkstemp's are private)
        tmp = target.with_name(temporary_prefix(target) + secrets.token_hex(4))
    try:
        yield tmp
        if target.exists() and not replace:
            raise FileExistsError(f"{target} appeared while it was being written")
        if folder:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a finished folder is a normal one
            if target.exists():  # rename() replaces only an empty folder
                shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
