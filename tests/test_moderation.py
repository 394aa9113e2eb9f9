"""Moderation: every message, answer and written answer checked (built-in phrases, an
OpenAI-compatible URL, or the operator's function). A flagged message is refused (422) and
nothing is generated; a flagged answer is withheld (not shown, not stored) and its pair takes
no vote, so it is in no export or round; a failing check refuses (fail closed) or lets through
(fail open), counted in /metrics and the Admin tab. Bad settings are config errors.

Real SQLite, the real FastAPI app and sampler; the model and moderation servers are a stand-in
OpenAI server (tests/openai_stub.py). The page in Chromium: test_browser_moderation.py.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from prefloop.app.arena import (
    CHECKING,
    DONE,
    WRITING,
    ArenaHandlers,
    ArenaState,
    answer_status,
)
from prefloop.app.chat import ChatService
from prefloop.app.guard import Client
from prefloop.app.loop_tabs import LoopHandlers
from prefloop.app.moderation import Flagged, ModerationDown, Moderator, builtin_check
from prefloop.app.server import create_app
from prefloop.cli import main
from prefloop.config import ConfigError, Settings, load_settings
from prefloop.loop.controller import Loop
from prefloop.loop.rounds import snapshot_pairs
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.exchange import export_records
from prefloop.storage.store import Conflict, Store
from tests.conftest import visitor
from tests.openai_stub import StubServer, stub_server

ME = "a" * 32
CHAT = "/v1/chat/completions"


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with stub_server() as server:
        server.flag_words = {"grenade": "violence", "insult": "harassment"}
        yield server


def refused_url() -> str:
    """A moderation URL on a port nothing listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/moderations"


def settings_for(tmp_path: Path, moderation: str, **more) -> Settings:
    return Settings(data_dir=tmp_path / "data", moderation=moderation, **more)


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    ("on", "expected off, builtin, an OpenAI-compatible moderation URL"),
    ("", "expected off, builtin"),
    ("http://127.0.0.1:8000", "ending in /moderations"),
    ("https:///v1/moderations", "ending in /moderations"),
    ("mymodule:", "expected off, builtin"),
    ("mymodule:not-a-name", "expected off, builtin"),
])
def test_a_bad_moderation_setting_is_a_config_error(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^moderation: .*{message}"):
        Settings(moderation=value)


def test_moderation_settings(tmp_path: Path) -> None:
    assert Settings().moderation == "off" and Settings().moderation_fail == "closed"
    assert Settings(moderation="https://mod.example/v1/moderations").moderation.endswith("s")
    assert Settings(moderation="path/to/file.py:check").moderation == "path/to/file.py:check"
    with pytest.raises(ConfigError, match="moderation_fail: expected one of closed, open"):
        Settings(moderation_fail="maybe")
    with pytest.raises(ConfigError, match="moderation_timeout"):
        Settings(moderation_timeout=0)
    with pytest.raises(ConfigError, match="moderation_api_key applies to a moderation URL"):
        Settings(moderation="builtin", moderation_api_key="k")
    with pytest.raises(ConfigError, match="moderation_model applies"):
        Settings(moderation_model="omni")
    env = {"PREFLOOP_MODERATION": "builtin", "PREFLOOP_MODERATION_FAIL": "open"}
    loaded = load_settings(None, env=env)
    assert (loaded.moderation, loaded.moderation_fail) == ("builtin", "open")


def test_a_moderation_function_that_cannot_be_loaded_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    cases = {"no_such_module_for_prefloop:check": "moderation module .* cannot be imported",
             f"{tmp_path / 'absent.py'}:check": "moderation file .* does not exist",
             f"{broken}:check": "failed while importing.*boom",
             "os:sep": "sep is a str, not a function",
             "os:no_such_function": "has no attribute 'no_such_function'"}
    for spec, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            Moderator(settings_for(tmp_path, spec))


def test_serve_refuses_a_bad_moderation_function_before_starting_anything(
        tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "data"),
                                       "--moderation", "no_such_module_for_prefloop:check"])
    assert result.exit_code == 1 and "cannot be imported" in result.output
    assert not (tmp_path / "data").exists()


# -- the checks --------------------------------------------------------------------------------


def test_the_builtin_check_matches_whole_phrases_case_and_width_folded() -> None:
    check = builtin_check()
    assert check(["Just KILL   YOURSELF", "how to make a pipe bomb?", "Hello there"]) == [
        "self-harm", "weapons", None]
    assert check(["ｋｉｌｌ ｙｏｕｒｓｅｌｆ"]) == ["self-harm"]  # full-width letters
    assert check(["skill yourself up", "a child pornographer"]) == [None, None]


def test_a_moderation_function_returns_a_reason_true_or_nothing(tmp_path: Path) -> None:
    module = tmp_path / "mod.py"
    module.write_text(
        "def check(text):\n"
        "    if 'bad' in text: return 'bad word'\n"
        "    if 'worse' in text: return True\n"
        "    if 'boom' in text: raise RuntimeError('down')\n"
        "    if 'odd' in text: return 42\n"
        "    return None\n")
    moderator = Moderator(settings_for(tmp_path, f"{module}:check"))
    assert moderator.check(["fine", "bad", "worse"], "answer") == [None, "bad word", "flagged"]
    assert moderator.flagged["answer"] == 2
    for text, fragment in (("boom", "raised RuntimeError"), ("odd", "returned 42")):
        with pytest.raises(ModerationDown, match=fragment):
            moderator.check([text], "message")
    assert moderator.failures["refused"] == 2
    with pytest.raises(Flagged, match=r"your message was flagged by moderation \(bad word\)"):
        moderator.refuse_flagged("bad", "message", "your message")


def test_the_url_check_asks_once_for_both_texts_and_judges_each(tmp_path: Path,
                                                                stub: StubServer) -> None:
    moderator = Moderator(settings_for(tmp_path, stub.url + "/v1/moderations",
                                       moderation_api_key="k", moderation_model="m"))
    assert moderator.check(["a grenade", "kind words", "an insult and a grenade"],
                           "answer") == ["violence", None, "harassment, violence"]
    assert stub.hits["/v1/moderations"] == 1
    assert stub.moderated == ["a grenade", "kind words", "an insult and a grenade"]
    stub.moderation_status = 500
    with pytest.raises(ModerationDown, match="answered 500"):
        moderator.check(["x"], "message")


@pytest.mark.parametrize("fail", ["closed", "open"])
def test_a_moderation_service_that_refuses_connections(tmp_path: Path, fail: str) -> None:
    moderator = Moderator(settings_for(tmp_path, refused_url(), moderation_fail=fail,
                                       moderation_timeout=2))
    if fail == "closed":
        with pytest.raises(ModerationDown, match="not answering.*nothing goes out unchecked"):
            moderator.check(["hello"], "message")
        assert moderator.failures == {"refused": 1, "allowed": 0}
    else:
        assert moderator.check(["hello"], "message") == [None]
        assert moderator.failures == {"refused": 0, "allowed": 1}


# -- the API -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "data" / "prefloop.db") as store:
        yield store


def app_for(settings: Settings, store: Store, stub: StubServer):
    sampler = PairSampler(Endpoint(stub.url, "x"), sampling=Sampling(0.8, 0.95, 16),
                          max_model_len=2048)
    return create_app(settings, store, sampler)



def test_a_flagged_message_is_refused_and_nothing_is_generated(tmp_path: Path, store: Store,
                                                              stub: StubServer) -> None:
    settings = settings_for(tmp_path, stub.url + "/v1/moderations")
    with visitor(app_for(settings, store, stub)) as http:
        response = http.post("/api/v1/pairs", json={"message": "Where is my grenade?"})
        assert response.status_code == 422
        assert response.json()["detail"] == ("your message was flagged by moderation "
                                             "(violence); nothing was stored. Please rephrase "
                                             "it.")
        assert stub.hits[CHAT] == 0 and set(store.counts().values()) == {0}
        assert 'prefloop_moderation_flagged_total{what="message"} 1.0' in http.get(
            "/metrics").text


@pytest.mark.parametrize("flagged_side", ["a", "b"])
def test_a_flagged_answer_is_withheld_and_never_votes_or_trains(
        tmp_path: Path, store: Store, stub: StubServer, flagged_side: str) -> None:
    settings = settings_for(tmp_path, stub.url + "/v1/moderations")
    bad = "Here is a grenade recipe marker-9f3e2."
    stub.answers = [bad, "Fine answer."] if flagged_side == "a" else ["Fine answer.", bad]
    fine_side = "b" if flagged_side == "a" else "a"
    with visitor(app_for(settings, store, stub)) as http:
        response = http.post("/api/v1/pairs", json={"message": "Tell me", "seed": 0})
        assert response.status_code == 200, response.text
        pair = response.json()
        assert pair["votable"] is False
        assert pair[flagged_side] | {"policy": None} == {
            "text": "", "policy": None, "finish_reason": "stop", "withheld": "violence"}
        assert pair[fine_side]["text"] == "Fine answer." and pair[fine_side]["withheld"] is None
        assert sorted(stub.moderated) == sorted(["Tell me", bad, "Fine answer."])

        row = store.pair(pair["pair_id"])
        assert row["withheld"] == f"answer {flagged_side.upper()}: violence"
        assert row[f"text_{flagged_side}"] == "" and row[f"text_{fine_side}"] == "Fine answer."
        assert b"marker-9f3e2" not in store.path.read_bytes() + Path(
            str(store.path) + "-wal").read_bytes()

        for body in ({"pair_id": pair["pair_id"], "choice": fine_side},
                     {"pair_id": pair["pair_id"], "answer": "Mine."}):
            response = http.post("/api/v1/votes", json=body)
            assert response.status_code == 409 and "withheld" in response.json()["detail"]
        assert store.vote_of(pair["pair_id"]) is None
        with pytest.raises(Conflict, match="withheld"):
            store.vote(pair["pair_id"], "a")

        # The conversation goes on without the withheld turn.
        stub.answers = ["One.", "Two."]
        response = http.post("/api/v1/pairs", json={
            "message": "Again", "conversation_id": pair["conversation_id"], "seed": 0})
        assert response.status_code == 200, response.text
        assert store.pair(response.json()["pair_id"])["context"] == [
            {"role": "user", "content": "Again"}]
        assert http.post("/api/v1/votes", json={"pair_id": response.json()["pair_id"],
                                                "choice": "a"}).status_code == 200
        metrics = http.get("/metrics").text
        assert 'prefloop_moderation_flagged_total{what="answer"} 1.0' in metrics
        assert "prefloop_pairs_withheld 1.0" in metrics

    exported = str(list(export_records(store, "trl")))
    snapshot = snapshot_pairs(store, tmp_path / "pairs.jsonl", 0, 100, 1.0, random.Random(0))
    assert "One." in exported and "Fine answer." not in exported
    assert snapshot.pairs == 1 and "Fine answer." not in snapshot.path.read_text()


def test_a_flagged_written_answer_is_refused(tmp_path: Path, store: Store,
                                             stub: StubServer) -> None:
    settings = settings_for(tmp_path, stub.url + "/v1/moderations")
    with visitor(app_for(settings, store, stub)) as http:
        pair = http.post("/api/v1/pairs", json={"message": "Hi", "seed": 0}).json()
        response = http.post("/api/v1/votes", json={"pair_id": pair["pair_id"],
                                                    "answer": "An insult."})
        assert response.status_code == 422
        assert "your written answer was flagged by moderation (harassment)" in \
            response.json()["detail"]
        assert store.vote_of(pair["pair_id"]) is None
        assert http.post("/api/v1/votes", json={"pair_id": pair["pair_id"],
                                                "answer": "A kind one."}).status_code == 200


@pytest.mark.parametrize("fail", ["closed", "open"])
def test_the_api_when_the_moderation_service_is_down(tmp_path: Path, store: Store,
                                                     stub: StubServer, fail: str) -> None:
    settings = settings_for(tmp_path, refused_url(), moderation_fail=fail,
                            moderation_timeout=2)
    with visitor(app_for(settings, store, stub)) as http:
        response = http.post("/api/v1/pairs", json={"message": "Hi", "seed": 0})
        metrics = http.get("/metrics").text
    if fail == "closed":
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert "not answering" in response.json()["detail"]
        assert stub.hits[CHAT] == 0 and store.counts()["pairs"] == 0
        assert 'prefloop_moderation_failures_total{outcome="refused"} 1.0' in metrics
    else:  # the message and both answers went through unchecked
        assert response.status_code == 200 and response.json()["votable"] is True
        assert 'prefloop_moderation_failures_total{outcome="allowed"} 2.0' in metrics


def test_no_moderation_metrics_when_off(tmp_path: Path, store: Store, stub: StubServer) -> None:
    with visitor(app_for(settings_for(tmp_path, "off"), store, stub)) as http:
        assert http.post("/api/v1/pairs", json={"message": "grenade", "seed": 0}
                         ).status_code == 200
        assert "prefloop_moderation" not in http.get("/metrics").text
    assert stub.hits["/v1/moderations"] == 0


# -- the page and the Admin tab ----------------------------------------------------------------


def test_the_page_never_shows_a_flagged_answer(tmp_path: Path, store: Store,
                                               stub: StubServer) -> None:
    settings = settings_for(tmp_path, "builtin")
    service = ChatService(settings, store, PairSampler(
        Endpoint(stub.url, "x"), sampling=Sampling(0.8, 0.95, 16), max_model_len=2048))
    handlers = ArenaHandlers(service)
    me = Client(ME)

    async def send(message: str) -> list:
        return [view async for view in handlers.send(message, ArenaState(), me)]

    views = asyncio.run(send("Kill yourself"))
    assert "flagged by moderation (self-harm)" in views[-1].status and views[-1].typing
    assert store.counts()["pairs"] == 0

    stub.answers = ["A calm answer.", "Go die, you should die."]
    send_views = asyncio.run(send("Hello"))
    streaming = [v for v in send_views if v.status.endswith("Writing two answers…")]
    assert streaming and all("Go die" not in v.answer_a + v.answer_b and
                             "calm" not in v.answer_a + v.answer_b for v in streaming)
    assert "characters so far" in streaming[-1].answer_b
    # Each answer's status: written, then checked (moderation has yet to pass it), then done.
    assert streaming[0].writing == (WRITING, WRITING)
    assert streaming[-1].writing == (CHECKING, CHECKING)
    assert "being checked" in answer_status("a", CHECKING)
    last = send_views[-1]
    assert last.writing == (DONE, DONE)
    withheld = "*Withheld: flagged by moderation (self-harm).*"
    # The page draws its own seed: either side may hold the flagged answer.
    side = "A" if last.answer_a == withheld else "B"
    assert {last.answer_a, last.answer_b} == {"A calm answer.", withheld}
    assert f"withheld answer {side}" in last.status and not last.voting and last.typing
    assert last.state.pair_id is None and last.chat == []


def test_the_admin_tab_shows_the_moderation_counts(tmp_path: Path, store: Store) -> None:
    settings = settings_for(tmp_path, "builtin")
    moderator = Moderator(settings)
    assert moderator.check(["kill yourself", "hi"], "answer") == ["self-harm", None]
    pool = AdapterPool(Endpoint("http://127.0.0.1:9", "x"), None, 16)
    loop = Loop(settings, store, pool, base_model=tmp_path, seed=0)
    try:
        handlers = LoopHandlers(loop, "pw", moderation=lambda: moderator.summary(3))
        text = handlers.admin_state()
    finally:
        loop.stop()
        pool.close()
    assert "Moderation: **builtin**, failing closed" in text
    assert "1 answers withheld" in text and "Pairs with a withheld answer stored: 3" in text
    assert Moderator(settings_for(tmp_path, "off")).summary(0) == "Moderation: **off**."
