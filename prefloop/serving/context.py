"""Fit a conversation into the model's context window by cutting its oldest turns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

Messages = list[dict[str, str]]
TokenCounter = Callable[[Messages], Awaitable[int]]

# Chat templates add a few tokens per message (role markers, separators); this bounds them
# generously for the templates we know.
TEMPLATE_TOKENS_PER_MESSAGE = 16


def with_system_prompt(system_prompt: str, messages: Messages) -> Messages:
    """``messages`` after the system prompt as a leading system message (none when empty):
    what the model is sent, and what a stored pair records as its context."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages


class ContextTooLong(ValueError):
    """Even the newest message alone does not fit the context window."""


def byte_bound(messages: Messages) -> int:
    """An upper bound on the prompt's token count, without a tokenizer.

    Byte-level BPE tokens each stand for at least one byte of text, so the UTF-8 length of
    the contents plus the template's overhead bounds the count from above.
    """
    return sum(len(m["content"].encode()) + TEMPLATE_TOKENS_PER_MESSAGE for m in messages) \
        + TEMPLATE_TOKENS_PER_MESSAGE


async def fit_context(messages: Messages, max_prompt_tokens: int,
                      count_tokens: TokenCounter) -> tuple[Messages, int]:
    """Drop the oldest user/assistant turns until the prompt fits ``max_prompt_tokens``.

    A leading system message and the final user message are always kept. Returns the
    messages to send and how many were dropped. The tokenizer is only asked when the cheap
    byte bound says the prompt might not fit.
    """
    assert messages and messages[-1]["role"] == "user", "the last message must be the user's"
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head):]
    dropped = 0
    while True:
        candidate = head + body
        if byte_bound(candidate) <= max_prompt_tokens:
            return candidate, dropped
        if await count_tokens(candidate) <= max_prompt_tokens:
            return candidate, dropped
        if len(body) == 1:
            raise ContextTooLong(
                "the message is too long for the model's context window "
                f"({max_prompt_tokens} tokens for the prompt); shorten it")
        # Drop the oldest user turn and the answer after it, keeping roles alternating.
        cut = 2 if len(body) > 2 and body[1]["role"] == "assistant" else 1
        body = body[cut:]
        dropped += cut
