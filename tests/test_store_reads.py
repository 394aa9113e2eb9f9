"""How the store reads: what one vote costs in SQL, and readers beside an open write."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefloop.app.chat import ChatService
from prefloop.config import Settings
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Store

DEAD = Endpoint("http://127.0.0.1:9", "x")  # nothing listens: no vote needs the model
HI = [{"role": "user", "content": "Hi"}]
DEADLINE = 30.0  # seconds; only a broken store takes this long


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "prefloop.db") as store:
        yield store


def new_pair(store: Store, a: str, b: str, kind: str, client_id: str | None = None) -> str:
    conversation_id = store.create_conversation(client_id)
    return store.add_pair(conversation_id, HI, Answer(a, "one", 1), Answer(b, "two", 2),
                          kind=kind)


def test_a_vote_reads_its_pair_once(tmp_path: Path, store: Store) -> None:
    """A duel vote through the chat service (candidate against champion, from a client the
    voter review looks at): the pair is read once, the candidate once, and the whole vote
    costs a handful of statements (52 before issue 17, 14 after)."""
    settings = Settings(data_dir=tmp_path)
    pool = AdapterPool(DEAD, None, 16)
    loop = Loop(settings, store, pool, base_model=tmp_path, seed=0)
    service = ChatService(settings, store, PairSampler(DEAD, sampling=Sampling(0.8, 0.95, 16),
                                                       max_model_len=2048), loop)
    store.add_adapter("v0001", tmp_path / "v0001", None, "base")
    client = service.guard.client("ab" * 16, "192.0.2.1")
    for _ in range(3):  # earlier duel votes: the review and the gate have rows to read
        service.vote(new_pair(store, "v0001", "base", "duel", client.id), "a", client=client)
    pair_id = new_pair(store, "v0001", "base", "duel", client.id)

    statements: list[str] = []
    store.trace(statements.append)
    try:
        reply = service.vote(pair_id, "a", client=client)
    finally:
        store.trace(None)
    pool.close()

    assert reply["policy_a"] == "v0001" and reply["kind"] == "duel"
    reads = [s for s in statements if s.lstrip().lower().startswith("select")]
    assert len([s for s in reads if pair_id in s]) == 1, statements
    assert len([s for s in reads if "from adapters" in s]) == 1, statements
    assert len(statements) <= 14, statements


def test_reads_see_the_last_commit_while_a_write_is_open(store: Store) -> None:
    """A write transaction holds the write lock; a read on another thread neither waits for
    it nor sees its uncommitted change, and sees it once committed. Inside the transaction,
    the writer's own reads see it."""
    conversation_id = store.create_conversation()
    before = store.conversation(conversation_id)["updated_at"]
    writing, release = threading.Event(), threading.Event()
    seen_by_writer: list[str] = []

    def writer() -> None:
        with store._write():
            store.db.execute("update conversations set updated_at = 'uncommitted' "
                             "where id = ?", [conversation_id])
            seen_by_writer.append(store.conversation(conversation_id)["updated_at"])
            writing.set()
            release.wait(DEADLINE)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(DEADLINE)
        read: list[str] = []
        reader = threading.Thread(target=lambda: (
            read.append(store.conversation(conversation_id)["updated_at"]), store.check()))
        reader.start()
        reader.join(DEADLINE)
        assert not reader.is_alive(), "a read waited for the open write transaction"
        assert read == [before]
    finally:
        release.set()
        thread.join(DEADLINE)
    assert seen_by_writer == ["uncommitted"]
    assert store.conversation(conversation_id)["updated_at"] == "uncommitted"


def test_a_closed_store_refuses_reads(tmp_path: Path) -> None:
    """close() closes the read connections too: a read afterwards fails, it does not open a
    new connection."""
    store = Store(tmp_path / "prefloop.db")
    conversation_id = store.create_conversation()
    store.conversation(conversation_id)  # a read connection now waits in the pool
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store.conversation(conversation_id)
