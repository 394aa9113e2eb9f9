"""The KL probe: its arithmetic by hand, its settings and storage, and base against itself
through the real vLLM. A trained adapter's KL and the budget are in test_loop.py (they share
its trained round)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
from pathlib import Path

import httpx
import pytest
from sqlite_utils import Database
from starlette.testclient import TestClient

from prefloop.app.loop_tabs import LoopHandlers
from prefloop.app.server import create_app
from prefloop.config import ConfigError, Settings, load_settings
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.kl_probe import (
    PROBE_PROMPTS,
    KLProbe,
    KLProbeError,
    KLReport,
    ProbeAnswer,
    answer_kl,
    kl_estimate,
    probe_prompts,
)
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.migrations import migrations
from prefloop.storage.store import Answer, Store

# -- the arithmetic -----------------------------------------------------------------------------


def test_kl_by_hand() -> None:
    """Two answers: (-1 + 1.5) + (-2 + 2.5) = 1.0 and (-0.5 + 0.25) = -0.25 nats; per answer
    (1.0 - 0.25) / 2 = 0.375, per token (1.0 - 0.25) / 3 tokens = 0.25."""
    policy = [[-1.0, -2.0], [-0.5]]
    base = [[-1.5, -2.5], [-0.25]]
    assert answer_kl(policy[0], base[0]) == 1.0 and answer_kl(policy[1], base[1]) == -0.25
    assert kl_estimate(policy, base) == (0.375, 0.25)


def test_kl_is_zero_against_itself_and_the_two_units_agree() -> None:
    policy = [[-0.1 * k - 0.01 * t for t in range(k + 1)] for k in range(7)]
    assert kl_estimate(policy, policy) == (0.0, 0.0)
    shifted = [[lp - 0.3 for lp in answer] for answer in policy]  # base 0.3 nats below
    per_answer, per_token = kl_estimate(policy, shifted)
    tokens = sum(len(a) for a in policy)
    assert math.isclose(per_token, 0.3) and math.isclose(per_answer * 7, per_token * tokens)


def test_relevance_by_hand() -> None:
    """Base's log-probs of two answers after their own prompts (-1 - 2 and -0.5) and after
    other prompts (-4 and -1.5): (-3.5 - -5.5) / 3 tokens = 2/3 nats per token."""
    answers = (ProbeAnswer("p", 0, "a", "stop", (-1.0, -2.0), (-1.0, -2.0), -4.0),
               ProbeAnswer("q", 1, "b", "stop", (-0.5,), (-0.5,), -1.5))
    report = KLReport("base", answers, 16, 0.1)
    assert math.isclose(report.relevance, 2 / 3) and report.per_token == 0.0
    assert report.as_dict()["relevance"] == report.relevance
    assert report.as_dict()["base_relevance"] is None  # not compared with base here
    # An answer that would do for any question: as likely after another prompt, 0.
    same = (ProbeAnswer("p", 0, "a", "stop", (-1.0,), (-1.0,), -1.0),) * 2
    assert KLReport("v0001", same, 16, 0.1).relevance == 0.0
    # One prompt only: nothing to compare with, not measured.
    alone = (ProbeAnswer("p", 0, "a", "stop", (-1.0,), (-1.0,)),)
    assert KLReport("v0001", alone, 16, 0.1).relevance is None


def test_probe_prompts_repeat_with_new_seeds() -> None:
    many = probe_prompts(len(PROBE_PROMPTS) + 2)
    assert [seed for _, seed in many] == list(range(len(PROBE_PROMPTS) + 2))
    assert many[len(PROBE_PROMPTS)][0] == many[0][0] == PROBE_PROMPTS[0]
    assert len(set(PROBE_PROMPTS)) == len(PROBE_PROMPTS)


# -- settings and storage ---------------------------------------------------------------------


@pytest.mark.parametrize("env, named", [
    ({"PREFLOOP_MAX_KL": "-0.1"}, "PREFLOOP_MAX_KL: expected a number from 0 to 100"),
    ({"PREFLOOP_MAX_KL": "inf"}, "PREFLOOP_MAX_KL"),
    ({"PREFLOOP_KL_PROBE_PROMPTS": "-1"}, "PREFLOOP_KL_PROBE_PROMPTS: expected an integer"),
    ({"PREFLOOP_KL_PROBE_PROMPTS": "2.5"}, "PREFLOOP_KL_PROBE_PROMPTS"),
    ({"PREFLOOP_KL_PROBE_PROMPTS": "0"}, r"max_kl \(0.2\) needs the KL probe"),
    ({"PREFLOOP_MIN_RELEVANCE": "-0.5"}, "PREFLOOP_MIN_RELEVANCE: expected a number from 0 to 10"),
    ({"PREFLOOP_MIN_RELEVANCE": "nan"}, "PREFLOOP_MIN_RELEVANCE"),
    ({"PREFLOOP_KL_PROBE_PROMPTS": "1"},
     r"min_relevance \(0.5\) needs the KL probe with two prompts or more"),
    ({"PREFLOOP_MAX_KL": "0", "PREFLOOP_KL_PROBE_PROMPTS": "0"},
     r"min_relevance \(0.5\) needs the KL probe"),
])
def test_bad_kl_settings_are_refused_by_name(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(env=env)


def test_kl_settings_defaults_and_switching_off() -> None:
    settings = Settings()
    assert (settings.max_kl, settings.kl_probe_prompts, settings.min_relevance) == \
        (0.2, 16, 0.5)
    off = load_settings(env={"PREFLOOP_MAX_KL": "0", "PREFLOOP_KL_PROBE_PROMPTS": "0",
                             "PREFLOOP_MIN_RELEVANCE": "0"})
    assert (off.max_kl, off.kl_probe_prompts, off.min_relevance) == (0.0, 0, 0.0)


def test_store_keeps_the_kl_of_adapters_and_rounds(tmp_path: Path) -> None:
    with Store(tmp_path / "prefloop.db") as store:
        round_id = store.start_round("admin")
        report = {"policy": "v0001", "per_token": 0.05, "per_answer": 1.6, "samples": []}
        store.update_round(round_id, status="succeeded", adapter="v0001", kl=report)
        store.add_adapter("v0001", tmp_path, round_id, "base", kl_per_token=0.05,
                          kl_per_answer=1.6)
        store.add_adapter("v0002", tmp_path, None, "v0001")  # not measured
        assert store.round(round_id)["kl"] == report
        assert (store.adapter("v0001")["kl_per_token"],
                store.adapter("v0001")["kl_per_answer"]) == (0.05, 1.6)
        assert store.adapter("v0002")["kl_per_token"] is None


def test_the_kl_migration_applies_to_an_existing_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = Database(sqlite3.connect(path))
    migrations.apply(old, stop_before="m005_kl_probe")
    old["adapters"].insert({"name": "v0001", "state": "champion", "path": str(tmp_path),
                            "created_at": "2026-01-01T00:00:00.000+00:00"})
    old.close()
    with Store(path) as store:
        assert migrations.pending(store.db) == []
        assert store.adapter("v0001")["kl_per_token"] is None  # measured before the probe
        assert store.adapter("v0001")["kl_per_answer"] is None


# -- shown: API, leaderboard, Training tab ---------------------------------------------------


def test_every_adapters_kl_is_shown_and_base_is_zero(tmp_path: Path) -> None:
    dead = Endpoint("http://127.0.0.1:9", "x")
    settings = Settings(data_dir=tmp_path, rating_resamples=20)
    with Store(settings.db_path) as store:
        pool = AdapterPool(dead, None, 16)
        loop = Loop(settings, store, pool, base_model=tmp_path)
        round_id = store.start_round("admin")
        store.update_round(round_id, status="succeeded", adapter="v0001",
                           kl={"policy": "v0001", "per_token": 0.0514, "per_answer": 2.1,
                               "answers": 16, "tokens": 654, "samples": [{"text": "Hi"}]})
        store.add_adapter("v0001", tmp_path, round_id, "base", kl_per_token=0.0514,
                          kl_per_answer=2.1)
        store.add_adapter("v0002", tmp_path, None, "v0001")  # from before the probe
        for policy_a, choice in [("v0001", "a"), ("base", "a"), ("v0002", "b")] * 2:
            pair = store.add_pair(store.create_conversation(), [{"role": "user",
                                                                 "content": "Hi"}],
                                  Answer(policy_a, "one", 1),
                                  Answer("base" if policy_a != "base" else "v0001", "two", 2),
                                  kind="duel")
            store.vote(pair, choice)
        sampler = PairSampler(dead, sampling=Sampling(0.8, 0.95, 16), max_model_len=2048)
        with TestClient(create_app(settings, store, sampler, loop, None)) as client:
            adapters = client.get("/api/v1/adapters").json()["adapters"]
            standings = client.get("/api/v1/leaderboard").json()["standings"]
            [summary] = client.get("/api/v1/rounds").json()["rounds"]
        assert [(a["name"], a["kl_per_token"], a["kl_per_answer"]) for a in adapters] == \
            [("v0001", 0.0514, 2.1), ("v0002", None, None)]
        assert {s["policy"]: s["kl_per_token"] for s in standings} == \
            {"base": 0.0, "v0001": 0.0514, "v0002": None}
        assert summary["kl"]["per_token"] == 0.0514 and "samples" not in summary["kl"]
        handlers = LoopHandlers(loop, None)
        board = {r["policy"]: r["KL/token"]
                 for r in handlers.leaderboard_view().table.to_dict("records")}
        assert board == {"base": "0.000", "v0001": "0.051", "v0002": "–"}
        [row] = handlers.training_view().rounds.to_dict("records")
        assert row["KL/token"] == "0.051"
        pool.close()


# -- the probe through vLLM ---------------------------------------------------------------------


class _FakePool:
    """Just what the loop's KL check touches of an AdapterPool."""

    def endpoint_for(self, policy: str) -> Endpoint:
        return Endpoint("http://127.0.0.1:9", "x")

    def served_name(self, policy: str) -> str:
        return policy

    def using(self, policy: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class _FakeProbe:
    """Reports of a given relevance per token (one 2-token answer each, KL 0)."""

    def __init__(self, candidate: float, base: float | Exception) -> None:
        self.candidate, self.base = candidate, base

    @staticmethod
    def _report(policy: str, relevance: float) -> KLReport:
        return KLReport(policy, (
            ProbeAnswer("p", 0, "a", "stop", (-1.0, -1.0), (-1.0, -1.0), -2.0 - relevance),
            ProbeAnswer("q", 1, "b", "stop", (-1.0, -1.0), (-1.0, -1.0), -2.0 - 3 * relevance)),
            16, 0.1)

    def measure_blocking(self, policy: str) -> KLReport:
        return self._report(policy, self.candidate)

    def base_blocking(self) -> KLReport:
        if isinstance(self.base, Exception):
            raise self.base
        return self._report("base", self.base)


@pytest.mark.parametrize("floor, candidate, base, reason", [
    (0.5, 0.6, 1.0, None),            # keeps 60% of base's: above the floor
    (0.5, 0.4, 1.0, "relevance 0.40 nats/token under min_relevance 0.5 of base's 1.00: "
                    "answers that would do for any question"),
    (0.5, -0.1, 0.8, "relevance -0.10 nats/token under min_relevance 0.5 of base's 0.80"),
    (0.0, -0.1, 0.8, None),           # no floor: recorded only
    (0.5, 0.9, KLProbeError("vLLM down"), "relevance not compared with base's: vLLM down"),
])
def test_the_relevance_floor_decides_by_the_share_of_bases(
        tmp_path: Path, floor: float, candidate: float, base: float | Exception,
        reason: str | None) -> None:
    settings = Settings(data_dir=tmp_path, min_relevance=floor)
    with Store(settings.db_path) as store:
        loop = Loop(settings, store, _FakePool(), tmp_path / "model")
        loop.kl_probe = _FakeProbe(candidate, base)
        report, refused = loop._check_kl(store.start_round("admin"), "v0001")
    assert math.isclose(report.relevance, candidate)
    if reason is None:
        assert refused is None
    else:
        assert refused is not None and refused.startswith(reason), refused
    if floor and not isinstance(base, Exception):
        assert report.as_dict()["base_relevance"] == pytest.approx(base)  # kept on the round


def test_a_probe_without_a_model_server_says_so() -> None:
    probe = KLProbe(Endpoint("http://127.0.0.1:9", "x"), prompts=2, max_tokens=8)
    with pytest.raises(KLProbeError, match="did not answer the KL probe"):
        probe.measure_blocking("v0001")


@pytest.mark.slow
def test_base_against_itself_is_exactly_zero(vllm_server) -> None:
    probe = KLProbe(vllm_server.endpoint, prompts=4, max_tokens=16)
    report = probe.measure_blocking("base")
    assert report.per_token == 0.0 and report.per_answer == 0.0
    assert len(report.answers) == 4 and report.tokens >= 4
    for answer in report.answers:
        assert 1 <= answer.tokens <= 16 and answer.text.strip()
        assert all(lp <= 0 for lp in answer.policy_logprobs), answer
        assert answer.policy_logprobs == answer.base_logprobs and answer.kl == 0.0
    figures = report.as_dict()
    assert (figures["answers"], figures["tokens"]) == (4, report.tokens)
    assert [s["seed"] for s in figures["samples"]] == [0, 1, 2, 3]
    # Base's answers depend on their question: likelier after their own prompt.
    assert report.relevance > 0 and figures["relevance"] == report.relevance
    # Seeded: the same answers again.
    again = probe.measure_blocking("base")
    assert [a.text for a in again.answers] == [a.text for a in report.answers]


@pytest.mark.slow
def test_prompt_logprobs_beside_other_requests_leave_vllm_running(vllm_server) -> None:
    """With LoRA on vLLM's output layer, prompt log-probs batched with any other request
    killed vLLM 0.32's CPU engine; prefloop's vLLM keeps LoRA to the blocks."""
    endpoint = vllm_server.endpoint
    probe = KLProbe(endpoint, prompts=4, max_tokens=16)

    async def chat(client: httpx.AsyncClient, k: int) -> int:
        response = await client.post("/chat/completions", json={
            "model": "base", "seed": k, "max_tokens": 24,
            "messages": [{"role": "user", "content": f"Count to {k + 3}."}]})
        return response.status_code

    async def together() -> list:
        async with httpx.AsyncClient(base_url=endpoint.v1, timeout=300,
                                     headers={"Authorization": f"Bearer {endpoint.api_key}"}
                                     ) as client:
            return await asyncio.gather(probe.measure("base"),
                                        *(chat(client, k) for k in range(6)))

    report, *codes = asyncio.run(together())
    assert codes == [200] * 6 and report.per_token == 0.0
    assert vllm_server.healthy() and vllm_server.restarts == 0


def test_prefloops_vllm_keeps_lora_off_the_output_layer(tmp_path: Path) -> None:
    from prefloop.serving.vllm_server import VLLMServer
    from prefloop.trainer.settings import DEFAULT_TARGET_MODULES

    command = VLLMServer(tmp_path / "model", tmp_path / "run").command()
    start = command.index("--lora-target-modules") + 1
    assert tuple(command[start:start + len(DEFAULT_TARGET_MODULES)]) == DEFAULT_TARGET_MODULES
    assert "lm_head" not in command
    assert "--lora-target-modules" not in VLLMServer(tmp_path / "model", tmp_path / "run",
                                                     lora=False).command()
