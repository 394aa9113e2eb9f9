"""How the page looks, measured in real Chromium: the two answers top-aligned while one is
still written, a "still writing…" status per answer, whole words in one font size, and the
votes-per-hour plot with readable ticks.

No vLLM: the real app runs in this process on the stand-in OpenAI server
(tests/openai_stub.py), which can hold its stream half way so the page is caught with answer
A complete and answer B half written.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Page, expect

from prefloop.app.server import create_app
from prefloop.config import Settings
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint, free_port
from prefloop.storage.store import Answer, Store
from tests.conftest import START_TIMEOUT, open_page, wait_for
from tests.openai_stub import StubServer, stub_server

pytestmark = pytest.mark.slow

SHORT_A = "Apples are red."
# Long enough to wrap over several lines; the stream is held right after HALF_WAY.
HALF_WAY = "midway"
LONG_B = " ".join(["Bananas are yellow and grow in bunches on large plants."] * 4
                  + [HALF_WAY] + ["They ripen after they are picked."] * 4)


@dataclass
class Polished:
    """The app on the stand-in server: where to reach it, its store and the stub."""

    url: str
    store: Store
    stub: StubServer


@contextmanager
def polished_app(data_dir: Path) -> Iterator[Polished]:
    """The whole web app (page, API, the loop's tabs) in this process, answering from the
    stand-in server; the loop is built but never scheduled."""
    with stub_server() as stub:
        settings = Settings(data_dir=data_dir)
        store = Store(settings.db_path)
        endpoint = Endpoint(stub.url, "x")
        pool = AdapterPool(endpoint, None, 16)
        sampler = PairSampler(endpoint, sampling=Sampling(0.8, 0.95, 128), max_model_len=2048)
        app = create_app(settings, store, sampler, Loop(settings, store, pool, data_dir))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: server.started, START_TIMEOUT, "the app to start", poll=0.05)
            yield Polished(f"http://127.0.0.1:{port}", store, stub)
        finally:
            stub.release.set()  # a held stream must not keep the server from stopping
            server.should_exit = True
            thread.join(60)
            pool.close()
            store.close()


@pytest.fixture(scope="module")
def polished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Polished]:
    with polished_app(tmp_path_factory.mktemp("polish")) as app:
        yield app


@pytest.fixture
def page(browser, polished: Polished) -> Iterator[Page]:
    yield from open_page(browser, polished.url + "/")


def text_box(page: Page, selector: str) -> dict[str, float]:
    """Where the text inside ``selector`` is drawn (its first line's top, and the height of
    all its lines), in CSS pixels: the text itself, not the box around it."""
    return page.evaluate("""(selector) => {
        const range = document.createRange();
        range.selectNodeContents(document.querySelector(selector).querySelector(".prose"));
        const lines = [...range.getClientRects()].filter(r => r.height > 0);
        const top = Math.min(...lines.map(r => r.top));
        return {top, height: Math.max(...lines.map(r => r.bottom)) - top};
    }""", selector)


def text_top(page: Page, selector: str) -> float:
    return text_box(page, selector)["top"]


def hold_b_half_way(stub: StubServer) -> None:
    """Answer A whole, then answer B up to HALF_WAY; the rest once ``stub.release`` is set."""
    stub.sides = [SHORT_A, LONG_B]
    words_a, words_b = SHORT_A.split(" "), LONG_B.split(" ")
    stub.hold_after = len(words_a) + words_b.index(HALF_WAY) + 1
    stub.release.clear()


def test_answers_stay_top_aligned_and_say_which_is_still_written(page: Page,
                                                                 polished: Polished) -> None:
    stub = polished.stub
    hold_b_half_way(stub)
    try:
        page.locator("#message textarea").fill("Tell me about fruit.")
        page.locator("#send").click()
        expect(page.locator("#answer-b")).to_contain_text(HALF_WAY)
        expect(page.locator("#answer-a")).to_contain_text(SHORT_A)
        a_box, b_box = text_box(page, "#answer-a"), text_box(page, "#answer-b")
        assert b_box["height"] > 2 * a_box["height"]  # B's text runs over more lines
        top_a, top_b = a_box["top"], b_box["top"]
        assert abs(top_a - top_b) <= 3, f"answer A's text starts at {top_a}, B's at {top_b}"

        # B is being written, A is complete: only B says so, and only B is busy.
        writing_a, writing_b = page.locator("#writing-a"), page.locator("#writing-b")
        expect(writing_b).to_contain_text("still writing")
        expect(writing_b).to_be_visible()
        expect(writing_a).not_to_contain_text("still writing")
        expect(writing_a).to_have_text("Answer A is complete.")  # heard, not seen
        expect(writing_a.locator(".visually-hidden")).to_have_count(1)
        expect(page.locator("#answer-b")).to_have_attribute("aria-busy", "true")
        expect(page.locator("#answer-a")).to_have_attribute("aria-busy", "false")
        for live in (writing_a, writing_b):
            expect(live).to_have_attribute("aria-live", "polite")
            expect(live).to_have_attribute("role", "status")
    finally:
        stub.release.set()
    expect(page.locator("#vote-a")).to_be_enabled()
    expect(page.locator("#answer-b")).to_contain_text("They ripen after they are picked.")
    expect(page.locator("#writing-b")).to_have_text("Answer B is complete.")
    expect(page.locator("#writing-b .busy")).to_have_count(0)
    expect(page.locator("#answer-b")).to_have_attribute("aria-busy", "false")
    assert abs(text_top(page, "#answer-a") - text_top(page, "#answer-b")) <= 3

    page.locator("#vote-b").click()  # the next turn starts with neither status shown
    expect(page.locator("#status")).to_contain_text("Saved: B is better")
    for side in "ab":
        expect(page.locator(f"#writing-{side}")).to_have_text("")


# Per character of an element's text: the height of its line box (the ascent and descent of
# the font it is drawn with), and whether the first font of the element's font-family lacks
# it: then the browser draws it with the next font, and it comes out as wide as that one's
# (measured with monospace, then serif, next: drawn from the first font, both are the same).
GLYPHS = """async (selector) => {
    const element = document.querySelector(selector);
    const style = getComputedStyle(element);
    const first = style.fontFamily.split(",")[0];
    await document.fonts.load(`${style.fontWeight} ${style.fontSize} ${first}`,
                              element.innerText);
    await document.fonts.ready;
    const canvas = document.createElement("canvas").getContext("2d");
    const width = (ch, next) => {
        canvas.font = `${style.fontWeight} 40px ${first}, ${next}`;
        return canvas.measureText(ch).width;
    };
    const walk = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
    const glyphs = [];
    for (let node = walk.nextNode(); node; node = walk.nextNode()) {
        for (let i = 0; i < node.length; i++) {
            const ch = node.textContent[i];
            if (!ch.trim()) continue;
            const range = document.createRange();
            range.setStart(node, i);
            range.setEnd(node, i + 1);
            glyphs.push({ch, height: range.getBoundingClientRect().height,
                         fallback: width(ch, "monospace") !== width(ch, "serif")});
        }
    }
    return {font: `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`, glyphs};
}"""


@pytest.mark.parametrize("selector", ["#vote-a", "#vote-b", "#vote-both-bad",
                                      "#answer-a-heading h3", "#answer-b-heading h3"])
def test_labels_are_drawn_in_one_font(page: Page, selector: str) -> None:
    expect(page.locator(selector)).to_be_visible()
    measured = page.evaluate(GLYPHS, selector)
    glyphs = measured["glyphs"]
    assert glyphs, f"no text in {selector}"
    fallen = "".join(g["ch"] for g in glyphs if g["fallback"])
    assert not fallen, f"{selector} ({measured['font']}): {fallen!r} drawn from a fallback font"
    heights = {g["ch"]: g["height"] for g in glyphs}
    assert max(heights.values()) - min(heights.values()) < 0.5, \
        f"{selector}: letters drawn at different sizes {heights}"


def add_votes(store: Store, per_hour: dict[str, int]) -> None:
    """Votes cast in the given UTC hours ('2025-01-01T10': 3 votes)."""
    for hour, count in per_hour.items():
        for _ in range(count):
            conversation = store.create_conversation()
            pair = store.add_pair(conversation, [{"role": "user", "content": "Hi"}],
                                  Answer("base", "one", 1), Answer("base", "two", 2))
            store.vote(pair, "a")
            with sqlite3.connect(store.path) as db:
                db.execute("update votes set created_at = ? where pair_id = ?",
                           [f"{hour}:30:00.000+00:00", pair])


def axis(page: Page, title: str, labels: bool = True):
    """The votes plot's axis titled ``title`` (Vega draws SVG, and describes each axis in its
    aria-label), or its tick labels."""
    found = page.locator(f"#votes-plot g.role-axis[aria-label*=\"titled '{title}'\"]")
    return found.locator("g.role-axis-label text") if labels else found


def test_votes_per_hour_plot_counts_whole_votes_from_zero(page: Page,
                                                          polished: Polished) -> None:
    with sqlite3.connect(polished.store.path) as db:
        db.execute("delete from votes")  # those of the other tests
    # One vote in one hour: the axis read "1.000000" (a range of 1 to 1).
    add_votes(polished.store, {"2025-01-01T10": 1})
    page.get_by_role("tab", name="Training").click()
    expect(axis(page, "hour (UTC)")).to_have_text(["2025-01-01 10:00"])
    expect(axis(page, "votes")).to_have_text(["0", "1", "2", "3", "4", "5"])

    # Three hours, the busiest with 3 votes: ticks were 1.0, 1.5, … and the hour of 1 vote
    # had no bar. Then a busy hour: ticks still whole votes, from 0.
    add_votes(polished.store, {"2025-01-01T11": 2, "2025-01-01T13": 3})
    page.locator("#training-refresh").click()
    expect(axis(page, "hour (UTC)")).to_have_text(
        ["2025-01-01 10:00", "2025-01-01 11:00", "2025-01-01 13:00"])
    expect(axis(page, "votes")).to_have_text(["0", "1", "2", "3", "4", "5"])
    add_votes(polished.store, {"2025-01-01T14": 37})
    page.locator("#training-refresh").click()
    expect(axis(page, "votes", labels=False)).to_have_attribute(
        "aria-label", re.compile(r"values from 0 to 37$"))
    ticks = axis(page, "votes").all_text_contents()
    assert ticks[0] == "0" and all(t.isdigit() for t in ticks), ticks
    assert [int(t) for t in ticks] == sorted({int(t) for t in ticks}), ticks  # no repeats
