"""The read side (loop/reports.py): the leaderboard's fits are cached, and refitted exactly
when the duel votes that count change, on a real store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prefloop.config import Settings
from prefloop.loop import reports
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Store

HI = [{"role": "user", "content": "Hi"}]
CLIENT = "ab" * 16


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    settings = Settings(data_dir=tmp_path, rating_resamples=5)
    store = Store(settings.db_path)
    pool = AdapterPool(Endpoint("http://127.0.0.1:9", "x"), None, 16)
    loop = Loop(settings, store, pool, base_model=tmp_path, seed=0)
    store.add_adapter("v0001", tmp_path / "v0001", None, "base")
    yield loop
    pool.close()
    store.close()


@pytest.fixture
def fits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of votes each real fit ran on, one entry per fit."""
    calls: list[int] = []
    real = reports.fit_ratings

    def counted(votes, *args, **kwargs):
        calls.append(len(votes))
        return real(votes, *args, **kwargs)

    monkeypatch.setattr(reports, "fit_ratings", counted)
    return calls


def vote(loop: Loop, a: str, b: str, choice: str, kind: str = "duel",
         client_id: str | None = None) -> None:
    conversation = loop.store.create_conversation(client_id)
    pair = loop.store.add_pair(conversation, HI, Answer(a, "one", 1), Answer(b, "two", 2),
                               kind=kind)
    loop.store.vote(pair, choice, client_id=client_id)


def ratings(loop: Loop) -> dict[str, float]:
    return {row["policy"]: row["rating"] for row in loop.reports.leaderboard()}


def test_the_leaderboard_is_fitted_once_per_state_of_the_duel_votes(loop: Loop,
                                                                    fits: list[int]) -> None:
    for choice in ("a", "a", "b"):
        vote(loop, "v0001", "base", choice)
    first = loop.reports.leaderboard()
    assert loop.reports.leaderboard() == first and loop.reports.ratings_over_time()
    assert fits == [3]

    vote(loop, "base", "base", "a", kind="sample")  # no duel: nothing to refit
    assert loop.reports.leaderboard() == first and fits == [3]

    vote(loop, "v0001", "base", "a")
    assert ratings(loop)["v0001"] > first[0]["rating"] and fits == [3, 4]


def test_flagging_or_clearing_a_voter_refits(loop: Loop, fits: list[int]) -> None:
    """A flagged client's duel votes stop counting, and count again once cleared: the
    number of duel votes alone would not tell (none is added)."""
    for _ in range(3):
        vote(loop, "v0001", "base", "a", client_id=CLIENT)
    vote(loop, "v0001", "base", "b")
    assert ratings(loop)["v0001"] > 1000 and fits == [4]

    loop.store.flag_client(CLIENT, ["test"])
    assert ratings(loop)["v0001"] < 1000 and fits == [4, 1]
    loop.store.clear_client(CLIENT)
    assert ratings(loop)["v0001"] > 1000 and fits == [4, 1, 4]


def test_states_are_read_fresh_beside_the_cached_fit(loop: Loop, fits: list[int]) -> None:
    """The adapters' states and the champion are not part of the fit: a promotion shows at
    once, without a refit."""
    vote(loop, "v0001", "base", "a")
    states = {row["policy"]: row["state"] for row in loop.reports.leaderboard()}
    assert states == {"v0001": "candidate", "base": "champion"}
    loop.store.crown("v0001", "test")
    states = {row["policy"]: row["state"] for row in loop.reports.leaderboard()}
    assert states == {"v0001": "champion", "base": "base"} and fits == [1]
