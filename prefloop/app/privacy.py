"""What a visitor agrees to and what is theirs: the terms, their acceptance (consent), and
a visitor's own data (download it, delete it).

With ``terms_file`` set, a client (cookie id) must accept the terms' current version before
anything of it is stored: until then it may read the page, but a message or a vote is
refused (:class:`ConsentRequired`, HTTP 403, saying how to accept). The version is a hash
of the file, so editing the terms (and restarting) asks every visitor again; each pair
records the version its client had accepted. Without ``terms_file`` (private use) nothing
is asked.

A visitor's data is everything stored under its cookie id (:meth:`Store.client_data`);
deleting it removes the rows from the database file and its WAL. An admin can do the same by
client id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.app.guard import COOKIE, Client
from prefloop.config import ConfigError
from prefloop.storage.store import Conflict, NotFound, Store, now

VERSION_DIGITS = 16  # hex digits of the file's SHA-256: the terms' version


@dataclass(frozen=True)
class Terms:
    """The terms visitors accept: Markdown text and its version (a hash of the file)."""

    text: str
    version: str


def load_terms(path: Path | None) -> Terms | None:
    """The terms in ``path`` (None: no terms). :class:`ConfigError` when the file is
    missing, unreadable, not UTF-8 or empty: a server that should ask for consent must not
    start without it."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"terms_file: {path} does not exist; write the terms there, or "
                          "unset terms_file to ask visitors for no consent") from None
    except OSError as exc:  # a folder, no permission, ...
        raise ConfigError(f"terms_file: {path} cannot be read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"terms_file: {path} is not UTF-8 text") from None
    if not text.strip():
        raise ConfigError(f"terms_file: {path} is empty; write the terms visitors must "
                          "accept (docs/TERMS_TEMPLATE.md is a start), or unset terms_file")
    return Terms(text, hashlib.sha256(data).hexdigest()[:VERSION_DIGITS])


class ConsentRequired(Exception):
    """A client that has not accepted the current terms tried to store something (403)."""

    def __init__(self, message: str, version: str) -> None:
        super().__init__(message)
        self.version = version


class Consent:
    """The terms of this server (None: none asked) and who accepted which version."""

    def __init__(self, store: Store, terms: Terms | None) -> None:
        self.store = store
        self.terms = terms

    @property
    def required(self) -> bool:
        return self.terms is not None

    def accepted(self, client: Client | None) -> bool:
        """Whether ``client`` may store things: no terms, an internal caller (``None``), or
        the current version accepted."""
        if self.terms is None or client is None:
            return True
        row = self.store.consent(client.id)
        return row is not None and row["terms_version"] == self.terms.version

    def require(self, client: Client | None) -> str | None:
        """The terms' version to store with what ``client`` makes (None: none asked);
        :class:`ConsentRequired` until it has accepted the current version."""
        if self.terms is None or client is None:
            return None
        row = self.store.consent(client.id)
        if row is not None and row["terms_version"] == self.terms.version:
            return self.terms.version
        why = ("the terms have changed since you accepted them" if row is not None
               else "accept the terms first")
        raise ConsentRequired(
            f"{why}: nothing of yours is stored until you do. Read them with GET "
            f"/api/v1/consent, then accept with POST /api/v1/consent and "
            f'{{"version": "{self.terms.version}"}} (keep the {COOKIE} cookie); on the page, '
            "press I accept under the terms", self.terms.version)

    def accept(self, client: Client, version: object) -> dict[str, Any]:
        """Record that ``client`` accepted the terms of ``version``: :class:`NotFound` when
        this server has no terms, :class:`Conflict` when ``version`` is not the current one
        (the visitor read other terms than those in force)."""
        if self.terms is None:
            raise NotFound("this server asks for no consent (no terms_file is set): nothing "
                           "to accept")
        if version != self.terms.version:
            raise Conflict(f"the terms in force are version {self.terms.version}, not the "
                           "version sent: read them again (GET /api/v1/consent) and accept "
                           "that version")
        stamp = self.store.accept_terms(client.id, self.terms.version)
        return {"accepted": True, "version": self.terms.version, "accepted_at": stamp}

    def status(self, client: Client | None) -> dict[str, Any]:
        """What a client needs to know: whether terms are asked, their text and version,
        and whether it has accepted them."""
        if self.terms is None:
            return {"required": False, "version": None, "terms": None, "accepted": True}
        return {"required": True, "version": self.terms.version, "terms": self.terms.text,
                "accepted": self.accepted(client)}


DOWNLOAD_NAME = "prefloop-my-data.json"
DELETION_LIMITS = ("Models already trained on these votes are not retrained, and copies "
                   "already exported are not recalled.")


def client_data(store: Store, client_id: str) -> dict[str, Any]:
    """Everything stored for ``client_id``, as a visitor downloads it (JSON-ready)."""
    return {"exported_at": now(), **store.client_data(client_id),
            "note": "Everything this prefloop stores under your cookie id. " + DELETION_LIMITS}


def stored_counts(data: dict[str, Any]) -> dict[str, int]:
    """How many conversations, pairs and votes ``data`` (of :func:`client_data`) holds."""
    return {what: len(data[what]) for what in ("conversations", "pairs", "votes")}


def holds_anything(data: dict[str, Any]) -> bool:
    return any(stored_counts(data).values()) or bool(data["consent"] or data["voter_flag"])


def describe_counts(counts: dict[str, int]) -> str:
    """"2 conversations, 3 answer pairs and 1 vote"."""
    words = {"conversations": "conversation", "pairs": "answer pair", "votes": "vote"}
    parts = [f"{counts[k]} {word}{'' if counts[k] == 1 else 's'}" for k, word in words.items()]
    return f"{parts[0]}, {parts[1]} and {parts[2]}"
