"""The loop through the page in real Chromium: an admin starts a round, the Training tab
follows it, and the new adapter answers in the Arena."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from playwright.sync_api import Page, expect

from prefloop.cli import main
from tests.conftest import ANSWER_TIMEOUT_MS, ROUND_TIMEOUT, ServeProcess, open_page, wait_for

pytestmark = pytest.mark.slow

PASSWORD = "open-sesame"
TOPICS = ["boil an egg", "learn to swim", "fix a bike", "bake bread", "plant a tree",
          "tie a tie", "save money", "sleep better"]


@pytest.fixture(scope="module")
def loop_served(tmp_path_factory: pytest.TempPathFactory,
                external_args: list[str]) -> Iterator[ServeProcess]:
    """``prefloop serve`` with an admin password, 8 imported pairs, immediate promotion."""
    data_dir = tmp_path_factory.mktemp("loop-served")
    pairs = data_dir / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"How do I {t}?"}],
        "chosen": [{"role": "assistant", "content": f"Happy to help you {t}!"}],
        "rejected": [{"role": "assistant", "content": "No."}]}) + "\n" for t in TOPICS))
    result = CliRunner().invoke(main, ["import", str(pairs), "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    with ServeProcess.running(data_dir, [
            *external_args, "--promote", "immediate", "--duel-share", "0", "--baseline-share", "0",
            "--train-every", "10000", "--train-epochs", "1", "--max-tokens", "24"],
            env={"PREFLOOP_ADMIN_PASSWORD": PASSWORD}) as server:
        yield server


@pytest.fixture
def page(browser, loop_served: ServeProcess) -> Iterator[Page]:
    yield from open_page(browser, loop_served.url + "/")


def admin(page: Page, password: str, button: str) -> None:
    page.locator("#admin-password input").fill(password)
    page.locator(f"#{button}").click()


def test_admin_round_then_the_new_adapter_answers(page: Page, loop_served: ServeProcess):
    page.get_by_role("tab", name="Admin").click()
    admin(page, "not-the-password", "admin-pause")
    expect(page.locator("#admin-result")).to_contain_text("Wrong admin password")
    admin(page, PASSWORD, "admin-start-round")
    expect(page.locator("#admin-result")).to_contain_text("Round 1 started")

    page.get_by_role("tab", name="Training").click()
    # The round trains, the adapter is loaded and (promote: immediate) made champion. The
    # round's end is read from the API: a failed or rejected round fails here, with its reason.
    def rounds() -> list[dict]:
        return loop_served.http.get("/api/v1/rounds").json()["rounds"]

    wait_for(lambda: rounds()[0]["status"] != "running", ROUND_TIMEOUT, "round 1 to end")
    [row] = rounds()
    assert row["status"] == "succeeded", row
    expect(page.locator("#loop-status"), f"v0001 is not champion: {row}").to_contain_text(
        "v0001")
    expect(page.locator("#rounds")).to_contain_text("succeeded")
    assert (Path(loop_served.data_dir) / "adapters" / "v0001" / "adapter_config.json").is_file()

    page.get_by_role("tab", name="Arena").click()
    page.locator("#message textarea").fill("How do I brew tea?")
    page.locator("#send").click()
    expect(page.locator("#vote-a")).to_be_enabled(timeout=ANSWER_TIMEOUT_MS)
    page.locator("#vote-a").click()
    expect(page.locator("#status")).to_contain_text("Both answers came from v0001")

    # Roll back to base from the page.
    page.get_by_role("tab", name="Admin").click()
    page.locator("#admin-policy input").click()
    page.get_by_role("option", name="base").first.click()
    admin(page, PASSWORD, "admin-promote")
    expect(page.locator("#admin-result")).to_contain_text("base is the champion now")
