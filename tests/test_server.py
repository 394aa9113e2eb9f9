"""The web process around the app: /healthz says why the database is unhealthy, and closing
the runtime lets a scheduled round record its end before the store closes."""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from prefloop.app.server import Runtime, create_app
from prefloop.config import Settings
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Store
from tests.conftest import wait_for

DEAD = Endpoint("http://127.0.0.1:9", "x")  # nothing listens there
DEADLINE = 120.0  # seconds; a tick comes every 3 s, so only a hang gets near it
# A trainer that never ends by itself: only the loop's stop ends it.
FOREVER = (sys.executable, "-c", "import signal\nsignal.pause()\n")


def test_healthz_logs_why_the_database_is_unhealthy(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "prefloop.db")
    sampler = PairSampler(DEAD, sampling=Sampling(0.8, 0.95, 16), max_model_len=2048)
    app = create_app(Settings(data_dir=tmp_path), store, sampler)
    store.close()  # every query fails from now on
    with TestClient(app) as client, caplog.at_level(logging.ERROR):
        response = client.get("/healthz")
    assert response.status_code == 503 and response.json()["database"] is False
    [record] = [r for r in caplog.records if "health check" in r.getMessage()]
    assert "the database failed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is sqlite3.ProgrammingError


def test_closing_the_runtime_ends_a_scheduled_round_before_the_store(tmp_path: Path) -> None:
    """A round the schedule started is running when prefloop stops: its trainer is killed
    and the round is recorded failed, in the store, before the store closes."""
    settings = Settings(data_dir=tmp_path, train_every=0.05, min_new_pairs=1)  # every 3 s
    store = Store(settings.db_path)
    pair = store.add_pair(store.create_conversation(), [{"role": "user", "content": "Hi"}],
                          Answer("base", "Hello!", 1), Answer("base", "Go away.", 2))
    store.vote(pair, "a")
    pool = AdapterPool(DEAD, None, 16)
    loop = Loop(settings, store, pool, base_model=tmp_path, trainer_command=FOREVER)
    loop.start()
    wait_for(lambda: any(r["status"] == "running" for r in store.rounds()), DEADLINE,
             "the scheduled round to start")

    Runtime(store, DEAD, None, loop).close()

    with Store(settings.db_path) as reopened:
        [round_] = reopened.rounds()
    assert round_["status"] == "failed" and "stopped" in round_["error"], round_
