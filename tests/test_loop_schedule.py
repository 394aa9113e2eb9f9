"""The loop's schedule with APScheduler really running: rounds start on their own when enough
new votes exist, never two at a time, and not while paused."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from apscheduler.events import EVENT_JOB_MAX_INSTANCES

from prefloop.config import Settings
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Store
from tests.conftest import wait_for

# The schedule, not training, is under test: a trainer that waits until the test opens its
# gate (a file), then fails.
GATED_FAIL = ("import pathlib, sys, time\n"
              "while not pathlib.Path({gate!r}).exists():\n"
              "    time.sleep(0.05)\n"
              "sys.exit('no trainer')\n")
DEADLINE = 120.0  # seconds; a tick comes every 3 s, so only a hang gets near it


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "prefloop.db") as store:
        yield store


def make_loop(tmp_path: Path, store: Store, **settings) -> Loop:
    settings = Settings(data_dir=tmp_path, **({"train_every": 0.05, "min_new_pairs": 2}
                                               | settings))
    pool = AdapterPool(Endpoint("http://127.0.0.1:9", "x"), None, 16)  # nothing to load
    gate = tmp_path / "gate"
    return Loop(settings, store, pool, base_model=tmp_path,
                trainer_command=(sys.executable, "-c", GATED_FAIL.format(gate=str(gate))))


def add_votes(store: Store, n: int, choice: str = "a") -> None:
    for _ in range(n):
        pair = store.add_pair(store.create_conversation(), [{"role": "user", "content": "Hi"}],
                              Answer("base", "Hello!", 1), Answer("base", "Go away.", 2))
        store.vote(pair, choice)


class Ticks:
    """Counts the schedule's calls of ``loop.tick`` (installed before ``loop.start``)."""

    def __init__(self, loop: Loop) -> None:
        self.tick = loop.tick
        self.started = 0
        self.finished: list[int] = []  # numbers of the ticks that returned
        loop.tick = self  # the scheduler calls what loop.tick is when it starts

    def __call__(self) -> int | None:
        self.started += 1
        number = self.started
        try:
            return self.tick()
        finally:
            self.finished.append(number)

    def wait_for_next(self) -> None:
        """Return once a tick that started after this call has returned: it saw the store as
        it is now."""
        after = self.started
        wait_for(lambda: any(n > after for n in self.finished), DEADLINE, "the next tick")


def test_the_schedule_starts_rounds_and_never_two_at_a_time(tmp_path: Path,
                                                           store: Store) -> None:
    add_votes(store, 1)
    loop = make_loop(tmp_path, store)  # a tick every 3 s
    ticks = Ticks(loop)
    dropped = threading.Event()
    loop.start()
    # A tick that comes due while the last one still runs (the round runs in it) is dropped
    # by APScheduler (max_instances=1): the listener sees that happen.
    loop._scheduler.add_listener(lambda event: dropped.set(), EVENT_JOB_MAX_INSTANCES)
    try:
        ticks.wait_for_next()
        assert store.rounds() == []  # 1 new vote < min_new_pairs
        add_votes(store, 1, "tie")
        ticks.wait_for_next()
        assert store.rounds() == []  # ties do not count
        add_votes(store, 1, "b")
        wait_for(lambda: store.rounds() != [], DEADLINE, "a scheduled round")
        [running] = store.rounds()
        assert running["status"] == "running" and running["trigger"] == "schedule"

        assert dropped.wait(DEADLINE), "no tick came due while the round ran"
        assert [r["status"] for r in store.rounds()] == ["running"]
        # A check that does get through while a round runs records a skipped round.
        # (ticks.tick is the loop's own tick, not counted.)
        skipped = store.round(ticks.tick())
        assert skipped["status"] == "skipped" and skipped["trigger"] == "schedule"
        assert skipped["error"] == "another round was running"

        (tmp_path / "gate").touch()  # the trainer fails
        wait_for(lambda: store.round(running["id"])["status"] == "failed", DEADLINE,
                 "the round to fail")
        assert "no trainer" in store.round(running["id"])["error"]
        # Later ticks may start and fail more rounds, each after the last one ended.
        later = [r for r in store.rounds() if r["id"] not in (running["id"], skipped["id"])]
        assert all(r["status"] in ("running", "failed") and r["trigger"] == "schedule"
                   for r in later), later
    finally:
        loop.stop()


def test_a_paused_loop_starts_nothing(tmp_path: Path, store: Store) -> None:
    add_votes(store, 3)
    loop = make_loop(tmp_path, store)
    ticks = Ticks(loop)
    loop.pause()
    loop.start()
    try:
        ticks.wait_for_next()
        assert store.rounds() == []  # the tick came and started nothing
        (tmp_path / "gate").touch()  # rounds fail at once from now on
        loop.resume()
        wait_for(lambda: store.rounds() != [], DEADLINE, "a round after resume")
        assert store.rounds()[0]["trigger"] == "schedule"
    finally:
        loop.stop()
