"""The Undo button in real Chromium on a real server: within the window the vote is deleted
and the pair can be voted again; after it, the page says why not and the vote stands."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ANSWER_TIMEOUT_MS, open_page

pytestmark = pytest.mark.slow


@pytest.fixture
def page(browser, served) -> Page:
    yield from open_page(browser, served.url + "/")


def last_vote(served) -> tuple | None:
    with sqlite3.connect(served.data_dir / "prefloop.db") as db:
        return db.execute("select pair_id, choice from votes order by rowid desc "
                          "limit 1").fetchone()


def vote_count(served) -> int:
    with sqlite3.connect(served.data_dir / "prefloop.db") as db:
        return db.execute("select count(*) from votes").fetchone()[0]


def test_undo_within_and_after_the_window(page: Page, served) -> None:
    before = vote_count(served)
    page.locator("#message textarea").fill("Suggest a name for a dog.")
    page.locator("#send").click()
    vote_a, undo = page.locator("#vote-a"), page.locator("#undo-vote")
    expect(vote_a).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    expect(undo).to_be_hidden()

    vote_a.click()
    expect(page.locator("#status")).to_contain_text("Saved: A is better")
    assert vote_count(served) == before + 1
    pair_id = last_vote(served)[0]
    undo.click()
    expect(page.locator("#status")).to_contain_text("Vote taken back")
    expect(vote_a).to_be_enabled()
    assert vote_count(served) == before

    page.locator("#vote-b").click()
    expect(page.locator("#status")).to_contain_text("Saved: B is better")
    assert last_vote(served) == (pair_id, "b")
    # Past the window (30 s by default): the vote is made older rather than waited for.
    old = (datetime.now(UTC) - timedelta(seconds=60)).isoformat(timespec="milliseconds")
    with sqlite3.connect(served.data_dir / "prefloop.db") as db:
        db.execute("update votes set created_at = ? where pair_id = ?", [old, pair_id])
    undo.click()
    expect(page.locator("#status")).to_contain_text("can be undone only within 30 s")
    expect(undo).to_be_hidden()
    assert last_vote(served) == (pair_id, "b")
