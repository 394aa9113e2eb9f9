"""Dependencies point one way (docs/DEVELOPMENT.md, DESIGN): checked on the source, every
import statement, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import prefloop

ROOT = Path(prefloop.__file__).parent


def prefloop_imports(path: Path) -> set[str]:
    """The prefloop modules ``path`` imports anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return {name for name in names if name == "prefloop" or name.startswith("prefloop.")}


def files(part: str) -> list[Path]:
    target = ROOT / part
    return sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]


# part of the package -> the parts it must never import
FORBIDDEN = {
    "names": ("prefloop.",),  # leaves: anything may import them
    "atomic": ("prefloop.",),
    "plugins": ("prefloop.",),
    "trainer": ("prefloop.app", "prefloop.serving", "prefloop.loop", "prefloop.sim",
                "prefloop.storage"),
    "serving": ("prefloop.app", "prefloop.loop", "prefloop.sim"),
    "storage": ("prefloop.app", "prefloop.loop", "prefloop.sim", "prefloop.serving",
                "prefloop.trainer"),
    "loop": ("prefloop.app", "prefloop.sim"),
}


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_point_one_way(part: str) -> None:
    paths = files(part)
    assert paths and all(p.is_file() for p in paths), part
    for path in paths:
        wrong = {name for name in prefloop_imports(path)
                 if name.startswith(FORBIDDEN[part])}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"
