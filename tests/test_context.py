"""fit_context: cut the oldest turns until the prompt fits, keeping the system message and the
user's new turn. The token counter is a fake (whitespace words), the logic is the real one."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefloop.serving.context import (
    TEMPLATE_TOKENS_PER_MESSAGE,
    ContextTooLong,
    Messages,
    byte_bound,
    fit_context,
)


class WordCounter:
    """Counts one token per whitespace-separated word, plus one per message; records calls."""

    def __init__(self) -> None:
        self.calls: list[Messages] = []

    async def __call__(self, messages: Messages) -> int:
        self.calls.append(list(messages))
        return sum(len(m["content"].split()) + 1 for m in messages)


async def refuse_to_count(messages: Messages) -> int:
    raise AssertionError("the byte bound fits: the tokenizer must not be asked")


def fit(messages: Messages, budget: int, counter=None) -> tuple[Messages, int]:
    return asyncio.run(fit_context(messages, budget, counter or WordCounter()))


def msg(role: str, words: int, tag: str = "w") -> dict[str, str]:
    return {"role": role, "content": " ".join([tag] * words)}


SYSTEM = msg("system", 3, "s")


def conversation(turns: int, words: int = 10) -> Messages:
    """System, then ``turns`` user/assistant pairs, then the new user turn."""
    body: Messages = []
    for i in range(turns):
        body += [msg("user", words, f"u{i}"), msg("assistant", words, f"a{i}")]
    return [SYSTEM, *body, msg("user", words, "new")]


def test_byte_bound_counts_utf8_bytes_and_template_overhead() -> None:
    """The bound is the UTF-8 bytes of every content plus overhead per message and prompt."""
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "🙂"}]
    assert byte_bound(messages) == 6 + 4 + 3 * TEMPLATE_TOKENS_PER_MESSAGE


def test_fits_by_byte_bound_without_counting() -> None:
    """When the cheap bound fits, everything is kept and the tokenizer is never called."""
    messages = conversation(3)
    assert byte_bound(messages) <= 10_000
    kept, dropped = fit(messages, 10_000, refuse_to_count)
    assert kept == messages and dropped == 0


def test_counter_is_asked_when_the_bound_is_too_big() -> None:
    """Over the byte bound but within the real count: nothing is dropped, one count call."""
    messages = conversation(3)  # system 3 words + 7 messages of 10 -> 4 + 7 * 11 = 81 tokens
    counter = WordCounter()
    kept, dropped = fit(messages, 81, counter)
    assert byte_bound(messages) > 81
    assert kept == messages and dropped == 0
    assert counter.calls == [messages]


def test_exact_fit_is_kept() -> None:
    """A prompt of exactly the budget fits (<=, not <)."""
    messages = conversation(1)  # system 3 words, then 3 messages of 10 -> 4 + 3 * 11 = 37
    assert fit(messages, 37)[1] == 0
    assert fit(messages, 36)[1] == 2


def test_drops_oldest_pairs_first_keeping_system_and_last_user() -> None:
    """Oldest user+assistant pairs go first; the dropped count is in messages."""
    messages = conversation(3)  # system 4 tokens, every other message 11
    kept, dropped = fit(messages, 4 + 3 * 11)  # room for system + one pair + the new turn
    assert kept == [SYSTEM, *messages[-3:]]
    assert dropped == 4
    assert kept[-1]["content"].startswith("new") and kept[1]["role"] == "user"


def test_drops_down_to_system_and_last_user() -> None:
    """With room for nothing else, only the system message and the new turn remain."""
    messages = conversation(3)
    kept, dropped = fit(messages, 4 + 11)
    assert kept == [SYSTEM, messages[-1]] and dropped == 6


def test_without_system_message() -> None:
    """Without a system message the body is cut the same way."""
    messages = conversation(2)[1:]
    kept, dropped = fit(messages, 2 * 11 + 11)
    assert kept == messages[2:] and dropped == 2
    assert kept[0]["role"] == "user"


def test_leading_assistant_message_is_dropped_alone() -> None:
    """A body starting with an assistant greeting loses it alone, so roles keep alternating."""
    messages = [msg("assistant", 10, "hello"), *conversation(1)[1:]]
    kept, dropped = fit(messages, 3 * 11)
    assert kept == messages[1:] and dropped == 1


def test_too_long_last_message_raises() -> None:
    """If the new turn alone does not fit, ContextTooLong says so and names the budget."""
    messages = [SYSTEM, msg("user", 50)]
    with pytest.raises(ContextTooLong, match=r"\(20 tokens for the prompt\); shorten it"):
        fit(messages, 20)
    with pytest.raises(ContextTooLong):
        fit(conversation(3, words=50), 40)


def test_input_is_not_modified() -> None:
    """The caller's list is left as it was."""
    messages = conversation(3)
    copy = [dict(m) for m in messages]
    fit(messages, 20)
    assert messages == copy


def test_last_message_must_be_the_users() -> None:
    """Asking for a reply to anything but a user turn is a programming error."""
    with pytest.raises(AssertionError):
        fit([SYSTEM, msg("assistant", 2)], 100)


@settings(max_examples=150, deadline=None)
@given(turns=st.integers(0, 6), words=st.lists(st.integers(0, 30), min_size=13, max_size=13),
       system=st.booleans(), budget=st.integers(1, 400))
def test_result_is_the_longest_fitting_suffix(turns: int, words: list[int], system: bool,
                                              budget: int) -> None:
    """Whatever the sizes: the result fits, keeps system and new turn, is a suffix of whole
    turns, and one more turn would not have fitted."""
    body: Messages = []
    for i in range(turns):
        body += [msg("user", words[2 * i]), msg("assistant", words[2 * i + 1])]
    body.append(msg("user", words[12]))
    head = [SYSTEM] if system else []
    count = WordCounter()

    def tokens(messages: Messages) -> int:
        return asyncio.run(count(messages))

    try:
        kept, dropped = fit(head + body, budget)
    except ContextTooLong:
        assert tokens(head + body[-1:]) > budget
        return
    assert kept[: len(head)] == head and kept[len(head):] == body[dropped:]
    assert dropped % 2 == 0 and kept[-1] == body[-1]
    assert tokens(kept) <= budget or byte_bound(kept) <= budget
    if dropped:
        assert tokens(head + body[dropped - 2:]) > budget
