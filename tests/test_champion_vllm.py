"""The champion engine with real vLLM engines (``champion_engine = "merged"``): a plain vLLM
serving base, then the switch to a merged adapter under a stream of pairs with 0 failed
requests; the merged engine's greedy answer starts as the LoRA engine's does; its start
time and memory are reported. The session's vLLM is the LoRA replica.

Written for issue 15 Part B and NOT YET RUN (the machine it was written on had no CPU to
spare for more vLLM engines); tests/test_champion.py runs the same logic on stand-ins."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from prefloop.names import BASE
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.champion import ChampionEngine
from prefloop.serving.merged import ensure_merged
from prefloop.serving.sampler import PairSampler, Sampling, SamplingError
from prefloop.serving.vllm_server import Endpoint, VLLMServer
from tests.conftest import START_TIMEOUT, wait_for
from tests.test_merged import train_adapter

pytestmark = pytest.mark.slow


def greedy(endpoint: Endpoint, model: str, max_tokens: int = 8) -> dict:
    reply = httpx.post(endpoint.v1 + "/chat/completions", timeout=300,
                       headers={"Authorization": f"Bearer {endpoint.api_key}"},
                       json={"model": model, "temperature": 0, "max_tokens": max_tokens,
                             "seed": 0, "logprobs": True, "top_logprobs": 1,
                             "messages": [{"role": "user",
                                           "content": "Name the capital of Italy."}]})
    reply.raise_for_status()
    return reply.json()["choices"][0]


def test_a_switch_to_a_merged_champion_under_load(vllm_server, embedded_model: Path,
                                                  tmp_path: Path, own_vllm_turn) -> None:
    adapter = tmp_path / "adapters" / "v0001"
    train_adapter(embedded_model, adapter)
    pool = AdapterPool(vllm_server.endpoint, embedded_model, 16, prefix="champ")
    pool.load("v0001", adapter)
    wanted = [BASE]

    def launch(model: Path, served: str, slot: str) -> VLLMServer:
        return VLLMServer(model, tmp_path / "logs", memory_fraction=0.1, lora=False,
                          served_name=served, name=f"vllm-champion-{slot}",
                          start_timeout=START_TIMEOUT)

    def model_for(policy: str) -> Path:
        return embedded_model if policy == BASE else ensure_merged(
            policy, adapter, embedded_model, tmp_path / "merged")

    engine = ChampionEngine(launch, lambda: wanted[0], model_for, pool.served_name,
                            merged_dir=tmp_path / "merged")
    pool.champion_engine = engine
    sampler = PairSampler(pool.replicas, sampling=Sampling(0.8, 0.95, 24), max_model_len=2048,
                          model_name=pool.served_name, champion=engine)
    stop, counts = threading.Event(), {"pairs": 0, "failed": 0}

    def pairs() -> None:
        """Sample pairs of the champion, one after another, until told to stop."""
        async def run() -> None:
            while not stop.is_set():
                try:
                    async for _ in sampler.stream([{"role": "user", "content": "Hi!"}],
                                                  wanted[0], wanted[0]):
                        pass
                    counts["pairs"] += 1
                except SamplingError:
                    counts["failed"] += 1
            await sampler.close()
        asyncio.run(run())

    engine.start()
    try:
        wait_for(lambda: engine.summary()["policy"] == BASE, START_TIMEOUT,
                 "the plain engine to serve base")
        burst = threading.Thread(target=pairs)
        burst.start()
        wait_for(lambda: counts["pairs"] >= 2, START_TIMEOUT, "pairs from the plain engine")
        wanted[0] = "v0001"  # crowned: merge, start green, answer, switch, drain blue
        wait_for(lambda: engine.summary()["policy"] == "v0001", START_TIMEOUT,
                 "the merged engine to take the traffic")
        wait_for(lambda: len(engine.rows()) == 1, START_TIMEOUT, "blue to drain and stop")
        before = counts["pairs"]
        wait_for(lambda: counts["pairs"] >= before + 2, START_TIMEOUT, "pairs after it")
        stop.set()
        burst.join(timeout=300)
        assert counts["failed"] == 0, counts

        [row] = engine.rows()
        assert row["policy"] == "v0001" and row["name"] == "champion-green"
        assert row["start_seconds"] > 0 and row["memory_bytes"] > 100_000_000
        assert engine.summary()["failed_switches"] == 0
        # The merged engine answers as the LoRA engine does (the first greedy token: later
        # tokens may part on a near-tie, the kernels differ).
        plain = engine.current.replica.endpoint  # type: ignore[union-attr]
        merged = greedy(plain, "champ-v0001")
        lora = greedy(vllm_server.endpoint, "champ-v0001")
        assert merged["logprobs"]["content"][0]["token"] \
            == lora["logprobs"]["content"][0]["token"], (merged, lora)
        # It serves the champion alone: base is not its to answer.
        with pytest.raises(httpx.HTTPStatusError):
            greedy(plain, BASE)
    finally:
        stop.set()
        engine.close()
        pool.unload("v0001")
        pool.close()
