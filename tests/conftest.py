"""Shared fixtures. The real vLLM server on the embedded model starts once per session."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from prefloop.config import Settings
from prefloop.hardware import NO_NATIVE_BF16_ENV

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PREFLOOP_TEST_CACHE_DIR", REPO / ".cache" / "test"))

# Nothing in the tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# A developer's settings must not leak into the tests; the rehearsal of a CPU without native
# bf16 (`make test-avx2`) must reach the code under test and its subprocesses.
for _name in [n for n in os.environ if n.startswith("PREFLOOP_") and n != NO_NATIVE_BF16_ENV]:
    del os.environ[_name]

# Tests wait for the event they need (a token, a row, a state); a deadline only turns a hang
# into a failure, so it is sized for the slowest machine the suite runs on (2 cores, AVX2
# only, the rest of the suite beside it), never for this one.
START_TIMEOUT = 600.0  # seconds for a vLLM or a `prefloop serve` to start
ROUND_TIMEOUT = 1200.0  # seconds for a real training round, its swap and the answers after
PAGE_TIMEOUT_MS = 60_000  # the page reacting to a click (a Gradio round trip)
ANSWER_TIMEOUT_MS = 300_000  # a pair of answers written by vLLM, shown in the page
# Prompts of the KL probe after a test's round (16 as shipped): scoring its answers twice is
# most of a short round's time. tests/test_kl_probe.py and the `trained` loop use 16.
PROBE_PROMPTS = 4
# Adapter names of a `prefloop serve` are PREFIX-vNNNN: the setting's default, unless
# ServeProcess gives it one of its own.
ADAPTER_PREFIX = next(f.default for f in dataclasses.fields(Settings)
                      if f.name == "adapter_prefix")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by it
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `vllm` every test that needs the session's vLLM server. `make test` runs those
    in one pytest process (one vLLM, in file order) and everything else in a second one at
    the same time."""
    for item in items:
        if "vllm_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)


@contextmanager
def own_vllm_lock() -> Iterator[None]:
    """Held while `prefloop serve` runs its own vLLM (or replicas): `make test`'s two
    processes then never run two of those at once beside the session's (memory for three
    is short)."""
    from filelock import FileLock

    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(CACHE / ".own-vllm.lock"):
        yield


@pytest.fixture
def own_vllm_turn() -> Iterator[None]:
    """:func:`own_vllm_lock` for one test."""
    with own_vllm_lock():
        yield


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             poll: float = 0.1) -> None:
    """Return once ``condition()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Models folder shared by the tests (the embedded model is converted once)."""
    path = CACHE / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def embedded_model(models_dir: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder."""
    from filelock import FileLock

    from prefloop.serving.models import prepare_model

    # `make test` runs two pytest processes: the first to get here converts, the other waits.
    with FileLock(models_dir / ".embedded.lock"):
        return prepare_model("embedded", models_dir, progress=lambda _: None)


@pytest.fixture(scope="session")
def vllm_server(embedded_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One real vLLM OpenAI server on the embedded model, LoRA enabled, for the session."""
    from prefloop.serving.vllm_server import VLLMServer

    server = VLLMServer(embedded_model, tmp_path_factory.mktemp("vllm"), memory_fraction=0.3,
                        max_model_len=2048, start_timeout=START_TIMEOUT)
    server.start()
    yield server
    server.stop()


class ServeProcess:
    """A real ``prefloop serve`` subprocess and where to reach it."""

    def __init__(self, data_dir: Path, args: list[str], env: dict[str, str] | None = None):
        import subprocess
        import sys

        import httpx

        from prefloop.serving.vllm_server import free_port

        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # One visitor: its cookie jar keeps the prefloop_client id that votes must carry.
        self.http = httpx.Client(base_url=self.url, timeout=120)
        self.log = data_dir / "serve.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.adapter_prefix = ADAPTER_PREFIX
        if "--vllm-url" in args:  # adapters of servers sharing one vLLM need their own names
            self.adapter_prefix = f"s{self.port}"
            args = [*args, "--adapter-prefix", self.adapter_prefix]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefloop", "serve", "--data-dir", str(data_dir),
                 "--port", str(self.port), *args],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    @classmethod
    @contextmanager
    def running(cls, data_dir: Path, args: list[str],
                env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
        """A started and ready server for the ``with`` block, stopped after it."""
        server = cls(data_dir, args, env)
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefloop serve exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"prefloop serve not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        import signal
        import subprocess

        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def lora_adapter(model: Path, folder: Path) -> Path:
    """A real PEFT LoRA adapter on ``model`` (freshly initialised: it answers as the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        folder)
    return folder


def memory_share(gib: float, most: float) -> float:
    """The fraction of this machine's memory that is ``gib`` GiB (at most ``most``), for a
    vLLM's memory fraction sized in GiB rather than as a share of whatever the machine has."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return round(min(most, gib * 2**30 / total), 3)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` (with these label values) in a Prometheus text
    page (KeyError if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name == name
              and all(sample.labels.get(k) == v for k, v in labels.items())]
    if not values:
        raise KeyError(name)
    return sum(values)


@contextmanager
def visitor(app: Any, cookie: str | None = None) -> Iterator[Any]:
    """A visitor of ``app`` (a starlette TestClient) with its own cookie jar, not entered, so
    the app outlives each visitor; a new client id unless ``cookie`` is given."""
    from starlette.testclient import TestClient

    from prefloop.app.guard import COOKIE

    client = TestClient(app, cookies={COOKIE: cookie} if cookie else None)
    try:
        client.get("/healthz")  # the middleware sets the client cookie
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def external_args(vllm_server, embedded_model: Path) -> list[str]:
    """CLI flags that point ``prefloop serve`` at the session's vLLM server (and at the
    converted base model, which its trainer needs), with the tests' short KL probe and no
    relevance floor (four short answers are too few to hold a round's adapter to it; the
    floor's own tests are in test_kl_probe.py and test_loop.py)."""
    endpoint = vllm_server.endpoint
    return ["--vllm-url", endpoint.url, "--vllm-api-key", endpoint.api_key,
            "--model", str(embedded_model), "--kl-probe-prompts", str(PROBE_PROMPTS),
            "--min-relevance", "0"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, external_args: list[str]) -> Iterator:
    """A ``prefloop serve`` on the shared vLLM, with its own data dir, for one test module."""
    with ServeProcess.running(tmp_path_factory.mktemp("served"), external_args) as server:
        yield server


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, one per test module."""
    import shutil

    from playwright.sync_api import expect, sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Chromium is missing: run `make chromium` (apt-get install chromium)"
    expect.set_options(timeout=PAGE_TIMEOUT_MS)  # Playwright's default is 5 s
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url: str) -> Iterator:
    """A fresh browser context on ``url``; after the test, no JavaScript error may have
    happened in the page. Use it as the body of a ``page`` fixture."""
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"
