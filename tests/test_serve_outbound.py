"""Every outbound connection attempt of ``prefloop serve`` during a visit with a message and
a vote stays on loopback. A ``sitecustomize`` on the subprocess's path records each host it
looks up or connects to (other than loopback) in a file; the quick test checks that the
recorder records, the slow one runs serve on the session's vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import START_TIMEOUT, ServeProcess, wait_for

RECORDER = '''
import ipaddress, os, socket

_log = os.environ["NETWATCH_LOG"]
_lookup, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex


def _outside(host):
    if not isinstance(host, str) or host in ("", "localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _note(host):
    if _outside(host):
        with open(_log, "a") as f:
            f.write(f"{os.getpid()} {host}\\n")


def getaddrinfo(host, *args, **kwargs):
    _note(host)
    return _lookup(host, *args, **kwargs)


def connect(self, address):
    if isinstance(address, tuple):
        _note(address[0])
    return _connect(self, address)


def connect_ex(self, address):
    if isinstance(address, tuple):
        _note(address[0])
    return _connect_ex(self, address)


socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = (
    getaddrinfo, connect, connect_ex)
'''


def recorder(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment that loads the recorder into a Python process, and its log."""
    folder = tmp_path / "netwatch"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(RECORDER)
    log = tmp_path / "outbound.log"
    log.touch()
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "NETWATCH_LOG": str(log)}, log


def test_the_recorder_notes_outside_hosts_and_not_loopback(tmp_path: Path) -> None:
    env, log = recorder(tmp_path)
    code = ("import socket\n"
            "for host in ('127.0.0.1', 'localhost', 'example.invalid'):\n"
            "    try:\n"
            "        socket.getaddrinfo(host, 80)\n"
            "    except OSError:\n"
            "        pass\n"
            "s = socket.socket()\n"
            "s.settimeout(0.01)\n"
            "s.connect_ex(('192.0.2.1', 9))\n")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True,
                   timeout=60)
    assert [line.split()[1] for line in log.read_text().splitlines()] == [
        "example.invalid", "192.0.2.1"]


def page_up(server: ServeProcess) -> bool:
    import httpx

    assert server.proc.poll() is None, server.log.read_text()[-3000:]
    try:
        return server.http.get("/").status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_starts_and_shows_its_page_contacting_nothing_but_loopback(
        tmp_path: Path) -> None:
    """Without vLLM: serve pointed at a dead model server, with a stand-in model folder (its
    files are only checked for, since the model server is external). Start, the page, and a
    pair request (503: the model server is down) reach no other host."""
    env, log = recorder(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    server = ServeProcess(tmp_path / "served", ["--vllm-url", "http://127.0.0.1:9",
                                                "--vllm-api-key", "x", "--model", str(model)],
                          env=env)
    try:
        wait_for(lambda: page_up(server), START_TIMEOUT, "prefloop serve's page")
        assert server.http.get("/config").json()["analytics_enabled"] is False
        response = server.http.post("/api/v1/pairs", json={"message": "Name a fruit."})
        assert response.status_code == 503, response.text
    finally:
        server.stop()
    assert log.read_text() == ""


@pytest.mark.slow
def test_serve_contacts_nothing_but_loopback_during_a_visit(
        tmp_path: Path, external_args: list[str]) -> None:
    env, log = recorder(tmp_path)
    server = ServeProcess(tmp_path / "served", external_args, env=env)
    try:
        server.wait_ready()
        page = server.http.get("/")
        assert page.status_code == 200
        pair = server.http.post("/api/v1/pairs", json={"message": "Name a fruit."})
        assert pair.status_code == 200, pair.text
        vote = server.http.post("/api/v1/votes", json={"pair_id": pair.json()["pair_id"],
                                                       "choice": "a"})
        assert vote.status_code == 200, vote.text
    finally:
        server.stop()
    assert log.read_text() == ""
