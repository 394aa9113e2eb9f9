"""Two of n candidates shown (``pair_candidates``): the choice by hand, and the sampler on
stand-in servers (tests/openai_stub.py: it scores answer i's implicit reward as the test
sets it) through the API, with a champion engine, and against a server that is not vLLM.
The real vLLM on a trained adapter is in test_loop.py (it shares that module's round)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from prefloop.config import ConfigError, load_settings
from prefloop.serving.candidates import furthest_apart
from prefloop.serving.sampler import PairProgress, PairSampler, Sampling, SamplingError
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Store
from tests.openai_stub import stub_server
from tests.test_champion import Rig

ANSWERS = ["Apples are red.", "Bananas are yellow.", "Cherries are dark.", "Dates are sweet."]


def test_the_highest_meets_the_lowest_in_sample_order() -> None:
    assert furthest_apart([0.3, -1.2, 2.0, 0.1]) == (1, 2)   # lowest 1, highest 2
    assert furthest_apart([2.0, 0.5, -0.4]) == (0, 2)
    assert furthest_apart([-3.0, 1.0]) == (0, 1)             # two: those two, as sampled
    assert furthest_apart([0.0, 0.0, 0.0, 0.0]) == (0, 1)    # base: nothing to choose by
    assert furthest_apart([1.0, 1.0, -2.0, -2.0]) == (0, 2)  # ties: the earliest


def test_candidates_are_a_setting_with_bounds() -> None:
    assert load_settings(env={}).pair_candidates == 2  # streams, as before
    assert load_settings(env={}, overrides={"pair_candidates": "4"}).pair_candidates == 4
    assert load_settings(env={"PREFLOOP_PAIR_CANDIDATES": "3"}).pair_candidates == 3
    for bad in ("1", "17", "four"):
        with pytest.raises(ConfigError, match="^--pair-candidates: expected an integer"):
            load_settings(env={}, overrides={"pair_candidates": bad})
    with pytest.raises(AssertionError, match="two answers"):
        Sampling(candidates=1)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """The app over one stand-in LoRA replica (and champion engines it may start), its
    sampler choosing two of four; v0001 is the champion, served by the replica."""
    with stub_server() as lora:
        lora.answers, lora.rewards = list(ANSWERS), [0.3, -1.2, 2.0, 0.1]
        rig = Rig(tmp_path, lora)
        rig.sampler.sampling = replace(rig.sampler.sampling, candidates=4)
        rig.crown("v0001")
        yield rig
        rig.close()


def stream(sampler: PairSampler, policy: str, seed: int) -> list[PairProgress]:
    async def run() -> list[PairProgress]:
        try:
            return [p async for p in sampler.stream([{"role": "user", "content": "Fruit?"}],
                                                    policy, policy, seed=seed)]
        finally:
            await sampler.close()
    return asyncio.run(run())


def test_an_adapters_turn_shows_the_two_furthest_apart(rig: Rig) -> None:
    [final] = stream(rig.sampler, "v0001", seed=0)  # one snapshot, complete
    assert final.done and final.first_token_ms == final.total_ms
    assert final.rewards == pytest.approx([0.3, -1.2, 2.0, 0.1])
    assert [c.seed for c in final.candidates] == [0, 1, 2, 3]
    assert (final.a.text, final.b.text) == (ANSWERS[1], ANSWERS[2])  # lowest, highest
    assert (final.a.seed, final.b.seed) == (1, 2)
    [request] = rig.lora.requests
    assert request["n"] == 4 and not request.get("stream")
    # Scored under the adapter and under base, each of the four.
    assert rig.lora.hits["/v1/completions"] == 8


def test_base_and_duels_stream_two_as_before(rig: Rig) -> None:
    snapshots = stream(rig.sampler, "base", seed=0)
    assert len(snapshots) > 1 and snapshots[-1].candidates == snapshots[-1].rewards == ()
    assert [body["n"] for body in rig.lora.requests] == [2]
    assert rig.lora.hits["/v1/completions"] == 0


def test_the_chosen_pair_is_what_the_api_stores(rig: Rig) -> None:
    rig.start()  # a champion engine for v0001: a turn with candidates still goes to LoRA
    with TestClient(rig.app) as http:
        reply = http.post("/api/v1/pairs", json={"message": "Name a fruit.", "seed": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["a"]["text"], body["b"]["text"]) == (ANSWERS[1], ANSWERS[2])
    assert len(rig.engines[-1].stub.requests) == 1  # only the engine's own start-up check
    with Store(rig.settings.db_path) as store:
        pair = store.pair(body["pair_id"])
    assert (pair["policy_a"], pair["policy_b"]) == ("v0001", "v0001")
    assert pair["sampling"]["candidates"] == 4


def test_a_server_without_token_ids_is_a_clear_error(tmp_path: Path) -> None:
    with stub_server() as old:
        old.adapters["prefloop-v0001"] = str(tmp_path)
        old.token_ids = False
        sampler = PairSampler(Endpoint(old.url, "key"), sampling=Sampling(candidates=4),
                              max_model_len=2048)
        with pytest.raises(SamplingError, match="token ids"):
            stream(sampler, "v0001", seed=0)
