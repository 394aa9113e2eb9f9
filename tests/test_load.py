"""The load benchmark (bench/load.py) at a small setting: a real ``prefloop serve`` on the
shared vLLM, with room for only 3 pairs at once, 10 clients chatting and voting while a real
round trains and its adapter is swapped in and promoted. No acknowledged vote is lost, no
server error, clients over capacity are told when to come back, /healthz stays fast.

The clients go on until the new adapter has answered a pair, however long that takes on this
machine; the time bound is only the deadline that fails the test."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from bench.load import PASSWORD, LoadPlan, run_load, summary
from tests.conftest import ROUND_TIMEOUT, ServeProcess

pytestmark = pytest.mark.slow


def test_load_with_a_round_and_a_swap(tmp_path: Path, external_args: list[str]) -> None:
    data_dir = tmp_path / "data"
    server = ServeProcess(data_dir, [
        *external_args, "--max-tokens", "16", "--max-generations", "3", "--kl-probe-prompts", "4",
        "--promote", "immediate", "--duel-share", "0", "--baseline-share", "0",
        "--train-every", "10000", "--train-epochs", "1"],
        env={"PREFLOOP_ADMIN_PASSWORD": PASSWORD, "HF_HUB_OFFLINE": "1", **os.environ})
    try:
        server.wait_ready()
        plan = LoadPlan(clients=10, turns=2, seconds=ROUND_TIMEOUT, max_pairs=None,
                        until_answered_by="v0001", train_after=6)
        result = run_load(server.url, plan)
    finally:
        server.stop()
    s = summary(result, data_dir / "prefloop.db")
    assert result.round.get("adapter") == "v0001", result.round
    assert not result.timed_out, f"v0001 answered no pair in {plan.seconds:.0f} s: {result.round}"
    assert result.answered_by["base"] and result.answered_by["v0001"], result.answered_by
    assert s["acknowledged"] >= 6 and s["stored"] == s["acknowledged"]
    assert s["server_errors"] == 0, s["outcomes"]
    assert s["turned_away"] > 0, s["outcomes"]  # 10 clients, room for 3: some were told to wait
    assert all(outcome == "ok" or outcome.startswith("turned away")
               for _, outcome in s["outcomes"]), s["outcomes"]
    assert s["health_failed"] == 0 and s["health_max"] <= 2.0, s
    with sqlite3.connect(data_dir / "prefloop.db") as db:
        policies = {row[0] for row in db.execute("select policy_a from pairs")}
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    assert {"base", "v0001"} <= policies  # answers before and after the swap
