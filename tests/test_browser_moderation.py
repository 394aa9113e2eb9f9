"""Moderation in real Chromium on a real `prefloop serve --moderation FILE:check`: a flagged
message is refused with the reason and nothing is stored; a flagged answer is never shown,
the page says why, and its pair takes no vote."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ANSWER_TIMEOUT_MS, ServeProcess, open_page

pytestmark = pytest.mark.slow

# The test's messages start with "§§ " (which the model does not write) and pass, unless
# they say "flag me"; every answer is flagged, so the test does not depend on what it says.
CHECK = '''
def check(text):
    if "flag me" in text:
        return "test phrase"
    if text.startswith("§§ "):
        return None
    return "every answer in this test"
'''


@pytest.fixture(scope="module")
def moderated(tmp_path_factory: pytest.TempPathFactory, external_args: list[str]) -> Iterator:
    folder = tmp_path_factory.mktemp("moderated")
    check = folder / "check.py"
    check.write_text(CHECK, encoding="utf-8")
    args = [*external_args, "--moderation", f"{check}:check"]
    with ServeProcess.running(folder / "data", args) as server:
        yield server


@pytest.fixture
def page(browser, moderated) -> Page:
    yield from open_page(browser, moderated.url + "/")


def count(server, sql: str) -> int:
    with sqlite3.connect(server.data_dir / "prefloop.db") as db:
        return db.execute(sql).fetchone()[0]


def test_a_flagged_message_and_a_flagged_answer(page: Page, moderated) -> None:
    page.locator("#message textarea").fill("§§ Please flag me.")
    page.locator("#send").click()
    expect(page.locator("#status")).to_contain_text("flagged by moderation (test phrase)")
    assert count(moderated, "select count(*) from pairs") == 0
    assert count(moderated, "select count(*) from conversations") == 0

    page.locator("#message textarea").fill("§§ Name a fruit.")
    page.locator("#send").click()
    status = page.locator("#status")
    expect(status).to_contain_text("Moderation withheld answer A and answer B",
                                   timeout=ANSWER_TIMEOUT_MS)
    for side in ("#answer-a", "#answer-b"):
        expect(page.locator(side)).to_contain_text(
            "Withheld: flagged by moderation (every answer in this test)")
    expect(page.locator("#vote-a")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()
    assert count(moderated, "select count(*) from pairs where withheld is not null") == 1
    assert count(moderated, "select count(*) from pairs where text_a != '' or text_b != ''") == 0
    assert count(moderated, "select count(*) from votes") == 0
