"""The loop's schedule with APScheduler really running: rounds start on their own when enough
new votes exist, never two at a time, and not while paused."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefloop.config import Settings
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Store

# A trainer that takes 2 s and fails: the schedule, not training, is under test.
SLOW_FAIL = (sys.executable, "-c", "import sys, time; time.sleep(2); sys.exit('no trainer')")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "prefloop.db") as store:
        yield store


def make_loop(tmp_path: Path, store: Store, **settings) -> Loop:
    settings = Settings(data_dir=tmp_path, **({"train_every": 0.05, "min_new_pairs": 2}
                                               | settings))
    pool = AdapterPool(Endpoint("http://127.0.0.1:9", "x"), None, 16)  # nothing to load
    return Loop(settings, store, pool, base_model=tmp_path, trainer_command=SLOW_FAIL)


def add_votes(store: Store, n: int, choice: str = "a") -> None:
    for _ in range(n):
        pair = store.add_pair(store.create_conversation(), [{"role": "user", "content": "Hi"}],
                              Answer("base", "Hello!", 1), Answer("base", "Go away.", 2))
        store.vote(pair, choice)


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_schedule_starts_rounds_and_skips_while_one_runs(tmp_path: Path,
                                                             store: Store) -> None:
    add_votes(store, 1)
    loop = make_loop(tmp_path, store)  # a tick every 3 s
    loop.start()
    try:
        time.sleep(4)
        assert store.rounds() == []  # 1 new vote < min_new_pairs
        add_votes(store, 1, "tie")
        time.sleep(4)
        assert store.rounds() == []  # ties do not count
        add_votes(store, 1, "b")
        wait_for(lambda: any(r["status"] == "failed" for r in store.rounds()))
        rounds = store.rounds()
        failed = [r for r in rounds if r["status"] == "failed"]
        assert failed[0]["trigger"] == "schedule" and "no trainer" in failed[0]["error"]
        # Ticks that came while it ran were recorded as skipped, not run beside it.
        assert {r["status"] for r in rounds} <= {"failed", "skipped", "running"}
        assert all(r["error"] == "another round was running"
                   for r in rounds if r["status"] == "skipped")
    finally:
        loop.stop()


def test_a_paused_loop_starts_nothing(tmp_path: Path, store: Store) -> None:
    add_votes(store, 3)
    loop = make_loop(tmp_path, store)
    loop.pause()
    loop.start()
    try:
        time.sleep(7)
        assert store.rounds() == []
        loop.resume()
        wait_for(lambda: store.rounds() != [])
    finally:
        loop.stop()
