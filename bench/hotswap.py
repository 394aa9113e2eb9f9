"""Hot-swap under load: clients stream pairs while a round trains, loads and promotes an adapter.

A real ``prefloop serve`` (its own vLLM, the embedded model, ``promote: immediate``, no duels)
gets 16 imported preference pairs. ``--clients`` clients then ask for pairs and vote without
pause; after a warm-up the admin API starts a round. The trainer runs beside the load, writes
``adapters/v0001``, the loop loads it into vLLM and makes it champion, and the clients keep
going for a while after. Reported:

- requests and failures (any non-200 or broken connection) before, during and after;
- pair latency (p50/p95) in each phase: a load that made requests wait would show here;
- from the adapter folder being complete (it appears by rename) to the first pair request
  served by the new adapter, and to that answer's first token (from the stored pair);
- a probe: a new visitor who asks 0.3 s after the folder appears (and again after each
  answer until the new adapter answers); the first token of its answer from the new
  adapter, counted from the folder being complete.

Target (issue 4): zero failed or dropped requests; the new adapter answers within 2 s of its
folder being complete.

    .venv/bin/python bench/hotswap.py                 # writes docs/BENCHMARKS.md
    .venv/bin/python bench/hotswap.py --dry-run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402
from prefloop.serving.models import prepare_model  # noqa: E402
from tests.conftest import ServeProcess  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-admin"
TOPICS = ["boil an egg", "learn to swim", "fix a bike", "bake bread", "plant a tree",
          "tie a tie", "save money", "sleep better", "write a poem", "start running",
          "clean a window", "brew tea", "fold a shirt", "paint a wall", "read faster",
          "learn chess"]


def seed_pairs(path: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": f"How do I {t}?"}],
             "chosen": [{"role": "assistant", "content": f"Happy to help you {t}! First, take "
                                                         "it one step at a time."}],
             "rejected": [{"role": "assistant", "content": "Figure it out yourself."}]}
            for t in TOPICS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class Watch:
    """Polls for the adapter folder and notes when it appears (complete, by rename)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.appeared: float | None = None  # time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.appeared is None:
            if self.folder.is_dir():
                self.appeared = time.time()
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()


async def client(url: str, k: int, stop: asyncio.Event, log: list[dict]) -> None:
    """Ask for a pair, vote, repeat; every request is logged with its outcome. Each client
    has its own cookie jar (its own prefloop_client id)."""
    async with httpx.AsyncClient(timeout=300) as http:
        await _client(http, url, k, stop, log)


async def _client(http: httpx.AsyncClient, url: str, k: int, stop: asyncio.Event,
                  log: list[dict]) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        start = time.time()
        entry = {"client": k, "start": start, "ok": False}
        try:
            response = await http.post(url + "/api/v1/pairs", json={
                "message": f"Give me one tip number {i} about {TOPICS[(k + i) % 16]}."})
            entry |= {"status": response.status_code, "seconds": time.time() - start}
            if response.status_code == 200:
                pair = response.json()
                entry |= {"ok": True, "policy": pair["a"]["policy"], "pair_id": pair["pair_id"]}
                vote = await http.post(url + "/api/v1/votes",
                                       json={"pair_id": pair["pair_id"], "choice": "a"})
                entry["vote_ok"] = vote.status_code == 200
        except httpx.HTTPError as exc:
            entry |= {"status": type(exc).__name__, "seconds": time.time() - start}
        log.append(entry)


async def probe(url: str, watch: Watch, out: list[dict]) -> None:
    """A new visitor who asks 0.3 s after the folder appears (about when the load is done),
    and again after each answer, until the new adapter answers (at most 5 requests)."""
    async with httpx.AsyncClient(timeout=300) as http:
        await _probe(http, url, watch, out)


async def _probe(http: httpx.AsyncClient, url: str, watch: Watch, out: list[dict]) -> None:
    while watch.appeared is None:
        await asyncio.sleep(0.01)
    await asyncio.sleep(max(0.0, watch.appeared + 0.3 - time.time()))
    for _ in range(5):
        start = time.time()
        response = await http.post(url + "/api/v1/pairs", json={"message": "Any tip?"})
        entry = {"start": start, "status": response.status_code}
        out.append(entry)
        if response.status_code != 200:
            continue
        pair = response.json()
        entry |= {"policy": pair["a"]["policy"], "pair_id": pair["pair_id"]}
        await http.post(url + "/api/v1/votes", json={"pair_id": pair["pair_id"],
                                                     "choice": "a"})
        if pair["a"]["policy"] == "v0001":
            return


async def drive(url: str, clients: int, data_dir: Path, warmup: float, after: float,
                timeout: float) -> dict:
    log: list[dict] = []
    stop = asyncio.Event()
    watch = Watch(data_dir / "adapters" / "v0001")
    probes: list[dict] = []
    async with httpx.AsyncClient(timeout=300) as http:
        tasks = [asyncio.create_task(client(url, k, stop, log)) for k in range(clients)]
        tasks.append(asyncio.create_task(probe(url, watch, probes)))
        await asyncio.sleep(warmup)
        round_start = time.time()
        response = await http.post(url + "/api/v1/admin/rounds",
                                   headers={"Authorization": f"Bearer {PASSWORD}"})
        assert response.status_code == 200, response.text
        round_id = response.json()["round_id"]
        deadline = time.time() + timeout
        champion_at = None
        while time.time() < deadline:
            adapters = (await http.get(url + "/api/v1/adapters")).json()
            if adapters["champion"] == "v0001":
                champion_at = time.time()
                break
            rounds = (await http.get(url + "/api/v1/rounds")).json()["rounds"]
            if rounds[0]["status"] == "failed":
                raise SystemExit(f"the round failed: {rounds[0]['error']}")
            await asyncio.sleep(0.2)
        if champion_at is None:
            raise SystemExit(f"no new champion within {timeout} s")
        await asyncio.sleep(after)
        stop.set()
        await asyncio.gather(*tasks)
        rounds = (await http.get(url + "/api/v1/rounds")).json()["rounds"]
    watch.stop()
    return {"log": log, "probes": probes, "round_start": round_start,
            "folder": watch.appeared,
            "champion_at": champion_at, "round": next(r for r in rounds if r["id"] == round_id)}


def first_adapter_answer(db: Path, pair_ids: list[str] | None = None
                         ) -> tuple[float, float] | None:
    """(request start, first token) wall-clock times of the earliest-starting pair from
    v0001 (among ``pair_ids`` if given)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select id, created_at, total_ms, first_token_ms from pairs "
                            "where policy_a = 'v0001'").fetchall()
    times = []
    for pair_id, created, total_ms, first_ms in rows:
        if pair_ids is not None and pair_id not in pair_ids:
            continue
        start = datetime.fromisoformat(created).timestamp() - total_ms / 1000
        times.append((start, start + first_ms / 1000))
    return min(times) if times else None


def phase_rows(result: dict) -> list[tuple[str, list[dict]]]:
    log, start, end = result["log"], result["round_start"], result["champion_at"]
    return [("before the round", [e for e in log if e["start"] < start]),
            ("while training, loading, promoting", [e for e in log if start <= e["start"] < end]),
            ("after promotion", [e for e in log if e["start"] >= end])]


def report(result: dict, clients: int, db: Path) -> tuple[str, bool]:
    lines = ["| phase | requests | failed | pair p50 s | pair p95 s |", "|---|---|---|---|---|"]
    failed_total = 0
    for name, entries in phase_rows(result):
        failed = [e for e in entries if not e["ok"] or e.get("vote_ok") is False]
        failed_total += len(failed)
        secs = sorted(e["seconds"] for e in entries if e["ok"])
        p50 = statistics.median(secs) if secs else float("nan")
        p95 = secs[min(len(secs) - 1, int(0.95 * len(secs)))] if secs else float("nan")
        lines.append(f"| {name} | {len(entries)} | {len(failed)} | {p50:.2f} | {p95:.2f} |")
    first = first_adapter_answer(db)
    folder = result["folder"]
    served_after = first[0] - folder if first and folder else float("nan")
    token_after = first[1] - folder if first and folder else float("nan")
    probe_first = first_adapter_answer(db, [p["pair_id"] for p in result["probes"]
                                            if p.get("policy") == "v0001"])
    probe_token = probe_first[1] - folder if probe_first and folder else float("nan")
    probe_failed = sum(p["status"] != 200 for p in result["probes"])
    with sqlite3.connect(db) as conn:
        firsts = [r[0] / 1000 for r in conn.execute(
            "select first_token_ms from pairs where policy_a = 'base' and kind = 'sample' "
            "and first_token_ms is not null")]
    base_first = statistics.median(firsts) if firsts else float("nan")
    failed_total += probe_failed
    answered_in_time = probe_token <= 2.0
    rnd = result["round"]
    checks = [
        "| check | value | target | |", "|---|---|---|---|",
        f"| failed or dropped requests (clients and probe) | {failed_total} | 0 | "
        f"{'✅' if failed_total == 0 else '❌'} |",
        f"| loading v0001 into vLLM (the load call) | "
        f"{(rnd['progress'] or {}).get('load_seconds', float('nan')):.2f} s | | |",
        f"| folder complete → first request served by v0001 | {served_after:.2f} s | | |",
        f"| folder complete → first token from v0001 (any client) | {token_after:.2f} s | | |",
        f"| for comparison: first token of base's answers under this load (p50) | "
        f"{base_first:.2f} s | | |",
        f"| probe: folder complete → first token from v0001 | {probe_token:.2f} s "
        f"({len(result['probes'])} probe requests, {probe_failed} failed) | <= 2 s | "
        f"{'✅' if answered_in_time else '❌'} |",
    ]
    body = (
        "## Hot-swap under load (issue 4)\n\n"
        f"`prefloop serve` with its own vLLM (embedded model, max 32 tokens per answer, "
        f"`promote: immediate`, no duels), {clients} clients asking for pairs and voting "
        "without pause. After the warm-up the admin API starts a round on 16 imported pairs; "
        f"it trained in {rnd['seconds'] or float('nan'):.0f} s beside the load (1 trainer "
        "thread), then the loop loaded `v0001` into vLLM and made it champion.\n\n"
        + "\n".join(lines) + "\n\n" + "\n".join(checks) + "\n")
    return body, failed_total == 0 and answered_in_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before the round")
    parser.add_argument("--after", type=float, default=20.0,
                        help="seconds of load after the promotion")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="most seconds to wait for the new champion")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    models = ROOT / ".cache" / "test" / "models"
    model = prepare_model("embedded", models, progress=print)
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-hotswap-") as tmp:
        data_dir = Path(tmp) / "data"
        pairs = Path(tmp) / "pairs.jsonl"
        seed_pairs(pairs)
        env = os.environ | {"PREFLOOP_ADMIN_PASSWORD": PASSWORD, "HF_HUB_OFFLINE": "1"}
        import subprocess

        subprocess.run([sys.executable, "-m", "prefloop", "import", str(pairs), "--data-dir",
                        str(data_dir)], check=True, env=env)
        serve = ServeProcess(data_dir, [
            "--model", str(model), "--max-tokens", "32", "--promote", "immediate",
            "--champion-engine", "lora",  # the LoRA replica's swap; merged: bench/champion.py
            "--duel-share", "0", "--baseline-share", "0", "--train-every", "10000",
            "--train-epochs", "1"], env=env)
        try:
            serve.wait_ready(timeout=600)
            print("serving; starting the clients", flush=True)
            result = asyncio.run(drive(serve.url, args.clients, data_dir, args.warmup,
                                       args.after, args.timeout))
        finally:
            serve.stop()
        body, ok = report(result, args.clients, data_dir / "prefloop.db")
    print(body)
    if not args.dry_run:
        write_section("hotswap", body)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
