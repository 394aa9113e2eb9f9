"""`prefloop serve` owning its vLLM: restart after vLLM dies, SIGKILL during a burst of
votes loses nothing acknowledged and leaves no vLLM behind, SIGTERM stops everything."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from prefloop.serving.vllm_server import group_alive
from prefloop.storage.store import Store
from tests.conftest import ServeProcess, lora_adapter, metric_sum, wait_for

pytestmark = pytest.mark.slow


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


def metric(server: ServeProcess, name: str) -> float:
    return metric_sum(server.http.get("/metrics").text, name)


def vllm_tokens(data_dir: Path) -> float:
    """Tokens the supervised vLLM has generated so far, from its own /metrics (which needs no
    API key); its port is on its command line."""
    argv = Path(f"/proc/{vllm_pgid(data_dir)}/cmdline").read_bytes().split(b"\0")
    port = int(argv[argv.index(b"--port") + 1])
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return metric_sum(page, "vllm:generation_tokens_total")


def test_crash_restart_and_shutdown(tmp_path: Path, embedded_model: Path, external_args,
                                    own_vllm_turn):
    data_dir = tmp_path / "data"
    # A champion and a candidate, so every turn is a duel between two adapters.
    adapter = lora_adapter(embedded_model, data_dir / "adapters" / "v0001")
    with Store(data_dir / "prefloop.db") as store:
        store.add_adapter("v0001", adapter, None, "base")
        store.crown("v0001", "test")
        shutil.copytree(adapter, data_dir / "adapters" / "v0002")
        store.add_adapter("v0002", data_dir / "adapters" / "v0002", None, "v0001")
    own = ["--model", str(embedded_model), "--vllm-memory-fraction", "0.3",
           "--duel-share", "1", "--baseline-share", "0", "--max-tokens", "96"]
    server = ServeProcess(data_dir, own)
    try:
        server.wait_ready()
        first = pair(server, "Hello!")
        assert first["kind"] == "duel"
        assert server.http.post("/api/v1/votes", json={"pair_id": first["pair_id"],
                                                       "choice": "b"}).status_code == 200

        # vLLM dies while a pair is being written: that request gets a clear 503, the
        # supervisor starts vLLM again with both adapters, and the next pair works.
        old = vllm_pgid(data_dir)
        tokens = vllm_tokens(data_dir)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(server.http.post, "/api/v1/pairs",
                                  json={"message": "Tell me a long story about a fox."})
            # Nothing else is generating: vLLM's first new token is this pair's, streaming.
            wait_for(lambda: vllm_tokens(data_dir) > tokens, 300,
                     "the pair's first streamed token", poll=0.05)
            os.kill(old, signal.SIGKILL)
            broken = pending.result()
        assert broken.status_code == 503, broken.text
        assert "model server" in broken.json()["detail"]
        assert broken.headers["Retry-After"]
        wait_for(lambda: health(server) == 503, 120, "healthz to report the dead model")
        wait_for(lambda: health(server) == 200, 600, "vLLM to be restarted")
        assert vllm_pgid(data_dir) != old
        wait_for(lambda: not group_alive(old), 120, "the old vLLM's processes to end")
        wait_for(lambda: metric(server, "prefloop_vllm_restarts_total") == 1, 300,
                 "the restart to be counted")
        again = pair(server, "Hello again!", first["conversation_id"])
        vote = server.http.post("/api/v1/votes", json={"pair_id": again["pair_id"],
                                                       "choice": "a"}).json()
        assert {vote["policy_a"], vote["policy_b"]} == {"v0001", "v0002"}  # both reloaded

        # A burst of votes, then SIGKILL: every acknowledged vote must be on disk.
        pairs = [pair(server, f"Count to {n}.") for n in range(2, 7)]
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

    wait_for(lambda: not group_alive(pgid), 120, "vLLM to die with its parent")
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
