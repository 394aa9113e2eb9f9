"""The prefloop database: conversations, their accepted messages, answer pairs and votes.

One :class:`Store` is one SQLite database in WAL mode, shared by the web server's threads
and its event loop. Writes go through one connection, one transaction at a time (a lock);
when a write method returns, its data is on disk (``synchronous=FULL``). Reads use read-only
connections of their own, so they see the last commit without waiting for the next.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from prefloop.names import BASE, CHOICES, AdapterState, PairKind, new_id
from prefloop.storage.migrations import migrations

ROUND_STATUSES = ("running", "succeeded", "failed", "skipped")
UNDONE_KEY = "votes_undone."  # loop_state keys counting undone votes, + the choice
DELETED_KEY = "deleted."  # loop_state keys counting what deleted clients' data held, + what
FLAGGED = "select client_id from client_flags where cleared_at is null"
"""Clients whose votes are held back (loop/voters.py) until an admin clears them."""
COUNTED = f"(v.client_id is null or v.client_id not in ({FLAGGED}))"
"""A vote (alias ``v``) that counts for training and the gate: not from a flagged client.
Votes without a client id (imports, internal callers) always count."""


class StoreError(Exception):
    """Base class of the errors a store operation reports to its caller."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """The operation contradicts what is stored (a second vote, a pair left unvoted)."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
        self.busy_timeout_s = busy_timeout_s
        conn = sqlite3.connect(str(path), timeout=busy_timeout_s, check_same_thread=False)
        self.db = Database(conn, execute_plugins=False)  # the one connection that writes
        self.db.execute("PRAGMA foreign_keys = ON")
        if self.path is not None:
            self.db.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is fsynced before it returns, so an acknowledged vote survives a
        # power cut as well as a crash of the process.
        self.db.execute("PRAGMA synchronous = FULL")
        # Deleted rows are overwritten with zeros, not left in free space: an undone vote or
        # a visitor's deleted data is gone from the file, not just unlinked.
        self.db.execute("PRAGMA secure_delete = ON")
        self._lock = threading.RLock()  # the write connection: one transaction at a time
        self._in_write = threading.local()  # .active: this thread is inside _write
        self._pool_lock = threading.Lock()
        self._idle: list[Database] = []  # read connections not in use
        self._trace: Callable[[str], None] | None = None
        self._closed = False
        with self._lock:
            migrations.apply(self.db)

    def close(self) -> None:
        """Close every connection; a read in progress closes its own when it ends."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for reader in idle:
            reader.close()
        with self._lock:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def trace(self, callback: Callable[[str], None] | None) -> None:
        """Call ``callback`` with each SQL statement any of this store's connections runs
        from now on (None: stop); to see what a request costs."""
        with self._pool_lock:
            self._trace = callback
        with self._lock:
            self.db.conn.set_trace_callback(callback)

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, serialised with this store's other writes.

        ``BEGIN IMMEDIATE`` takes the write lock before the first read, so a writer on another
        connection (another process) makes this wait up to the busy timeout; a plain deferred
        ``BEGIN`` would fail at once with "database is locked" once its read snapshot is stale.
        Reads inside the block use the write connection, so they see the transaction.
        """
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            self._in_write.active = True
            try:
                yield
            except BaseException:
                self.db.rollback()
                raise
            else:
                try:
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.rollback()
                    raise
            finally:
                self._in_write.active = False

    @contextlib.contextmanager
    def _read(self) -> Iterator[Database]:
        """A connection for one read.

        With WAL a reader sees the last commit and never waits for the writer, so reads get
        read-only connections of their own (from a pool: one per concurrent read), and never
        queue behind a commit's fsync. Inside this thread's write transaction a read uses the
        write connection, to see that transaction; an in-memory database exists only on the
        write connection, so its reads share it under the lock.
        """
        if self.path is None or getattr(self._in_write, "active", False):
            with self._lock:
                yield self.db
            return
        with self._pool_lock:
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            reader = self._idle.pop() if self._idle else None
            trace = self._trace
        if reader is None:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                   timeout=self.busy_timeout_s, check_same_thread=False)
            reader = Database(conn, execute_plugins=False)
        reader.conn.set_trace_callback(trace)
        try:
            yield reader
        finally:
            with self._pool_lock:
                keep = not self._closed
                if keep:
                    self._idle.append(reader)
            if not keep:
                reader.close()

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
        with self._read() as db:
            rows = list(db["conversations"].rows_where("id = ?", [conversation_id]))
        if not rows:
            raise NotFound(f"conversation {conversation_id!r} does not exist")
        return rows[0]

    def messages(self, conversation_id: str) -> list[dict[str, str]]:
        """The accepted path of a conversation as chat messages, oldest first."""
        self.conversation(conversation_id)
        with self._read() as db:
            rows = db["messages"].rows_where(
                "conversation_id = ?", [conversation_id], order_by="position",
                select="role, content")
            return [dict(row) for row in rows]

    def open_pair(self, conversation_id: str) -> str | None:
        """The id of the conversation's pair that awaits a vote, if any (a pair withheld by
        moderation awaits none)."""
        with self._read() as db:
            rows = list(db.query(
                "select p.id from pairs p left join votes v on v.pair_id = p.id "
                "where p.conversation_id = ? and v.pair_id is null and p.withheld is null",
                [conversation_id]))
        return rows[0]["id"] if rows else None

    # -- pairs ----------------------------------------------------------------------------

    def add_pair(self, conversation_id: str, context: list[dict[str, str]], a: Answer,
                 b: Answer, *, kind: str = PairKind.SAMPLE, dropped_messages: int = 0,
                 sampling: dict[str, Any] | None = None, first_token_ms: float | None = None,
                 total_ms: float | None = None, terms_version: str | None = None,
                 withheld: str | None = None) -> str:
        """Store two answers to ``context`` (whose last message is the user's new turn);
        ``terms_version``: the terms the asking client accepted, if any were asked;
        ``withheld``: why moderation withheld an answer (then the pair takes no vote)."""
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
                "total_ms": total_ms, "terms_version": terms_version, "withheld": withheld,
                "created_at": now()})
        return pair_id

    def pair(self, pair_id: str) -> dict[str, Any]:
        """The pair's row (context and sampling decoded) and ``owner``, the client id of its
        conversation (None: started by an internal caller)."""
        with self._read() as db:
            rows = _dicts(db.execute(
                "select p.*, c.client_id as owner from pairs p left join conversations c "
                "on c.id = p.conversation_id where p.id = ?", [pair_id]))
        if not rows:
            raise NotFound(f"pair {pair_id!r} does not exist")
        row = rows[0]
        row["context"] = json.loads(row["context"])
        row["sampling"] = json.loads(row["sampling"] or "{}")
        return row

    # -- votes ----------------------------------------------------------------------------

    def vote(self, pair: str | dict[str, Any], choice: str, answer: str | None = None,
             client_id: str | None = None) -> dict[str, Any]:
        """Record the one vote on a pair and extend the conversation with the kept answer.

        ``pair`` is the pair's id, or its row as :meth:`pair` gave it (a caller that has read
        it already need not read it again). ``a``/``b`` keep that answer, ``written`` keeps
        ``answer``; ``tie`` and ``both_bad`` keep answer A so the conversation can go on.
        Raises :class:`Conflict` on a second vote. Returns the vote row; it is committed when
        this returns.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if (choice == "written") != (answer is not None):
            raise ValueError("a written answer comes with choice 'written', and only then")
        if isinstance(pair, str):
            pair = self.pair(pair)
        if pair.get("withheld"):
            raise Conflict(f"pair {pair['id']} cannot be voted on: moderation withheld "
                           f"{pair['withheld']}")
        conversation_id = pair["conversation_id"]
        kept = {"a": pair["text_a"], "b": pair["text_b"], "written": answer}.get(
            choice, pair["text_a"])
        row = {"pair_id": pair["id"], "choice": choice, "answer": answer,
               "client_id": client_id, "created_at": now()}
        try:
            # Plain SQL: sqlite-utils' table helpers look up the schema first (a dozen
            # statements more on every vote).
            with self._write():
                self.db.execute("insert into votes (pair_id, choice, answer, client_id, "
                                "created_at) values (:pair_id, :choice, :answer, :client_id, "
                                ":created_at)", row)
                position = self.db.execute(
                    "select count(*) from messages where conversation_id = ?",
                    [conversation_id]).fetchone()[0]
                self.db.conn.executemany(
                    "insert into messages (conversation_id, position, role, content, pair_id, "
                    "created_at) values (?, ?, ?, ?, ?, ?)",
                    [(conversation_id, position, "user", pair["context"][-1]["content"],
                      pair["id"], row["created_at"]),
                     (conversation_id, position + 1, "assistant", kept, pair["id"],
                      row["created_at"])])
                self.db.execute("update conversations set updated_at = ? where id = ?",
                                [row["created_at"], conversation_id])
        except sqlite3.IntegrityError:
            if self.vote_of(pair["id"]) is not None:
                raise Conflict(f"pair {pair['id']} already has a vote") from None
            raise
        return row

    def delete_vote(self, pair_id: str) -> dict[str, Any]:
        """Take back the vote on a pair: the vote row and the two messages it added are
        deleted (not hidden), so the pair can be voted again. Returns the deleted row.

        :class:`NotFound` when the pair has no vote; :class:`Conflict` (saying why) when the
        vote may already have had effects that deleting it cannot undo: a round snapshot
        took it (or a round is taking its snapshot now), a gate decision came after it
        (a duel vote), or the conversation went on after it.
        """
        with self._write():
            vote = _dicts(self.db.execute(
                "select v.rowid as vote_rowid, v.*, p.conversation_id, p.turn, p.kind "
                "from votes v join pairs p on p.id = v.pair_id where v.pair_id = ?",
                [pair_id]))
            if not vote:
                raise NotFound(f"pair {pair_id!r} has no vote to undo")
            row = vote[0]
            # A running round without votes_until is reading its snapshot right now.
            taken = self.db.execute(
                "select id from rounds where votes_until >= ? or "
                "(status = 'running' and votes_until is null) limit 1",
                [row["vote_rowid"]]).fetchone()
            if taken:
                raise Conflict(f"the vote on pair {pair_id} can no longer be undone: "
                               f"training round {taken[0]} has taken it")
            if row["kind"] == PairKind.DUEL and self.db.execute(
                    "select 1 from adapters where state_at >= ? union all "
                    "select 1 from loop_state where key = 'champion_since' and value >= ?",
                    [row["created_at"], row["created_at"]]).fetchone():
                raise Conflict(f"the vote on pair {pair_id} can no longer be undone: a "
                               "promotion decision has been taken since")
            if self.db.execute("select 1 from pairs where conversation_id = ? and turn > ?",
                               [row["conversation_id"], row["turn"]]).fetchone():
                raise Conflict(f"the vote on pair {pair_id} can no longer be undone: the "
                               "conversation went on after it")
            self.db.execute("delete from messages where pair_id = ?", [pair_id])
            self.db.execute("delete from votes where pair_id = ?", [pair_id])
            # Counted (no more than that), so that /metrics' vote counter never goes down.
            key = UNDONE_KEY + row["choice"]
            self.db.execute("insert into loop_state (key, value) values (?, '1') on conflict "
                            "(key) do update set value = cast(value as integer) + 1", [key])
            self.db.execute("update conversations set updated_at = ? where id = ?",
                            [now(), row["conversation_id"]])
        return {k: row[k] for k in ("pair_id", "choice", "answer", "client_id", "created_at")}

    def import_pair(self, context: list[dict[str, str]], chosen: str, rejected: str,
                    fingerprint: str) -> bool:
        """Store an outside preference as a conversation, a pair and its vote (``a`` =
        chosen). Returns False, storing nothing, when ``fingerprint`` is already here."""
        with self._write():
            if self.db.execute("select 1 from pairs where fingerprint = ?",
                               [fingerprint]).fetchone():
                return False
            conversation_id, pair_id, stamp = new_id(), new_id(), now()
            self.db["conversations"].insert({"id": conversation_id, "created_at": stamp,
                                             "updated_at": stamp})
            self.db["pairs"].insert({
                "id": pair_id, "conversation_id": conversation_id, "turn": 0,
                "kind": "import", "context": json.dumps(context, ensure_ascii=False),
                "dropped_messages": 0, "policy_a": "import", "policy_b": "import",
                "text_a": chosen, "text_b": rejected, "sampling": "{}",
                "fingerprint": fingerprint, "created_at": stamp})
            self.db["votes"].insert({"pair_id": pair_id, "choice": "a", "created_at": stamp})
            self.db["messages"].insert_all([
                {"conversation_id": conversation_id, "position": i, "role": m["role"],
                 "content": m["content"], "pair_id": pair_id, "created_at": stamp}
                for i, m in enumerate(context + [{"role": "assistant", "content": chosen}])])
        return True

    def vote_of(self, pair_id: str) -> dict[str, Any] | None:
        with self._read() as db:
            rows = list(db["votes"].rows_where("pair_id = ?", [pair_id]))
        return rows[0] if rows else None

    def voted_pairs(self, since: str | None = None) -> Iterator[dict[str, Any]]:
        """Pairs joined with their votes, oldest vote first."""
        yield from self._voted_pairs("v.created_at >= ?" if since else "1",
                                     [since] if since else [])

    def _voted_pairs(self, where: str, params: list[Any]) -> Iterator[dict[str, Any]]:
        sql = ("select p.*, v.choice, v.answer, v.created_at as voted_at, "
               "v.client_id as voter, v.rowid as vote_rowid, "
               f"coalesce(v.client_id in ({FLAGGED}), 0) as flagged_client "
               "from pairs p join votes v on v.pair_id = p.id "
               f"where {where}")
        with self._read() as db:
            rows = [dict(r) for r in db.query(sql + " order by v.rowid", params)]
        for row in rows:
            row["context"] = json.loads(row["context"])
            yield row

    def trainable_pairs(self, after_vote: int = 0) -> Iterator[dict[str, Any]]:
        """Voted pairs DPO can use (choice a, b or written) whose vote rowid > ``after_vote``,
        from clients not flagged."""
        yield from self._voted_pairs(
            f"v.choice in ('a', 'b', 'written') and v.rowid > ? and {COUNTED}", [after_vote])

    def count_trainable(self, after_vote: int = 0) -> int:
        with self._read() as db:
            return db.execute(
                "select count(*) from votes v where v.choice in ('a', 'b', 'written') "
                f"and v.rowid > ? and {COUNTED}", [after_vote]).fetchone()[0]

    def duel_votes(self, between: tuple[str, str] | None = None,
                   since: str | None = None) -> list[dict[str, Any]]:
        """Votes on pairs of two different policies, oldest first (for ratings and the
        gate), from clients not flagged; only duels of the two policies ``between`` (either
        side), only votes after ``since``."""
        where, params = ["p.kind = 'duel'", COUNTED], []
        if between is not None:
            where.append("((p.policy_a = ? and p.policy_b = ?) or "
                         "(p.policy_a = ? and p.policy_b = ?))")
            params += [*between, *between[::-1]]
        if since is not None:
            where.append("v.created_at > ?")
            params.append(since)
        with self._read() as db:
            return _dicts(db.execute(
                "select p.id as pair_id, p.policy_a, p.policy_b, v.choice, "
                "v.created_at as voted_at from pairs p join votes v on v.pair_id = p.id "
                f"where {' and '.join(where)} order by v.rowid", params))

    def duel_votes_key(self) -> tuple[Any, ...]:
        """A value that changes whenever :meth:`duel_votes` (all of them) would change: a
        duel vote added (or removed), a client flagged or cleared. Cheaper than the votes.
        (The newest vote's time as well: an undone vote voted again may reuse its rowid.)"""
        with self._read() as db:
            return tuple(db.execute(
                "select count(*), max(v.rowid), max(v.created_at), "
                "(select count(*) from client_flags where cleared_at is null), "
                "(select max(flagged_at) from client_flags), "
                "(select max(cleared_at) from client_flags) "
                "from pairs p join votes v on v.pair_id = p.id where p.kind = 'duel'").fetchone())

    def count_withheld(self) -> int:
        """Pairs stored with an answer moderation withheld."""
        with self._read() as db:
            return db.execute("select count(*) from pairs where withheld is not null"
                              ).fetchone()[0]

    def votes_by_choice(self) -> dict[str, int]:
        with self._read() as db:
            counts = dict(db.execute(
                "select choice, count(*) from votes group by choice").fetchall())
        return {choice: counts.get(choice, 0) for choice in CHOICES}

    def votes_undone(self) -> dict[str, int]:
        """Votes taken back (and deleted) so far, by choice."""
        with self._read() as db:
            counts = {k[len(UNDONE_KEY):]: int(v) for k, v in db.execute(
                "select key, value from loop_state where key like ?",
                [UNDONE_KEY + "%"]).fetchall()}
        return {choice: counts.get(choice, 0) for choice in CHOICES}

    def rounds_by_status(self) -> dict[str, int]:
        with self._read() as db:
            counts = dict(db.execute(
                "select status, count(*) from rounds group by status").fetchall())
        return {status: counts.get(status, 0) for status in ROUND_STATUSES}

    def votes_per_hour(self, hours: int = 48) -> list[dict[str, Any]]:
        """Votes counted per UTC hour, the last ``hours`` hours that had any."""
        with self._read() as db:
            rows = db.query(
                "select substr(created_at, 1, 13) as hour, count(*) as votes from votes "
                "group by hour order by hour desc limit ?", [hours])
            return sorted((dict(r) for r in rows), key=lambda r: r["hour"])

    # -- consent --------------------------------------------------------------------------

    def accept_terms(self, client_id: str, version: str) -> str:
        """Record that the client accepted the terms of ``version`` (replacing an earlier
        acceptance); returns the time stamp."""
        stamp = now()
        with self._write():
            self.db.execute("insert into consents (client_id, terms_version, accepted_at) "
                            "values (?, ?, ?) on conflict (client_id) do update set "
                            "terms_version = excluded.terms_version, "
                            "accepted_at = excluded.accepted_at", [client_id, version, stamp])
        return stamp

    def consent(self, client_id: str) -> dict[str, Any] | None:
        """The client's acceptance (``terms_version``, ``accepted_at``), None if none."""
        with self._read() as db:
            rows = _dicts(db.execute("select terms_version, accepted_at from consents "
                                     "where client_id = ?", [client_id]))
        return rows[0] if rows else None

    # -- a client's own data ------------------------------------------------------------

    def client_data(self, client_id: str) -> dict[str, Any]:
        """Everything stored for a client id: its consent, its conversations (with their
        accepted messages), the pairs in them, the votes on those pairs or cast by it, and
        its voter flag. An unvoted duel's policies stay hidden (the vote must be blind)."""
        with self._read() as db:
            conversations = _dicts(db.execute(
                "select * from conversations where client_id = ? order by created_at",
                [client_id]))
            messages = _dicts(db.execute(
                "select m.conversation_id, m.position, m.role, m.content, m.pair_id, "
                "m.created_at from messages m join conversations c on c.id = m.conversation_id "
                "where c.client_id = ? order by m.conversation_id, m.position", [client_id]))
            pairs = _dicts(db.execute(
                "select p.*, exists (select 1 from votes v where v.pair_id = p.id) as voted "
                "from pairs p join conversations c on c.id = p.conversation_id "
                "where c.client_id = ? order by p.created_at",
                [client_id]))
            votes = _dicts(db.execute(
                f"select * from votes where {_CLIENT_VOTES} order by created_at",
                [client_id, client_id]))
        by_conversation: dict[str, list[dict[str, Any]]] = {}
        for message in messages:
            by_conversation.setdefault(message.pop("conversation_id"), []).append(message)
        for pair in pairs:
            pair["context"] = json.loads(pair["context"])
            pair["sampling"] = json.loads(pair["sampling"] or "{}")
            if pair["kind"] == PairKind.DUEL and not pair["voted"]:
                pair["policy_a"] = pair["policy_b"] = None
            del pair["voted"]
        return {"client_id": client_id, "consent": self.consent(client_id),
                "conversations": [{**c, "messages": by_conversation.get(c["id"], [])}
                                  for c in conversations],
                "pairs": pairs, "votes": votes, "voter_flag": self.client_flag(client_id)}

    def delete_client_data(self, client_id: str) -> dict[str, Any]:
        """Delete everything :meth:`client_data` shows, for good: the rows are deleted (their
        bytes overwritten, ``secure_delete``), then the WAL is checkpointed into the file
        and truncated, so no copy stays in it. Returns what was deleted, and ``checkpoint``:
        False if a reader kept the WAL from being emptied (it is, at the next checkpoint).

        A vote a round took stays in its adapter; the caller's docs say so."""
        pairs_sql = ("select p.id from pairs p join conversations c on c.id = p.conversation_id "
                     "where c.client_id = ?")
        with self._write():
            voted = [r[0] for r in self.db.execute(
                f"select pair_id from votes where {_CLIENT_VOTES}", [client_id, client_id])]
            choices = self.db.execute(
                f"select choice, count(*) from votes where {_CLIENT_VOTES} group by choice",
                [client_id, client_id]).fetchall()
            # The messages its votes added (to a conversation not its own as well).
            by_votes = self.db.conn.executemany("delete from messages where pair_id = ?",
                                                [(pair_id,) for pair_id in voted]).rowcount
            deleted = {
                "votes": self.db.execute(f"delete from votes where {_CLIENT_VOTES}",
                                         [client_id, client_id]).rowcount,
                "messages": max(by_votes, 0) + self.db.execute(
                    "delete from messages where conversation_id in (select id from "
                    "conversations where client_id = ?)", [client_id]).rowcount,
                "pairs": self.db.execute(f"delete from pairs where id in ({pairs_sql})",
                                         [client_id]).rowcount,
                "conversations": self.db.execute(
                    "delete from conversations where client_id = ?", [client_id]).rowcount,
                "consent": self.db.execute("delete from consents where client_id = ?",
                                           [client_id]).rowcount,
                "voter_flag": self.db.execute("delete from client_flags where client_id = ?",
                                              [client_id]).rowcount}
            # Counted (no more), so that /metrics' counters never go down.
            counted = [(DELETED_KEY + "conversations", deleted["conversations"]),
                       (DELETED_KEY + "pairs", deleted["pairs"]),
                       *((f"{DELETED_KEY}votes.{choice}", n) for choice, n in choices)]
            self.db.conn.executemany(
                "insert into loop_state (key, value) values (?, ?) on conflict (key) do "
                "update set value = cast(value as integer) + excluded.value",
                [(key, str(n)) for key, n in counted if n])
        if not any(deleted.values()):  # nothing to clear from the WAL: spare the checkpoint
            return {**deleted, "checkpoint": True}
        return {**deleted, "checkpoint": self.checkpoint()}

    def checkpoint(self) -> bool:
        """Copy the WAL into the database file and truncate it to nothing; False when a
        reader held it past the busy timeout (an in-memory database: True)."""
        if self.path is None:
            return True
        with self._lock:
            busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return busy == 0

    def deleted_counts(self) -> dict[str, int]:
        """What deleted clients' data held, counted at deletion: conversations, pairs, and
        votes by choice (``votes.a``, ...)."""
        with self._read() as db:
            return {k[len(DELETED_KEY):]: int(v) for k, v in db.execute(
                "select key, value from loop_state where key like ?", [DELETED_KEY + "%"])}

    # -- voter flags ----------------------------------------------------------------------

    def client_votes(self, client_id: str, after_vote: int = 0) -> list[dict[str, Any]]:
        """A client's votes with vote rowid > ``after_vote``, oldest first, with what the
        voter review needs: choice, voted_at, the pair's kind, policies, created_at
        (``pair_at``: both answers complete), timings and answer lengths in characters."""
        with self._read() as db:
            return _dicts(db.execute(
                "select v.rowid as vote_rowid, v.choice, v.created_at as voted_at, p.kind, "
                "p.policy_a, p.policy_b, p.created_at as pair_at, p.first_token_ms, "
                "p.total_ms, length(p.text_a) as chars_a, length(p.text_b) as chars_b "
                "from votes v join pairs p on p.id = v.pair_id "
                "where v.client_id = ? and v.rowid > ? order by v.rowid",
                [client_id, after_vote]))

    def duel_consensus(self, client_id: str) -> dict[tuple[str, str], tuple[int, int]]:
        """For each policy pair (sorted) the client cast a decisive duel vote on: the decisive
        votes of everyone else not flagged, as (wins of the first policy, of the second)."""
        sql = f"""
            with mine as (
                select distinct min(p.policy_a, p.policy_b) as lo,
                                max(p.policy_a, p.policy_b) as hi
                from votes v join pairs p on p.id = v.pair_id
                where v.client_id = ? and p.kind = 'duel' and v.choice in ('a', 'b'))
            select m.lo, m.hi,
                   sum((v.choice = 'a') = (p.policy_a = m.lo)) as lo_wins,
                   sum((v.choice = 'a') != (p.policy_a = m.lo)) as hi_wins
            from mine m
            join pairs p on p.kind = 'duel' and ((p.policy_a = m.lo and p.policy_b = m.hi)
                                                 or (p.policy_a = m.hi and p.policy_b = m.lo))
            join votes v on v.pair_id = p.id
            where v.choice in ('a', 'b') and (v.client_id is null or v.client_id != ?)
              and {COUNTED}
            group by m.lo, m.hi"""
        with self._read() as db:
            rows = db.execute(sql, [client_id, client_id]).fetchall()
        return {(lo, hi): (lo_wins, hi_wins) for lo, hi, lo_wins, hi_wins in rows}

    def client_flag(self, client_id: str) -> dict[str, Any] | None:
        """The client's flag row (``cleared_at`` set: cleared), ``None`` if never flagged."""
        with self._read() as db:
            rows = _dicts(db.execute("select * from client_flags where client_id = ?",
                                     [client_id]))
        return _flag_row(rows[0]) if rows else None

    def flag_client(self, client_id: str, reasons: list[str]) -> bool:
        """Hold back the client's votes (from training and the gate) until an admin clears
        it. Returns False, changing nothing, when the client is flagged already."""
        assert client_id and reasons, "a flag needs a client id and a reason"
        with self._write():
            flag = self.client_flag(client_id)
            if flag is not None and flag["cleared_at"] is None:
                return False
            self.db["client_flags"].upsert(
                {"client_id": client_id, "reasons": json.dumps(reasons, ensure_ascii=False),
                 "flagged_at": now(), "cleared_at": None, "cleared_by": None}, pk="client_id")
        return True

    def clear_client(self, client_id: str, by: str = "admin") -> None:
        """Count the client's votes again. Its votes so far are never reviewed again: only
        newer ones can flag it anew. :class:`NotFound` if it is not flagged."""
        with self._write():
            flag = self.client_flag(client_id)
            if flag is None or flag["cleared_at"] is not None:
                raise NotFound(f"client {client_id} is not flagged")
            through = self.db.execute("select coalesce(max(rowid), 0) from votes "
                                      "where client_id = ?", [client_id]).fetchone()[0]
            self.db["client_flags"].update(client_id, {"cleared_at": now(), "cleared_by": by,
                                                       "cleared_through": through})

    def flagged_clients(self) -> list[dict[str, Any]]:
        """Clients flagged now, oldest flag first: client_id, reasons (list), flagged_at and
        votes (how many of its votes are held back)."""
        with self._read() as db:
            rows = db.query(
                "select f.client_id, f.reasons, f.flagged_at, "
                "(select count(*) from votes v where v.client_id = f.client_id) as votes "
                "from client_flags f where f.cleared_at is null order by f.flagged_at")
            return [_flag_row(r) for r in rows]

    # -- rounds ---------------------------------------------------------------------------

    def start_round(self, trigger: str) -> int:
        """Record a round as running; :class:`Conflict` if one is running already."""
        with self._write():
            running = self.db.execute(
                "select id from rounds where status = 'running'").fetchone()
            if running:
                raise Conflict(f"round {running[0]} is running; one round at a time")
            return self.db["rounds"].insert(
                {"trigger": trigger, "status": "running", "started_at": now()}).last_pk

    def update_round(self, round_id: int, **fields: Any) -> None:
        """Set fields of a round; dicts are stored as JSON, ``status`` other than
        ``running`` also stamps ``ended_at``."""
        values = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}
        if values.get("status", "running") != "running":
            values["ended_at"] = now()
        with self._write():
            self.db["rounds"].update(round_id, values)

    def record_skipped_round(self, trigger: str, reason: str) -> int:
        stamp = now()
        with self._write():
            return self.db["rounds"].insert(
                {"trigger": trigger, "status": "skipped", "started_at": stamp,
                 "ended_at": stamp, "error": reason}).last_pk

    def fail_running_rounds(self, reason: str) -> list[int]:
        """Mark rounds left ``running`` (by a crash) as failed; returns their ids."""
        with self._write():
            ids = [r[0] for r in self.db.execute(
                "select id from rounds where status = 'running'").fetchall()]
            for round_id in ids:
                self.db["rounds"].update(round_id, {"status": "failed", "error": reason,
                                                    "ended_at": now()})
        return ids

    def round(self, round_id: int) -> dict[str, Any]:
        with self._read() as db:
            rows = list(db["rounds"].rows_where("id = ?", [round_id]))
        if not rows:
            raise NotFound(f"round {round_id} does not exist")
        return _round_row(rows[0])

    def rounds(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest rounds, newest first."""
        with self._read() as db:
            rows = list(db["rounds"].rows_where(order_by="id desc", limit=limit))
        return [_round_row(r) for r in rows]

    def last_trained_vote(self) -> int:
        """The highest vote rowid a succeeded round trained on (0: none yet)."""
        with self._read() as db:
            value = db.execute("select max(votes_until) from rounds "
                               "where status = 'succeeded'").fetchone()[0]
        return value or 0

    # -- adapters and the champion --------------------------------------------------------

    def add_adapter(self, name: str, path: Path, round_id: int | None, parent: str,
                    state: str = AdapterState.CANDIDATE, reason: str | None = None, *,
                    kl_per_token: float | None = None,
                    kl_per_answer: float | None = None) -> None:
        """Record a new adapter with its state and, when the KL probe measured it,
        KL(adapter ‖ base) in nats per answer token and per answer."""
        stamp = now()
        with self._write():
            self.db["adapters"].insert(
                {"name": name, "state": state, "path": str(path), "round_id": round_id,
                 "parent": parent, "created_at": stamp, "state_at": stamp, "reason": reason,
                 "kl_per_token": kl_per_token, "kl_per_answer": kl_per_answer})

    def adapter(self, name: str) -> dict[str, Any]:
        with self._read() as db:
            rows = _dicts(db.execute("select * from adapters where name = ?", [name]))
        if not rows:
            raise NotFound(f"adapter {name!r} does not exist")
        return rows[0]

    def adapters(self) -> list[dict[str, Any]]:
        """All adapter versions, oldest first."""
        with self._read() as db:
            return [dict(r) for r in db["adapters"].rows_where(order_by="name")]

    def set_adapter_state(self, name: str, state: str, reason: str | None = None) -> None:
        with self._write():
            self.adapter(name)
            self.db["adapters"].update(name, {"state": state, "state_at": now(),
                                              "reason": reason})

    def champion(self) -> str:
        """The policy new turns come from: ``base`` or an adapter name."""
        return self.get_state("champion") or BASE

    def candidate(self) -> str | None:
        row = self.candidate_adapter()
        return row["name"] if row else None

    def candidate_adapter(self) -> dict[str, Any] | None:
        """The newest candidate's adapter row, if there is a candidate."""
        with self._read() as db:
            rows = _dicts(db.execute("select * from adapters where state = 'candidate' "
                                     "order by name desc limit 1"))
        return rows[0] if rows else None

    def candidate_other_than(self, name: str) -> list[str]:
        with self._read() as db:
            return [r[0] for r in db.execute(
                "select name from adapters where state = 'candidate' and name != ?", [name])]

    def crown(self, policy: str, reason: str, old_state: str = AdapterState.RETIRED) -> str:
        """Make ``policy`` (``base`` or an adapter) the champion in one transaction; the old
        champion adapter goes to ``old_state`` (``retired``, or ``rolled_back``). Returns
        the old champion."""
        with self._write():
            if policy != BASE:
                self.adapter(policy)
            old = self.champion()
            stamp = now()
            if old != BASE and old != policy:
                self.db["adapters"].update(old, {"state": old_state, "state_at": stamp,
                                                 "reason": reason})
            if policy != BASE:
                self.db["adapters"].update(policy, {"state": AdapterState.CHAMPION,
                                                    "state_at": stamp,
                                                    "reason": reason})
            self.db["loop_state"].upsert_all(
                [{"key": "champion", "value": policy}, {"key": "champion_since", "value": stamp}],
                pk="key")
        return old

    def champion_since(self) -> str | None:
        """When the champion was crowned (None: ``base`` since the start)."""
        return self.get_state("champion_since")

    def get_state(self, key: str) -> str | None:
        with self._read() as db:
            row = db.execute("select value from loop_state where key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_state(self, key: str, value: str) -> None:
        with self._write():
            self.db["loop_state"].upsert({"key": key, "value": value}, pk="key")

    # -- overview -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            return {name: db[name].count for name in
                    ("conversations", "messages", "pairs", "votes", "rounds", "adapters")}

    def check(self) -> None:
        """Raise if the database cannot answer a trivial query."""
        with self._read() as db:
            db.execute("select 1").fetchone()


_CLIENT_VOTES = ("(client_id = ? or pair_id in (select p.id from pairs p join conversations c "
                 "on c.id = p.conversation_id where c.client_id = ?))")
"""Votes cast by a client, and votes on the pairs of its conversations (two parameters, both
the client id)."""


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """A query's rows as dicts (sqlite-utils' helpers would look up the schema first)."""
    columns = [column[0] for column in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor]


def _flag_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "reasons": json.loads(row["reasons"])}


def _round_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    for key in ("metrics", "progress", "kl"):
        row[key] = json.loads(row[key]) if row[key] else None
    return row
