"""The arena's logic, shared by the page and the JSON API: validate, sample a pair, vote."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from prefloop.app.guard import COOKIE, Client, Guard
from prefloop.app.moderation import Moderator
from prefloop.app.privacy import Consent, load_terms
from prefloop.config import Settings
from prefloop.loop.controller import Loop
from prefloop.loop.duels import TurnPlan
from prefloop.names import BASE, PairKind, is_hex_id
from prefloop.serving.context import with_system_prompt
from prefloop.serving.sampler import PairProgress, PairSampler, Side
from prefloop.storage.store import CHOICES, Answer, Conflict, NotFound, Store

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Input a person or client sent that we refuse; the message says why."""


class Forbidden(Exception):
    """A client reached for a conversation or pair of another client (HTTP 403)."""


@dataclass
class Turn:
    """A pair being answered: its snapshots while streaming, then its stored id."""

    conversation_id: str | None
    progress: PairProgress
    kind: str = PairKind.SAMPLE  # duel: two policies, named to the voter only after the vote
    pair_id: str | None = None  # set on the last snapshot, once the pair is stored
    # On the last snapshot: side ("a", "b") -> why moderation withheld that answer (its text
    # is blank then); a pair with any withheld answer takes no vote.
    withheld: dict[str, str] = dataclasses.field(default_factory=dict)


def stored_answer(side: Side) -> Answer:
    """A finished answer as the store keeps it (the same fields: a new one on ``Side``
    fails here, not silently)."""
    return Answer(**dataclasses.asdict(side))


def clean_text(text: object, what: str, limit: int) -> str:
    """Check user text: a non-blank string within ``limit`` characters, no control codes."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be text")
    if not text.strip():
        raise InputError(f"{what} is empty")
    if len(text) > limit:
        raise InputError(f"{what} has {len(text):,} characters; the limit is {limit:,}")
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cs") and c not in "\n\t\r"]
    if bad:
        raise InputError(f"{what} contains control characters (e.g. U+{ord(bad[0]):04X})")
    return text


class ChatService:
    """Conversations in the arena: each user turn gets two answers and one vote."""

    def __init__(self, settings: Settings, store: Store, sampler: PairSampler,
                 loop: Loop | None = None, guard: Guard | None = None,
                 consent: Consent | None = None, moderator: Moderator | None = None) -> None:
        """``consent``: the terms (read from ``settings.terms_file`` when not given);
        ``moderator``: the moderation check (from ``settings.moderation`` when not given).
        :class:`~prefloop.config.ConfigError` if a setting will not do."""
        self.settings = settings
        self.store = store
        self.sampler = sampler
        self.loop = loop  # None: every turn is two samples from base
        self.guard = guard or Guard(settings)
        self.consent = consent or Consent(store, load_terms(settings.terms_file))
        self.moderator = moderator or Moderator(settings)
        # Called with each stored pair's kind and final snapshot (e.g. latency metrics).
        self.on_pair: list[Callable[[str, PairProgress], None]] = []

    def check_turn(self, message: object, conversation_id: str | None,
                   client: Client | None = None) -> str:
        """Validate a new user turn before any work is done; returns the message.
        :class:`~prefloop.app.privacy.ConsentRequired` until the client accepted the terms."""
        text = clean_text(message, "the message", self.settings.max_message_chars)
        self.consent.require(client)
        if conversation_id is not None:
            if not isinstance(conversation_id, str):
                raise InputError("conversation_id must be a string")
            _check_id(conversation_id, "conversation")
            owner = self.store.conversation(conversation_id)["client_id"]  # NotFound
            _check_owner(owner, client, "conversation")
            if (open_id := self.store.open_pair(conversation_id)) is not None:
                raise Conflict(f"vote on pair {open_id} before sending the next message")
            turns = sum(m["role"] == "user" for m in self.store.messages(conversation_id))
            if turns >= self.settings.max_turns:
                raise InputError(f"this conversation has reached {self.settings.max_turns} "
                                 "turns; start a new conversation")
        return text

    async def stream_turn(self, message: object, conversation_id: str | None = None,
                          client: Client | None = None,
                          seed: int | None = None) -> AsyncIterator[Turn]:
        """Stream both answers to ``message``; the last :class:`Turn` has the stored pair.

        Nothing is stored unless both answers complete, so a failure leaves no trace. A
        ``client`` is held to its rate limits (:class:`~prefloop.app.guard.Refused`).
        """
        # Store calls run in a thread: a commit waits for fsync, and under load that held the
        # event loop (and /healthz, and every stream) for seconds (bench/load.py).
        text = await asyncio.to_thread(self.check_turn, message, conversation_id, client)
        with self.guard.generation(client):
            # Inside the client's limits: a refused message costs a check, and checks count.
            await asyncio.to_thread(self.moderator.refuse_flagged, text, "message",
                                    "your message")
            async for turn in self._stream_turn(text, conversation_id, client, seed):
                yield turn

    async def _stream_turn(self, text: str, conversation_id: str | None,
                           client: Client | None, seed: int | None) -> AsyncIterator[Turn]:
        history = (await asyncio.to_thread(self.store.messages, conversation_id)
                   if conversation_id else [])
        history.append({"role": "user", "content": text})
        plan = (await asyncio.to_thread(self.loop.hold_turn) if self.loop
                else TurnPlan(PairKind.SAMPLE, BASE, BASE))
        final: PairProgress | None = None
        try:
            async for progress in self.sampler.stream(history, plan.policy_a, plan.policy_b,
                                                      seed=seed):
                final = progress
                yield Turn(conversation_id, progress, plan.kind)
        finally:
            if self.loop:
                self.loop.pool.release(plan.policy_a, plan.policy_b)
        assert final is not None and final.done
        withheld: dict[str, str] = {}
        if self.moderator.active:
            final, withheld = await asyncio.to_thread(self._withhold_flagged, final)
        # Asked again: the visitor may have deleted their data (and consent) meanwhile.
        terms_version = await asyncio.to_thread(self.consent.require, client)
        if conversation_id is None:
            conversation_id = await asyncio.to_thread(self.store.create_conversation,
                                                      client and client.id)
        # The stored context is the conversation as the person sees it (not cut short);
        # dropped_messages says how much of it the model did not see.
        context = with_system_prompt(self.settings.system_prompt, history)
        pair_id = await asyncio.to_thread(
            self.store.add_pair, conversation_id, context, stored_answer(final.a),
            stored_answer(final.b), kind=plan.kind,
            dropped_messages=final.dropped_messages, sampling=self.sampler.sampling.as_dict(),
            first_token_ms=final.first_token_ms, total_ms=final.total_ms,
            terms_version=terms_version,
            withheld="; ".join(f"answer {side.upper()}: {why}"
                               for side, why in withheld.items()) or None)
        for observe in self.on_pair:
            observe(plan.kind, final)
        yield Turn(conversation_id, final, plan.kind, pair_id, withheld)

    def _withhold_flagged(self, final: PairProgress) -> tuple[PairProgress, dict[str, str]]:
        """Check both answers (each on its own); a flagged one's text is blanked, so it is
        neither shown nor stored. Returns the answers to keep and side -> reason."""
        reasons = self.moderator.check([final.a.text, final.b.text], "answer")
        withheld = {side: why for side, why in zip("ab", reasons, strict=True)
                    if why is not None}
        blank = {side: dataclasses.replace(getattr(final, side), text="")
                 for side in withheld}
        return dataclasses.replace(final, **blank), withheld

    async def turn(self, message: object, conversation_id: str | None = None,
                   client: Client | None = None, seed: int | None = None) -> Turn:
        """Both answers to ``message``, stored; for clients that do not stream."""
        turns = [turn async for turn in self.stream_turn(message, conversation_id, client,
                                                         seed)]
        assert turns[-1].pair_id is not None
        return turns[-1]

    def vote(self, pair_id: object, choice: object, answer: object = None,
             client: Client | None = None, conversation_id: object = None) -> dict:
        """Record a vote; ``answer`` (a written better answer) implies choice ``written``.

        A ``client`` may vote only on its own pairs, within its vote rate; with
        ``conversation_id`` the pair must belong to that conversation.
        """
        self.guard.admit_vote(client)
        self.consent.require(client)
        if not isinstance(pair_id, str) or not pair_id:
            raise InputError("pair_id must be a non-empty string")
        if answer is not None and choice in (None, "written"):
            choice = "written"
            answer = clean_text(answer, "the written answer", self.settings.max_answer_chars)
        elif answer is not None:
            raise InputError("a written answer goes with choice 'written' (or no choice)")
        if choice not in CHOICES:
            raise InputError(f"choice must be one of {', '.join(CHOICES)}")
        if choice == "written" and answer is None:
            raise InputError("choice 'written' needs the answer text")
        _check_id(pair_id, "pair")
        pair = self.store.pair(pair_id)  # NotFound; read once for the whole vote
        _check_owner(pair["owner"], client, "pair")
        if conversation_id is not None and conversation_id != pair["conversation_id"]:
            raise Conflict(f"pair {pair_id} belongs to another conversation")
        if answer is not None:  # it would be trained on as the better answer
            self.moderator.refuse_flagged(answer, "written_answer", "your written answer")
        row = self.store.vote(pair, choice, answer, client and client.id)
        decision = None
        if self.loop is not None:
            try:
                decision = self.loop.after_vote(pair, client and client.id)
            except Exception:  # the vote is stored; a promotion check must not undo that
                log.exception("promotion check after the vote on %s failed", pair_id)
        # The policies behind the answers, revealed now that the vote is in.
        return {**row, "kind": pair["kind"], "policy_a": pair["policy_a"],
                "policy_b": pair["policy_b"], "decision": decision}


    def undo_vote(self, pair_id: object, client: Client | None = None) -> dict:
        """Take back a vote within ``undo_seconds``: it is deleted, never trains or counts
        for the gate, and the pair awaits a vote again. Only the client that voted may undo
        it (``None``, an internal caller, may undo any). Returns the deleted vote row.

        :class:`NotFound` for an unknown pair or one without a vote; :class:`Conflict` with
        the reason when undo is off, the window has passed, the vote has been used, or the
        pair is a duel (its models were named after the vote).
        """
        self.guard.admit_vote(client)  # an undo and a new vote count as two votes
        if not isinstance(pair_id, str) or not pair_id:
            raise InputError("pair_id must be a non-empty string")
        _check_id(pair_id, "pair")
        pair = self.store.pair(pair_id)  # NotFound
        vote = self.store.vote_of(pair_id)
        if vote is None:
            raise NotFound(f"pair {pair_id} has no vote to undo")
        _check_owner(vote["client_id"] if vote["client_id"] is not None else pair["owner"],
                     client, "vote")
        window = self.settings.undo_seconds
        if window <= 0:
            raise Conflict("votes cannot be undone on this server (undo_seconds = 0)")
        if pair["kind"] == PairKind.DUEL:
            # The vote's reply named both models: a second vote would not be blind, and the
            # gate counts duel votes.
            raise Conflict("a vote in a duel cannot be undone: the models were named after "
                           "the vote, so a second vote would not be blind")
        age = (datetime.now(UTC) - datetime.fromisoformat(vote["created_at"])).total_seconds()
        if age > window:
            raise Conflict(f"the vote was cast {age:.0f} s ago; a vote can be undone only "
                           f"within {window:g} s")
        return self.store.delete_vote(pair_id)  # Conflict if a round or the gate used it


def _check_id(value: str, what: str) -> None:
    """Ids are 32 hex digits; anything else (a lone surrogate, which SQLite cannot even
    encode) does not exist."""
    if not is_hex_id(value):
        raise NotFound(f"{what} {value[:64]!r} does not exist")


def _check_owner(owner: str | None, client: Client | None, what: str) -> None:
    """A client may use only what it started (internal callers, ``None``, may use all)."""
    if client is not None and owner is not None and owner != client.id:
        raise Forbidden(f"this {what} belongs to another client (votes and follow-ups must "
                        f"come with the {COOKIE} cookie of the client that started it)")
