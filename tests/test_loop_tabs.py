"""The Leaderboard, Training and Admin tabs: their handlers on a real store and loop, and the
layout built in a real ``gr.Blocks``. Nothing here needs vLLM (nothing listens on port 9)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pytest
from gradio.events import EventData
from gradio.state_holder import SessionState

from prefloop.app.guard import Guard
from prefloop.app.loop_api import password_matches
from prefloop.app.loop_tabs import (
    NO_DUELS,
    NO_ROUNDS,
    WRONG_PASSWORD,
    LoopHandlers,
    build_loop_tabs,
)
from prefloop.config import Settings
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Store

PASSWORD = "s3cret-pw"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    settings = Settings(data_dir=tmp_path, rating_resamples=20)
    store = Store(settings.db_path)
    pool = AdapterPool(Endpoint("http://127.0.0.1:9", "x"), None, 16)
    yield Loop(settings, store, pool, base_model=tmp_path)
    pool.close()
    store.close()


@pytest.fixture
def handlers(loop: Loop) -> LoopHandlers:
    return LoopHandlers(loop, PASSWORD)


def vote(store: Store, a: str, b: str, choice: str, kind: str = "duel") -> None:
    """One voted pair of answers by policies ``a`` and ``b``."""
    conversation = store.create_conversation()
    pair = store.add_pair(conversation, HI, Answer(a, "one", 1), Answer(b, "two", 2), kind=kind)
    store.vote(pair, choice)


def fake_adapter(loop: Loop, name: str) -> None:
    """An adapter row whose folder holds no adapter files (vLLM would refuse it)."""
    folder = loop.settings.adapters_dir / name
    folder.mkdir(parents=True)
    loop.store.add_adapter(name, folder, None, "base")


# -- leaderboard -------------------------------------------------------------------------------


def test_leaderboard_rates_the_policy_that_wins_above_base(loop: Loop,
                                                           handlers: LoopHandlers) -> None:
    fake_adapter(loop, "v0001")
    # v0001 wins 6 of 8 duels against base, from either side.
    for a, b, choice in [("v0001", "base", "a")] * 3 + [("base", "v0001", "b")] * 3 \
            + [("v0001", "base", "b"), ("base", "v0001", "a")]:
        vote(loop.store, a, b, choice)
    vote(loop.store, "base", "base", "a", kind="sample")  # no duel: not counted

    view = handlers.leaderboard_view()
    rows = view.table.to_dict("records")
    assert [r["policy"] for r in rows] == ["v0001", "base"]
    top, base = rows
    # Bradley-Terry with 0.01 virtual ties: p = 6.005 / 8.01, R = 1000 + 400 log10(p / (1-p)).
    assert top["rating"] == round(1000 + 400 * math.log10(6.005 / 2.005)) == 1191
    assert base["rating"] == 1000 and base["state"] == "champion"
    assert top["state"] == "candidate"
    assert top["votes"] == base["votes"] == 8
    assert top["win-rate vs base"] == "75%" and top["votes vs base"] == 8
    assert base["win-rate vs base"] == "–" and base["votes vs base"] == 0
    low, high = (int(x) for x in top["95% interval"].split("–"))
    assert low <= top["rating"] <= high
    assert base["95% interval"] == "1000–1000"
    assert "Bradley–Terry" in view.note and "base fixed at 1000" in view.note
    assert "half a win" in view.note

    over_time = view.over_time
    assert list(over_time.columns) == ["duel_votes", "policy", "rating"]
    assert over_time["duel_votes"].max() == 8
    final = over_time[over_time["duel_votes"] == 8].set_index("policy")["rating"]
    assert round(final["v0001"]) == 1191 and final["base"] == 1000
    note, table, plot = view.updates()
    assert table["visible"] is True and plot["visible"] is True
    gr.Dataframe().postprocess(view.table)  # Gradio can show what the handler returns
    gr.LinePlot(x="duel_votes", y="rating", color="policy").postprocess(over_time)


def test_leaderboard_without_duel_votes_says_so(loop: Loop, handlers: LoopHandlers) -> None:
    vote(loop.store, "base", "base", "a", kind="sample")
    view = handlers.leaderboard_view()
    assert view.note == NO_DUELS and view.note.startswith("**No duel votes yet.**")
    assert view.table.empty and view.over_time.empty
    note, table, plot = view.updates()
    assert table["visible"] is False and plot["visible"] is False


# -- training ----------------------------------------------------------------------------------


def test_status_when_running_paused_and_training(loop: Loop, handlers: LoopHandlers) -> None:
    for _ in range(3):
        vote(loop.store, "base", "base", "a", kind="sample")
    text = handlers.status_text()
    assert text.startswith("Loop: **running**")
    assert "Champion: **base** · Candidate: none" in text
    assert "3 of 32 new votes needed for the next round, checked every 10 min." in text

    loop.pause()
    text = handlers.status_text()
    assert text.startswith("Loop: **paused**") and "3 of 32" in text

    loop.resume()
    fake_adapter(loop, "v0001")
    round_id = loop.store.start_round("admin")
    text = handlers.status_text()
    assert text.startswith(f"Loop: **training** round {round_id} — preparing")
    assert "Candidate: **v0001**" in text
    loop.store.update_round(round_id, progress={"event": "step", "step": 4, "of": 8,
                                                "loss": 0.6123})
    text = handlers.status_text()
    assert text.startswith(f"Loop: **training** round {round_id} — step 4/8, loss 0.61")


def test_rounds_table_and_plots(loop: Loop, handlers: LoopHandlers) -> None:
    store = loop.store
    good = store.start_round("schedule")
    store.update_round(good, status="succeeded", adapter="v0001", pairs=16, new_pairs=12,
                       metrics={"steps": [{"loss": 0.6}, {"loss": 0.5}],
                                "held_out": {"before": {"accuracy": 0.5, "margin": 0.0},
                                             "after": {"accuracy": 0.75, "margin": 0.3}},
                                "seconds": {"total": 12}})
    no_held_out = store.start_round("admin")
    store.update_round(no_held_out, status="succeeded", adapter="v0002", pairs=4,
                       new_pairs=4, metrics={"steps": [{"loss": 0.4}],
                                             "held_out": {"before": None, "after": None}})
    failed = store.start_round("admin")
    store.update_round(failed, status="failed", error="trainer exited with status 1")
    vote(store, "base", "base", "a", kind="sample")
    vote(store, "base", "base", "b", kind="sample")

    view = handlers.training_view()
    rows = view.rounds.to_dict("records")
    assert [r["id"] for r in rows] == [failed, no_held_out, good]  # newest first
    first = rows[2]
    assert first["trigger"] == "schedule" and first["status"] == "succeeded"
    assert first["adapter"] == "v0001" and first["pairs"] == 16 and first["new pairs"] == 12
    assert first["final loss"] == 0.5 and first["held-out accuracy after"] == 0.75
    assert len(first["started"]) == 19 and "T" not in first["started"] and first["ended"]
    assert rows[1]["held-out accuracy after"] == "" and rows[1]["final loss"] == 0.4
    assert rows[0]["status"] == "failed" and rows[0]["error"] == "trainer exited with status 1"
    assert rows[0]["adapter"] == rows[0]["final loss"] == rows[0]["pairs"] == ""
    assert type(first["pairs"]) is int  # not 16.0

    assert view.loss.to_dict("records") == [{"round": good, "loss": 0.5},
                                            {"round": no_held_out, "loss": 0.4}]
    assert view.accuracy.to_dict("records") == [{"round": good, "accuracy": 0.75}]
    assert view.margin.to_dict("records") == [{"round": good, "margin": 0.3}]
    [hour] = view.votes.to_dict("records")
    assert hour["votes"] == 2 and len(hour["hour"]) == 16  # 'YYYY-MM-DD HH:00'
    assert hour["hour"].endswith(":00") and "T" not in hour["hour"]
    assert view.plots_note == ""
    updates = view.updates()
    assert len(updates) == 7 and all(u["visible"] for u in updates[3:])
    assert updates[-1]["y_lim"] == [0, 5]  # whole-vote ticks: see votes_axis_top
    shown = gr.Dataframe().postprocess(view.rounds)  # what Gradio sends: no NaN
    assert not any(isinstance(c, float) and math.isnan(c) for row in shown.data for c in row)


def test_training_view_before_any_round(handlers: LoopHandlers) -> None:
    view = handlers.training_view()
    assert view.rounds.empty and view.loss.empty and view.votes.empty
    assert view.plots_note == NO_ROUNDS
    assert not any(u["visible"] for u in view.updates()[3:])


# -- admin -------------------------------------------------------------------------------------


def test_admin_disabled_without_password(loop: Loop) -> None:
    for password in (None, ""):
        handlers = LoopHandlers(loop, password)
        assert handlers.admin_action("pause", "", None) == "⚠️ Admin is disabled."
        assert handlers.admin_action("pause", "anything", None) == "⚠️ Admin is disabled."
    assert not loop.paused


def test_wrong_password_changes_nothing(loop: Loop, handlers: LoopHandlers) -> None:
    fake_adapter(loop, "v0001")
    loop.store.crown("v0001", "test")
    for given in ("wrong", "", None, PASSWORD + " "):
        assert handlers.admin_action("pause", given) == WRONG_PASSWORD
        assert handlers.admin_action("promote", given, "base") == WRONG_PASSWORD
        assert handlers.admin_action("start_round", given) == WRONG_PASSWORD
    assert not loop.paused
    assert loop.store.champion() == "v0001"
    assert loop.store.rounds() == []
    loop.pause()
    assert handlers.admin_action("resume", "wrong") == WRONG_PASSWORD
    assert loop.paused


def test_pause_resume_and_rollback_to_base(loop: Loop, handlers: LoopHandlers) -> None:
    assert handlers.admin_action("pause", PASSWORD).startswith("✅ Loop paused")
    assert loop.paused and "Loop: **paused**" in handlers.admin_state()
    assert handlers.admin_action("resume", PASSWORD).startswith("✅ Loop resumed")
    assert not loop.paused

    fake_adapter(loop, "v0001")
    loop.store.crown("v0001", "test")
    assert handlers.policy_choices() == [("base", "base"), ("v0001 (champion)", "v0001")]
    message = handlers.admin_action("promote", PASSWORD, "base")
    assert message == "✅ base is the champion now (was v0001); new turns come from it."
    assert loop.store.champion() == "base"
    assert loop.store.adapter("v0001")["state"] == "retired"
    assert handlers.policy_choices() == [("base (champion)", "base"),
                                         ("v0001 (retired)", "v0001")]
    assert handlers.admin_action("promote", PASSWORD, "base") == \
        "✅ base was already the champion."


def test_admin_errors_are_messages(loop: Loop, handlers: LoopHandlers) -> None:
    fake_adapter(loop, "v0001")
    assert handlers.admin_action("promote", PASSWORD, "../x") == \
        "⚠️ policy must be 'base' or an adapter name like 'v0003'"
    assert handlers.admin_action("promote", PASSWORD, "v0009") == \
        "⚠️ adapter 'v0009' does not exist"
    assert handlers.admin_action("promote", PASSWORD, None) == \
        "⚠️ Choose a policy to make champion."
    refused = handlers.admin_action("promote", PASSWORD, "v0001")  # its folder is empty
    assert refused.startswith("⚠️ v0001 cannot be served:") and "adapter_config.json" in refused
    assert loop.store.champion() == "base"
    assert handlers.admin_action("start_round", PASSWORD) == (
        "⚠️ there are no trainable votes yet (votes for A, B or a written answer)")
    assert loop.store.rounds() == [] and not loop.training
    with pytest.raises(ValueError, match="unknown admin action"):
        handlers.admin_action("reboot", PASSWORD)


# -- layout ------------------------------------------------------------------------------------


def build(loop: Loop, password: str | None) -> tuple[gr.Blocks, gr.Tabs]:
    with gr.Blocks() as page:
        with gr.Tabs() as tabs:
            with gr.Tab("Arena"):
                gr.Markdown("arena")
            build_loop_tabs(loop, password)
    return page, tabs


def elem_ids(page: gr.Blocks) -> dict[str, gr.blocks.Block]:
    return {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}


def test_tabs_build_with_admin(loop: Loop) -> None:
    page, tabs = build(loop, PASSWORD)
    ids = elem_ids(page)
    for wanted in ("leaderboard-tab", "leaderboard", "ratings-plot", "loop-status", "rounds",
                   "admin-password", "admin-start-round", "admin-pause", "admin-resume",
                   "admin-policy", "admin-promote", "admin-result"):
        assert wanted in ids, wanted
    assert "admin-disabled" not in ids
    assert ids["admin-password"].type == "password"
    assert not any(isinstance(b, gr.State) for b in page.blocks.values())
    # The timers stop when another tab (even the Arena) is shown.
    assert any((tabs._id, "select") in fn.targets for fn in page.fns.values())
    timers = [b for b in page.blocks.values() if isinstance(b, gr.Timer)]
    assert len(timers) == 2 and not any(t.active for t in timers)


def test_tabs_build_without_admin(loop: Loop) -> None:
    page, _ = build(loop, None)
    ids = elem_ids(page)
    assert "admin-disabled" in ids and "PREFLOOP_ADMIN_PASSWORD" in ids["admin-disabled"].value
    assert not {"admin-password", "admin-promote", "admin-result"} & ids.keys()
    assert {"leaderboard", "loop-status", "rounds"} <= ids.keys()


def test_wired_events_run_through_gradio(loop: Loop) -> None:
    """Each event as the page would call it: the outputs fit, the password is checked, and the
    Tabs' select turns on only the shown tab's timer."""
    fake_adapter(loop, "v0001")
    page, tabs = build(loop, PASSWORD)
    ids = elem_ids(page)
    state = SessionState(page)

    def fire(block: gr.blocks.Block, event: str, inputs: list, value: str | None = None
             ) -> list:
        """The first function wired to ``event`` of ``block``, run as a page's request."""
        fn = next(f for f in page.fns.values() if (block._id, event) in f.targets)
        data = EventData(block, {"index": 0, "value": value}) if value else None
        out = asyncio.run(page.process_api(fn, inputs, state, event_data=data))
        return out["data"]

    assert fire(ids["admin-pause"], "click", ["wrong", None]) == [WRONG_PASSWORD]
    assert not loop.paused
    assert fire(ids["admin-pause"], "click", [PASSWORD, None])[0].startswith("✅")
    assert loop.paused
    # An adapter made after the page was built can be chosen once the tab refreshed.
    fake_adapter(loop, "v0002")
    state_md, choices = fire(ids["admin-tab"], "select", [])
    assert [value for _, value in choices["choices"]] == ["base", "v0001", "v0002"]
    assert fire(ids["admin-promote"], "click", [PASSWORD, "v0002"])[0].startswith(
        "⚠️ v0002 cannot be served")
    with pytest.raises(gr.Error, match="not in the list of choices"):
        fire(ids["admin-promote"], "click", [PASSWORD, "../x"])
    note, table, plot = fire(ids["leaderboard-refresh"], "click", [])
    assert note == NO_DUELS and table["visible"] is False
    status, rounds, *_ = fire(ids["training-refresh"], "click", [])
    assert status.startswith("Loop: **paused**") and rounds["headers"][0] == "id"
    timers = [u["active"] for u in fire(tabs, "select", [], value="Arena")]
    assert timers == [False, False]
    assert [u["active"] for u in fire(tabs, "select", [], value="Training")] == [True, False]


def test_wrong_admin_passwords_on_the_page_are_slowed_too(loop: Loop) -> None:
    handlers = LoopHandlers(loop, PASSWORD, Guard(loop.settings))
    for _ in range(10):
        assert handlers.admin_action("pause", "guess", host="203.0.113.9") == WRONG_PASSWORD
    assert "Too many wrong passwords" in handlers.admin_action("pause", PASSWORD,
                                                               host="203.0.113.9")
    assert not loop.paused
    # Another address is not held back.
    assert handlers.admin_action("pause", PASSWORD, host="198.51.100.1").startswith("✅")


def test_a_non_ascii_password_works_on_the_page_as_in_the_api(loop: Loop) -> None:
    """One check for both paths: the page compares the typed text as UTF-8, the API the
    header's bytes as sent (tests/test_loop_api.py sends the same password as UTF-8)."""
    password = "pässwörd-✓"
    handlers = LoopHandlers(loop, password)
    for given in ("pässwörd-✗", "pässwörd", "passwOrd-✓", password + " ", "\udcff"):
        assert handlers.admin_action("pause", given) == WRONG_PASSWORD, given
    assert not loop.paused
    assert handlers.admin_action("pause", password).startswith("✅")
    assert loop.paused
    assert password_matches(password, password)
    assert password_matches(password.encode("utf-8"), password)
    assert not password_matches(password.encode("latin-1", "replace"), password)
    assert not password_matches(password.encode("utf-16"), password)
