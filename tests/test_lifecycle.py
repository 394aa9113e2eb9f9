"""`prefloop serve` owning its vLLM: SIGTERM stops everything.

A vLLM killed mid-stream (503 with Retry-After, restarted, its adapters loaded again) and
SIGKILL of the serve during a burst of votes (nothing acknowledged lost, no vLLM left behind,
the data dir serves the visitor again) are tests/test_replicas_vllm.py's, on a serve with two
local replicas."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from prefloop.serving.vllm_server import group_alive
from tests.conftest import ServeProcess

pytestmark = pytest.mark.slow


def vllm_pgid(data_dir: Path) -> int:
    return int((data_dir / "logs" / "vllm.pid").read_text())


def test_sigterm_stops_vllm_too(tmp_path: Path, embedded_model: Path, own_vllm_turn):
    data_dir = tmp_path / "data"
    server = ServeProcess(data_dir, ["--model", str(embedded_model)])
    try:
        server.wait_ready()
        pgid = vllm_pgid(data_dir)
        assert group_alive(pgid)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0
    finally:
        server.stop()
    assert not group_alive(pgid)
    assert not (data_dir / "logs" / "vllm.pid").exists()
