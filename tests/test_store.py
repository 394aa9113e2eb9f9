"""The SQLite store on a real database: conversations, pairs, one vote per pair, durability."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from prefloop.storage import store as store_module
from prefloop.storage.migrations import migrations
from prefloop.storage.store import CHOICES, Answer, Conflict, NotFound, Store

USER_TURN = [{"role": "user", "content": "Wie heißt die Hauptstadt? 🙂"}]
A = Answer("base", "Answer A", seed=1, finish_reason="stop", tokens=3)
B = Answer("v0001", "Answer B", seed=2, finish_reason="length", tokens=4)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "prefloop.db"  # the parent folder does not exist yet


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def start_turn(store: Store, conversation_id: str | None = None,
               context: list[dict[str, str]] = USER_TURN) -> tuple[str, str]:
    """A conversation (new unless given) with one unvoted pair; returns both ids."""
    conversation_id = conversation_id or store.create_conversation("client-1")
    return conversation_id, store.add_pair(conversation_id, context, A, B)


# -- conversations -----------------------------------------------------------------------------


def test_create_and_get_conversation(store: Store) -> None:
    """A new conversation has an id, its client and equal UTC creation/update stamps."""
    conversation_id = store.create_conversation("client-1")
    row = store.conversation(conversation_id)
    assert row["id"] == conversation_id and len(conversation_id) == 32
    assert row["client_id"] == "client-1"
    assert row["created_at"] == row["updated_at"]
    assert datetime.fromisoformat(row["created_at"]).utcoffset().total_seconds() == 0
    assert store.messages(conversation_id) == []
    assert store.open_pair(conversation_id) is None


def test_unknown_ids_raise_not_found(store: Store) -> None:
    """Reading or writing through an id that does not exist is NotFound, and writes nothing."""
    with pytest.raises(NotFound, match="conversation 'nope'"):
        store.conversation("nope")
    with pytest.raises(NotFound):
        store.messages("nope")
    with pytest.raises(NotFound, match="pair 'nope'"):
        store.pair("nope")
    with pytest.raises(NotFound):
        store.vote("nope", "a")
    with pytest.raises(NotFound):
        store.add_pair("nope", USER_TURN, A, B)
    assert store.counts() == {"conversations": 0, "messages": 0, "pairs": 0, "votes": 0,
                              "rounds": 0, "adapters": 0}


# -- pairs -------------------------------------------------------------------------------------


def test_add_pair_stores_both_answers_and_how_they_came_about(store: Store) -> None:
    """Every field of the pair comes back as stored; context and sampling are JSON."""
    conversation_id = store.create_conversation()
    context = [{"role": "system", "content": "Be brief."}, *USER_TURN]
    pair_id = store.add_pair(conversation_id, context, A, B, kind="duel", dropped_messages=2,
                             sampling={"temperature": 0.8, "max_tokens": 64},
                             first_token_ms=12.5, total_ms=340.0)
    pair = store.pair(pair_id)
    assert pair["conversation_id"] == conversation_id
    assert pair["turn"] == 0 and pair["kind"] == "duel" and pair["dropped_messages"] == 2
    assert pair["context"] == context  # non-ASCII survives the round trip
    assert pair["sampling"] == {"temperature": 0.8, "max_tokens": 64}
    assert (pair["policy_a"], pair["text_a"], pair["seed_a"], pair["finish_a"],
            pair["tokens_a"]) == ("base", "Answer A", 1, "stop", 3)
    assert (pair["policy_b"], pair["text_b"], pair["seed_b"], pair["finish_b"],
            pair["tokens_b"]) == ("v0001", "Answer B", 2, "length", 4)
    assert (pair["first_token_ms"], pair["total_ms"]) == (12.5, 340.0)
    assert store.open_pair(conversation_id) == pair_id


def test_add_pair_needs_a_user_turn_last(store: Store) -> None:
    """A context that does not end with the user's turn is a programming error."""
    conversation_id = store.create_conversation()
    with pytest.raises(AssertionError):
        store.add_pair(conversation_id, [{"role": "assistant", "content": "hi"}], A, B)
    assert store.counts()["pairs"] == 0


def test_open_pair_blocks_a_second_pair(store: Store) -> None:
    """Until the open pair has a vote, no new pair joins the conversation."""
    conversation_id, pair_id = start_turn(store)
    with pytest.raises(Conflict, match=pair_id):
        store.add_pair(conversation_id, USER_TURN, A, B)
    assert store.counts()["pairs"] == 1
    store.vote(pair_id, "a")
    assert store.open_pair(conversation_id) is None
    second = store.add_pair(conversation_id, USER_TURN, A, B)
    assert store.pair(second)["turn"] == 1


def test_open_pair_of_one_conversation_does_not_block_another(store: Store) -> None:
    """Pairs are per conversation."""
    start_turn(store)
    _, other = start_turn(store)
    assert store.pair(other)["turn"] == 0


# -- votes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("choice", "answer", "kept"), [
    ("a", None, "Answer A"),
    ("b", None, "Answer B"),
    ("tie", None, "Answer A"),
    ("both_bad", None, "Answer A"),
    ("written", "My better answer", "My better answer"),
])
def test_vote_keeps_the_right_answer(store: Store, choice: str, answer: str | None,
                                     kept: str) -> None:
    """The conversation goes on with the chosen answer (A for tie and both bad)."""
    conversation_id, pair_id = start_turn(store)
    row = store.vote(pair_id, choice, answer, client_id="client-2")
    assert store.messages(conversation_id) == [
        {"role": "user", "content": USER_TURN[0]["content"]},
        {"role": "assistant", "content": kept}]
    stored = store.vote_of(pair_id)
    assert stored == row
    assert (stored["choice"], stored["answer"], stored["client_id"]) == (choice, answer,
                                                                         "client-2")
    assert store.conversation(conversation_id)["updated_at"] == row["created_at"]
    positions = [(r["position"], r["role"], r["pair_id"]) for r in store.db.query(
        "select * from messages where conversation_id = ? order by position",
        [conversation_id])]
    assert positions == [(0, "user", pair_id), (1, "assistant", pair_id)]


def test_second_vote_is_a_conflict_and_changes_nothing(store: Store) -> None:
    """One vote per pair: a second one is refused and leaves the first as it was."""
    conversation_id, pair_id = start_turn(store)
    first = store.vote(pair_id, "b")
    before = (store.counts(), store.messages(conversation_id))
    for choice, answer in [("a", None), ("b", None), ("written", "other")]:
        with pytest.raises(Conflict, match="already has a vote"):
            store.vote(pair_id, choice, answer)
    assert store.vote_of(pair_id) == first
    assert (store.counts(), store.messages(conversation_id)) == before


@pytest.mark.parametrize(("choice", "answer", "match"), [
    ("c", None, "choice must be one of a, b, tie, both_bad, written"),
    ("A", None, "choice must be one of"),
    ("written", None, "written answer"),
    ("a", "text", "written answer"),
    ("tie", "text", "written answer"),
])
def test_bad_votes_raise_value_error_and_write_nothing(store: Store, choice: str,
                                                       answer: str | None, match: str) -> None:
    """A choice outside CHOICES, or an answer with the wrong choice, is refused up front."""
    _, pair_id = start_turn(store)
    with pytest.raises(ValueError, match=match):
        store.vote(pair_id, choice, answer)
    assert store.vote_of(pair_id) is None
    assert store.counts()["messages"] == 0


def test_choices_are_the_documented_ones() -> None:
    """The vote kinds of the design: a, b, tie, both_bad and written."""
    assert CHOICES == ("a", "b", "tie", "both_bad", "written")


def test_turns_extend_the_conversation_in_order(store: Store) -> None:
    """Each vote appends the user turn and the kept answer after the earlier ones."""
    conversation_id, first = start_turn(store)
    store.vote(first, "b")
    history = [*store.messages(conversation_id), {"role": "user", "content": "And then?"}]
    _, second = start_turn(store, conversation_id, history)
    store.vote(second, "written", "Then this.")
    assert store.messages(conversation_id) == [
        {"role": "user", "content": USER_TURN[0]["content"]},
        {"role": "assistant", "content": "Answer B"},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Then this."}]


def test_concurrent_votes_on_one_store_exactly_one_wins(store: Store) -> None:
    """Threads racing to vote on one pair: one vote is stored, every other one is Conflict."""
    conversation_id, pair_id = start_turn(store)
    results = race(8, lambda i: store.vote(pair_id, "ab"[i % 2]))
    winners = [r for r in results if isinstance(r, dict)]
    assert len(winners) == 1
    assert all(isinstance(r, Conflict) for r in results if r is not winners[0])
    kept = {"a": "Answer A", "b": "Answer B"}[winners[0]["choice"]]
    assert store.messages(conversation_id)[-1] == {"role": "assistant", "content": kept}
    assert store.counts()["votes"] == 1 and store.counts()["messages"] == 2


def test_concurrent_votes_over_separate_connections_exactly_one_wins(store: Store,
                                                                     db_path: Path) -> None:
    """Separate connections (as separate processes would have) also get Conflict, not a
    'database is locked' error, and exactly one vote is stored."""
    conversation_id, pair_id = start_turn(store)
    others = [Store(db_path) for _ in range(4)]
    try:
        results = race(4, lambda i: others[i].vote(pair_id, "b"))
    finally:
        for other in others:
            other.close()
    assert sum(isinstance(r, dict) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 3
    assert store.counts()["votes"] == 1
    assert store.messages(conversation_id)[-1]["content"] == "Answer B"


def test_concurrent_add_pair_over_separate_connections_stores_one(store: Store,
                                                                  db_path: Path) -> None:
    """Racing new turns of one conversation leave exactly one open pair."""
    conversation_id = store.create_conversation()
    others = [Store(db_path) for _ in range(4)]
    try:
        results = race(4, lambda i: others[i].add_pair(conversation_id, USER_TURN, A, B))
    finally:
        for other in others:
            other.close()
    assert sum(isinstance(r, str) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 3
    assert store.counts()["pairs"] == 1


def race(n: int, work) -> list[object]:
    """Run ``work(i)`` in ``n`` threads released at once; their results or exceptions."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # the test inspects what each thread got
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


# -- reading votes back ------------------------------------------------------------------------


def test_voted_pairs_since(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """voted_pairs gives voted pairs only, oldest vote first, from ``since`` on (inclusive)."""
    stamps = (f"2030-01-01T00:00:{s:02d}.000+00:00" for s in itertools.count())
    monkeypatch.setattr(store_module, "now", lambda: next(stamps))
    _, first = start_turn(store)
    _, second = start_turn(store)
    _, unvoted = start_turn(store)
    vote_2 = store.vote(second, "b")
    vote_1 = store.vote(first, "written", "Mine.")
    assert vote_2["created_at"] < vote_1["created_at"]

    rows = list(store.voted_pairs())
    assert [r["id"] for r in rows] == [second, first]
    assert [(r["choice"], r["answer"]) for r in rows] == [("b", None), ("written", "Mine.")]
    assert rows[0]["voted_at"] == vote_2["created_at"]
    assert rows[0]["context"] == USER_TURN and rows[0]["text_b"] == "Answer B"
    assert unvoted not in {r["id"] for r in rows}

    assert [r["id"] for r in store.voted_pairs(since=vote_1["created_at"])] == [first]
    assert [r["id"] for r in store.voted_pairs(since=vote_2["created_at"])] == [second, first]
    assert list(store.voted_pairs(since="2031-01-01")) == []


# -- the database itself -----------------------------------------------------------------------


def test_file_database_is_wal_full_sync_with_foreign_keys(store: Store, db_path: Path) -> None:
    """WAL lets readers run beside the writer; FULL sync makes a commit durable."""
    assert db_path.is_file()
    assert store.db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("pragma synchronous").fetchone()[0] == 2  # FULL
    assert store.db.execute("pragma foreign_keys").fetchone()[0] == 1


def test_foreign_keys_are_enforced(store: Store) -> None:
    """A vote row for a pair that does not exist is refused by the database itself."""
    with pytest.raises(sqlite3.IntegrityError):
        store.db["votes"].insert({"pair_id": "ghost", "choice": "a", "created_at": "x"})


def test_in_memory_store_works() -> None:
    """':memory:' gives a working throwaway store (no file, no WAL)."""
    memory = Store(":memory:")
    assert memory.path is None
    conversation_id, pair_id = start_turn(memory)
    memory.vote(pair_id, "a")
    assert memory.messages(conversation_id)[-1]["content"] == "Answer A"
    assert memory.counts() == {"conversations": 1, "messages": 2, "pairs": 1, "votes": 1,
                              "rounds": 0, "adapters": 0}
    memory.check()
    memory.close()


def test_migrations_apply_once_and_reopening_keeps_data(db_path: Path) -> None:
    """Opening the file again applies nothing twice and finds everything stored before."""
    first = Store(db_path)
    conversation_id, pair_id = start_turn(first)
    first.vote(pair_id, "b")
    first.close()

    again = Store(db_path)
    try:
        applied = [r["name"] for r in again.db["_sqlite_migrations"].rows]
        assert len(applied) == len(set(applied))  # each recorded once
        assert "m001_conversations_pairs_votes" in applied
        assert migrations.pending(again.db) == []
        assert {"conversations", "messages", "pairs", "votes"} <= set(again.db.table_names())
        assert again.messages(conversation_id)[-1] == {"role": "assistant",
                                                       "content": "Answer B"}
        assert again.vote_of(pair_id)["choice"] == "b"
    finally:
        again.close()


def test_acknowledged_vote_is_visible_to_another_connection(store: Store,
                                                            db_path: Path) -> None:
    """When vote() returns, the vote is committed: a fresh connection reads it."""
    _, pair_id = start_turn(store)
    store.vote(pair_id, "tie")
    reader = sqlite3.connect(db_path)
    try:
        assert reader.execute("select choice from votes where pair_id = ?",
                              [pair_id]).fetchall() == [("tie",)]
    finally:
        reader.close()


def test_failed_write_leaves_no_transaction_open(store: Store) -> None:
    """After a refused write the connection is clean, so later writes commit."""
    conversation_id, _ = start_turn(store)
    with pytest.raises(Conflict):
        store.add_pair(conversation_id, USER_TURN, A, B)
    assert not store.db.conn.in_transaction
    store.create_conversation()
    assert store.counts()["conversations"] == 2


def test_counts_and_check(store: Store) -> None:
    """counts() reports each table's rows; check() passes on a healthy database."""
    _, pair_id = start_turn(store)
    store.vote(pair_id, "a")
    assert store.counts() == {"conversations": 1, "messages": 2, "pairs": 1, "votes": 1,
                              "rounds": 0, "adapters": 0}
    store.check()


# -- rounds, adapters and the champion ---------------------------------------------------------


def test_one_running_round_at_a_time_and_crash_recovery(store: Store) -> None:
    first = store.start_round("schedule")
    with pytest.raises(Conflict, match=f"round {first} is running"):
        store.start_round("admin")
    store.update_round(first, progress={"step": 2, "of": 8})
    assert store.round(first)["progress"] == {"step": 2, "of": 8}
    assert store.round(first)["ended_at"] is None
    assert store.fail_running_rounds("crashed") == [first]
    row = store.round(first)
    assert row["status"] == "failed" and row["error"] == "crashed" and row["ended_at"]
    second = store.start_round("admin")  # free again
    store.update_round(second, status="succeeded", votes_until=7, metrics={"steps": []})
    assert store.round(second)["metrics"] == {"steps": []}
    assert store.last_trained_vote() == 7
    assert [r["id"] for r in store.rounds()] == [second, first]
    with pytest.raises(NotFound):
        store.round(99)


def test_trainable_votes_counted_after_a_cutoff(store: Store) -> None:
    for choice in ("a", "tie", "b", "both_bad"):
        _, pair_id = start_turn(store)
        store.vote(pair_id, choice)
    _, pair_id = start_turn(store)
    store.vote(pair_id, "written", "Mine.")
    assert store.count_trainable() == 3  # a, b, written
    rows = list(store.trainable_pairs())
    assert [r["choice"] for r in rows] == ["a", "b", "written"]
    assert store.count_trainable(rows[0]["vote_rowid"]) == 2
    assert store.votes_by_choice() == {"a": 1, "b": 1, "tie": 1, "both_bad": 1, "written": 1}


def test_crown_retires_the_old_champion(store: Store, tmp_path: Path) -> None:
    assert store.champion() == "base" and store.candidate() is None
    store.add_adapter("v0001", tmp_path, None, "base")
    store.add_adapter("v0002", tmp_path, None, "v0001")
    assert store.candidate() == "v0002" and store.candidate_other_than("v0002") == ["v0001"]
    assert store.crown("v0001", "admin") == "base"
    assert store.adapter("v0001")["state"] == "champion"
    assert store.crown("v0002", "won") == "v0001"
    assert store.adapter("v0001")["state"] == "retired"
    assert store.adapter("v0001")["reason"] == "won"
    assert store.crown("base", "rollback") == "v0002"
    assert store.champion() == "base" and store.adapter("v0002")["state"] == "retired"
    with pytest.raises(NotFound):
        store.crown("v0009", "nope")
    assert store.champion() == "base"
