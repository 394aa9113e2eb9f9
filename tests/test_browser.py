"""The Arena page in real Chromium (Debian's), driven by Playwright, on a real server."""

from __future__ import annotations

import re
import sqlite3

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ANSWER_TIMEOUT_MS, open_page

pytestmark = pytest.mark.slow

@pytest.fixture
def page(browser, served) -> Page:
    yield from open_page(browser, served.url + "/")


def send(page: Page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()


def votes(served) -> list[tuple]:
    with sqlite3.connect(served.data_dir / "prefloop.db") as db:
        return db.execute("select p.conversation_id, v.choice, p.text_a, p.text_b from votes v "
                          "join pairs p on p.id = v.pair_id order by v.created_at").fetchall()


def test_chat_vote_and_continue(page: Page, served):
    vote_a = page.locator("#vote-a")
    expect(vote_a).to_be_disabled()
    before = len(votes(served))

    send(page, "Suggest a name for a cat.")
    expect(vote_a).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    answer_a = page.locator("#answer-a").inner_text().strip()
    answer_b = page.locator("#answer-b").inner_text().strip()
    # Two samples of the tiny model may coincide ("A cat."): the panes are checked against
    # the stored pair below instead of against each other.
    assert answer_a and answer_b
    expect(page.locator("#send")).to_be_disabled()

    vote_a.click()
    expect(page.locator("#status")).to_contain_text("Saved: A is better")
    expect(vote_a).to_be_disabled()
    rows = votes(served)
    assert len(rows) == before + 1
    conversation_id, choice, text_a, text_b = rows[-1]
    assert choice == "a"
    # The stored answers are the ones shown as A and B (compared without Markdown punctuation).
    assert re.sub(r"\W", "", text_a)[:30] == re.sub(r"\W", "", answer_a)[:30]
    assert re.sub(r"\W", "", text_b)[:30] == re.sub(r"\W", "", answer_b)[:30]
    # The chosen answer joined the conversation shown above the answers.
    expect(page.locator("#conversation")).to_contain_text("Suggest a name for a cat.")

    send(page, "Another one, please.")
    expect(vote_a).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    page.locator("#vote-both-bad").click()
    expect(page.locator("#status")).to_contain_text("Saved: Both bad")
    rows = votes(served)
    assert len(rows) == before + 2
    assert rows[-1][0] == conversation_id and rows[-1][1] == "both_bad"


def test_written_answer_joins_the_conversation(page: Page, served):
    send(page, "Say hello.")
    expect(page.locator("#vote-a")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    page.locator("#write-accordion").get_by_text("Write a better answer").click()
    expect(page.locator("#vote-written")).to_be_enabled()
    page.locator("#written-answer textarea").fill("Hello! Nice to meet you.")
    page.locator("#vote-written").click()
    expect(page.locator("#status")).to_contain_text("Saved: your written answer")
    expect(page.locator("#conversation")).to_contain_text("Hello! Nice to meet you.")


def test_bad_messages_show_an_error_and_store_nothing(page: Page, served):
    before = len(votes(served))
    with sqlite3.connect(served.data_dir / "prefloop.db") as db:
        pairs_before = db.execute("select count(*) from pairs").fetchone()[0]
    send(page, "   ")
    expect(page.locator("#status")).to_contain_text("empty")
    send(page, "x" * 4001)
    expect(page.locator("#status")).to_contain_text("limit is 4,000")
    expect(page.locator("#vote-a")).to_be_disabled()
    with sqlite3.connect(served.data_dir / "prefloop.db") as db:
        assert db.execute("select count(*) from pairs").fetchone()[0] == pairs_before
    assert len(votes(served)) == before


def test_new_conversation_starts_over(page: Page, served):
    send(page, "Tell me a fact.")
    expect(page.locator("#vote-tie")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    page.locator("#vote-tie").click()
    expect(page.locator("#status")).to_contain_text("Saved: Tie")
    expect(page.locator("#conversation")).to_contain_text("Tell me a fact.")
    page.locator("#new-conversation").click()
    expect(page.locator("#conversation")).not_to_contain_text("Tell me a fact.")


def test_loop_tabs_without_an_admin_password(page: Page, served):
    page.get_by_role("tab", name="Admin").click()
    expect(page.locator("#admin-disabled")).to_contain_text("PREFLOOP_ADMIN_PASSWORD")
    expect(page.locator("#admin-password")).to_have_count(0)
    page.get_by_role("tab", name="Leaderboard").click()
    expect(page.locator("#leaderboard-note")).to_contain_text("No duel votes yet")
    page.get_by_role("tab", name="Training").click()
    expect(page.locator("#loop-status")).to_contain_text("champion")
