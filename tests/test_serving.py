"""Pair sampling and the vLLM supervisor, against the real vLLM server on the embedded model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from prefloop.serving.context import ContextTooLong
from prefloop.serving.sampler import PairProgress, PairSampler, Sampling, SamplingError, Side
from prefloop.serving.vllm_server import Endpoint, VLLMError, VLLMServer, free_port

pytestmark = pytest.mark.slow


def collect(sampler: PairSampler, history: list[dict], seed: int | None = None,
            ) -> list[PairProgress]:
    async def run() -> list[PairProgress]:
        try:
            return [p async for p in sampler.stream(history, seed=seed)]
        finally:
            await sampler.close()
    return asyncio.run(run())


def answer_once(sampler: PairSampler, history: list[dict], seed: int | None = None) -> Side:
    async def run() -> Side:
        try:
            return await sampler.answer(history, seed=seed)
        finally:
            await sampler.close()
    return asyncio.run(run())


def make_sampler(server: VLLMServer, max_model_len: int = 2048, max_tokens: int = 48,
                 system_prompt: str = "") -> PairSampler:
    return PairSampler(server.endpoint, sampling=Sampling(0.9, 0.95, max_tokens),
                       max_model_len=max_model_len, system_prompt=system_prompt)


def test_two_different_answers_for_fixed_seeds(vllm_server):
    history = [{"role": "user", "content": "Give me one tip for staying focused."}]
    snapshots = collect(make_sampler(vllm_server), history, seed=1234)
    final = snapshots[-1]
    assert final.done and final.a.text.strip() and final.b.text.strip()
    assert final.a.text != final.b.text
    assert (final.a.seed, final.b.seed) == (1234, 1235)
    assert final.a.tokens and final.b.tokens and final.first_token_ms <= final.total_ms
    # The answers streamed: some snapshot before the last had partial text.
    assert any(0 < len(s.a.text) < len(final.a.text) or 0 < len(s.b.text) < len(final.b.text)
               for s in snapshots[:-1])
    # (No check that a seed repeats exactly: with prefix caching vLLM's bf16 logits differ in
    # the last bits between a cold and a warm prompt, and sampling can diverge.)


def test_one_answer_without_streaming(vllm_server):
    history = [{"role": "user", "content": "Name a colour."}]
    side = answer_once(make_sampler(vllm_server, max_tokens=12), history, seed=99)
    assert side.policy == "base" and side.seed == 99 and side.text.strip()
    assert side.finish_reason in ("stop", "length") and 0 < side.tokens <= 12


def test_token_count_matches_the_chat_template(vllm_server, embedded_model: Path):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there, how are you today?"}]
    sampler = make_sampler(vllm_server)
    counted = asyncio.run(sampler.count_tokens(messages))
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    expected = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"])
    assert counted == expected


def test_history_is_cut_from_the_oldest_turns(vllm_server):
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"Question {i}: " + "tell me more " * 20},
                    {"role": "assistant", "content": f"Answer {i}: " + "here is more " * 20}]
    history.append({"role": "user", "content": "Now sum it up in one word."})
    sampler = make_sampler(vllm_server, max_model_len=700, max_tokens=16, system_prompt="Hi.")
    final = collect(sampler, history, seed=7)[-1]
    assert final.dropped_messages > 0 and final.dropped_messages % 2 == 0
    assert final.context[0] == {"role": "system", "content": "Hi."}
    assert final.context[-1] == history[-1]
    assert final.context[1:] == history[final.dropped_messages:]
    assert final.a.text and final.b.text


def test_a_message_too_long_for_the_context_is_refused(vllm_server):
    sampler = make_sampler(vllm_server, max_model_len=300, max_tokens=16)
    history = [{"role": "user", "content": "word " * 600}]
    with pytest.raises(ContextTooLong, match="too long"):
        collect(sampler, history)


def test_unreachable_server_is_a_clear_error():
    sampler = PairSampler(Endpoint(f"http://127.0.0.1:{free_port()}", "k"),
                          sampling=Sampling(max_tokens=8), max_model_len=2048)
    with pytest.raises(SamplingError, match="not answering"):
        collect(sampler, [{"role": "user", "content": "hi"}])
    sampler = PairSampler(Endpoint(f"http://127.0.0.1:{free_port()}", "k"),
                          sampling=Sampling(max_tokens=8), max_model_len=2048)
    with pytest.raises(SamplingError, match="not answering"):
        answer_once(sampler, [{"role": "user", "content": "hi"}])


def test_wrong_api_key_is_refused(vllm_server):
    sampler = PairSampler(Endpoint(vllm_server.endpoint.url, "wrong-key"),
                          sampling=Sampling(max_tokens=8), max_model_len=2048)
    with pytest.raises(SamplingError, match="401"):
        collect(sampler, [{"role": "user", "content": "hi"}])
    sampler = PairSampler(Endpoint(vllm_server.endpoint.url, "wrong-key"),
                          sampling=Sampling(max_tokens=8), max_model_len=2048)
    with pytest.raises(SamplingError, match="401"):
        answer_once(sampler, [{"role": "user", "content": "hi"}])


def test_start_failure_reports_the_log_tail(tmp_path: Path):
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    server = VLLMServer(bogus, tmp_path / "run", start_timeout=300)
    with pytest.raises(VLLMError) as info:
        server.start()
    assert "exited" in str(info.value) and "not-a-model" in str(info.value)
    server.stop()
