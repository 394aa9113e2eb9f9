"""My data in real Chromium on a real server: a visitor downloads everything stored for their
cookie, then deletes it (asked first); another visitor's data stays."""

from __future__ import annotations

import json
import sqlite3

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ANSWER_TIMEOUT_MS, open_page

pytestmark = pytest.mark.slow


@pytest.fixture
def page(browser, served) -> Page:
    yield from open_page(browser, served.url + "/")


def count(served, sql: str, *args: object) -> int:
    with sqlite3.connect(served.data_dir / "prefloop.db") as db:
        return db.execute(sql, args).fetchone()[0]


def chat_and_vote(page: Page, message: str) -> None:
    page.locator("#message textarea").fill(message)
    page.locator("#send").click()
    expect(page.locator("#vote-a")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    page.locator("#vote-a").click()
    expect(page.locator("#status")).to_contain_text("Saved: A is better")


def test_download_then_delete_my_data(browser, page: Page, served) -> None:
    # Another visitor (its own browser context, so its own cookie) whose data must stay.
    other = browser.new_context()
    other_page = other.new_page()
    other_page.goto(served.url + "/")
    chat_and_vote(other_page, "Name a river.")
    theirs = count(served, "select count(*) from conversations")

    chat_and_vote(page, "Name a mountain.")
    page.locator("#my-data").click()  # open the accordion
    link = page.get_by_role("link", name="download it as JSON")
    expect(link).to_be_visible()
    href = link.get_attribute("href")
    assert href and href.endswith("api/v1/me/data")
    # The context's request shares the page's cookie, as the link does.
    response = page.context.request.get(served.url + "/api/v1/me/data")
    assert response.ok and "attachment" in response.headers["content-disposition"]
    data = json.loads(response.text())
    assert [m["content"] for m in data["conversations"][0]["messages"]][0] == "Name a mountain."
    assert "Name a river." not in response.text()
    mine = data["client_id"]
    assert count(served, "select count(*) from conversations where client_id = ?", mine) == 1

    page.locator("#delete-my-data").click()
    expect(page.locator("#my-data-result")).to_contain_text("1 conversation, 1 answer pair")
    assert count(served, "select count(*) from conversations where client_id = ?", mine) == 1
    page.locator("#confirm-delete-my-data").click()
    expect(page.locator("#my-data-result")).to_contain_text("Deleted 1 conversation")
    expect(page.locator("#confirm-delete-my-data")).to_be_hidden()
    assert count(served, "select count(*) from conversations where client_id = ?", mine) == 0
    assert count(served, "select count(*) from votes where client_id = ?", mine) == 0
    assert count(served, "select count(*) from conversations") == theirs
    data = json.loads(page.context.request.get(served.url + "/api/v1/me/data").text())
    assert data["conversations"] == [] and data["votes"] == []
    other.close()
