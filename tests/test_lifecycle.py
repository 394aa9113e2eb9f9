"""`prefloop serve` owning its vLLM: restart after vLLM dies, SIGKILL during a burst of
votes loses nothing acknowledged and leaves no vLLM behind, SIGTERM stops everything."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from prefloop.serving.vllm_server import group_alive
from tests.conftest import ServeProcess

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def health(server: ServeProcess) -> int:
    try:
        return httpx.get(server.url + "/healthz", timeout=3).status_code
    except httpx.HTTPError:
        return 0


def pair(server: ServeProcess, message: str, conversation_id: str | None = None) -> dict:
    response = server.http.post("/api/v1/pairs", json={
        "message": message, "conversation_id": conversation_id})
    assert response.status_code == 200, response.text
    return response.json()


def vllm_pgid(data_dir: Path) -> int:
    return int((data_dir / "logs" / "vllm.pid").read_text())


def test_crash_restart_and_shutdown(tmp_path: Path, embedded_model: Path, external_args):
    data_dir = tmp_path / "data"
    own = ["--model", str(embedded_model), "--vllm-memory-fraction", "0.3"]
    server = ServeProcess(data_dir, own)
    try:
        server.wait_ready()
        first = pair(server, "Hello!")

        # vLLM dies: health says so, the supervisor starts it again, answers come back.
        old = vllm_pgid(data_dir)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: health(server) == 503, 30, "healthz to report the dead model")
        wait_for(lambda: health(server) == 200, 300, "vLLM to be restarted")
        assert vllm_pgid(data_dir) != old
        wait_for(lambda: not group_alive(old), 30, "the old vLLM's processes to end")

        # A burst of votes, then SIGKILL: every acknowledged vote must be on disk.
        pairs = [first] + [pair(server, f"Count to {n}.") for n in range(2, 6)]
        with ThreadPoolExecutor(len(pairs)) as pool:
            replies = list(pool.map(lambda p: server.http.post(
                "/api/v1/votes", json={"pair_id": p["pair_id"], "choice": "a"}), pairs))
        acknowledged = {p["pair_id"] for p, r in zip(pairs, replies, strict=True)
                        if r.status_code == 200}
        assert len(acknowledged) == len(pairs)
        pgid = vllm_pgid(data_dir)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
    finally:
        server.stop()

    wait_for(lambda: not group_alive(pgid), 60, "vLLM to die with its parent")
    with sqlite3.connect(data_dir / "prefloop.db") as db:
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
        stored = {row[0] for row in db.execute("select pair_id from votes")}
    assert acknowledged <= stored

    # The same data dir serves again (on the shared vLLM this time) and the
    # conversation goes on where it was.
    again = ServeProcess(data_dir, external_args)
    try:
        again.wait_ready()
        again.http.cookies = server.http.cookies  # the same visitor comes back
        follow_up = pair(again, "And then?", first["conversation_id"])
        assert follow_up["conversation_id"] == first["conversation_id"]
    finally:
        again.stop()
    assert again.proc.returncode == 0


def test_sigterm_stops_vllm_too(tmp_path: Path, embedded_model: Path):
    data_dir = tmp_path / "data"
    server = ServeProcess(data_dir, ["--model", str(embedded_model)])
    try:
        server.wait_ready()
        pgid = vllm_pgid(data_dir)
        assert group_alive(pgid)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    assert not group_alive(pgid)
    assert not (data_dir / "logs" / "vllm.pid").exists()
