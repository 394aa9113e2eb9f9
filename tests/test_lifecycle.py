"""`prefloop serve` owning its vLLMs: SIGTERM stops everything.

A vLLM killed mid-stream (503 with Retry-After, restarted, its adapters loaded again) and
SIGKILL of the serve during a burst of votes (nothing acknowledged lost, no vLLM left behind,
the data dir serves the visitor again) are tests/test_replicas_vllm.py's, on a serve with two
local replicas."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from prefloop.serving.vllm_server import group_alive
from tests.conftest import START_TIMEOUT, ServeProcess, wait_for

pytestmark = pytest.mark.slow


def vllm_pgid(data_dir: Path) -> int:
    return int((data_dir / "logs" / "vllm.pid").read_text())


def champion_pid_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "logs").glob("vllm-champion-*.pid"))


def test_sigterm_stops_vllm_too(tmp_path: Path, embedded_model: Path, own_vllm_turn):
    """Both engines: the LoRA replica and the champion's plain engine, SIGTERMed while the
    latter is still starting (it starts after the page is up)."""
    data_dir = tmp_path / "data"
    server = ServeProcess(data_dir, ["--model", str(embedded_model),
                                     "--champion-engine", "merged"])
    try:
        server.wait_ready()
        pgid = vllm_pgid(data_dir)
        assert group_alive(pgid)
        wait_for(lambda: champion_pid_files(data_dir), START_TIMEOUT,
                 "the champion engine to be launched")
        champion = int(champion_pid_files(data_dir)[0].read_text())
        assert group_alive(champion) and champion != pgid
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0
    finally:
        server.stop()
    assert not group_alive(pgid) and not group_alive(champion)
    assert not (data_dir / "logs" / "vllm.pid").exists()
    assert champion_pid_files(data_dir) == []
