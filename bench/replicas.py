"""Replicas: pairs/s with 1 and 2 vLLM replicas, adapter sync time, a replica killed under load.

Issue 15's figures: pairs/s with 1 and 2 local vLLM replicas, the time from an adapter folder
complete to served by every replica, and a replica SIGKILLed under load.

For each replica count (``--replicas``, default 1 then 2) a real ``prefloop serve`` with that
many local vLLM replicas of its own (the embedded model, 32 tokens per answer, sample pairs
only, ``promote: immediate``, no KL probe so that a loaded adapter is served at once, no
rate limits) and 16 imported preference pairs. ``--clients`` visitors (``Burst`` of
tests/replica_drill.py) ask for a pair and vote on it without pause; they vote tie, so every
round trains on the same 16 pairs. Then:

1. after ``--warmup`` s, the pairs answered in the next ``--seconds`` s: pairs/s with base;
2. the admin API starts a round while the visitors go on. From the moment its adapter folder
   appears (complete, by rename), each replica's ``GET /v1/models`` is asked every 20 ms
   until it lists the adapter; and the first pair the adapter answered;
3. pairs/s again once every visitor has had a pair from the adapter (now champion: LoRA in
   every request);
4. with 2 or more replicas, ``local-2``'s process group is SIGKILLed while it writes answers,
   and the visitors go on until it is restarted, reconciled, and has answered again.
   Counted: requests by outcome, failures with and without Retry-After, votes acknowledged
   and stored, the time to take it out and to bring it back.

No target for pairs/s on 2 cores (the section says what a GPU box should see and why); the
failover must lose no vote and give no error without Retry-After (exit status 1 otherwise).
Run it alone on the machine.

    .venv/bin/python bench/replicas.py              # writes docs/BENCHMARKS.md
    .venv/bin/python bench/replicas.py --dry-run
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.hotswap import PASSWORD, seed_pairs  # noqa: E402
from bench.report import write_section  # noqa: E402
from prefloop.serving.adapters import served_name  # noqa: E402
from prefloop.serving.models import prepare_model  # noqa: E402
from prefloop.serving.vllm_server import is_cpu_build  # noqa: E402
from tests.conftest import START_TIMEOUT, ServeProcess, wait_for  # noqa: E402
from tests.replica_drill import Burst, Engine, Request, local_replica, replica_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = "v0001"  # the round's adapter: the first version of a fresh data dir
POLL_S = 0.02


@dataclass
class Window:
    """Pairs answered in a stretch of time."""

    pairs: int
    seconds: float
    p50: float  # seconds from asking to both answers

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds if self.seconds else math.nan


def window(burst: Burst, start: float, end: float, policy: str | None = None) -> Window:
    done = [r for r in burst.log() if r.kind == "pair" and r.ok and start <= r.end < end
            and policy in (None, r.policy)]
    secs = [r.end - r.start for r in done]
    return Window(len(done), end - start, statistics.median(secs) if secs else math.nan)


def measure(burst: Burst, seconds: float, policy: str | None = None) -> Window:
    start = time.monotonic()
    time.sleep(seconds)  # the visitors are the load; this only times the window
    return window(burst, start, time.monotonic(), policy)


class FolderToReplicas:
    """From the moment ``folder`` appears: when each replica first lists it as ``name``."""

    def __init__(self, folder: Path, name: str, engines: dict[str, Engine]) -> None:
        self.folder, self.name, self.engines = folder, name, engines
        self.appeared: float | None = None
        self.listed: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.folder.is_dir():
            self._stop.wait(0.01)
        self.appeared = time.monotonic()
        path = self.folder.resolve()
        while not self._stop.is_set() and len(self.listed) < len(self.engines):
            for replica, engine in self.engines.items():
                if replica not in self.listed and engine.lists(self.name, path):
                    self.listed[replica] = time.monotonic()
            self._stop.wait(POLL_S)

    def done(self) -> bool:
        return len(self.listed) == len(self.engines)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@dataclass
class Run:
    """One replica count's figures."""

    replicas: int
    ready: float  # seconds from starting the serve to its page answering
    base: Window | None = None
    adapter: Window | None = None
    load_seconds: float = math.nan  # the loop's load call (every replica)
    train_seconds: float = math.nan
    listed: dict[str, float] = field(default_factory=dict)  # replica -> s after the folder
    first_pair: float = math.nan  # s from the folder to the first pair by the adapter
    log: list[Request] = field(default_factory=list)
    stored: set[str] = field(default_factory=set)  # pair ids in the votes table at the end
    failover: dict | None = None

    def votes(self, requests: list[Request] | None = None) -> tuple[int, int]:
        """Votes acknowledged (200) among ``requests`` (all: the whole run), and how many
        of those are in the database."""
        acknowledged = [r.pair_id for r in (self.log if requests is None else requests)
                        if r.kind == "vote" and r.ok]
        return len(acknowledged), sum(p in self.stored for p in acknowledged)


def new_champion(url: str, burst: Burst, data_dir: Path, engines: dict[str, Engine],
                 run: Run, timeout: float) -> None:
    """Start a round; time its adapter from folder complete to listed by every replica and
    to its first answered pair."""
    watch = FolderToReplicas(data_dir / "adapters" / ADAPTER, served_name(ADAPTER), engines)
    try:
        response = httpx.post(url + "/api/v1/admin/rounds", timeout=60,
                              headers={"Authorization": f"Bearer {PASSWORD}"})
        if response.status_code != 200:
            raise SystemExit(f"could not start a round: {response.text}")
        round_id = response.json()["round_id"]

        def crowned() -> bool:
            rounds = httpx.get(url + "/api/v1/rounds", timeout=60).json()["rounds"]
            row = next(r for r in rounds if r["id"] == round_id)
            if row["status"] == "failed":
                raise SystemExit(f"the round failed: {row['error']}")
            return httpx.get(url + "/api/v1/adapters", timeout=60).json()["champion"] == ADAPTER

        wait_for(crowned, timeout, f"{ADAPTER} to be trained, loaded and crowned", poll=0.2)
        wait_for(watch.done, 60, f"every replica to list {ADAPTER}")
        wait_for(lambda: burst.pairs(policy=ADAPTER), 600, f"a pair by {ADAPTER}")
    finally:
        watch.stop()
    rounds = httpx.get(url + "/api/v1/rounds", timeout=60).json()["rounds"]
    row = next(r for r in rounds if r["id"] == round_id)
    run.load_seconds = (row["progress"] or {}).get("load_seconds", math.nan)
    run.train_seconds = row["seconds"] or math.nan
    assert watch.appeared is not None
    run.listed = {r: t - watch.appeared for r, t in watch.listed.items()}
    run.first_pair = min(r.end for r in burst.pairs(policy=ADAPTER)) - watch.appeared


def kill_one(url: str, burst: Burst, data_dir: Path) -> dict:
    """SIGKILL local-2 while it writes answers; wait until it is back and answering."""
    pgid, _ = local_replica(data_dir, 1)
    wait_for(lambda: replica_rows(url)["local-2"]["in_flight"], 300,
             "local-2 writing answers", poll=0.05)
    killed = time.monotonic()
    os.killpg(pgid, signal.SIGKILL)
    wait_for(lambda: not replica_rows(url)["local-2"]["up"], 300, "local-2 to be taken out")
    out = time.monotonic()
    wait_for(lambda: (row := replica_rows(url)["local-2"])["up"] and row["restarts"] >= 1,
             START_TIMEOUT, "local-2 to be restarted, reconciled and up")
    back = time.monotonic()
    _, engine = local_replica(data_dir, 1)
    tokens = engine.tokens()
    wait_for(lambda: engine.tokens() > tokens, 300, "local-2 answering again")
    used = time.monotonic()
    requests = [r for r in burst.log() if r.end >= killed and r.start <= used]
    return {"killed": killed, "out": out - killed, "back": back - killed,
            "used": used - killed, "requests": requests}


def stored_votes(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("select pair_id from votes")}


def run_one(replicas: int, model: Path, args: argparse.Namespace) -> Run:
    with tempfile.TemporaryDirectory(prefix=f"prefloop-bench-replicas-{replicas}-") as tmp:
        data_dir = Path(tmp) / "data"
        pairs = Path(tmp) / "pairs.jsonl"
        seed_pairs(pairs)
        env = os.environ | {"PREFLOOP_ADMIN_PASSWORD": PASSWORD, "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "prefloop", "import", str(pairs), "--data-dir",
                        str(data_dir)], check=True, env=env)
        started = time.monotonic()
        serve = ServeProcess(data_dir, [
            "--model", str(model), "--vllm-replicas", str(replicas), "--champion-engine", "lora",
            "--max-tokens", "32",
            "--promote", "immediate", "--duel-share", "0", "--baseline-share", "0",
            "--train-every", "10000", "--train-epochs", "1", "--kl-probe-prompts", "0",
            "--max-kl", "0", "--min-relevance", "0", "--pairs-per-minute", "0",
            "--votes-per-minute", "0"], env=env)
        try:
            serve.wait_ready(timeout=START_TIMEOUT * replicas)
            run = Run(replicas, time.monotonic() - started)
            print(f"{replicas} replica(s): serving after {run.ready:.0f} s", flush=True)
            engines = {f"local-{i + 1}": local_replica(data_dir, i)[1] for i in range(replicas)}
            with Burst(serve.url, args.clients, choice="tie") as burst:
                time.sleep(args.warmup)
                run.base = measure(burst, args.seconds)
                print(f"  base: {run.base.rate:.2f} pairs/s; training", flush=True)
                new_champion(serve.url, burst, data_dir, engines, run, args.timeout)
                # Every visitor has had an answer from it: the pairs in flight at the swap
                # (base's) are over.
                wait_for(lambda: len(burst.pairs(policy=ADAPTER)) >= args.clients, 600,
                         f"every visitor's pair by {ADAPTER}")
                run.adapter = measure(burst, args.seconds, ADAPTER)
                print(f"  {ADAPTER}: {run.adapter.rate:.2f} pairs/s", flush=True)
                if replicas > 1:
                    run.failover = kill_one(serve.url, burst, data_dir)
                    print(f"  failover: back after {run.failover['back']:.0f} s", flush=True)
            run.log = burst.log()
            run.stored = stored_votes(data_dir / "prefloop.db")
        finally:
            serve.stop()
    return run


def outcome(r: Request) -> str:
    if r.ok:
        return "ok"
    if r.turned_away:
        return f"turned away ({r.status}, Retry-After)"
    if r.status is None:
        return "dropped connection"
    return f"failed ({r.status}, no Retry-After)"


def seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} s"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB"


def report(runs: list[Run], clients: int) -> tuple[str, bool]:
    speed = ["| local replicas | serve ready after | pairs/s, base | pair p50, base | "
             f"pairs/s, {ADAPTER} champion | pair p50, {ADAPTER} |", "|---|---|---|---|---|---|"]
    sync = ["| local replicas | the loop's load call (every replica) | folder → listed, each "
            "replica | folder → listed by every replica | folder → first pair by it |",
            "|---|---|---|---|---|"]
    ok = True
    for run in runs:
        assert run.base and run.adapter
        speed.append(f"| {run.replicas} | {run.ready:.0f} s | {run.base.rate:.2f} | "
                     f"{seconds(run.base.p50)} | {run.adapter.rate:.2f} | "
                     f"{seconds(run.adapter.p50)} |")
        each = ", ".join(f"{r} {seconds(t)}" for r, t in sorted(run.listed.items()))
        sync.append(f"| {run.replicas} | {seconds(run.load_seconds)} | {each} | "
                    f"{seconds(max(run.listed.values(), default=math.nan))} | "
                    f"{seconds(run.first_pair)} |")
    lines = []
    for run in runs:
        acknowledged, stored = run.votes()
        bad = sum(not r.ok and not r.turned_away for r in run.log)
        good = acknowledged == stored and bad == 0
        ok &= good
        lines.append(f"| {run.replicas} | {len(run.log)} | {acknowledged} / {stored} | {bad} | "
                     f"{'✅' if good else '❌'} |")
    whole = ["| local replicas | requests | votes acknowledged / stored | failures without "
             "Retry-After | |", "|---|---|---|---|---|", *lines]
    drill = next((run for run in runs if run.failover), None)
    failover = ""
    if drill is not None:
        f = drill.failover
        requests: list[Request] = f["requests"]
        counts = Counter((r.kind, outcome(r)) for r in requests)
        acknowledged, stored = drill.votes(requests)
        bad = sum(not r.ok and not r.turned_away for r in requests)
        ok &= bad == 0 and acknowledged == stored
        failover = (
            f"\n### Failover: `local-2` SIGKILLed under load ({drill.replicas} replicas)\n\n"
            "Its whole process group (API server, engine, worker) was killed while it wrote "
            "answers; the visitors went on until its supervisor had started it again, it was "
            "reconciled (the champion loaded) and it had answered again. Requests that ended "
            "after the kill and started before it answered again:\n\n"
            "| request | outcome | count |\n|---|---|---|\n"
            + "\n".join(f"| {kind} | {o} | {n} |" for (kind, o), n in sorted(counts.items()))
            + "\n\n| check | value | target | |\n|---|---|---|---|\n"
            f"| votes acknowledged / stored | {acknowledged} / {stored} | lost 0 | "
            f"{'✅' if acknowledged == stored else '❌'} |\n"
            f"| failures without Retry-After (5xx, dropped connections, other errors) | {bad} "
            f"| 0 | {'✅' if bad == 0 else '❌'} |\n"
            f"| pairs broken off mid-answer (503 + Retry-After) | "
            f"{sum(r.kind == 'pair' and r.turned_away for r in requests)} | | |\n"
            f"| kill → taken out | {seconds(f['out'])} | | |\n"
            f"| kill → restarted, reconciled, in use | {seconds(f['back'])} | | |\n"
            f"| kill → answering again | {seconds(f['used'])} | | |\n")
    body = (
        "## vLLM replicas: pairs/s, adapter sync, failover (issue 15)\n\n"
        f"`prefloop serve` with N local vLLM replicas of its own (`--vllm-replicas N`; with "
        "2 on a CPU each is bound to its own share of the cores, `VLLM_CPU_OMP_THREADS_BIND`, "
        "and they split `vllm_memory_fraction` 0.3), embedded model, 32 tokens per answer, "
        f"sample pairs only (one `n=2` request per pair), {clients} visitors asking and voting "
        "without pause, no rate limits. A round on 16 imported pairs makes the adapter, "
        f"champion at once (`promote: immediate`, no KL probe). Machine: {machine()}.\n\n"
        + "\n".join(speed) + "\n\n"
        "From the round's adapter folder complete (its rename) to listed by each replica's "
        "`GET /v1/models` (asked every 20 ms) and to the first pair it answered; the loop's "
        "load call is the round's own `load_seconds`:\n\n"
        + "\n".join(sync) + "\n\n"
        "Every request of each run:\n\n" + "\n".join(whole) + "\n"
        + failover +
        "\nWhat to read in it:\n\n"
        "- **This machine.** vLLM's CPU build, left to bind itself (one replica), runs its "
        "OpenMP threads on every core but one and keeps that one for its API server and "
        "scheduler (on 2 cores its log says `core ids=[0]`, `reserved_cpus=[1]`). Two "
        "replicas are bound by prefloop to a core each and reserve none: their decode "
        "threads have both cores, and their API servers, schedulers and the web process "
        "share them. Whether that answers more pairs than one replica depends on how much "
        "of a core the front ends take under this load (the table says what happened); "
        "replicas on one CPU also share its memory bandwidth. What they buy here for sure is "
        "failover.\n"
        "- **A GPU box.** Each replica gets a GPU of its own (`CUDA_VISIBLE_DEVICES`), so N "
        "replicas have N times the compute and memory bandwidth that decoding is bound by, "
        "and share nothing but the web process: pairs/s should grow close to N-fold while "
        "the visitors keep every replica busy, until the web process or the network is the "
        "limit. Routing keeps both answers of a sample pair on one replica (one `n=2` "
        "request: the prompt is prefilled once).\n"
        "- **Adapter sync.** `Replicas.sync` loads a new adapter on one replica after "
        "another, so the time until every replica lists it grows by one load call per "
        "replica (vLLM reads the adapter's files; on a GPU it also copies them to the "
        "device). With many replicas the loads could run in parallel.\n")
    return body, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2",
                        help="local replica counts to run, in order (default 1,2)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="seconds of each pairs/s window")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="most seconds for the round to train, load and crown its adapter")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the docs")
    args = parser.parse_args()
    counts = [int(n) for n in args.replicas.split(",")]
    if is_cpu_build() and len(os.sched_getaffinity(0)) < max(counts):
        raise SystemExit(f"{max(counts)} CPU replicas need a core each")
    model = prepare_model("embedded", ROOT / ".cache" / "test" / "models", progress=print)
    runs = [run_one(n, model, args) for n in counts]
    body, ok = report(runs, args.clients)
    print(body)
    if not args.dry_run:
        write_section("replicas", body)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
