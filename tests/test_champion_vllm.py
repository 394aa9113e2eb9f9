"""The champion engine with a real vLLM (``champion_engine = "merged"``): a crowned adapter
merged into the weights and served by a plain vLLM (no LoRA) under the adapter's name; its
greedy answer starts as the merged model's does in transformers (fp32 both); it serves
nothing else; its start time and memory are reported.

One plain engine, started on the merged champion, and no session vLLM: each vLLM start
costs a minute or more of the suite's time on two cores. Routing the champion's pairs to it
and the blue-green switch (start, health, one answer, traffic, drain) are
tests/test_champion.py's, on stand-in servers; bench/champion.py runs the switch under load
on real engines (0 failed requests, docs/BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from prefloop.names import BASE
from prefloop.serving.champion import ChampionEngine
from prefloop.serving.merged import ensure_merged
from prefloop.serving.vllm_server import Endpoint, VLLMServer
from tests.conftest import START_TIMEOUT, memory_share, wait_for
from tests.test_merged import train_adapter

pytestmark = pytest.mark.slow

QUESTION = "Name the capital of Italy."
# Host memory each plain engine may reserve. vLLM's CPU worker must hold the fp32 model and
# its warm-up (RSS 1.65 GiB measured) inside its share and a KV cache beside it; a fixed
# fraction of 0.1 failed to start where vLLM counted 17.2 GiB of memory ("requested memory
# for kv -0.04/1.61 GiB"), so the fraction is worked out from this machine's memory.
ENGINE_GIB = 3.0


def greedy(endpoint: Endpoint, model: str, max_tokens: int = 8) -> dict:
    reply = httpx.post(endpoint.v1 + "/chat/completions", timeout=300,
                       headers={"Authorization": f"Bearer {endpoint.api_key}"},
                       json={"model": model, "temperature": 0, "max_tokens": max_tokens,
                             "seed": 0, "logprobs": True, "top_logprobs": 1,
                             "return_tokens_as_token_ids": True,
                             "messages": [{"role": "user", "content": QUESTION}]})
    reply.raise_for_status()
    return reply.json()["choices"][0]


def first_token(model: Path) -> str:
    """The greedy first token of the merged model's answer, in transformers (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(ids).logits
    return f"token_id:{int(logits[0, -1].argmax())}"  # as vLLM names it (see greedy)


def test_a_merged_champion_is_served_by_a_plain_engine(
        embedded_model: Path, tmp_path: Path, own_vllm_turn) -> None:
    adapter = tmp_path / "adapters" / "v0001"
    train_adapter(embedded_model, adapter)

    def launch(model: Path, served: str, slot: str) -> VLLMServer:
        return VLLMServer(model, tmp_path / "logs", lora=False,
                          memory_fraction=memory_share(ENGINE_GIB, most=0.3),
                          served_name=served, name=f"vllm-champion-{slot}",
                          start_timeout=START_TIMEOUT, dtype="float32")

    def model_for(policy: str) -> Path:
        return embedded_model if policy == BASE else ensure_merged(
            policy, adapter, embedded_model, tmp_path / "merged")

    engine = ChampionEngine(launch, lambda: "v0001", model_for, lambda p: f"champ-{p}",
                            merged_dir=tmp_path / "merged")
    engine.start()
    try:
        wait_for(lambda: engine.summary()["policy"] == "v0001"
                 or engine.summary()["failed_switches"], START_TIMEOUT,
                 "the merged engine to take the champion's traffic, or fail to start")
        assert engine.summary()["failed_switches"] == 0, engine.summary()["error"]
        [row] = engine.rows()
        assert row["policy"] == "v0001" and row["up"] and row["name"] == "champion-blue"
        assert row["start_seconds"] > 0 and row["memory_bytes"] > 100_000_000
        plain = engine.current.replica.endpoint  # type: ignore[union-attr]
        answer = greedy(plain, "champ-v0001")
        merged = engine.current.model  # type: ignore[union-attr]
        assert answer["logprobs"]["content"][0]["token"] == first_token(merged), answer
        # It serves the champion alone: base is not its to answer.
        with pytest.raises(httpx.HTTPStatusError):
            greedy(plain, BASE)
    finally:
        engine.close()
