"""Schema of the prefloop database as named migrations, applied in order, each in a transaction.

Never rename or edit a migration that has shipped: add a new one.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("prefloop")


@migrations()
def m001_conversations_pairs_votes(db: Database) -> None:
    db["conversations"].create(
        {"id": str, "client_id": str, "created_at": str, "updated_at": str},
        pk="id",
    )
    # The accepted path of a conversation: user messages and the answers that joined it.
    db["messages"].create(
        {"id": int, "conversation_id": str, "position": int, "role": str, "content": str,
         "pair_id": str, "created_at": str},
        pk="id",
        foreign_keys=[("conversation_id", "conversations", "id")],
    )
    db["messages"].create_index(["conversation_id", "position"], unique=True)
    db["pairs"].create(
        {"id": str, "conversation_id": str, "turn": int, "kind": str,
         "context": str,            # JSON list of chat messages the answers reply to
         "dropped_messages": int,   # oldest messages cut to fit the context window
         "policy_a": str, "policy_b": str, "text_a": str, "text_b": str,
         "finish_a": str, "finish_b": str, "tokens_a": int, "tokens_b": int,
         "seed_a": int, "seed_b": int, "sampling": str,  # JSON: temperature, top_p, max_tokens
         "first_token_ms": float, "total_ms": float, "created_at": str},
        pk="id",
        foreign_keys=[("conversation_id", "conversations", "id")],
        not_null={"conversation_id", "context", "policy_a", "policy_b", "text_a", "text_b"},
    )
    db["pairs"].create_index(["conversation_id", "turn"], unique=True)
    # One vote per pair: the primary key makes a second vote fail inside the database.
    db["votes"].create(
        {"pair_id": str, "choice": str, "answer": str, "client_id": str, "created_at": str},
        pk="pair_id",
        foreign_keys=[("pair_id", "pairs", "id")],
        not_null={"choice"},
    )
    db["votes"].create_index(["created_at"])


@migrations()
def m002_pair_fingerprints(db: Database) -> None:
    # Imported pairs carry a fingerprint of (prompt, chosen, rejected) so that importing the
    # same file twice adds nothing. NULL for pairs sampled here (NULLs never collide).
    db["pairs"].add_column("fingerprint", str)
    db["pairs"].create_index(["fingerprint"], unique=True)


@migrations()
def m003_adapters_rounds_loop(db: Database) -> None:
    # One row per training round, whatever became of it.
    db["rounds"].create(
        {"id": int, "trigger": str,       # schedule | admin | simulate
         "status": str,                   # running | succeeded | failed | skipped
         "started_at": str, "ended_at": str,
         "pairs": int,                    # pairs in the snapshot the trainer got
         "new_pairs": int,                # of them, from votes since the last good round
         "votes_until": int,              # highest votes.rowid in the snapshot
         "parent": str,                   # policy the adapter was warm-started from
         "adapter": str, "metrics": str,  # JSON: the trainer's metrics.json
         "progress": str,                 # JSON: the trainer's last step event, while running
         "error": str},
        pk="id",
        not_null={"trigger", "status", "started_at"},
    )
    # Adapter versions: candidate -> champion -> retired, or candidate -> rejected.
    db["adapters"].create(
        {"name": str, "state": str, "path": str, "round_id": int, "parent": str,
         "created_at": str, "state_at": str, "reason": str},
        pk="name",
        foreign_keys=[("round_id", "rounds", "id")],
        not_null={"state", "path", "created_at"},
    )
    # Small loop settings that must survive a restart: champion, paused.
    db["loop_state"].create({"key": str, "value": str}, pk="key")
    db["pairs"].create_index(["kind"])


@migrations()
def m004_client_flags(db: Database) -> None:
    # Clients (cookie ids) whose votes look untrustworthy (loop/voters.py). Their votes stay
    # stored but count neither for training nor for the gate while cleared_at is NULL.
    db["client_flags"].create(
        {"client_id": str,
         "reasons": str,            # JSON list of sentences: what fired, with the numbers
         "flagged_at": str, "cleared_at": str,
         "cleared_by": str,         # who cleared it: "admin (API)", "admin (page)"
         "cleared_through": int},   # the client's highest vote rowid when last cleared:
        pk="client_id",             # a later review looks only at votes after it
        not_null={"reasons", "flagged_at", "cleared_through"},
        defaults={"cleared_through": 0},
    )
    db["votes"].create_index(["client_id"])


@migrations()
def m005_kl_probe(db: Database) -> None:
    # KL(adapter ‖ base) as the KL probe measured it after the round (serving/kl_probe.py):
    # per answer token (the unit of max_kl) and per answer; the round keeps the whole report.
    db["adapters"].add_column("kl_per_token", float)
    db["adapters"].add_column("kl_per_answer", float)
    db["rounds"].add_column("kl", str)  # JSON: the probe's report (or {"error": ...})


@migrations()
def m006_consent(db: Database) -> None:
    # The version (a hash) of the terms each client accepted; nothing of a client is stored
    # before this row when the server asks for consent (app/privacy.py). One row per client:
    # accepting new terms replaces it.
    db["consents"].create({"client_id": str, "terms_version": str, "accepted_at": str},
                          pk="client_id", not_null={"terms_version", "accepted_at"})
    # The terms the asking client had accepted when the pair was made (NULL: none asked).
    db["pairs"].add_column("terms_version", str)


@migrations()
def m007_withheld(db: Database) -> None:
    # Why moderation withheld an answer of the pair (NULL: both shown). A withheld answer's
    # text is not stored, and such a pair can never be voted on, so it never trains.
    db["pairs"].add_column("withheld", str)
