"""Nothing leaves the machine unasked, in real Chromium: every request the page makes during
a visit with a message and a vote goes to the prefloop server itself."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from tests.conftest import ANSWER_TIMEOUT_MS, open_page

pytestmark = pytest.mark.slow


def test_a_visit_with_a_message_and_a_vote_asks_no_other_host(browser, served) -> None:
    requested: list[str] = []
    pages = open_page(browser, served.url + "/")
    page = next(pages)
    page.context.on("request", lambda request: requested.append(request.url))
    page.reload()  # everything the page loads, now that the hook is in place
    page.locator("#message textarea").fill("Suggest a name for a cat.")
    page.locator("#send").click()
    expect(page.locator("#vote-a")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    page.locator("#vote-a").click()
    expect(page.locator("#status")).to_contain_text("Saved: A is better")
    with pytest.raises(StopIteration):
        next(pages)  # closes the context; fails on JavaScript errors
    ours = urlsplit(served.url).netloc
    others = sorted({u for u in requested
                     if urlsplit(u).scheme in ("http", "https", "ws", "wss")
                     and urlsplit(u).netloc != ours})
    assert requested and others == []
