"""Undo of a vote: deleted for real, the pair open again, never in training or the gate; only
its voter, only within ``undo_seconds``, never once a round or a promotion decision used it.

A real SQLite store, the real FastAPI app through TestClient, and the page's handlers; the
model server is a dead endpoint (nothing here samples). The button in Chromium is in
test_browser_undo.py (needs vLLM).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from prefloop.app.arena import ArenaHandlers, ArenaState
from prefloop.app.chat import ChatService, Forbidden
from prefloop.app.guard import COOKIE, Client
from prefloop.app.server import create_app
from prefloop.config import ConfigError, Settings
from prefloop.names import AdapterState, PairKind
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Conflict, NotFound, Store
from tests.conftest import visitor

DEAD = Endpoint("http://127.0.0.1:9", "x")  # nothing listens there
HI = [{"role": "user", "content": "Hi"}]
ME, OTHER = "a" * 32, "b" * 32


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    with Store(settings.db_path) as store:
        yield store


def pair_of(store: Store, owner: str | None = None, kind: str = PairKind.SAMPLE,
            conversation: str | None = None, policies: tuple[str, str] = ("base", "base"),
            context: list[dict[str, str]] = HI) -> str:
    conversation = conversation or store.create_conversation(owner)
    return store.add_pair(conversation, context, Answer(policies[0], "one", 1),
                          Answer(policies[1], "two", 2), kind=kind)


def age_vote(store: Store, pair: str, seconds: float) -> None:
    """Make the vote on ``pair`` ``seconds`` old (instead of waiting that long)."""
    stamp = (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="milliseconds")
    with store._write():
        store.db.execute("update votes set created_at = ? where pair_id = ?", [stamp, pair])


# -- the store ---------------------------------------------------------------------------------


def test_deleting_a_vote_removes_it_and_its_messages_and_the_pair_can_be_voted_again(
        store: Store) -> None:
    pair = pair_of(store, ME)
    conversation = store.pair(pair)["conversation_id"]
    store.vote(pair, "a", client_id=ME)
    assert store.count_trainable() == 1 and len(store.messages(conversation)) == 2

    deleted = store.delete_vote(pair)

    assert deleted["choice"] == "a" and deleted["client_id"] == ME
    assert store.vote_of(pair) is None and store.messages(conversation) == []
    assert store.db.execute("select count(*) from votes").fetchone() == (0,)
    assert store.count_trainable() == 0 and list(store.trainable_pairs()) == []
    assert store.open_pair(conversation) == pair
    store.vote(pair, "b", client_id=ME)
    assert store.vote_of(pair)["choice"] == "b"
    assert [m["content"] for m in store.messages(conversation)] == ["Hi", "two"]
    with pytest.raises(NotFound, match="no vote"):
        store.delete_vote(pair_of(store))


def test_an_undone_duel_vote_leaves_the_gate_and_its_cache_key(store: Store) -> None:
    pair = pair_of(store, kind=PairKind.DUEL, policies=("v0001", "base"))
    store.vote(pair, "a")
    key = store.duel_votes_key()
    assert len(store.duel_votes(between=("v0001", "base"))) == 1
    store.delete_vote(pair)
    assert store.duel_votes(between=("v0001", "base")) == []
    store.vote(pair, "b")  # the same count and perhaps the same rowid: the key still moves
    assert store.duel_votes_key() != key
    assert [v["choice"] for v in store.duel_votes()] == ["b"]


def test_a_vote_a_round_took_or_is_taking_cannot_be_undone(store: Store) -> None:
    taken, later = pair_of(store), pair_of(store)
    store.vote(taken, "a")
    round_id = store.start_round("admin")
    with pytest.raises(Conflict, match=f"round {round_id}"):
        store.delete_vote(taken)  # the round is reading its snapshot
    store.update_round(round_id, votes_until=store.db.execute(
        "select rowid from votes where pair_id = ?", [taken]).fetchone()[0], status="failed")
    with pytest.raises(Conflict, match=f"round {round_id}"):
        store.delete_vote(taken)
    store.vote(later, "b")  # after the snapshot: still the voter's to take back
    store.delete_vote(later)
    assert store.vote_of(taken) is not None and store.vote_of(later) is None


def test_a_duel_vote_followed_by_a_promotion_decision_cannot_be_undone(store: Store) -> None:
    pair = pair_of(store, kind=PairKind.DUEL, policies=("v0001", "base"))
    store.vote(pair, "a")
    store.add_adapter("v0001", Path("/nowhere"), None, "base")
    store.set_adapter_state("v0001", AdapterState.REJECTED, "no better")
    with pytest.raises(Conflict, match="promotion decision"):
        store.delete_vote(pair)
    sample = pair_of(store)  # a sample pair's vote feeds no decision
    store.vote(sample, "a")
    store.delete_vote(sample)


def test_a_vote_the_conversation_went_on_from_cannot_be_undone(store: Store) -> None:
    first = pair_of(store)
    conversation = store.pair(first)["conversation_id"]
    store.vote(first, "a")
    second = pair_of(store, conversation=conversation,
                     context=[*HI, {"role": "assistant", "content": "one"},
                              {"role": "user", "content": "More"}])
    with pytest.raises(Conflict, match="went on"):
        store.delete_vote(first)
    store.vote(second, "b")
    store.delete_vote(second)  # the last turn may still be taken back
    assert store.open_pair(conversation) == second


# -- the service and its settings --------------------------------------------------------------


def test_undo_seconds_is_a_bounded_setting() -> None:
    assert Settings().undo_seconds == 30
    with pytest.raises(ConfigError, match="undo_seconds"):
        Settings(undo_seconds=-1)


def test_only_the_voter_may_undo_and_only_within_the_window(settings: Settings,
                                                            store: Store) -> None:
    service = ChatService(settings, store, sampler=None)  # type: ignore[arg-type]
    me, other = Client(ME), Client(OTHER)
    pair = pair_of(store, ME)
    service.vote(pair, "a", client=me)
    with pytest.raises(Forbidden):
        service.undo_vote(pair, other)
    age_vote(store, pair, 31)
    with pytest.raises(Conflict, match="within 30 s"):
        service.undo_vote(pair, me)
    age_vote(store, pair, 29)
    assert service.undo_vote(pair, me)["choice"] == "a"
    with pytest.raises(NotFound):
        service.undo_vote(pair, me)
    duel = pair_of(store, ME, kind=PairKind.DUEL, policies=("v0001", "base"))
    service.vote(duel, "a", client=me)
    with pytest.raises(Conflict, match="would not be blind"):
        service.undo_vote(duel, me)
    assert store.vote_of(duel) is not None
    off = ChatService(Settings(data_dir=settings.data_dir, undo_seconds=0), store,
                      sampler=None)  # type: ignore[arg-type]
    off.vote(pair, "b", client=me)
    with pytest.raises(Conflict, match="undo_seconds = 0"):
        off.undo_vote(pair, me)


# -- the API -----------------------------------------------------------------------------------



@pytest.fixture
def app(settings: Settings, store: Store):
    sampler = PairSampler(DEAD, sampling=Sampling(0.8, 0.95, 16), max_model_len=2048)
    return create_app(settings, store, sampler)


def test_delete_vote_through_the_api(app, store: Store) -> None:
    with visitor(app) as owner, visitor(app) as stranger:
        pair = pair_of(store, owner.cookies[COOKIE])
        assert owner.post("/api/v1/votes", json={"pair_id": pair, "choice": "a"}).status_code \
            == 200

        response = stranger.delete(f"/api/v1/votes/{pair}")
        assert response.status_code == 403 and store.vote_of(pair) is not None

        response = owner.delete(f"/api/v1/votes/{pair}")
        assert response.status_code == 200, response.text
        assert response.json() == {"pair_id": pair, "choice": "a", "undone": True}
        assert store.vote_of(pair) is None and store.count_trainable() == 0

        response = owner.delete(f"/api/v1/votes/{pair}")  # nothing left to undo
        assert response.status_code == 404 and "no vote" in response.json()["detail"]
        assert owner.delete(f"/api/v1/votes/{'f' * 32}").status_code == 404
        assert owner.delete("/api/v1/votes/not-an-id").status_code == 404

        # /metrics counts votes cast: an undo adds one to the undone, takes none away.
        metrics = owner.get("/metrics").text
        assert 'prefloop_votes_total{choice="a"} 1.0' in metrics
        assert 'prefloop_votes_undone_total{choice="a"} 1.0' in metrics

        # Voted again, then too late.
        assert owner.post("/api/v1/votes", json={"pair_id": pair, "choice": "b"}).status_code \
            == 200
        age_vote(store, pair, 60)
        response = owner.delete(f"/api/v1/votes/{pair}")
        assert response.status_code == 409 and "within 30 s" in response.json()["detail"]
        assert store.vote_of(pair)["choice"] == "b"


# -- the page's handlers -----------------------------------------------------------------------


def test_the_undo_button_reopens_the_pair_for_a_new_vote(settings: Settings,
                                                         store: Store) -> None:
    handlers = ArenaHandlers(ChatService(settings, store, sampler=None))  # type: ignore[arg-type]
    me = Client(ME)
    pair = pair_of(store, ME)
    conversation = store.pair(pair)["conversation_id"]
    state = ArenaState(conversation_id=conversation, pair_id=pair, pending_message="Hi")

    voted = handlers.vote("a", state, client=me)
    assert voted.undo and "Undo" in voted.status and not voted.voting
    assert voted.updates()[-1]["visible"] is True

    undone = handlers.undo(voted.state, me)
    assert undone.status.startswith("Vote taken back") and undone.voting and not undone.undo
    assert (undone.answer_a, undone.answer_b) == ("one", "two")
    assert undone.state.pair_id == pair and undone.chat == HI
    assert store.vote_of(pair) is None and store.messages(conversation) == []

    again = handlers.vote("b", undone.state, client=me)
    assert again.status.startswith("Saved: B is better")
    assert store.vote_of(pair)["choice"] == "b"

    age_vote(store, pair, 31)
    late = handlers.undo(again.state, me)
    assert "within 30 s" in late.status and not late.undo and late.typing
    assert store.vote_of(pair)["choice"] == "b"
    assert "no vote" in handlers.undo(late.state, me).status

    duel = pair_of(store, ME, kind=PairKind.DUEL, policies=("v0001", "base"))
    state = ArenaState(conversation_id=store.pair(duel)["conversation_id"], pair_id=duel,
                       pending_message="Hi")
    voted = handlers.vote("a", state, client=me)
    assert voted.status.startswith("Saved") and not voted.undo and "Undo" not in voted.status
