"""The champion engine (``champion_engine = "merged"``) on stand-in servers
(``tests/openai_stub.py``) in place of vLLM: the champion's own turns go to the plain engine,
duels to the LoRA replica; the blue-green switch loses no request (the old engine drains,
then stops); a failed start leaves the traffic where it was and shows in status and
/metrics; a plain engine that dies hands its turns to the LoRA replica. Nothing here starts
a real vLLM: tests/test_champion_vllm.py serves a merged adapter on one, and
bench/champion.py runs the switch under load (docs/BENCHMARKS.md)."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from prefloop.app.server import create_app
from prefloop.config import ConfigError, Settings, load_settings
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.champion import ChampionEngine
from prefloop.serving.replicas import Replica
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint, VLLMError, group_rss
from prefloop.storage.store import NotFound, Store
from tests.conftest import wait_for
from tests.openai_stub import StubServer, stub_server
from tests.test_replicas import make_adapter

DEADLINE = 60.0  # seconds; the engine's thread looks every 0.05 s, so only a hang nears it


class StubEngine:
    """A champion engine on a stand-in server serving ``served``: healthy as soon as it
    listens. ``fail``: start() raises it, as a vLLM that cannot start does; ``chat_status``:
    every chat completion gets it (a model that fails to run)."""

    def __init__(self, model: Path, served: str, slot: str, fail: str | None = None,
                 chat_status: int = 200) -> None:
        self.model, self.served, self.slot, self.fail = model, served, slot, fail
        self.chat_status = chat_status
        self.stub: StubServer | None = None
        self.stopped = threading.Event()
        self.pid = None

    def start(self) -> Endpoint:
        if self.fail:
            raise VLLMError(self.fail)
        self.stub = StubServer()
        self.stub.model_name = self.served
        self.stub.chat_status = self.chat_status
        threading.Thread(target=self.stub.serve_forever, daemon=True).start()
        return Endpoint(self.stub.url, "key")

    def stop(self) -> None:
        if self.stub is not None and not self.stub.dead.is_set():
            self.stub.kill()
        self.stopped.set()


class Rig:
    """The app as ``prefloop serve --champion-engine merged`` builds it, over one stand-in
    LoRA replica and stand-in champion engines."""

    def __init__(self, tmp_path: Path, lora: StubServer) -> None:
        self.tmp_path, self.lora = tmp_path, lora
        self.settings = Settings(
            data_dir=tmp_path / "data", duel_share=0.0, baseline_share=0.0,
            pairs_per_minute=0, votes_per_minute=0, client_generations=64,
            kl_probe_prompts=0, max_kl=0.0, min_relevance=0.0, max_tokens=16,
            champion_engine="merged")
        self.store = Store(self.settings.db_path)
        self.pool = AdapterPool([Replica("external-1", Endpoint(lora.url, "key"))], None, 16,
                                watch_every=0.05)
        self.pool.replicas.start()
        self.loop = Loop(self.settings, self.store, self.pool, base_model=tmp_path, seed=0)
        self.engines: list[StubEngine] = []
        self.fail: dict[str, str] = {}  # policy -> why its engine does not start
        self.chat_status: dict[str, int] = {}  # policy -> its engine's answer to a chat
        self.champion = ChampionEngine(self.launch, self.store.champion, self.model_for,
                                       self.pool.served_name, watch_every=0.05,
                                       retry_after=0.2)
        self.pool.champion_engine = self.champion
        self.sampler = PairSampler(self.pool.replicas, sampling=Sampling(0.8, 0.95, 16),
                                   max_model_len=2048, model_name=self.pool.served_name,
                                   champion=self.champion)
        self.app = create_app(self.settings, self.store, self.sampler, self.loop)

    def model_for(self, policy: str) -> Path:
        return self.tmp_path / "merged" / policy  # the real merge is tests/test_merged.py's

    def launch(self, model: Path, served: str, slot: str) -> StubEngine:
        engine = StubEngine(model, served, slot, self.fail.get(model.name),
                            self.chat_status.get(model.name, 200))
        self.engines.append(engine)
        return engine

    def start(self) -> StubEngine:
        """Start the champion engine; returns the engine once it serves the champion."""
        self.champion.start()
        return self.serving(self.store.champion())

    def serving(self, policy: str) -> StubEngine:
        """Wait until the champion engine takes ``policy``'s traffic; its engine."""
        wait_for(lambda: (self.champion.summary()["policy"] == policy
                          and self.champion.summary()["up"]), DEADLINE,
                 f"the champion engine to serve {policy}")
        return self.engines[-1]

    def crown(self, policy: str) -> None:
        path = make_adapter(self.tmp_path / "adapters" / policy)
        self.store.add_adapter(policy, path, None, "base")
        self.loop.promote(policy)  # loads it on the LoRA replica, then crowns it

    def close(self) -> None:
        self.champion.close()
        self.pool.close()
        self.store.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with stub_server() as lora:
        rig = Rig(tmp_path, lora)
        yield rig
        rig.close()


def ask(http: TestClient, n: int) -> list:
    with ThreadPoolExecutor(n) as threads:
        return list(threads.map(lambda i: http.post("/api/v1/pairs", json={
            "message": f"Name fruit number {i}."}), range(n)))


# -- routing -------------------------------------------------------------------------------------


def test_the_champions_turns_go_to_the_plain_engine_and_duels_to_lora(rig: Rig) -> None:
    plain = rig.start()
    assert plain.served == "base" and plain.model.name == "base"
    assert plain.stub is not None and len(plain.stub.requests) == 1  # its check: one answer
    with TestClient(rig.app) as http:
        replies = ask(http, 4)
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    assert len(plain.stub.requests) == 5 and rig.lora.requests == []
    assert all(body["n"] == 2 for body in plain.stub.requests[1:])  # one request per pair

    # A duel (two policies) never goes to it, even one that includes the champion.
    rig.pool.load("v0001", make_adapter(rig.tmp_path / "adapters" / "v0001"))

    async def duel() -> None:
        async for _ in rig.sampler.stream([{"role": "user", "content": "Hi"}], "v0001",
                                          "base", seed=1):
            pass
        await rig.sampler.close()

    asyncio.run(duel())
    assert rig.lora.served == {"prefloop-v0001": 1, "base": 1}
    assert len(plain.stub.requests) == 5
    rows = {row["name"]: row for row in rig.pool.status()}
    assert rows["champion-blue"]["kind"] == "champion" and rows["champion-blue"]["up"]
    assert rows["champion-blue"]["policy"] == "base"


def test_without_a_champion_engine_the_lora_replica_answers_the_champion(rig: Rig) -> None:
    """Before the first engine is up (and whenever none serves the champion)."""
    with TestClient(rig.app) as http:
        replies = ask(http, 2)
    assert [r.status_code for r in replies] == [200] * 2
    assert rig.lora.served == {"base": 2}


# -- the blue-green switch -----------------------------------------------------------------------


def test_the_switch_loses_no_request_and_the_old_engine_drains(rig: Rig) -> None:
    blue = rig.start()
    with TestClient(rig.app) as http:
        http.get("/healthz")  # one visitor: its cookie before the concurrent requests
        assert blue.stub is not None
        blue.stub.hold_after = 1  # pairs on blue stream their first word, then wait
        with ThreadPoolExecutor(4) as threads:
            held = [threads.submit(http.post, "/api/v1/pairs", json={"message": f"Hi {i}"})
                    for i in range(4)]
            wait_for(lambda: rig.champion.rows()[0]["in_flight"] == 4, DEADLINE,
                     "four pairs streaming on blue")
            rig.crown("v0001")  # the champion changes while they stream
            green = rig.serving("v0001")
            assert green.slot == "green" and green.model.name == "v0001"
            assert green.served == "prefloop-v0001"
            # New turns go to green at once; blue drains: not stopped while it streams.
            fresh = ask(http, 3)
            assert [r.status_code for r in fresh] == [200] * 3
            assert {r.json()["a"]["policy"] for r in fresh} == {"v0001"}
            assert green.stub is not None and len(green.stub.requests) == 1 + 3
            assert not blue.stopped.is_set()
            assert [row["draining"] for row in rig.champion.rows()] == [False, True]
            blue.stub.release.set()
            replies = [p.result() for p in held]
        assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
        assert {r.json()["a"]["policy"] for r in replies} == {"base"}
        wait_for(blue.stopped.is_set, DEADLINE, "blue to stop once drained")
        assert [row["name"] for row in rig.champion.rows()] == ["champion-green"]

        # A rollback re-points to base the same way: a new engine in the free slot.
        rig.loop.promote("base", "rollback")
        again = rig.serving("base")
        assert again.slot == "blue" and again.served == "base"
        wait_for(green.stopped.is_set, DEADLINE, "green to stop once drained")
        assert [r.status_code for r in ask(http, 2)] == [200] * 2
    assert rig.lora.requests == []  # every champion turn was a plain engine's
    summary = rig.champion.summary()
    assert summary["switches"] == 3 and summary["failed_switches"] == 0
    assert summary["error"] is None


def test_a_failed_start_leaves_the_traffic_where_it_was(rig: Rig) -> None:
    blue = rig.start()
    rig.fail["v0001"] = "vLLM exited with code 1 while starting"
    rig.crown("v0001")
    wait_for(lambda: rig.champion.failures >= 1, DEADLINE, "the failed switch")
    # Tried again after retry_after (0.2 s here), doubling: it keeps failing meanwhile.
    summary = rig.champion.summary()
    assert summary["policy"] == "base" and summary["up"]  # blue still runs, untouched
    assert "v0001: vLLM exited with code 1" in summary["error"]
    assert not blue.stopped.is_set()
    with TestClient(rig.app) as http:
        replies = ask(http, 2)
        assert [r.status_code for r in replies] == [200] * 2
        assert rig.lora.served == {"prefloop-v0001": 2}  # the champion's turns, as before
        page = http.get("/metrics").text
        failed = re.search(r"^prefloop_champion_engine_failed_switches_total (\S+)$", page,
                           re.MULTILINE)
        assert failed and float(failed[1]) >= 1, page
        assert 'prefloop_replica_up{kind="champion",replica="champion-blue"} 1.0' in page
        stats = http.get("/api/v1/stats").json()["loop"]["champion_engine"]
        assert stats["failed_switches"] >= 1 and "vLLM exited" in stats["error"]
    del rig.fail["v0001"]  # the next try starts, and takes the traffic
    green = rig.serving("v0001")
    assert green.slot == "green" and rig.champion.summary()["error"] is None
    wait_for(blue.stopped.is_set, DEADLINE, "blue to stop")


def test_an_engine_that_starts_but_does_not_answer_is_not_used(rig: Rig) -> None:
    blue = rig.start()
    rig.champion.retry_after = 600  # no second try within the test
    rig.chat_status["v0001"] = 500  # healthy, but its model fails to run
    rig.crown("v0001")
    wait_for(lambda: rig.champion.failures >= 1, DEADLINE, "the failed switch")
    broken = next(e for e in rig.engines if e.served == "prefloop-v0001")
    assert broken.stopped.is_set() and "its first request failed (500)" in rig.champion.error
    assert rig.champion.summary()["policy"] == "base" and not blue.stopped.is_set()


def test_a_plain_engine_that_dies_hands_its_turns_to_lora(rig: Rig) -> None:
    blue = rig.start()
    assert blue.stub is not None
    with TestClient(rig.app) as http:
        http.get("/healthz")
        blue.stub.hold_after = 0  # pairs wait before their first word
        with ThreadPoolExecutor(3) as threads:
            pending = [threads.submit(http.post, "/api/v1/pairs", json={"message": f"Q {i}"})
                       for i in range(3)]
            wait_for(lambda: rig.champion.rows()[0]["in_flight"] == 3, DEADLINE,
                     "three pairs waiting on the champion engine")
            blue.stub.kill()
            replies = [p.result() for p in pending]
        assert [r.status_code for r in replies] == [200] * 3, [r.text for r in replies]
        assert rig.lora.served == {"base": 3}
        assert not rig.champion.summary()["up"]
        assert [r.status_code for r in ask(http, 2)] == [200] * 2  # LoRA meanwhile


def test_close_stops_every_engine(rig: Rig) -> None:
    blue = rig.start()
    rig.champion.close()
    assert blue.stopped.is_set() and rig.champion.rows() == []


# -- settings and small parts ----------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"champion_engine": "fast"}, "--champion-engine: expected one of auto, lora, merged"),
    ({"champion_engine": "merged", "vllm_memory_fraction": 0.5,
      "champion_memory_fraction": 0.3}, "two champion engines"),
    ({"champion_memory_fraction": "0.6"}, "--champion-memory-fraction: expected a number"),
])
def test_bad_champion_engine_settings_say_what_is_wrong(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env={}, overrides=overrides)


def test_the_champion_engine_is_one_more_local_engine() -> None:
    assert load_settings(env={}).local_engines == 1
    settings = load_settings(env={"PREFLOOP_CHAMPION_ENGINE": "merged"})
    assert settings.champion_engine == "merged" and settings.local_engines == 2
    assert settings.merged_dir == settings.data_dir / "merged"
    # Only external replicas: the memory check is for local ones.
    assert load_settings(env={}, overrides={
        "champion_engine": "merged", "vllm_url": ("http://a:1",),
        "vllm_memory_fraction": 0.9}).local_engines == 1


def test_auto_is_merged_on_a_cpu_build_with_an_own_replica_and_a_core_to_spare() -> None:
    """The default: the measured speed-up (docs/BENCHMARKS.md, "The champion engine") where
    it applies; the LoRA replicas everywhere else."""
    def picked(cpu_build: bool, cores: int, **overrides: object) -> str:
        settings = load_settings(env={}, overrides=overrides)
        return settings.resolve_champion_engine(cpu_build=cpu_build, cores=cores).champion_engine

    assert load_settings(env={}).champion_engine == "auto"
    assert picked(True, 2) == "merged"
    resolved = load_settings(env={}).resolve_champion_engine(cpu_build=True, cores=2)
    assert resolved.local_engines == 2
    assert picked(False, 64) == "lora"  # a GPU build: its LoRA kernels are cheap
    assert picked(True, 1) == "lora"  # no core to give it
    assert picked(True, 2, vllm_replicas=2) == "lora"  # the replicas have both cores
    assert picked(True, 3, vllm_replicas=2) == "merged"
    assert picked(True, 8, vllm_url=("http://a:1",)) == "lora"  # no replica of our own
    assert picked(True, 8, vllm_memory_fraction=0.9) == "lora"  # two engines would not fit
    # Asked for by name: kept, whatever the machine.
    assert picked(False, 1, champion_engine="merged") == "merged"
    assert picked(True, 8, champion_engine="lora") == "lora"


def test_a_simulation_keeps_the_champion_on_the_lora_replica(monkeypatch, tmp_path) -> None:
    from prefloop.sim import simulate

    seen: list[str] = []

    def start_runtime(settings: Settings, *args: object, **kwargs: object) -> None:
        seen.append(settings.champion_engine)
        raise RuntimeError("stop here")

    monkeypatch.setattr(simulate, "start_runtime", start_runtime)
    for asked, used in (("auto", "lora"), ("merged", "merged")):
        with pytest.raises(RuntimeError, match="stop here"):
            simulate.run_simulation(Settings(data_dir=tmp_path, champion_engine=asked),
                                    None, None, tmp_path)  # type: ignore[arg-type]
        assert seen[-1] == used


def test_group_memory_is_read_from_proc() -> None:
    assert group_rss(os.getpgid(0)) > 10_000_000  # this test process at least
    assert group_rss(2**22 + 12345) is None


def test_serve_builds_the_champion_engine_without_lora_on_its_own_share(tmp_path: Path) -> None:
    """What ``prefloop serve`` starts for ``champion_engine = "merged"`` (built, not
    started)."""
    from prefloop.app import server

    settings = Settings(data_dir=tmp_path, champion_engine="merged", vllm_replicas=1)
    store = Store(settings.db_path)
    pool = AdapterPool([Replica("local-1", Endpoint("http://127.0.0.1:9", "k"))], None, 16)
    try:
        engine = server._champion_engine(settings, tmp_path / "model", store, pool)
        assert engine.model_for("base") == tmp_path / "model"  # base: the folder as it is
        vllm = engine.launch(tmp_path / "merged" / "v0001-abc", "prefloop-v0001", "green")
        command = vllm.command()
        assert "--enable-lora" not in command and not vllm.lora
        assert command[command.index("--served-model-name") + 1] == "prefloop-v0001"
        assert vllm.memory_fraction == settings.champion_memory_fraction
        assert vllm.log_path == settings.logs_dir / "vllm-champion-green.log"
        # Its own share: on a CPU build its cores are not the replica's.
        if len(os.sched_getaffinity(0)) >= 2:
            replica = server._vllm_server(settings, tmp_path / "model", 0)
            assert vllm.extra_env != replica.extra_env
        with pytest.raises(NotFound, match="v0009"):  # no such adapter: a clear error
            engine.model_for("v0009")
    finally:
        pool.close()
        store.close()
