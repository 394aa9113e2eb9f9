"""`GET /api/v1/leaderboard` at 10,000 duel votes: refitted on every request (as before
issue 17) against the cached fits of ``loop/reports.py``, in one run.

A real SQLite store (a file, WAL) gets ``--votes`` duel votes between four policies of
known strength (ties, both-bad and written answers among them), then the real route answers
through FastAPI's test client. "Before" is a request that finds no cached fit, as every
request did before the cache: a fresh :class:`~prefloop.loop.reports.Reports` each time.
"After" is the first request (it fits and fills the cache), then requests that find it.

    .venv/bin/python bench/leaderboard.py [--votes 10000] [--repeats 5] [--cached 50]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402
from prefloop.app.loop_api import loop_routers  # noqa: E402
from prefloop.config import Settings  # noqa: E402
from prefloop.loop.controller import Loop  # noqa: E402
from prefloop.loop.reports import Reports  # noqa: E402
from prefloop.names import BASE, new_id  # noqa: E402
from prefloop.serving.adapters import AdapterPool  # noqa: E402
from prefloop.serving.vllm_server import Endpoint  # noqa: E402
from prefloop.storage.store import Store, now  # noqa: E402

STRENGTH = {BASE: 0.0, "v0001": 60.0, "v0002": 120.0, "v0003": 90.0}  # Elo points


def fill(db_path: Path, votes: int, seed: int = 0) -> None:
    """``votes`` voted duel pairs, one conversation each, in one transaction."""
    rng = random.Random(seed)
    stamp = now()
    conversations, pairs, rows = [], [], []
    for _ in range(votes):
        conversation_id, pair_id = new_id(), new_id()
        a, b = rng.sample(sorted(STRENGTH), 2)
        p_a = 1 / (1 + 10 ** ((STRENGTH[b] - STRENGTH[a]) / 400))
        draw = rng.random()
        choice = ("tie" if draw < 0.08 else "both_bad" if draw < 0.12 else
                  "written" if draw < 0.14 else "a" if rng.random() < p_a else "b")
        conversations.append((conversation_id, stamp, stamp))
        pairs.append((pair_id, conversation_id, a, b, stamp))
        rows.append((pair_id, choice, "mine" if choice == "written" else None, stamp))
    with sqlite3.connect(db_path) as db:
        db.executemany("insert into conversations (id, created_at, updated_at) "
                       "values (?, ?, ?)", conversations)
        db.executemany("insert into pairs (id, conversation_id, turn, kind, context, "
                       "dropped_messages, policy_a, policy_b, text_a, text_b, sampling, "
                       "created_at) values (?, ?, 0, 'duel', "
                       "'[{\"role\": \"user\", \"content\": \"Hi\"}]', 0, ?, ?, 'one', 'two', "
                       "'{}', ?)", pairs)
        db.executemany("insert into votes (pair_id, choice, answer, created_at) "
                       "values (?, ?, ?, ?)", rows)
    db.close()


def timed(client: TestClient) -> float:
    start = time.perf_counter()
    response = client.get("/api/v1/leaderboard")
    seconds = time.perf_counter() - start
    assert response.status_code == 200 and response.json()["standings"], response.text
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5, help="uncached requests")
    parser.add_argument("--cached", type=int, default=50, help="cached requests")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        store = Store(settings.db_path)
        fill(settings.db_path, args.votes)
        for name in sorted(STRENGTH)[1:]:
            store.add_adapter(name, Path(tmp) / name, None, BASE, state="retired")
        pool = AdapterPool(Endpoint("http://127.0.0.1:9", "x"), None, 16)  # never called
        loop = Loop(settings, store, pool, base_model=Path(tmp), seed=0)
        app = FastAPI()
        for router in loop_routers(loop, None):
            app.include_router(router)
        with TestClient(app) as client:
            timed(client)  # imports and first connections, outside the figures
            before = []
            for _ in range(args.repeats):
                loop.reports = Reports(loop)  # nothing cached: what every request did
                before.append(timed(client))
            loop.reports = Reports(loop)
            first = timed(client)
            cached = [timed(client) for _ in range(args.cached)]
            duel_votes = len(store.duel_votes())
        pool.close()
        store.close()

    old = statistics.median(before)
    rows = [("before: every request refits (median of "
             f"{args.repeats})", old),
            ("after: first request (fits, fills the cache)", first),
            (f"after: cached requests (median of {args.cached})", statistics.median(cached)),
            (f"after: cached requests (slowest of {args.cached})", max(cached))]
    table = ["| request | time | ÷ before |", "|---|---|---|"]
    table += [f"| {label} | {seconds * 1000:.1f} ms | {seconds / old:.4f} |"
              for label, seconds in rows]
    print("\n".join(table))
    write_section("leaderboard", f"""## Leaderboard requests at {args.votes:,} duel votes (issue 17)

`GET /api/v1/leaderboard` (no login) on a real SQLite store with {args.votes:,} voted duel \
pairs between four policies ({duel_votes:,} duel votes counted; ties, both-bad and \
written answers among them), through FastAPI's test client, `rating_resamples` = \
{settings.rating_resamples}. Before issue 17 every request ran the Bradley-Terry fit, its \
{settings.rating_resamples} bootstrap refits and up to 20 refits for the ratings over time; \
now the fits are cached until the duel votes that count change (a vote, a client flagged or \
cleared: `Store.duel_votes_key`), and a cached request reads only that key, the adapters \
and the champion. All requests ran in one process, one after the other: load on the machine \
weighs on both sides alike, and the ratios are what compare.

""" + "\n".join(table))


if __name__ == "__main__":
    main()
