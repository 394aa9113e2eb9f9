"""The prefloop database: conversations, their accepted messages, answer pairs and votes.

One :class:`Store` wraps one SQLite connection in WAL mode. Calls are serialised by a lock,
so the web server's threads and its event loop can share it. Every write is one
transaction; when a write method returns, its data is on disk (``synchronous=FULL``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from prefloop.storage.migrations import migrations

CHOICES = ("a", "b", "tie", "both_bad", "written")
"""Vote choices. ``written`` carries the person's own answer in ``answer``."""


class StoreError(Exception):
    """Base class of the errors a store operation reports to its caller."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """The operation contradicts what is stored (a second vote, a pair left unvoted)."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Answer:
    """One sampled answer and how it came about."""

    policy: str
    text: str
    seed: int
    finish_reason: str | None = None
    tokens: int | None = None


class Store:
    """All reads and writes of the prefloop database."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path) if path != ":memory:" else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=busy_timeout_s, check_same_thread=False)
        self.db = Database(conn, execute_plugins=False)
        self.db.execute("PRAGMA foreign_keys = ON")
        if self.path is not None:
            self.db.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is fsynced before it returns, so an acknowledged vote survives a
        # power cut as well as a crash of the process.
        self.db.execute("PRAGMA synchronous = FULL")
        self._lock = threading.RLock()
        with self._lock:
            migrations.apply(self.db)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, serialised with this store's other calls.

        ``BEGIN IMMEDIATE`` takes the write lock before the first read, so a writer on another
        connection (another process) makes this wait up to the busy timeout; a plain deferred
        ``BEGIN`` would fail at once with "database is locked" once its read snapshot is stale.
        """
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.rollback()
                raise
            try:
                self.db.execute("COMMIT")
            except BaseException:
                self.db.rollback()
                raise

    # -- conversations -------------------------------------------------------------------

    def create_conversation(self, client_id: str | None = None) -> str:
        conversation_id = new_id()
        stamp = now()
        with self._write():
            self.db["conversations"].insert(
                {"id": conversation_id, "client_id": client_id, "created_at": stamp,
                 "updated_at": stamp})
        return conversation_id

    def conversation(self, conversation_id: str) -> dict[str, Any]:
        with self._lock:
            rows = list(self.db["conversations"].rows_where("id = ?", [conversation_id]))
        if not rows:
            raise NotFound(f"conversation {conversation_id!r} does not exist")
        return rows[0]

    def messages(self, conversation_id: str) -> list[dict[str, str]]:
        """The accepted path of a conversation as chat messages, oldest first."""
        self.conversation(conversation_id)
        with self._lock:
            rows = self.db["messages"].rows_where(
                "conversation_id = ?", [conversation_id], order_by="position",
                select="role, content")
            return [dict(row) for row in rows]

    def open_pair(self, conversation_id: str) -> str | None:
        """The id of the conversation's pair that has no vote yet, if any."""
        with self._lock:
            rows = list(self.db.query(
                "select p.id from pairs p left join votes v on v.pair_id = p.id "
                "where p.conversation_id = ? and v.pair_id is null", [conversation_id]))
        return rows[0]["id"] if rows else None

    # -- pairs ----------------------------------------------------------------------------

    def add_pair(self, conversation_id: str, context: list[dict[str, str]], a: Answer,
                 b: Answer, *, kind: str = "sample", dropped_messages: int = 0,
                 sampling: dict[str, Any] | None = None, first_token_ms: float | None = None,
                 total_ms: float | None = None) -> str:
        """Store two answers to ``context`` (whose last message is the user's new turn)."""
        assert context and context[-1]["role"] == "user", "context must end with a user turn"
        pair_id = new_id()
        with self._write():
            self.conversation(conversation_id)
            if (open_id := self.open_pair(conversation_id)) is not None:
                raise Conflict(f"pair {open_id} of this conversation has no vote yet")
            turn = self.db.execute(
                "select count(*) from pairs where conversation_id = ?",
                [conversation_id]).fetchone()[0]
            self.db["pairs"].insert({
                "id": pair_id, "conversation_id": conversation_id, "turn": turn, "kind": kind,
                "context": json.dumps(context, ensure_ascii=False),
                "dropped_messages": dropped_messages,
                "policy_a": a.policy, "policy_b": b.policy, "text_a": a.text, "text_b": b.text,
                "finish_a": a.finish_reason, "finish_b": b.finish_reason,
                "tokens_a": a.tokens, "tokens_b": b.tokens, "seed_a": a.seed, "seed_b": b.seed,
                "sampling": json.dumps(sampling or {}), "first_token_ms": first_token_ms,
                "total_ms": total_ms, "created_at": now()})
        return pair_id

    def pair(self, pair_id: str) -> dict[str, Any]:
        with self._lock:
            rows = list(self.db["pairs"].rows_where("id = ?", [pair_id]))
        if not rows:
            raise NotFound(f"pair {pair_id!r} does not exist")
        row = dict(rows[0])
        row["context"] = json.loads(row["context"])
        row["sampling"] = json.loads(row["sampling"] or "{}")
        return row

    # -- votes ----------------------------------------------------------------------------

    def vote(self, pair_id: str, choice: str, answer: str | None = None,
             client_id: str | None = None) -> dict[str, Any]:
        """Record the one vote on a pair and extend the conversation with the kept answer.

        ``a``/``b`` keep that answer, ``written`` keeps ``answer``; ``tie`` and ``both_bad``
        keep answer A so the conversation can go on. Raises :class:`Conflict` on a second
        vote. Returns the vote row; it is committed when this returns.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if (choice == "written") != (answer is not None):
            raise ValueError("a written answer comes with choice 'written', and only then")
        with self._lock:
            pair = self.pair(pair_id)
            kept = {"a": pair["text_a"], "b": pair["text_b"], "written": answer}.get(
                choice, pair["text_a"])
            user_turn = pair["context"][-1]["content"]
            row = {"pair_id": pair_id, "choice": choice, "answer": answer,
                   "client_id": client_id, "created_at": now()}
            try:
                with self._write():
                    self.db["votes"].insert(row)
                    position = self.db.execute(
                        "select count(*) from messages where conversation_id = ?",
                        [pair["conversation_id"]]).fetchone()[0]
                    self.db["messages"].insert_all([
                        {"conversation_id": pair["conversation_id"], "position": position,
                         "role": "user", "content": user_turn, "pair_id": pair_id,
                         "created_at": row["created_at"]},
                        {"conversation_id": pair["conversation_id"], "position": position + 1,
                         "role": "assistant", "content": kept, "pair_id": pair_id,
                         "created_at": row["created_at"]}])
                    self.db["conversations"].update(pair["conversation_id"],
                                                    {"updated_at": row["created_at"]})
            except sqlite3.IntegrityError:
                if self.vote_of(pair_id) is not None:
                    raise Conflict(f"pair {pair_id} already has a vote") from None
                raise
        return row

    def import_pair(self, context: list[dict[str, str]], chosen: str, rejected: str,
                    fingerprint: str) -> bool:
        """Store an outside preference as a conversation, a pair and its vote (``a`` =
        chosen). Returns False, storing nothing, when ``fingerprint`` is already here."""
        with self._lock:
            if self.db.execute("select 1 from pairs where fingerprint = ?",
                               [fingerprint]).fetchone():
                return False
            with self._write():
                conversation_id, pair_id, stamp = new_id(), new_id(), now()
                self.db["conversations"].insert({"id": conversation_id, "created_at": stamp,
                                                 "updated_at": stamp})
                self.db["pairs"].insert({
                    "id": pair_id, "conversation_id": conversation_id, "turn": 0,
                    "kind": "import", "context": json.dumps(context, ensure_ascii=False),
                    "dropped_messages": 0, "policy_a": "import", "policy_b": "import",
                    "text_a": chosen, "text_b": rejected, "sampling": "{}",
                    "fingerprint": fingerprint, "created_at": stamp})
                self.db["votes"].insert({"pair_id": pair_id, "choice": "a",
                                         "created_at": stamp})
                self.db["messages"].insert_all([
                    {"conversation_id": conversation_id, "position": i, "role": m["role"],
                     "content": m["content"], "pair_id": pair_id, "created_at": stamp}
                    for i, m in enumerate(context + [{"role": "assistant",
                                                      "content": chosen}])])
        return True

    def vote_of(self, pair_id: str) -> dict[str, Any] | None:
        with self._lock:
            rows = list(self.db["votes"].rows_where("pair_id = ?", [pair_id]))
        return rows[0] if rows else None

    def voted_pairs(self, since: str | None = None) -> Iterator[dict[str, Any]]:
        """Pairs joined with their votes, oldest vote first."""
        sql = ("select p.*, v.choice, v.answer, v.created_at as voted_at from pairs p "
               "join votes v on v.pair_id = p.id")
        params: list[Any] = []
        if since is not None:
            sql += " where v.created_at >= ?"
            params.append(since)
        with self._lock:
            rows = [dict(r) for r in self.db.query(sql + " order by v.created_at", params)]
        for row in rows:
            row["context"] = json.loads(row["context"])
            yield row

    # -- overview -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {name: self.db[name].count for name in
                    ("conversations", "messages", "pairs", "votes")}

    def check(self) -> None:
        """Raise if the database cannot answer a trivial query."""
        with self._lock:
            self.db.execute("select 1").fetchone()
