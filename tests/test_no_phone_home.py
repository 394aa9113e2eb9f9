"""Nothing leaves the machine unasked: no analytics, no version check, no third-party fonts
or scripts in the page. In-process, with a dead model endpoint; the visit with a message and
a vote in real Chromium is in test_browser_privacy.py (needs vLLM)."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from starlette.testclient import TestClient

from prefloop import NO_TELEMETRY
from prefloop.app.server import create_app
from prefloop.config import Settings
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Store

DEAD = Endpoint("http://127.0.0.1:9", "x")  # nothing listens there
LOCAL_HOSTS = {"testserver", "localhost", ""}
# What a browser fetches by itself: src/href of elements and url()/@import in CSS. (The
# og:image meta tags name Gradio's GitHub; only a link preview fetches those, not the page.)
FETCHED = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']([^"']+)["'])"""
                     r"""|(?:url\(\s*["']?([^"')]+)["']?\s*\))|(?:@import\s+["']([^"']+)["'])""")


def is_local(host: str | None) -> bool:
    if host is None or host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def third_party(text: str) -> list[str]:
    """Addresses in ``text`` a browser would fetch from a host other than this server."""
    urls = [next(g for g in m.groups() if g) for m in FETCHED.finditer(text)]
    return [u for u in urls if not u.startswith("data:")
            and urlsplit(u).scheme in ("http", "https", "")
            and not is_local(urlsplit(u).hostname)]


@contextmanager
def outbound() -> Iterator[list[str]]:
    """Every host this process looks up or connects to (other than loopback) while inside."""
    seen: list[str] = []
    lookup, connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if not is_local(host if isinstance(host, str) else None):
            seen.append(str(host))
        return lookup(host, *args, **kwargs)

    def connect_(self, address):
        if isinstance(address, tuple) and not is_local(address[0]):
            seen.append(str(address[0]))
        return connect(self, address)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect_  # type: ignore
    try:
        yield seen
    finally:
        socket.getaddrinfo, socket.socket.connect = lookup, connect  # type: ignore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "prefloop.db") as store:
        yield store


def test_the_app_reports_to_nobody_and_its_page_loads_nothing_from_elsewhere(
        tmp_path: Path, store: Store) -> None:
    before = set(threading.enumerate())
    with outbound() as seen:
        sampler = PairSampler(DEAD, sampling=Sampling(0.8, 0.95, 16), max_model_len=2048)
        app = create_app(Settings(data_dir=tmp_path), store, sampler)
        # Gradio's version check runs in a thread of its own: let any such thread finish.
        for thread in set(threading.enumerate()) - before:
            thread.join(timeout=10)
        client = TestClient(app)
        page = client.get("/")
        config = client.get("/config").json()
        css = client.get("/theme.css")
        client.close()
    assert page.status_code == 200 and css.status_code == 200
    assert config["analytics_enabled"] is False
    assert third_party(page.text) == []
    assert third_party(css.text) == []
    assert all(is_local(urlsplit(s).hostname) for s in config.get("stylesheets", []))
    assert "fonts.googleapis.com" not in page.text + css.text
    assert seen == []


def test_the_checker_sees_third_party_addresses() -> None:
    """The check above would notice a Google font, a CDN script or a remote image."""
    html = ('<link href="https://fonts.googleapis.com/css2?family=Inter" rel="stylesheet">'
            '<script src="//cdn.jsdelivr.net/x.js"></script><img src="static/a.png">'
            '<a href="http://127.0.0.1:7860/docs">docs</a>')
    css = "@import 'https://fonts.gstatic.com/f.css'; b { background: url(static/b.png) }"
    assert third_party(html) == ["https://fonts.googleapis.com/css2?family=Inter",
                                 "//cdn.jsdelivr.net/x.js"]
    assert third_party(css) == ["https://fonts.gstatic.com/f.css"]


def test_importing_prefloop_turns_telemetry_off_unless_the_operator_set_it() -> None:
    env = {k: v for k, v in os.environ.items() if k not in NO_TELEMETRY}
    code = ("import prefloop, os, huggingface_hub.constants as hub, gradio.analytics as ga; "
            "print(os.environ['VLLM_NO_USAGE_STATS'], os.environ['DO_NOT_TRACK'], "
            "hub.HF_HUB_DISABLE_TELEMETRY, ga.analytics_enabled())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parents[1]).stdout.split()
    assert out == ["1", "1", "True", "False"]
    # An operator who sets a variable keeps it.
    env["GRADIO_ANALYTICS_ENABLED"] = "True"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parents[1]).stdout.split()
    assert out[-1] == "True"
