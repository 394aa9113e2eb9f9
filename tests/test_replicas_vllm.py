"""Issue 15's acceptance with real vLLM CPU replicas under a real ``prefloop serve``: a new
adapter is on every replica before it serves; a replica SIGKILLed during a burst of pairs and
votes loses no vote, causes no error without Retry-After, and pairs keep coming from the
others; its supervisor restarts it and it gets the adapters again; an external replica
missing an adapter is reconciled; SIGKILL of the serve itself takes its replicas with it and
loses no acknowledged vote.

One serve for the module (two vLLM starts are most of its time): two local replicas
(``--vllm-replicas 2``: on a 2-core machine one core each) and the session's vLLM as an
external replica (``--vllm-url``). A third vLLM of the test's own would not fit in memory
beside those three; the session's is one the test can unload an adapter from by hand, and
its adapters are named apart from other tests' (``ServeProcess`` gives the serve its own
adapter prefix). The module holds the own-vLLM lock, so that `make test`'s other process
never runs a serve with its own vLLM beside these. The same cases on stand-in servers, quick
and exact about the order of events: ``tests/test_replicas.py``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from prefloop.config import ADMIN_PASSWORD_ENV
from prefloop.serving.adapters import served_name
from prefloop.serving.vllm_server import group_alive, is_cpu_build
from prefloop.storage.store import Store
from tests.conftest import (
    START_TIMEOUT,
    ServeProcess,
    lora_adapter,
    memory_share,
    metric_sum,
    own_vllm_lock,
    wait_for,
)
from tests.replica_drill import (
    Burst,
    Engine,
    Request,
    local_replica,
    new_adapter,
    process_env,
    replica_rows,
)

pytestmark = pytest.mark.slow

PASSWORD = "replicas-admin"
# Host memory each local replica reserves (vLLM's CPU build takes a fraction of the total,
# so the fraction is worked out from this machine's): its worker process (0.9 to 1.8 GiB
# measured here, fp32 the most) and a KV cache with the rest (at least ~0.45 GiB, ~10,000
# tokens of the embedded model in fp32). Two of these and the session's vLLM (0.3 of the
# memory) fit in ~24 GB beside the other test process.
REPLICA_GIB = 2.25
PAIRS = 6  # pairs a case waits for: enough to go to every replica more than once
# Generous: only turns a hang into a failure (a 2-core AVX2 machine, the other tests' process
# beside, one core per replica).
DEADLINE = 300.0


@dataclass
class Rig:
    """The module's serve and what the tests reach beside it."""

    serve: ServeProcess
    external: Engine  # the session's vLLM, the serve's external-1
    source: Path  # a real adapter's files, copied for each new version

    @property
    def url(self) -> str:
        return self.serve.url

    @property
    def data_dir(self) -> Path:
        return self.serve.data_dir

    def where(self) -> str:
        return f"(logs: {self.data_dir / 'serve.log'}, {self.data_dir / 'logs'})"

    def served_name(self, policy: str) -> str:
        return served_name(policy, self.serve.adapter_prefix)

    def local(self, index: int) -> tuple[int, Engine]:
        return local_replica(self.data_dir, index)

    def engines(self) -> dict[str, Engine]:
        """Every replica by the serve's name for it."""
        return {"local-1": self.local(0)[1], "local-2": self.local(1)[1],
                "external-1": self.external}

    def replicas(self) -> dict[str, dict]:
        return replica_rows(self.url)

    def ours(self, engine: Engine) -> dict[str, str | None]:
        """The serve's adapters on ``engine``: served name -> folder."""
        prefix = self.serve.adapter_prefix + "-"
        return {n: root for n, root in engine.models().items() if n.startswith(prefix)}

    def champion(self) -> str:
        return httpx.get(self.url + "/api/v1/adapters", timeout=60).json()["champion"]

    def add_adapter(self, policy: str) -> Path:
        """A new adapter folder, complete at once, recorded as a candidate."""
        path = new_adapter(self.source, self.data_dir / "adapters", policy)
        with Store(self.data_dir / "prefloop.db") as store:
            store.add_adapter(policy, path, None, "base")
        return path

    def promote(self, policy: str) -> httpx.Response:
        return httpx.post(self.url + "/api/v1/admin/promote", json={"policy": policy},
                          headers={"Authorization": f"Bearer {PASSWORD}"}, timeout=300)

    def stored(self, table: str) -> set[str]:
        """Pair ids in ``votes`` (column pair_id) or ids in ``pairs``, as on disk now."""
        column = "pair_id" if table == "votes" else "id"
        with sqlite3.connect(self.data_dir / "prefloop.db") as db:
            return {row[0] for row in db.execute(f"select {column} from {table}")}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path,
        vllm_server) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("replicas")
    source = lora_adapter(embedded_model, root / "made")
    data_dir = root / "data"
    # A champion adapter from the start: every pair asks the replicas for an adapter.
    first = new_adapter(source, data_dir / "adapters", "v0001")
    with Store(data_dir / "prefloop.db") as store:
        store.add_adapter("v0001", first, None, "base")
        store.crown("v0001", "test")
    endpoint = vllm_server.endpoint
    args = ["--model", str(embedded_model), "--vllm-replicas", "2", "--champion-engine", "lora",
            "--vllm-memory-fraction", str(memory_share(2 * REPLICA_GIB, most=0.9)),
            "--vllm-url", endpoint.url, "--vllm-api-key", endpoint.api_key,
            "--max-tokens", "32", "--duel-share", "0", "--baseline-share", "0",
            "--pairs-per-minute", "0", "--votes-per-minute", "0", "--train-every", "10000"]
    with own_vllm_lock(), ServeProcess.running(data_dir, args,
                                               env={ADMIN_PASSWORD_ENV: PASSWORD}) as serve:
        rig = Rig(serve, Engine(endpoint.url, endpoint.api_key), source)
        wait_for(lambda: all(row["up"] for row in rig.replicas().values()), DEADLINE,
                 f"every replica to be up {rig.where()}")
        yield rig


def failures(log: list[Request]) -> list[tuple]:
    return [(r.kind, r.status, r.retry_after, r.error) for r in log if not r.ok]


def test_each_local_replica_has_a_core_or_gpu_of_its_own(rig: Rig) -> None:
    envs = [process_env(rig.local(i)[0]) for i in range(2)]
    if is_cpu_build():
        cores = [set(map(int, env["VLLM_CPU_OMP_THREADS_BIND"].split(","))) for env in envs]
        assert all(cores) and not cores[0] & cores[1], cores
        assert cores[0] | cores[1] <= os.sched_getaffinity(0)
    else:
        gpus = [env["CUDA_VISIBLE_DEVICES"] for env in envs]
        assert gpus[0] != gpus[1], gpus


def test_a_new_adapter_is_on_every_replica_before_it_serves(rig: Rig) -> None:
    engines = rig.engines()
    refused = {n: e.chats("4xx") for n, e in engines.items()}
    name = rig.served_name("v0002")
    path = rig.add_adapter("v0002")
    with Burst(rig.url, clients=3) as burst:
        wait_for(lambda: len(burst.pairs()) >= 2, DEADLINE, "the visitors' first pairs")
        reply = rig.promote("v0002")  # loads it on every replica that is up, then crowns it
        assert reply.status_code == 200, reply.text
        # Crowned, so it may serve from now on: every replica lists it, from its folder.
        assert {n: e.models().get(name) for n, e in engines.items()} \
            == dict.fromkeys(engines, str(path))
        # Every replica answers a pair for it: a request routed after the crown has ended
        # there (those routed before it, the pairs in flight now, are counted out).
        in_flight = {n: row["in_flight"] for n, row in rig.replicas().items()}
        answered = {n: e.chats() for n, e in engines.items()}
        wait_for(lambda: all(e.chats() - answered[n] > in_flight[n]
                             for n, e in engines.items()),
                 DEADLINE, f"every replica to answer for v0002 {rig.where()}")
        wait_for(lambda: len(burst.pairs(policy="v0002")) >= PAIRS, DEADLINE,
                 "pairs by v0002")
    log = burst.log()
    # A pair planned for v0001 just before the promotion may find it pruned before it is
    # marked in use (ChatService plans, then marks): 503 with Retry-After, nothing lost.
    assert all(r.ok or r.turned_away for r in log), failures(log)
    # No request reached a replica that lacked its adapter: vLLM would have said 404.
    assert {n: e.chats("4xx") for n, e in engines.items()} == refused
    assert all("v0002" in row["adapters"] for row in rig.replicas().values())


def test_an_external_replica_missing_an_adapter_is_reconciled(rig: Rig) -> None:
    name = rig.served_name(rig.champion())
    path = rig.external.models().get(name)
    assert path, f"the external replica does not serve the champion {name}"
    # Unloaded by its operator (a restart would do the same), while nothing streams from it.
    rig.external.unload(name)
    with Burst(rig.url, clients=3) as burst:
        # A pair sent there before the next reconcile finds it missing (vLLM's 404) and goes
        # to another replica.
        wait_for(lambda: rig.external.lists(name, path), DEADLINE,
                 f"the external replica to get {name} again {rig.where()}")
        back = time.monotonic()
        wait_for(lambda: len(burst.pairs(since=back)) >= PAIRS, DEADLINE,
                 "pairs after the adapter was loaded again")
    log = burst.log()
    assert not failures(log), failures(log)
    assert rig.replicas()["external-1"]["up"]


def test_a_replica_killed_mid_burst_loses_nothing_and_comes_back_with_the_adapters(
        rig: Rig) -> None:
    pgid, engine = rig.local(1)
    survivor = rig.local(0)[1]
    pairs_before = rig.stored("pairs")
    tokens = engine.tokens()
    with Burst(rig.url, clients=4) as burst:
        wait_for(lambda: engine.tokens() > tokens and rig.replicas()["local-2"]["in_flight"],
                 DEADLINE, "local-2 writing the burst's answers", poll=0.05)
        os.killpg(pgid, signal.SIGKILL)  # the whole replica: API server, engine, worker
        wait_for(lambda: not rig.replicas()["local-2"]["up"], DEADLINE,
                 "local-2 to be taken out")
        out = time.monotonic()
        survivor_tokens = survivor.tokens()
        wait_for(lambda: len(burst.pairs(since=out)) >= PAIRS, DEADLINE,
                 f"pairs from the other replicas {rig.where()}")
    log = burst.log()
    # Only pairs that were streaming from local-2 fail, with 503 and Retry-After; nothing
    # fails without Retry-After; no vote fails (votes never reach vLLM).
    assert all(r.kind == "pair" and r.status == 503 and r.retry_after
               for r in log if not r.ok), failures(log)
    assert all(r.ok for r in log if r.start >= out), failures(log)
    assert survivor.tokens() > survivor_tokens
    acknowledged = burst.acknowledged()
    assert acknowledged and set(acknowledged) <= rig.stored("votes")
    # A pair is stored when both answers are complete, and only then.
    answered = {r.pair_id for r in burst.pairs()}
    assert rig.stored("pairs") == pairs_before | answered

    # Its supervisor starts it again; it is reconciled before it is counted as restarted.
    wait_for(lambda: (row := rig.replicas()["local-2"])["up"] and row["restarts"] >= 1,
             START_TIMEOUT, f"local-2 to be restarted and up {rig.where()}")
    again, engine = rig.local(1)
    assert again != pgid
    wait_for(lambda: rig.ours(engine) == rig.ours(survivor), DEADLINE,
             "the restarted replica to serve what local-1 serves, from the same folders")
    assert rig.served_name(rig.champion()) in rig.ours(engine)
    assert metric_sum(rig.serve.http.get("/metrics").text,
                      "prefloop_vllm_restarts_total") == 1
    # And it is used again.
    tokens = engine.tokens()
    with Burst(rig.url, clients=3) as burst:
        wait_for(lambda: engine.tokens() > tokens, DEADLINE, "pairs on the restarted local-2")
    log = burst.log()
    assert not failures(log), failures(log)


def test_a_killed_serve_takes_its_replicas_with_it_and_keeps_every_vote(
        rig: Rig, external_args: list[str]) -> None:
    """Last in the module (it ends the module's serve): SIGKILL of ``prefloop serve`` itself
    during a burst of votes. Its replicas die with it, every acknowledged vote is on disk,
    and the same data dir serves the same visitor again (here on the external replica
    alone), the conversation where it was."""
    first = rig.serve.http.post("/api/v1/pairs", json={"message": "Hello!"})
    assert first.status_code == 200, first.text
    conversation = first.json()["conversation_id"]
    vote = rig.serve.http.post("/api/v1/votes", json={"pair_id": first.json()["pair_id"],
                                                       "choice": "a"})
    assert vote.status_code == 200, vote.text
    pgids = [rig.local(i)[0] for i in range(2)]
    with Burst(rig.url, clients=4) as burst:
        wait_for(lambda: len(burst.acknowledged()) >= 4, DEADLINE, "acknowledged votes")
        rig.serve.proc.send_signal(signal.SIGKILL)
        rig.serve.proc.wait()
    acknowledged = burst.acknowledged()
    wait_for(lambda: not any(group_alive(p) for p in pgids), 120,
             "the local replicas to die with their parent")
    with sqlite3.connect(rig.data_dir / "prefloop.db") as db:
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    assert set(acknowledged) <= rig.stored("votes")

    with ServeProcess.running(rig.data_dir, external_args) as again:
        again.http.cookies = rig.serve.http.cookies  # the same visitor comes back
        follow_up = again.http.post("/api/v1/pairs", json={
            "message": "And then?", "conversation_id": conversation})
        assert follow_up.status_code == 200, follow_up.text
        assert follow_up.json()["conversation_id"] == conversation
