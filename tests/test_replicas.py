"""Several vLLM replicas, with stand-in OpenAI servers (``tests/openai_stub.py``, which answers
/v1/models and the LoRA load/unload endpoints as vLLM 0.32 does) in place of vLLM: an adapter
is on every replica before it serves; a replica killed during a burst of pairs and votes
loses no vote and causes no error without Retry-After, and pairs keep coming from the other;
a replica that comes back is reconciled, then used again; an external replica missing an
adapter gets it. The same with real vLLM replicas: tests/test_replicas_vllm.py (slow)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from starlette.testclient import TestClient

from prefloop.app.server import create_app
from prefloop.config import ConfigError, Settings, load_settings
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterError, AdapterPool
from prefloop.serving.replicas import NoReplica, Replica, Replicas
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint, VLLMError, replica_env
from prefloop.storage.store import Store
from tests.conftest import wait_for
from tests.openai_stub import StubServer, stub_server

DEADLINE = 60.0  # seconds; the watcher looks every 0.05 s, so only a hang gets near it


def make_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "base_model_name_or_path": "/models/stub"}))
    save_file({"a.lora_A.weight": torch.ones(8, 16), "a.lora_B.weight": torch.zeros(16, 8)},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder.resolve()


class Rig:
    """The app over two stand-in replicas, as ``prefloop serve`` builds it with two
    ``--vllm-url``: pool, watcher, loop, sampler and the HTTP API."""

    def __init__(self, tmp_path: Path, stubs: list[StubServer]) -> None:
        self.tmp_path, self.stubs = tmp_path, stubs
        self.ports = [s.server_address[1] for s in stubs]
        self.settings = Settings(
            data_dir=tmp_path / "data", duel_share=0.0, baseline_share=0.0,
            pairs_per_minute=0, votes_per_minute=0, client_generations=64,
            kl_probe_prompts=0, max_kl=0.0, min_relevance=0.0, max_tokens=16)
        self.store = Store(self.settings.db_path)
        self.pool = AdapterPool([Replica(f"external-{i + 1}", Endpoint(s.url, "key"))
                                 for i, s in enumerate(stubs)], None, 16, watch_every=0.05)
        self.pool.replicas.start()
        self.loop = Loop(self.settings, self.store, self.pool, base_model=tmp_path, seed=0)
        self.sampler = PairSampler(self.pool.replicas, sampling=Sampling(0.8, 0.95, 16),
                                   max_model_len=2048, model_name=self.pool.served_name)
        self.app = create_app(self.settings, self.store, self.sampler, self.loop)

    def crown(self, policy: str) -> Path:
        path = make_adapter(self.tmp_path / "adapters" / policy)
        self.store.add_adapter(policy, path, None, "base")
        self.store.crown(policy, "test")
        self.loop.recover()  # loads the champion on every replica, as at start
        return path

    def replica(self, i: int) -> Replica:
        return self.pool.replicas.replicas[i]

    def up(self, i: int) -> bool:
        return self.pool.status()[i]["up"]

    def close(self) -> None:
        self.pool.close()
        self.store.close()


@pytest.fixture
def stubs() -> Iterator[list[StubServer]]:
    with stub_server() as a, stub_server() as b:
        yield [a, b]


@pytest.fixture
def rig(tmp_path: Path, stubs: list[StubServer]) -> Iterator[Rig]:
    rig = Rig(tmp_path, stubs)
    yield rig
    rig.close()


def ask(http: TestClient, n: int) -> list[httpx.Response]:
    """``n`` pairs at once, each in a new conversation."""
    with ThreadPoolExecutor(n) as threads:
        return list(threads.map(lambda i: http.post("/api/v1/pairs", json={
            "message": f"Name fruit number {i}."}), range(n)))


# -- adapters in sync ----------------------------------------------------------------------------


def test_a_new_adapter_is_on_every_replica_before_it_serves(rig: Rig,
                                                            stubs: list[StubServer]) -> None:
    path = make_adapter(rig.tmp_path / "adapters" / "v0001")
    assert not rig.pool.is_ready("v0001")
    rig.pool.load("v0001", path)
    # load() returns once every replica that is up serves it, from its own folder.
    assert [s.adapters for s in stubs] == [{"prefloop-v0001": str(path)}] * 2
    assert rig.pool.is_ready("v0001")
    assert [row["adapters"] for row in rig.pool.status()] == [["v0001"], ["v0001"]]

    rig.store.add_adapter("v0001", path, None, "base")
    rig.loop.promote("v0001")
    with TestClient(rig.app) as http:
        replies = [http.post("/api/v1/pairs", json={"message": f"Hi {i}"}) for i in range(4)]
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert {r.json()["a"]["policy"] for r in replies} == {"v0001"}
    # Both answers of a pair from one replica (one request, n=2); the pairs spread over both.
    assert [s.served["prefloop-v0001"] for s in stubs] == [2, 2]
    assert all(body["n"] == 2 for s in stubs for body in s.requests)


def test_a_turn_holds_its_adapters_against_a_prune_between_plan_and_request(
        rig: Rig, stubs: list[StubServer], monkeypatch: pytest.MonkeyPatch) -> None:
    rig.crown("v0001")
    path = make_adapter(rig.tmp_path / "adapters" / "v0002")
    rig.store.add_adapter("v0002", path, None, "v0001")
    rig.pool.load("v0002", path)
    plan_turn = rig.loop.plan_turn

    def planned_then_retired():  # the plan names v0001; a promotion and prune come next
        plan = plan_turn()
        if plan.policy_a == "v0001":
            rig.loop.promote("v0002")
            rig.pool.prune(keep={"v0002"})
        return plan

    monkeypatch.setattr(rig.loop, "plan_turn", planned_then_retired)
    plan = rig.loop.hold_turn()
    assert (plan.policy_a, plan.policy_b) == ("v0002", "v0002")  # planned again
    assert not rig.pool.is_ready("v0001")
    # Held: a prune now leaves it alone until the turn releases it.
    assert rig.pool.prune(keep=set()) == []
    assert rig.pool.is_ready("v0002")
    rig.pool.release(plan.policy_a, plan.policy_b)
    assert rig.pool.prune(keep=set()) == ["v0002"]
    with TestClient(rig.app) as http:  # the page's turns still come, from base now
        reply = http.post("/api/v1/pairs", json={"message": "Hi"})
    assert reply.status_code == 200 and reply.json()["a"]["policy"] == "base", reply.text


def test_an_adapter_a_replica_refuses_is_served_nowhere(rig: Rig,
                                                        stubs: list[StubServer]) -> None:
    stubs[1].refuse.add("prefloop-v0002")
    with pytest.raises(AdapterError, match="stub refuses prefloop-v0002"):
        rig.pool.load("v0002", make_adapter(rig.tmp_path / "v0002"))
    assert not rig.pool.is_ready("v0002")
    assert stubs[0].adapters == {} and stubs[1].adapters == {}  # unloaded where it loaded


def test_a_name_is_never_given_other_files(rig: Rig) -> None:
    rig.pool.load("v0001", make_adapter(rig.tmp_path / "one" / "v0001"))
    with pytest.raises(AdapterError, match="never reused"):
        rig.pool.replicas.want("prefloop-v0001", make_adapter(rig.tmp_path / "two" / "v0001"))


def test_an_external_replica_missing_an_adapter_is_reconciled(rig: Rig,
                                                              stubs: list[StubServer]) -> None:
    path = rig.crown("v0001")
    ours = str(path)
    # Its operator restarted it, or unloaded by hand; it also has a stale adapter of ours
    # and one of another prefloop sharing it.
    stubs[1].adapters.clear()
    stubs[1].adapters.update({"prefloop-v0009": "/gone/v0009", "other-v0001": "/theirs"})
    wait_for(lambda: stubs[1].adapters == {"prefloop-v0001": ours, "other-v0001": "/theirs"},
             DEADLINE, "the replica to be reconciled")
    # Our name with other files (an earlier run's): unloaded, then loaded from ours.
    stubs[0].adapters["prefloop-v0001"] = "/old/v0001"
    wait_for(lambda: stubs[0].adapters == {"prefloop-v0001": ours}, DEADLINE,
             "the stale adapter to be replaced")
    assert rig.up(0) and rig.up(1)


# -- failover ------------------------------------------------------------------------------------


def test_a_replica_killed_mid_burst_loses_nothing_and_comes_back(
        rig: Rig, stubs: list[StubServer]) -> None:
    rig.crown("v0001")
    a = rig.replica(0)
    with ExitStack() as later, TestClient(rig.app) as http:
        http.get("/healthz")  # one visitor: its cookie before the concurrent requests
        # Pairs on A wait before their first word: killed then, they start again on B.
        stubs[0].hold_after = 0
        with ThreadPoolExecutor(6) as threads:
            pending = [threads.submit(http.post, "/api/v1/pairs",
                                      json={"message": f"Name fruit {i}."}) for i in range(6)]
            wait_for(lambda: a.in_flight + sum(p.done() for p in pending) == 6
                     and a.in_flight > 0, DEADLINE, "pairs held on A, the rest done")
            stubs[0].kill()
            replies = [p.result() for p in pending]
        assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
        assert not rig.up(0) and rig.up(1)
        assert "prefloop_replica_up{kind=\"external\",replica=\"external-1\"} 0.0" \
            in http.get("/metrics").text

        # While A is down: pairs and votes go on; a new adapter is loaded on B alone.
        more = ask(http, 4)
        assert [r.status_code for r in more] == [200] * 4
        votes = [http.post("/api/v1/votes", json={"pair_id": r.json()["pair_id"],
                                                  "choice": "a"}) for r in replies + more]
        assert [v.status_code for v in votes] == [200] * 10
        v0002 = make_adapter(rig.tmp_path / "adapters" / "v0002")
        rig.pool.load("v0002", v0002)
        assert set(stubs[1].adapters) == {"prefloop-v0001", "prefloop-v0002"}

        # A comes back empty: reconciled (both adapters) before it is used again.
        again = later.enter_context(stub_server(rig.ports[0]))
        wait_for(lambda: rig.up(0), DEADLINE, "A to be back")
        assert set(again.adapters) == {"prefloop-v0001", "prefloop-v0002"}
        replies = [http.post("/api/v1/pairs", json={"message": f"More {i}"}) for i in range(4)]
        assert [r.status_code for r in replies] == [200] * 4
        assert again.served["prefloop-v0001"] > 0, "A is not used again"

        # Killed while its pairs stream: those get 503 with Retry-After, nothing stored.
        again.hold_after = 1
        before = rig.store.counts()["pairs"]
        with ThreadPoolExecutor(4) as threads:
            pending = [threads.submit(http.post, "/api/v1/pairs",
                                      json={"message": f"Tell {i}."}) for i in range(4)]
            wait_for(lambda: a.in_flight + sum(p.done() for p in pending) == 4
                     and a.in_flight > 0, DEADLINE, "pairs streaming on A, the rest done")
            again.kill()
            broken = [p.result() for p in pending]
        ok = [r for r in broken if r.status_code == 200]
        failed = [r for r in broken if r.status_code != 200]
        assert failed and all(r.status_code == 503 and r.headers["Retry-After"]
                              for r in failed), [(r.status_code, r.text) for r in broken]
        assert rig.store.counts()["pairs"] == before + len(ok)
        # Healthy while one replica answers; 503 once none does.
        assert http.get("/healthz").status_code == 200
        stubs[1].kill()
        health = http.get("/healthz")
        assert health.status_code == 503, health.text
        assert health.json() == {"database": True, "model": False}
    counts = rig.store.counts()
    assert counts["votes"] == 10  # every acknowledged vote is on disk


def test_a_single_endpoint_is_never_taken_out(stubs: list[StubServer]) -> None:
    """One server, as before replicas: a failed request fails alone."""
    replicas = Replicas.single(Endpoint(stubs[0].url, "x"), lambda name: False)
    [only] = replicas.replicas
    replicas.failed(only, "a request failed")
    assert only.up and replicas.acquire({"base", "anything"}) is only


# -- routing ---------------------------------------------------------------------------------------


def test_routing_picks_the_least_busy_replica_that_has_the_adapters() -> None:
    replicas = Replicas([Replica(n, Endpoint(f"http://127.0.0.1:9/{n}", "x"))
                         for n in ("r1", "r2", "r3")], lambda name: name.startswith("p-"))
    r1, r2, r3 = replicas.replicas
    r1.up, r2.up, r3.up = True, True, False
    r1.loaded = {"base": "", "p-v1": "/a"}
    r2.loaded = {"base": "", "p-v1": "/a", "p-v2": "/b"}
    r3.loaded = dict(r2.loaded)
    assert replicas.acquire({"p-v1", "p-v2"}) is r2  # r3 has both, but is down
    assert replicas.acquire({"p-v1"}) is r1  # r2 is busier now
    assert replicas.acquire({"base"}) in (r1, r2)
    with pytest.raises(NoReplica, match="2 of 3 up"):
        replicas.acquire({"p-v3"})
    replicas.lost(r2, "p-v2")  # it said 404: routed around until reconciled
    with pytest.raises(NoReplica):
        replicas.acquire({"p-v2"})
    replicas.close()


def test_ties_spread_over_the_replicas() -> None:
    replicas = Replicas([Replica(n, Endpoint("http://127.0.0.1:9", "x")) for n in "ab"],
                        lambda name: False)
    for r in replicas.replicas:
        r.up = True
    picked = []
    for _ in range(4):
        replica = replicas.acquire({"base"})
        picked.append(replica.name)
        replicas.release(replica)
    assert sorted(picked) == ["a", "a", "b", "b"]
    replicas.close()


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"vllm_replicas": 0}, "no vLLM to answer"),
    ({"vllm_url": ("http://a:1", "http://b:2"), "vllm_api_key": ("k1", "k2", "k3")},
     "3 keys for 2 URLs"),
    ({"vllm_url": ("http://a:1", "http://a:1")}, "each server once"),
    ({"vllm_url": ("a:1",)}, "without a path"),
    ({"vllm_url": ("http://a:1/v1",)}, "without a path"),
    ({"vllm_url": ("ftp://a:1",)}, "without a path"),
    ({"vllm_replicas": "-1"}, "--vllm-replicas: expected an integer from 0 to 64"),
    ({"vllm_replicas": "65"}, "--vllm-replicas: expected an integer from 0 to 64"),
    ({"vllm_replicas": "two"}, "--vllm-replicas: expected an integer"),
    ({"vllm_replicas": 3, "vllm_port": 65534}, "ports up to 65536"),
    ({"vllm_url": ("http://a:1", "")}, "--vllm-url: expected a string or a list"),
])
def test_bad_replica_settings_say_what_is_wrong(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env={}, overrides=overrides)


def test_replica_settings_from_every_source(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('vllm_url = ["http://a:1", "http://b:2"]\nvllm_api_key = "k"\n')
    settings = load_settings(config, env={})
    assert settings.external_vllms == [("http://a:1", "k"), ("http://b:2", "k")]
    assert settings.local_replicas == 0  # a URL and no vllm_replicas: none of our own
    settings = load_settings(env={"PREFLOOP_VLLM_URL": "http://a:1, http://b:2",
                                  "PREFLOOP_VLLM_API_KEY": "k1,k2",
                                  "PREFLOOP_VLLM_REPLICAS": "2"})
    assert settings.external_vllms == [("http://a:1", "k1"), ("http://b:2", "k2")]
    assert settings.local_replicas == 2
    assert load_settings(env={}).local_replicas == 1
    assert load_settings(env={}, overrides={"vllm_url": ("http://a:1",)}).external_vllms \
        == [("http://a:1", "none")]


def test_the_url_flag_repeats(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from prefloop.cli import main

    result = CliRunner().invoke(main, [
        "status", "--json", "--data-dir", str(tmp_path), "--port", "9",
        "--vllm-url", "http://a:1", "--vllm-url", "http://b:2", "--vllm-api-key", "k"],
        env={})
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["settings"]["vllm_url"] == ["http://a:1", "http://b:2"]
    assert info["settings"]["vllm_api_key"] == "***"


def test_cpu_replicas_split_the_cores_and_gpu_replicas_take_one_gpu_each() -> None:
    cpus = [0, 1, 2, 3, 4]
    binds = [replica_env(i, 2, cpu_build=True, cpus=cpus, visible_gpus=None) for i in range(2)]
    assert binds == [{"VLLM_CPU_OMP_THREADS_BIND": "0,1,2"},
                     {"VLLM_CPU_OMP_THREADS_BIND": "3,4"}]
    assert replica_env(0, 1, cpu_build=True, cpus=cpus, visible_gpus=None) == {}
    with pytest.raises(VLLMError, match="need a core each"):
        replica_env(0, 3, cpu_build=True, cpus=[0, 1], visible_gpus=None)
    assert replica_env(1, 2, cpu_build=False, cpus=cpus, visible_gpus="4,6") \
        == {"CUDA_VISIBLE_DEVICES": "6"}
    assert replica_env(1, 2, cpu_build=False, cpus=cpus, visible_gpus=None) \
        == {"CUDA_VISIBLE_DEVICES": "1"}
    with pytest.raises(VLLMError, match="need a GPU each"):
        replica_env(0, 2, cpu_build=False, cpus=cpus, visible_gpus="3")
