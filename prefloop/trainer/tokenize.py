"""Turn preference pairs into token ids for DPO.

Each answer becomes one sequence ``prompt tokens + completion tokens``, where the prompt is the
chat template applied to the conversation with the generation prompt (what the server feeds
the model) and the completion is the answer followed by the template's end-of-turn token, so
the model also learns where to stop. Only completion tokens are scored.

Prompt and answer are tokenised as one string and split where the prompt's tokens end. BPE
can merge characters across that boundary (a prompt ending in "\\n" followed by an answer
starting with "\\n" gives one "\\n\\n" token); then the prompt's tokens are no prefix of the
whole, and the completion is tokenised on its own after the prompt's tokens instead, which is
exactly what the model sees when it generates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from prefloop.trainer.data import Message, PreferencePair


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of both answers to one prompt; ``*_start`` indexes the first answer token."""

    chosen_ids: list[int]
    chosen_start: int
    rejected_ids: list[int]
    rejected_start: int

    @property
    def length(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizeStats:
    pairs: int = 0  # pairs kept
    dropped: int = 0  # nothing left to train on after truncation
    prompts_truncated: int = 0  # turns dropped or first tokens cut
    answers_truncated: int = 0  # an answer's end cut to fit max_length
    boundary_merges: int = 0  # a token crossed the prompt/answer boundary (handled)


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Iterable[PreferencePair],
                   max_length: int, max_prompt_length: int | None = None,
                   ) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenise every pair; pairs with nothing left to train on are dropped and counted."""
    if tokenizer.chat_template is None:
        raise ValueError("the model's tokenizer has no chat template; use a chat/instruct model")
    stats = TokenizeStats()
    out = []
    for pair in pairs:
        tokenized = tokenize_pair(tokenizer, pair, max_length, max_prompt_length, stats)
        if tokenized is None:
            stats.dropped += 1
        else:
            out.append(tokenized)
    stats.pairs = len(out)
    return out, stats


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, pair: PreferencePair, max_length: int,
                  max_prompt_length: int | None = None, stats: TokenizeStats | None = None,
                  ) -> TokenizedPair | None:
    """Token ids for one pair, at most ``max_length`` per sequence, or None if nothing is left.

    When prompt plus the longer answer do not fit, the prompt keeps its end: first the oldest
    turns are dropped (a system message stays), then its first tokens are cut. It keeps at
    least ``max_prompt_length`` tokens (default half of ``max_length``) when it has them; the
    answers' ends are cut to fit what remains.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    floor = max_prompt_length if max_prompt_length is not None else max_length // 2
    if not 1 <= floor < max_length:
        raise ValueError(f"max_prompt_length must be from 1 to max_length - 1 ({max_length - 1}),"
                         f" got {floor}")
    stats = stats if stats is not None else TokenizeStats()
    answers = (pair.chosen, pair.rejected)
    longest = max(len(_encode(tokenizer, a)) + 1 for a in answers)  # +1: end of turn
    budget = max(max_length - longest, floor)  # most prompt tokens we can keep

    messages = _drop_oldest_turns(tokenizer, pair.prompt, budget)
    prompt_text = _render(tokenizer, messages, add_generation_prompt=True)
    prompt_ids = _encode(tokenizer, prompt_text)
    completions = []
    for answer in answers:
        ids, merged = _split(tokenizer, prompt_text, prompt_ids,
                             completion_text(tokenizer, messages, prompt_text, answer))
        stats.boundary_merges += merged
        completions.append(ids)

    if len(messages) < len(pair.prompt) or len(prompt_ids) > budget:
        stats.prompts_truncated += 1
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - budget):]  # keep the end
    room = max_length - len(prompt_ids)
    chosen, rejected = (ids[:room] for ids in completions)
    if len(chosen) < len(completions[0]) or len(rejected) < len(completions[1]):
        stats.answers_truncated += 1
    if not chosen or not rejected or chosen == rejected:
        return None
    start = len(prompt_ids)
    return TokenizedPair(prompt_ids + chosen, start, prompt_ids + rejected, start)


def completion_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                    prompt_text: str, answer: str) -> str:
    """The text that follows ``prompt_text``: the answer and the template's end of turn.

    Taken from the template applied to the whole conversation, so each model gets its own
    end-of-turn marker; whitespace after it is dropped (it comes after the model stops).
    """
    conversation = [*messages, Message("assistant", answer)]
    full = _render(tokenizer, conversation, add_generation_prompt=False)
    if full.startswith(prompt_text):
        text = full[len(prompt_text):].rstrip()
    else:  # a template that renders earlier turns differently once an answer follows
        text = answer
    if text.rstrip() == answer.rstrip() and tokenizer.eos_token:
        text += tokenizer.eos_token  # the template marks no end of turn: the model must stop
    return text


def _split(tokenizer: PreTrainedTokenizerBase, prompt_text: str, prompt_ids: list[int],
           completion: str) -> tuple[list[int], bool]:
    """Completion token ids after ``prompt_ids``, and whether a token crossed the boundary."""
    full = _encode(tokenizer, prompt_text + completion)
    if full[:len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids):], False
    # The server feeds prompt_ids as they are and the model produces the answer from there.
    return _encode(tokenizer, completion), True


def _drop_oldest_turns(tokenizer: PreTrainedTokenizerBase, prompt: Sequence[Message],
                       budget: int) -> list[Message]:
    """Drop the oldest turns while the rendered prompt exceeds ``budget`` tokens.

    A system message and the last user message always stay; a dropped user message takes the
    assistant replies after it along, so the conversation still starts with a user turn.
    """
    messages = list(prompt)
    first = 1 if messages[0].role == "system" else 0
    while len(messages) - first > 1:
        rendered = _render(tokenizer, messages, add_generation_prompt=True)
        if len(_encode(tokenizer, rendered)) <= budget:
            break
        del messages[first]
        while messages[first].role == "assistant":  # ends: the last message is a user turn
            del messages[first]
    return messages


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
            add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([m.as_dict() for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The chat template writes special tokens (BOS, <|im_start|>) itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]
