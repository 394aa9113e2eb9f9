"""The terms gate in real Chromium on a real `prefloop serve --terms-file`: the terms are shown
before the first message, nothing is stored until they are accepted, the pair then carries
their version, and a visitor who accepted does not see them again."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ANSWER_TIMEOUT_MS, ServeProcess, open_page

pytestmark = pytest.mark.slow

TERMS = "# Terms of this demo\n\nConversations here may be published as a dataset.\n"


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, external_args: list[str]) -> Iterator:
    folder = tmp_path_factory.mktemp("consent")
    terms = folder / "terms.md"
    terms.write_text(TERMS, encoding="utf-8")
    args = [*external_args, "--terms-file", str(terms)]
    with ServeProcess.running(folder / "data", args) as server:
        yield server


@pytest.fixture
def page(browser, gated) -> Page:
    yield from open_page(browser, gated.url + "/")


def rows(data_dir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(data_dir / "prefloop.db") as db:
        return db.execute(sql).fetchall()


def test_the_terms_gate(page: Page, gated) -> None:
    terms = page.locator("#terms")
    expect(terms).to_be_visible()
    expect(page.locator("#terms-text")).to_contain_text("may be published as a dataset")

    page.locator("#message textarea").fill("Name a colour.")
    page.locator("#send").click()
    expect(page.locator("#status")).to_contain_text("press I accept first")
    assert rows(gated.data_dir, "select count(*) from conversations") == [(0,)]
    assert rows(gated.data_dir, "select count(*) from consents") == [(0,)]

    page.locator("#accept-terms").click()
    expect(terms).to_be_hidden()
    expect(page.locator("#status")).to_contain_text("Thank you")
    version = hashlib.sha256(TERMS.encode()).hexdigest()[:16]
    assert rows(gated.data_dir, "select terms_version from consents") == [(version,)]

    page.locator("#message textarea").fill("Name a colour.")
    page.locator("#send").click()
    expect(page.locator("#vote-a")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    assert rows(gated.data_dir, "select terms_version from pairs") == [(version,)]

    page.reload()  # the same cookie: accepted, so the terms stay hidden
    expect(page.locator("#message textarea")).to_be_visible()
    expect(terms).to_be_hidden()
