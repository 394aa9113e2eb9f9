"""A visitor's own data: download everything stored for their cookie id, and delete it for
good: gone from the database file and its WAL (checked on the bytes), from every later export
and round snapshot, another client's rows untouched; an admin can do the same by client id.

A real SQLite file, the real FastAPI app through TestClient and the page's handlers; the model
server is a dead endpoint (nothing here samples). The page in Chromium:
test_browser_my_data.py.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefloop.app.arena import ArenaHandlers, ArenaState
from prefloop.app.chat import ChatService
from prefloop.app.guard import Client
from prefloop.app.privacy import DOWNLOAD_NAME
from prefloop.app.server import create_app
from prefloop.config import Settings
from prefloop.loop.controller import Loop
from prefloop.loop.rounds import snapshot_pairs
from prefloop.names import PairKind
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.exchange import export_records, hf_rows, write_export
from prefloop.storage.store import Answer, Store
from tests.conftest import visitor
from tests.test_loop_api import BOOM

DEAD = Endpoint("http://127.0.0.1:9", "x")
ME, OTHER = "a" * 32, "b" * 32
PASSWORD = "admin-pw"
AUTH = {"Authorization": f"Bearer {PASSWORD}"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    with Store(settings.db_path) as store:
        yield store


def marker() -> str:
    """A string found nowhere else: in a row, it shows whether the bytes are still there."""
    return f"marker-{secrets.token_hex(12)}"


def conversation_of(store: Store, client: str, text: str, *, vote: str | None = "a",
                    kind: str = PairKind.SAMPLE) -> tuple[str, str]:
    """A conversation of ``client`` whose message and answers hold ``text``; (conversation,
    pair)."""
    conversation = store.create_conversation(client)
    policies = ("v0001", "base") if kind == PairKind.DUEL else ("base", "base")
    pair = store.add_pair(conversation, [{"role": "user", "content": f"Say {text}."}],
                          Answer(policies[0], f"{text} one", 1),
                          Answer(policies[1], f"{text} two", 2), kind=kind)
    if vote is not None:
        store.vote(pair, vote, f"{text} mine" if vote == "written" else None, client_id=client)
    return conversation, pair


def file_bytes(store: Store) -> bytes:
    """The database file and its WAL, as they are on disk."""
    wal = store.path.with_name(store.path.name + "-wal")
    return store.path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


# -- the store ---------------------------------------------------------------------------------


def test_a_clients_data_holds_everything_stored_for_it_and_nothing_else(store: Store) -> None:
    mine, other = marker(), marker()
    conversation, pair = conversation_of(store, ME, mine)
    _, duel = conversation_of(store, ME, mine, vote=None, kind=PairKind.DUEL)
    conversation_of(store, OTHER, other, vote="written")
    store.accept_terms(ME, "0123456789abcdef")
    store.flag_client(ME, ["always A"])

    data = store.client_data(ME)
    assert data["client_id"] == ME and data["consent"]["terms_version"] == "0123456789abcdef"
    assert data["voter_flag"]["reasons"] == ["always A"]
    assert [c["id"] for c in data["conversations"]][0] == conversation
    assert [m["role"] for m in data["conversations"][0]["messages"]] == ["user", "assistant"]
    assert {p["id"] for p in data["pairs"]} == {pair, duel}
    assert [v["pair_id"] for v in data["votes"]] == [pair]
    unvoted_duel = next(p for p in data["pairs"] if p["id"] == duel)
    assert unvoted_duel["policy_a"] is None and unvoted_duel["policy_b"] is None  # still blind
    assert other not in json.dumps(data) and mine in json.dumps(data)

    empty = store.client_data("c" * 32)
    assert empty["conversations"] == empty["pairs"] == empty["votes"] == []
    assert empty["consent"] is None and empty["voter_flag"] is None


def test_deleted_data_is_gone_from_the_database_file_and_its_wal(store: Store) -> None:
    mine, other = marker(), marker()
    for _ in range(3):
        conversation_of(store, ME, mine)
        conversation_of(store, ME, mine, vote="written")
        conversation_of(store, OTHER, other)
    conversation_of(store, ME, mine, vote=None)
    store.accept_terms(ME, "0123456789abcdef")
    before_other = store.client_data(OTHER)
    store.checkpoint()
    assert mine.encode() in file_bytes(store)  # the check below can see it

    deleted = store.delete_client_data(ME)

    assert deleted == {"votes": 6, "messages": 12, "pairs": 7, "conversations": 7,
                       "consent": 1, "voter_flag": 0, "checkpoint": True}
    wal = store.path.with_name(store.path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert mine.encode() not in file_bytes(store)
    assert ME.encode() not in file_bytes(store)  # its id is gone as well
    assert other.encode() in file_bytes(store)
    assert store.client_data(OTHER) == before_other
    assert store.counts()["conversations"] == 3
    assert store.delete_client_data(ME)["conversations"] == 0  # twice: nothing more to do


def test_deleted_data_is_in_no_later_export_or_round(store: Store, tmp_path: Path) -> None:
    mine, other = marker(), marker()
    for choice in ("a", "b", "written"):
        conversation_of(store, ME, mine, vote=choice)
        conversation_of(store, OTHER, other, vote=choice)

    def everything() -> str:
        trl = json.dumps(list(export_records(store, "trl", with_client_ids=True)))
        hh = json.dumps(list(export_records(store, "hh")))
        hf = json.dumps(hf_rows(store, with_client_ids=True)[0])
        snapshot = snapshot_pairs(store, tmp_path / "pairs.jsonl", 0, 1000, 1.0,
                                  random.Random(0))
        return trl + hh + hf + snapshot.path.read_text()

    before = everything()
    assert mine in before and other in before
    store.delete_client_data(ME)
    after = everything()
    assert mine not in after and ME not in after and other in after
    assert write_export(store, tmp_path / "out.jsonl", "trl") == 4  # other's: 1 + 1 + 2
    assert store.count_trainable() == 3 and len(list(store.trainable_pairs())) == 3


def test_a_vote_on_someone_elses_pair_goes_with_its_voter(store: Store) -> None:
    """A pair of an internal caller (no owner) may be voted by any client: deleting the voter
    deletes that vote and the messages it added, not the pair."""
    conversation, pair = conversation_of(store, None, "shared", vote=None)  # type: ignore[arg-type]
    store.vote(pair, "b", client_id=ME)
    assert len(store.messages(conversation)) == 2
    deleted = store.delete_client_data(ME)
    assert deleted["votes"] == 1 and deleted["pairs"] == 0
    assert store.vote_of(pair) is None and store.messages(conversation) == []
    assert store.open_pair(conversation) == pair


def test_the_counters_of_metrics_never_go_down(settings: Settings, store: Store) -> None:
    conversation_of(store, ME, "x")
    conversation_of(store, ME, "y", vote="tie")
    conversation_of(store, OTHER, "z")
    app = create_app(settings, store, PairSampler(DEAD, sampling=Sampling(0.8, 0.95, 16),
                                                  max_model_len=2048))
    with visitor(app) as http:
        before = http.get("/metrics").text
        store.delete_client_data(ME)
        after = http.get("/metrics").text
    for line in ("prefloop_conversations_total 3.0", "prefloop_pairs_total 3.0",
                 'prefloop_votes_total{choice="a"} 2.0', 'prefloop_votes_total{choice="tie"} 1.0'):
        assert line in before and line in after, line
    assert 'prefloop_votes_deleted_total{choice="a"} 1.0' in after
    assert 'prefloop_votes_deleted_total{choice="tie"} 1.0' in after


def test_a_rounds_pairs_file_is_removed_when_the_trainer_is_done(settings: Settings,
                                                                 store: Store) -> None:
    """Deleted data must not linger in an old round's folder: the snapshot is the trainer's
    input only, removed once the trainer has ended (here it fails at once)."""
    conversation_of(store, ME, marker())
    pool = AdapterPool(DEAD, None, 16)
    loop = Loop(settings, store, pool, base_model=settings.data_dir, trainer_command=BOOM,
                seed=0)
    try:
        round_id = loop.run_round("admin")
    finally:
        loop.stop()
        pool.close()
    assert store.round(round_id)["status"] == "failed" and store.round(round_id)["pairs"] == 1
    folder = settings.data_dir / "rounds" / f"{round_id:04d}"
    assert folder.is_dir() and not (folder / "pairs.jsonl").exists()


# -- the API -----------------------------------------------------------------------------------



@pytest.fixture
def app(settings: Settings, store: Store):
    sampler = PairSampler(DEAD, sampling=Sampling(0.8, 0.95, 16), max_model_len=2048)
    return create_app(settings, store, sampler, admin_password=PASSWORD)


def test_download_and_delete_my_data_through_the_api(app, store: Store) -> None:
    mine, other = marker(), marker()
    conversation_of(store, ME, mine)
    conversation_of(store, OTHER, other)
    with visitor(app, ME) as me, visitor(app, OTHER) as them:
        response = me.get("/api/v1/me/data")
        assert response.status_code == 200
        assert DOWNLOAD_NAME in response.headers["content-disposition"]
        assert response.headers["cache-control"] == "no-store"
        data = response.json()
        assert data["client_id"] == ME and len(data["conversations"]) == 1
        assert mine in response.text and other not in response.text
        assert "not retrained" in data["note"]

        response = me.delete("/api/v1/me/data")
        assert response.status_code == 200, response.text
        assert response.json()["deleted"]["conversations"] == 1
        assert response.json()["deleted"]["checkpoint"] is True
        assert me.get("/api/v1/me/data").json()["conversations"] == []
        assert me.delete("/api/v1/me/data").json()["deleted"]["conversations"] == 0
        assert other in them.get("/api/v1/me/data").text
    assert mine.encode() not in file_bytes(store) and other.encode() in file_bytes(store)


def test_an_admin_deletes_by_client_id(app, store: Store) -> None:
    mine, other = marker(), marker()
    conversation_of(store, ME, mine)
    conversation_of(store, OTHER, other)
    url = f"/api/v1/admin/clients/{ME}/data"
    with visitor(app) as http:
        assert http.get(url).status_code == 401 and http.delete(url).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert http.delete(url, headers=wrong).status_code == 401
        response = http.get("/api/v1/admin/clients/not-an-id/data", headers=AUTH)
        assert response.status_code == 422 and "32 lowercase hex" in response.json()["detail"]
        response = http.get(f"/api/v1/admin/clients/{'c' * 32}/data", headers=AUTH)
        assert response.status_code == 404 and "nothing is stored" in response.json()["detail"]
        assert http.delete(f"/api/v1/admin/clients/{'c' * 32}/data",
                           headers=AUTH).status_code == 404
        assert store.client_data(ME)["conversations"]  # nothing deleted by the refusals

        response = http.get(url, headers=AUTH)
        assert response.status_code == 200 and mine in response.text
        assert other not in response.text
        response = http.delete(url, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["client_id"] == ME
        assert response.json()["deleted"]["votes"] == 1
        assert http.get(url, headers=AUTH).status_code == 404
    assert mine.encode() not in file_bytes(store) and other.encode() in file_bytes(store)


def test_admin_data_routes_are_off_without_a_password(settings: Settings,
                                                      store: Store) -> None:
    conversation_of(store, ME, "x")
    sampler = PairSampler(DEAD, sampling=Sampling(0.8, 0.95, 16), max_model_len=2048)
    with visitor(create_app(settings, store, sampler)) as http:
        response = http.delete(f"/api/v1/admin/clients/{ME}/data", headers=AUTH)
        assert response.status_code == 403 and "admin is disabled" in response.json()["detail"]
    assert store.client_data(ME)["votes"]


# -- the page's handlers -----------------------------------------------------------------------


def test_the_page_asks_then_deletes_and_starts_afresh(settings: Settings, store: Store,
                                                      tmp_path: Path) -> None:
    terms = tmp_path / "terms.md"
    terms.write_text("Be kind.\n")
    settings = Settings(data_dir=settings.data_dir, terms_file=terms)
    handlers = ArenaHandlers(ChatService(settings, store, sampler=None))  # type: ignore[arg-type]
    me = Client(ME)
    shown, said = handlers.deletion_preview(me)
    assert not shown and said == "Nothing is stored under your cookie id."

    handlers.accept_terms(me)
    conversation, pair = conversation_of(store, ME, "x")
    conversation_of(store, OTHER, "y")
    shown, said = handlers.deletion_preview(me)
    assert shown and "1 conversation, 1 answer pair and 1 vote" in said
    assert "not retrained" in said and store.client_data(ME)["votes"]  # asked, not done

    state = ArenaState(conversation_id=conversation, history=store.messages(conversation),
                       voted_pair_id=pair)
    view, shown, said = handlers.delete_my_data(state, me)
    assert not shown and said.startswith("✅ Deleted 1 conversation, 1 answer pair and 1 vote")
    assert view.state == ArenaState() and view.chat == [] and view.typing
    assert store.client_data(ME)["conversations"] == [] and store.client_data(OTHER)["votes"]
    assert handlers.terms_shown(me)  # the acceptance went with the rest: asked again


def test_the_page_has_a_my_data_section(settings: Settings, store: Store) -> None:
    from prefloop.app.server import build_page

    page = build_page(ChatService(settings, store, sampler=None))  # type: ignore[arg-type]
    ids = {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert {"my-data", "delete-my-data", "confirm-delete-my-data", "my-data-result"} <= ids.keys()
    assert "(api/v1/me/data)" in ids["my-data-help"].value
    assert ids["confirm-delete-my-data"].visible is False


def test_deleting_counts_against_the_vote_rate(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", votes_per_minute=1)
    with Store(settings.db_path) as store:
        app = create_app(settings, store, PairSampler(DEAD, sampling=Sampling(0.8, 0.95, 16),
                                                      max_model_len=2048))
        with visitor(app, ME) as me:
            assert me.delete("/api/v1/me/data").status_code == 200
            response = me.delete("/api/v1/me/data")
            assert response.status_code == 429 and "retry-after" in response.headers
