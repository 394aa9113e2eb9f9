"""HTML and script in messages, in written answers and in model answers stay inert in the
page, checked in real Chromium.

vLLM cannot be made to answer with a given text, so the model server here is a small
OpenAI-compatible server whose every answer is hostile HTML: what a prompt-injected or
compromised model could send. It speaks the same streaming protocol prefloop reads from vLLM
(``--vllm-url`` accepts any such server).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Page, expect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from prefloop.serving.vllm_server import free_port
from tests.conftest import ANSWER_TIMEOUT_MS, ServeProcess, open_page, wait_for

pytestmark = pytest.mark.slow

PAYLOADS = [
    '<script>window.__pwned = "script"</script>',
    '<img src="x" onerror="window.__pwned = \'img\'">',
    '<svg onload="window.__pwned = \'svg\'"></svg>',
    '<iframe srcdoc="<script>parent.__pwned = \'iframe\'</script>"></iframe>',
    '[click me](javascript:window.__pwned="link")',
    '<a href="javascript:window.__pwned=\'a\'">and me</a>',
    '<details open ontoggle="window.__pwned = \'details\'">x</details>',
    '<style>body { display: none }</style>',
]
ANSWER = "Here you go: " + " ".join(PAYLOADS)


def chunk(index: int, content: str | None, finish: str | None = None) -> str:
    delta = {"content": content} if content is not None else {}
    return "data: " + json.dumps({
        "id": "hostile", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}) + "\n\n"


async def completions(request: Request) -> StreamingResponse:
    body = await request.json()
    n = body.get("n", 1)

    async def events() -> Iterator[str]:
        for piece in (ANSWER[:40], ANSWER[40:]):
            for index in range(n):
                yield chunk(index, piece)
        for index in range(n):
            yield chunk(index, None, "stop")
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def tokenize(request: Request) -> JSONResponse:
    return JSONResponse({"count": 20})


async def ok(request: Request) -> JSONResponse:
    return JSONResponse({"data": []})


@pytest.fixture(scope="module")
def hostile_model() -> Iterator[str]:
    app = Starlette(routes=[
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/health", ok), Route("/v1/models", ok)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 60, "the stand-in model server to start", poll=0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def served_hostile(tmp_path_factory: pytest.TempPathFactory, hostile_model: str,
                   embedded_model: Path) -> Iterator[ServeProcess]:
    args = ["--vllm-url", hostile_model, "--vllm-api-key", "x", "--model", str(embedded_model)]
    with ServeProcess.running(tmp_path_factory.mktemp("hostile"), args) as server:
        yield server


@pytest.fixture
def page(browser, served_hostile: ServeProcess) -> Iterator[Page]:
    yield from open_page(browser, served_hostile.url + "/")


def settled(page: Page) -> None:
    """Wait until every image in the page has loaded or failed, then for the browser to run
    the tasks queued so far: by then an injected load/error/toggle handler would have run."""
    page.wait_for_function("() => [...document.images].every(img => img.complete)")
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => setTimeout(done)))")


def assert_inert(page: Page) -> None:
    """No payload ran, and none of its elements survived (Gradio's own SVG icons carry a
    harmless <style>, so styles inside SVG are not counted)."""
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("parent.__pwned") is None
    for area in ("#answer-a", "#answer-b", "#conversation"):
        found = page.evaluate(
            "(sel) => { const root = document.querySelector(sel); return {"
            " scripts: [...root.querySelectorAll('script, iframe, style:not(svg style)')]"
            "   .map(e => e.outerHTML.slice(0, 120)),"
            " handlers: [...root.querySelectorAll('*')].filter(e => [...e.attributes]"
            "   .some(a => a.name.startsWith('on'))).length,"
            " js_links: [...root.querySelectorAll('a')].filter(a =>"
            "   (a.getAttribute('href') || '').trim().toLowerCase()"
            "   .startsWith('javascript:')).length } }", area)
        assert found == {"scripts": [], "handlers": 0, "js_links": 0}, (area, found)
    expect(page.locator("body")).to_be_visible()


def test_hostile_html_is_shown_inert(page: Page, served_hostile: ServeProcess) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    page.locator("#message textarea").fill(
        "Hi <img src=x onerror=\"window.__pwned='message'\"> <script>window.__pwned=1</script>")
    page.locator("#send").click()
    expect(page.locator("#vote-a")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#answer-a")).to_contain_text("Here you go")
    settled(page)
    assert_inert(page)

    # A written answer with script becomes part of the conversation shown above.
    page.locator("#write-accordion").click()
    page.locator("#written-answer textarea").fill(
        '<img src=x onerror="window.__pwned=\'written\'"> **bold** <script>alert(1)</script>')
    page.locator("#vote-written").click()
    expect(page.locator("#status")).to_contain_text("Saved")
    expect(page.locator("#conversation")).to_contain_text("bold")
    settled(page)
    assert_inert(page)
    assert dialogs == []
