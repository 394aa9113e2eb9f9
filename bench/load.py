"""Load: many clients chat and vote while a round trains and its adapter is swapped in.

A real ``prefloop serve`` (its own vLLM, the embedded model, ``promote: immediate``). Each of
``--clients`` clients has its own cookie jar (its own client id) and, until the run ends:
opens a conversation, asks for a pair, votes (a, b, tie, both bad or a written answer),
goes on for ``--turns`` turns, then opens the next conversation. A client that is turned away
(429 or 503 with ``Retry-After``) waits as told and asks again. Once enough trainable votes are
in, the admin API starts a round; the trainer runs beside the load, and the loop loads the new
adapter and makes it champion. The clients stop ``--after`` seconds after that, or at
``--seconds`` (the time bound), or after ``--max-pairs`` pairs each (the count bound).
With ``--until-answered-by vNNNN`` they stop instead once a pair written by that policy has a
vote, whatever the machine's speed; ``--seconds`` is then only the deadline (the test uses
this: a slower CPU must not end the load before the new adapter has answered).

Meanwhile a monitor asks ``/healthz`` and the page (``GET /``) twice a second.

Reported: requests by outcome, pair latency p50/p95, votes acknowledged vs votes in the
database, health and page latency. Targets (issue 6): zero lost votes, zero server errors (a
5xx that is not a 503 with Retry-After, or a dropped connection), health answering within 2 s.

    .venv/bin/python bench/load.py                 # 50 clients; writes docs/BENCHMARKS.md
    .venv/bin/python bench/load.py --dry-run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.hotswap import PASSWORD, TOPICS  # noqa: E402
from bench.report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHOICES = ["a", "b", "tie", "both_bad", "written"]
CHOICE_WEIGHTS = [35, 35, 10, 10, 10]


@dataclass
class LoadPlan:
    clients: int = 50
    turns: int = 3               # turns per conversation
    seconds: float = 900.0       # time bound of the whole run
    max_pairs: int | None = 40   # count bound per client (None: no bound)
    after: float = 30.0          # seconds of load after the promotion
    # Instead of `after`: go on until a pair by this policy has a vote.
    until_answered_by: str | None = None
    train_after: int = 16        # trainable votes acknowledged before the round starts
    password: str = PASSWORD
    seed: int = 0


@dataclass
class LoadResult:
    requests: list[dict] = field(default_factory=list)   # one per HTTP request
    acknowledged: list[str] = field(default_factory=list)  # pair ids of 200 votes
    health: list[dict] = field(default_factory=list)
    round: dict = field(default_factory=dict)
    answered_by: Counter[str] = field(default_factory=Counter)  # voted pairs per policy
    seconds: float = 0.0
    timed_out: bool = False  # stopped by the time bound


def _outcome(response: httpx.Response) -> str:
    if response.status_code < 400:
        return "ok"
    if response.status_code in (429, 503) and "Retry-After" in response.headers:
        return f"turned away ({response.status_code})"
    if response.status_code < 500:
        return f"client error ({response.status_code})"
    return f"server error ({response.status_code})"


class Load:
    def __init__(self, url: str, plan: LoadPlan) -> None:
        self.url, self.plan = url, plan
        self.result = LoadResult()
        self.stop = asyncio.Event()
        self.trainable = 0
        self.enough_votes = asyncio.Event()
        self.target_answered = asyncio.Event()  # plan.until_answered_by wrote a voted pair

    async def request(self, http: httpx.AsyncClient, kind: str, path: str,
                      body: dict) -> httpx.Response | None:
        """POST and log; on 429/503 with Retry-After, wait as told and try again."""
        while not self.stop.is_set():
            start = time.monotonic()
            entry: dict = {"kind": kind, "start": start}
            try:
                response = await http.post(path, json=body)
            except httpx.HTTPError as exc:
                entry |= {"outcome": f"connection error ({type(exc).__name__})",
                          "seconds": time.monotonic() - start}
                self.result.requests.append(entry)
                return None
            entry |= {"outcome": _outcome(response), "status": response.status_code,
                      "seconds": time.monotonic() - start}
            self.result.requests.append(entry)
            if entry["outcome"].startswith("turned away"):
                wait = float(response.headers["Retry-After"])
                try:
                    await asyncio.wait_for(self.stop.wait(), timeout=wait)
                except TimeoutError:
                    pass
                continue
            return response
        return None

    async def client(self, k: int) -> None:
        rng = random.Random(self.plan.seed * 1000 + k)
        async with httpx.AsyncClient(base_url=self.url, timeout=600) as http:
            pairs = 0
            while not self.stop.is_set() and (self.plan.max_pairs is None
                                              or pairs < self.plan.max_pairs):
                conversation = None
                for turn in range(self.plan.turns):
                    topic = TOPICS[rng.randrange(len(TOPICS))]
                    message = (f"How do I {topic}?" if turn == 0
                               else f"Tell me more about step {turn}.")
                    response = await self.request(http, "pair", "/api/v1/pairs", {
                        "message": message, "conversation_id": conversation})
                    if response is None or response.status_code != 200:
                        break
                    pairs += 1
                    pair = response.json()
                    conversation = pair["conversation_id"]
                    choice = rng.choices(CHOICES, CHOICE_WEIGHTS)[0]
                    body = {"pair_id": pair["pair_id"]}
                    if choice == "written":
                        body["answer"] = f"Here is a short, friendly way to {topic}."
                    else:
                        body["choice"] = choice
                    vote = await self.request(http, "vote", "/api/v1/votes", body)
                    if vote is None or vote.status_code != 200:
                        break
                    self.result.acknowledged.append(pair["pair_id"])
                    revealed = vote.json()
                    for policy in {revealed["policy_a"], revealed["policy_b"]}:
                        self.result.answered_by[policy] += 1
                        if policy == self.plan.until_answered_by:
                            self.target_answered.set()
                    if choice in ("a", "b", "written"):
                        self.trainable += 1
                        if self.trainable >= self.plan.train_after:
                            self.enough_votes.set()

    async def monitor(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                for path in ("/healthz", "/"):
                    start = time.monotonic()
                    try:
                        status = (await http.get(path)).status_code
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    self.result.health.append({"path": path, "status": status,
                                               "seconds": time.monotonic() - start})
                await asyncio.sleep(0.5)

    async def trainer(self) -> None:
        """Start a round once enough votes are in; wait for its adapter to be champion."""
        try:
            await self._trainer()
        except Exception as exc:  # reported, and the clients still stop in time
            self.result.round["error"] = f"{type(exc).__name__}: {exc}"

    async def _trainer(self) -> None:
        await self.enough_votes.wait()
        info = self.result.round
        auth = {"Authorization": f"Bearer {self.plan.password}"}
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as http:
            info["started"] = time.monotonic()
            response = await http.post("/api/v1/admin/rounds", headers=auth)
            if response.status_code != 200:
                info["error"] = f"could not start a round: {response.text}"
                return
            round_id = response.json()["round_id"]
            while not self.stop.is_set():
                rounds = (await http.get("/api/v1/rounds")).json()["rounds"]
                row = next(r for r in rounds if r["id"] == round_id)
                if row["status"] == "failed":
                    info["error"] = row["error"]
                    return
                if row["status"] == "succeeded":
                    champion = (await http.get("/api/v1/adapters")).json()["champion"]
                    if champion == row["adapter"]:
                        info |= {"adapter": champion, "promoted": time.monotonic(),
                                 "train_seconds": row.get("seconds")}
                        return
                await asyncio.sleep(0.5)

    async def run(self) -> LoadResult:
        start = time.monotonic()
        clients = [asyncio.create_task(self.client(k)) for k in range(self.plan.clients)]
        monitor = asyncio.create_task(self.monitor())
        trainer = asyncio.create_task(self.trainer())

        async def stop_when_done() -> None:
            await trainer
            if "promoted" in self.result.round:  # else the round failed: stop now
                if self.plan.until_answered_by is not None:
                    await self.target_answered.wait()
                else:
                    await asyncio.sleep(self.plan.after)
            self.stop.set()

        stopper = asyncio.create_task(stop_when_done())
        done = asyncio.gather(*clients)
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout=self.plan.seconds)
        except TimeoutError:
            self.result.timed_out = True
            self.stop.set()
            await done
        self.stop.set()
        for task in (stopper, trainer):
            task.cancel()
        await monitor
        self.result.seconds = time.monotonic() - start
        return self.result


def run_load(url: str, plan: LoadPlan) -> LoadResult:
    return asyncio.run(Load(url, plan).run())


def stored_votes(db: Path, pair_ids: list[str]) -> int:
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("select pair_id from votes")}
    return sum(p in stored for p in pair_ids)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summary(result: LoadResult, db: Path) -> dict:
    outcomes = Counter((r["kind"], r["outcome"]) for r in result.requests)
    pair_secs = [r["seconds"] for r in result.requests
                 if r["kind"] == "pair" and r["outcome"] == "ok"]
    health = [h for h in result.health if h["path"] == "/healthz"]
    page = [h for h in result.health if h["path"] == "/"]
    errors = sum(n for (_, outcome), n in outcomes.items()
                 if outcome.startswith(("server error", "connection error")))
    return {
        "outcomes": outcomes, "server_errors": errors,
        "pairs": len(pair_secs), "pair_p50": statistics.median(pair_secs) if pair_secs
        else float("nan"), "pair_p95": percentile(pair_secs, 0.95),
        "acknowledged": len(result.acknowledged),
        "stored": stored_votes(db, result.acknowledged),
        "health_max": max((h["seconds"] for h in health), default=float("nan")),
        "health_p95": percentile([h["seconds"] for h in health], 0.95),
        "health_failed": sum(h["status"] != 200 for h in health),
        "page_max": max((h["seconds"] for h in page), default=float("nan")),
        "turned_away": sum(n for (_, outcome), n in outcomes.items()
                           if outcome.startswith("turned away")),
    }


def report(result: LoadResult, s: dict, plan: LoadPlan) -> tuple[str, bool]:
    lost = s["acknowledged"] - s["stored"]
    rnd = result.round
    promoted = rnd.get("promoted")
    ok = lost == 0 and s["server_errors"] == 0 and s["health_max"] <= 2.0 and promoted
    rows = "\n".join(f"| {kind} | {outcome} | {n} |"
                     for (kind, outcome), n in sorted(s["outcomes"].items()))
    round_line = (f"`{rnd['adapter']}` trained ({rnd.get('train_seconds') or 0:.0f} s of "
                  f"training), loaded and promoted {promoted - rnd['started']:.0f} s after the "
                  "round was started" if promoted else f"no promotion: {rnd.get('error')}")
    body = (
        "## Load: 50 clients while a round trains and swaps (issue 6)\n\n"
        f"`prefloop serve` with its own vLLM (embedded model, 32 tokens per answer, "
        f"`promote: immediate`, default limits: 32 pairs written at once), {plan.clients} "
        f"clients, {plan.turns} turns per conversation, votes mixed "
        "a/b/tie/both bad/written (35/35/10/10/10). Clients turned away wait `Retry-After` and "
        f"ask again. Ran {result.seconds:.0f} s; {round_line}.\n\n"
        "| request | outcome | count |\n|---|---|---|\n" + rows + "\n\n"
        "| check | value | target | |\n|---|---|---|---|\n"
        f"| votes acknowledged / stored | {s['acknowledged']} / {s['stored']} | lost 0 | "
        f"{'✅' if lost == 0 else '❌'} |\n"
        f"| server errors (5xx without Retry-After, dropped connections) | "
        f"{s['server_errors']} | 0 | {'✅' if s['server_errors'] == 0 else '❌'} |\n"
        f"| /healthz under load: p95 / max | {s['health_p95']:.3f} / "
        f"{s['health_max']:.3f} s ({s['health_failed']} not 200) | <= 2 s | "
        f"{'✅' if s['health_max'] <= 2.0 else '❌'} |\n"
        f"| page (`GET /`) under load: max | {s['page_max']:.3f} s | | |\n"
        f"| pairs answered: p50 / p95 | {s['pair_p50']:.1f} / {s['pair_p95']:.1f} s "
        f"({s['pairs']} pairs) | | |\n"
        f"| turned away with Retry-After (429/503), then retried | {s['turned_away']} | | |\n")
    return body, bool(ok)


def main() -> None:
    from prefloop.serving.models import prepare_model
    from tests.conftest import ServeProcess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=900.0)
    parser.add_argument("--max-pairs", type=int, default=40)
    parser.add_argument("--after", type=float, default=30.0)
    parser.add_argument("--train-after", type=int, default=16)
    parser.add_argument("--until-answered-by", metavar="POLICY",
                        help="stop once a pair by POLICY (e.g. v0001) has a vote, not "
                        "--after seconds after the promotion; --seconds is the deadline")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    plan = LoadPlan(clients=args.clients, turns=args.turns, seconds=args.seconds,
                    max_pairs=args.max_pairs, after=args.after, train_after=args.train_after,
                    until_answered_by=args.until_answered_by)
    model = prepare_model("embedded", ROOT / ".cache" / "test" / "models", progress=print)
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-load-") as tmp:
        data_dir = Path(tmp) / "data"
        env = os.environ | {"PREFLOOP_ADMIN_PASSWORD": PASSWORD, "HF_HUB_OFFLINE": "1"}
        serve = ServeProcess(data_dir, [
            "--model", str(model), "--max-tokens", "32", "--promote", "immediate",
            "--champion-engine", "lora",  # the LoRA replica's swap; merged: bench/champion.py
            "--duel-share", "0", "--baseline-share", "0", "--train-every", "10000",
            "--train-epochs", "1"], env=env)
        try:
            serve.wait_ready(timeout=600)
            print("serving; starting the clients", flush=True)
            result = run_load(serve.url, plan)
        finally:
            serve.stop()
        s = summary(result, data_dir / "prefloop.db")
    body, ok = report(result, s, plan)
    print(body)
    if not args.dry_run:
        write_section("load", body)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
