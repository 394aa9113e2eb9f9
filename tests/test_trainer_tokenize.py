"""Tokenisation for DPO on the embedded model's tokenizer (ChatML, <|im_end|> = id 2)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from prefloop.trainer.data import Message, PreferencePair
from prefloop.trainer.tokenize import TokenizeStats, tokenize_pair, tokenize_pairs

IM_END = 2


@pytest.fixture(scope="module")
def tokenizer(embedded_model: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(embedded_model)


def _pair(prompt: str | list[Message], chosen: str = "Hello!", rejected: str = "Go away.",
          ) -> PreferencePair:
    messages = (Message("user", prompt),) if isinstance(prompt, str) else tuple(prompt)
    return PreferencePair(messages, chosen, rejected)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_is_the_template_and_answer_ends_with_end_of_turn(tokenizer) -> None:
    stats = TokenizeStats()
    pair = tokenize_pair(tokenizer, _pair("Hi there"), max_length=512, stats=stats)
    prompt = _prompt_ids(tokenizer, [{"role": "user", "content": "Hi there"}])
    assert pair.chosen_start == pair.rejected_start == len(prompt)
    assert pair.chosen_ids[:len(prompt)] == pair.rejected_ids[:len(prompt)] == prompt
    assert tokenizer.decode(pair.chosen_ids[pair.chosen_start:]) == "Hello!<|im_end|>"
    assert tokenizer.decode(pair.rejected_ids[pair.rejected_start:]) == "Go away.<|im_end|>"
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == IM_END
    assert stats == TokenizeStats(boundary_merges=0)


def test_token_merge_at_the_boundary(tokenizer) -> None:
    # The prompt ends "assistant\n"; an answer starting "\n\n" merges with that "\n" into one
    # token when the two are tokenised together, so the prompt is no prefix of the whole.
    prompt = _prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    text = tokenizer.decode(prompt) + "\n\nHello!<|im_end|>"
    assert tokenizer(text, add_special_tokens=False)["input_ids"][:len(prompt)] != prompt

    stats = TokenizeStats()
    pair = tokenize_pair(tokenizer, _pair("Hi", chosen="\n\nHello!"), 512, stats=stats)
    assert stats.boundary_merges == 1
    # The prompt stays exactly what the server feeds; the answer follows it, complete.
    assert pair.chosen_ids[:pair.chosen_start] == prompt
    assert tokenizer.decode(pair.chosen_ids[pair.chosen_start:]) == "\n\nHello!<|im_end|>"


@pytest.mark.parametrize("answer", [" Leading space", "Trailing spaces  ", "émoji 🎉 ok",
                                    "ends with newline\n"])
def test_answer_text_survives(tokenizer, answer: str) -> None:
    pair = tokenize_pair(tokenizer, _pair("Hi", chosen=answer), 512)
    assert tokenizer.decode(pair.chosen_ids[pair.chosen_start:]) == answer + "<|im_end|>"


def test_long_conversation_drops_oldest_turns(tokenizer) -> None:
    prompt = [Message("system", "Be brief."), Message("user", "FIRST " * 60),
              Message("assistant", "reply " * 60), Message("user", "Last question?")]
    stats = TokenizeStats()
    pair = tokenize_pair(tokenizer, _pair(prompt, "Yes.", "No."), max_length=64, stats=stats)
    text = tokenizer.decode(pair.chosen_ids)
    assert "Be brief." in text and "Last question?" in text
    assert "FIRST" not in text and "reply" not in text
    assert text.endswith("<|im_start|>assistant\nYes.<|im_end|>")
    assert stats.prompts_truncated == 1 and stats.answers_truncated == 0


def test_long_message_keeps_its_end(tokenizer) -> None:
    message = "START " + "filler " * 300 + "END?"
    stats = TokenizeStats()
    pair = tokenize_pair(tokenizer, _pair(message, "Yes.", "No."), max_length=64, stats=stats)
    prompt = tokenizer.decode(pair.chosen_ids[:pair.chosen_start])
    assert len(pair.chosen_ids) <= 64 and len(pair.rejected_ids) <= 64
    assert "START" not in prompt and prompt.endswith("END?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(pair.chosen_ids[pair.chosen_start:]) == "Yes.<|im_end|>"
    assert stats.prompts_truncated == 1


def test_long_answer_is_cut_to_max_length(tokenizer) -> None:
    long_answer = "word " * 200
    full = tokenize_pair(tokenizer, _pair("Hi", long_answer), max_length=4096)
    stats = TokenizeStats()
    cut = tokenize_pair(tokenizer, _pair("Hi", long_answer), max_length=96, stats=stats)
    assert len(cut.chosen_ids) == 96
    assert cut.chosen_ids == full.chosen_ids[:96]  # the answer's end is cut, the prompt kept
    assert cut.chosen_start == full.chosen_start
    assert cut.rejected_ids == full.rejected_ids  # the short answer is untouched
    assert stats.answers_truncated == 1 and stats.prompts_truncated == 0


def test_long_prompt_and_long_answer_share_the_budget(tokenizer) -> None:
    pair = tokenize_pair(tokenizer, _pair("question " * 200, "answer " * 200), max_length=100,
                         max_prompt_length=40)
    assert pair.chosen_start == 40 and len(pair.chosen_ids) == 100


def test_pair_with_nothing_left_is_dropped(tokenizer) -> None:
    # The answers differ only after the first 200 words: cut to 64 tokens they are the same.
    same_start = "word " * 200
    pairs = [_pair("Hi", same_start + "yes", same_start + "no"), _pair("Hi")]
    kept, stats = tokenize_pairs(tokenizer, pairs, max_length=64)
    assert len(kept) == 1 and stats.pairs == 1 and stats.dropped == 1


def test_bad_lengths(tokenizer) -> None:
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tokenize_pair(tokenizer, _pair("Hi"), max_length=1)
    with pytest.raises(ValueError, match="max_prompt_length must be from 1 to"):
        tokenize_pair(tokenizer, _pair("Hi"), max_length=64, max_prompt_length=64)


def test_tokenizer_without_chat_template(tokenizer) -> None:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_pairs(plain, [_pair("Hi")], max_length=64)
