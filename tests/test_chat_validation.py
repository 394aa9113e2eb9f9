"""Input checks of the arena (shared by the page and the JSON API), on a real SQLite store.

These paths refuse input before any model is asked, so the service runs without a sampler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefloop.app.chat import ChatService, InputError, clean_text, stored_answer
from prefloop.app.guard import Client
from prefloop.config import Settings
from prefloop.serving.context import with_system_prompt
from prefloop.serving.sampler import Side
from prefloop.storage.store import Answer, Conflict, NotFound, Store

A = Answer("base", "Answer A", seed=1)
B = Answer("base", "Answer B", seed=2)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "prefloop.db")
    yield s
    s.close()


@pytest.fixture
def service(store: Store, tmp_path: Path) -> ChatService:
    settings = Settings(data_dir=tmp_path, max_message_chars=10, max_answer_chars=20,
                        max_turns=2)
    return ChatService(settings, store, sampler=None)  # type: ignore[arg-type]


def open_turn(store: Store, text: str = "hi") -> tuple[str, str]:
    """A conversation with one pair waiting for its vote."""
    conversation_id = store.create_conversation()
    return conversation_id, store.add_pair(conversation_id, [{"role": "user", "content": text}],
                                           A, B)


# -- clean_text --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "hello", "x" * 10, "two\nlines", "tab\there", "crlf\r\n ok", "émoji 🙂", "日本語",
    "  padded  ",
])
def test_clean_text_accepts_and_returns_text_unchanged(text: str) -> None:
    """Ordinary text, newlines and tabs, any script: returned exactly as given."""
    assert clean_text(text, "the message", 10) == text


@pytest.mark.parametrize(("text", "reason"), [
    (None, "must be text"),
    (5, "must be text"),
    (b"bytes", "must be text"),
    (["hi"], "must be text"),
    ("", "is empty"),
    ("   ", "is empty"),
    (" \n\t\r ", "is empty"),
    ("x" * 11, "has 11 characters; the limit is 10"),
])
def test_clean_text_refuses(text: object, reason: str) -> None:
    """Non-strings, blank text and text over the limit are refused; the message names what
    was checked and why."""
    with pytest.raises(InputError, match=f"^the message {reason}$"):
        clean_text(text, "the message", 10)


@pytest.mark.parametrize(("text", "code"), [
    ("a\x00b", "0000"),
    ("\x1b[31mred", "001B"),
    ("del\x7f", "007F"),
    ("bell\x07", "0007"),
    ("\x85next", "0085"),
    ("a\ud800b", "D800"),
    ("\udfff", "DFFF"),
])
def test_clean_text_refuses_control_characters(text: str, code: str) -> None:
    """Control codes (escape sequences, NUL) and lone surrogates are refused by code point."""
    with pytest.raises(InputError, match=rf"^the message contains control characters "
                                         rf"\(e\.g\. U\+{code}\)$"):
        clean_text(text, "the message", 10)


def test_input_error_is_a_value_error() -> None:
    """Callers that only know ValueError still catch it."""
    assert issubclass(InputError, ValueError)


# -- check_turn --------------------------------------------------------------------------------


def test_check_turn_new_conversation(service: ChatService) -> None:
    """A first message needs no conversation; it comes back as given."""
    assert service.check_turn("hello", None) == "hello"


@pytest.mark.parametrize("message", ["", "   ", "x" * 11, "\x00", 42, None, "\ud83d"])
def test_check_turn_bad_message(service: ChatService, message: object) -> None:
    """check_turn applies clean_text with max_message_chars."""
    with pytest.raises(InputError, match="^the message "):
        service.check_turn(message, None)


def test_check_turn_unknown_conversation(service: ChatService) -> None:
    """An id that does not exist is NotFound, not a new conversation."""
    with pytest.raises(NotFound):
        service.check_turn("hello", "no-such-conversation")


def test_check_turn_with_open_pair_is_conflict(service: ChatService, store: Store) -> None:
    """The person must vote on the open pair before sending the next message."""
    conversation_id, pair_id = open_turn(store)
    with pytest.raises(Conflict, match=f"vote on pair {pair_id}"):
        service.check_turn("next", conversation_id)
    store.vote(pair_id, "a")
    assert service.check_turn("next", conversation_id) == "next"


def test_check_turn_max_turns(service: ChatService, store: Store) -> None:
    """After max_turns (2) voted turns, the conversation takes no more messages."""
    conversation_id, pair_id = open_turn(store)
    store.vote(pair_id, "a")
    history = [*store.messages(conversation_id), {"role": "user", "content": "again"}]
    store.vote(store.add_pair(conversation_id, history, A, B), "b")
    with pytest.raises(InputError, match="reached 2 turns; start a new conversation"):
        service.check_turn("third", conversation_id)
    assert service.check_turn("fresh", None) == "fresh"


def test_stream_turn_refuses_bad_input_before_sampling(service: ChatService,
                                                       store: Store) -> None:
    """Bad input fails before the sampler is touched (it is None here) and stores nothing."""
    async def consume() -> None:
        async for _ in service.stream_turn("\x1b", None):
            pass

    with pytest.raises(InputError, match="control characters"):
        asyncio.run(consume())
    assert store.counts()["conversations"] == 0


# -- vote --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair_id", [None, "", 5, ["id"]])
def test_vote_pair_id_must_be_a_string(service: ChatService, pair_id: object) -> None:
    """The pair id is checked before the database is asked."""
    with pytest.raises(InputError, match="pair_id must be a non-empty string"):
        service.vote(pair_id, "a")


@pytest.mark.parametrize(("choice", "answer", "match"), [
    ("c", None, "choice must be one of a, b, tie, both_bad, written"),
    (None, None, "choice must be one of"),
    (1, None, "choice must be one of"),
    (["a"], None, "choice must be one of"),
    ("written", None, "choice 'written' needs the answer text"),
    ("a", "better", "a written answer goes with choice 'written'"),
    ("tie", "better", "a written answer goes with choice 'written'"),
    ("written", "", "the written answer is empty"),
    (None, "  ", "the written answer is empty"),
    (None, "x" * 21, "the written answer has 21 characters; the limit is 20"),
    (None, "ok\x00", "the written answer contains control characters"),
    (None, "\ud800", "the written answer contains control characters"),
    (None, 7, "the written answer must be text"),
])
def test_bad_votes_are_refused_and_store_nothing(service: ChatService, store: Store,
                                                 choice: object, answer: object,
                                                 match: str) -> None:
    """Every malformed vote is an InputError; the pair stays open."""
    conversation_id, pair_id = open_turn(store)
    with pytest.raises(InputError, match=match):
        service.vote(pair_id, choice, answer)
    assert store.vote_of(pair_id) is None
    assert store.open_pair(conversation_id) == pair_id
    assert store.messages(conversation_id) == []


@pytest.mark.parametrize("choice", [None, "written"])
def test_written_answer_implies_choice_written(service: ChatService, store: Store,
                                               choice: str | None) -> None:
    """An answer with no choice (or 'written') is stored as the kept answer."""
    conversation_id, pair_id = open_turn(store)
    row = service.vote(pair_id, choice, "Much better.", client=Client("c1"))
    assert (row["choice"], row["answer"], row["client_id"]) == ("written", "Much better.", "c1")
    assert store.messages(conversation_id)[-1] == {"role": "assistant",
                                                   "content": "Much better."}


def test_vote_unknown_pair(service: ChatService) -> None:
    """A well-formed vote for a pair that does not exist is NotFound."""
    with pytest.raises(NotFound):
        service.vote("0" * 32, "a")


def test_second_vote_is_conflict(service: ChatService, store: Store) -> None:
    """The first vote stands; the second is a Conflict."""
    _, pair_id = open_turn(store)
    assert service.vote(pair_id, "b")["choice"] == "b"
    with pytest.raises(Conflict):
        service.vote(pair_id, "a")
    assert store.vote_of(pair_id)["choice"] == "b"


def test_a_finished_side_is_stored_as_it_streamed() -> None:
    side = Side("v0002", 7, "Hello.", "stop", 3)
    assert stored_answer(side) == Answer("v0002", "Hello.", 7, "stop", 3)
    assert stored_answer(Side("base", 8)) == Answer("base", "", 8, None, None)


def test_the_system_prompt_goes_first_when_there_is_one() -> None:
    hi = [{"role": "user", "content": "Hi"}]
    assert with_system_prompt("", hi) == hi
    assert with_system_prompt("Be brief.", hi) == [{"role": "system", "content": "Be brief."},
                                                   *hi]
    assert hi == [{"role": "user", "content": "Hi"}]  # not changed in place
