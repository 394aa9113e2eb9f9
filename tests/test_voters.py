"""Voter quality (loop/voters.py) on a real SQLite store: hand-made vote streams for each
signal, flags that hold back one client's votes and nobody else's, clearing, the migration,
the export mark, and the admin API and Admin tab handlers. Nothing here needs vLLM."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlite_utils import Database
from starlette.testclient import TestClient

from prefloop.app.loop_tabs import WRONG_PASSWORD, LoopHandlers
from prefloop.app.server import create_app
from prefloop.cli import main
from prefloop.config import Settings
from prefloop.loop.controller import Loop
from prefloop.loop.voters import (
    binomial_cdf,
    binomial_sf,
    consensus_verdict,
    position_verdict,
    review_client,
    speed_verdict,
    two_sided_half,
    wilson_lower,
)
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.migrations import migrations
from prefloop.storage.store import Answer, NotFound, Store

HI = [{"role": "user", "content": "Say something."}]
TEXT = "A reasonable answer that takes a few seconds to read, as most answers do. " * 2
OTHER = TEXT.replace("reasonable", "acceptable")  # as long, not the same: a vote prefers one
PASSWORD = "s3cret-pw"
AUTH = {"Authorization": f"Bearer {PASSWORD}"}
DEAD = "http://127.0.0.1:9"  # nothing listens there: no model server is needed


def client_id(n: int) -> str:
    return f"{n:032x}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "prefloop.db") as s:
        yield s


def cast(store: Store, client: str | None, choice: str, *, policies: tuple[str, str] =
         ("base", "base"), seconds: float = 30.0, texts: tuple[str, str] = (TEXT, OTHER),
         timings: tuple[float, float] | None = None) -> str:
    """One pair voted ``choice`` by ``client``, ``seconds`` after both answers were complete
    (``timings``: first token and total ms of the pair's streaming)."""
    a, b = policies
    conversation = store.create_conversation(client)
    first_token_ms, total_ms = timings or (None, None)
    pair_id = store.add_pair(conversation, HI, Answer(a, texts[0], 1), Answer(b, texts[1], 2),
                             kind="sample" if a == b else "duel",
                             first_token_ms=first_token_ms, total_ms=total_ms)
    vote = store.vote(pair_id, choice, client_id=client)
    voted_at = datetime.fromisoformat(vote["created_at"])
    with store._write():  # backdate the pair: when its answers were complete
        store.db["pairs"].update(pair_id, {"created_at": (
            voted_at - timedelta(seconds=seconds)).isoformat(timespec="milliseconds")})
    return pair_id


def duel(store: Store, client: str | None, winner: str, loser: str, rng: random.Random,
         **kwargs) -> str:
    """A duel voted for ``winner``, its sides shuffled as the loop shuffles them."""
    if rng.random() < 0.5:
        return cast(store, client, "a", policies=(winner, loser), **kwargs)
    return cast(store, client, "b", policies=(loser, winner), **kwargs)


def crowd(store: Store, rng: random.Random, votes: int = 40, share: float = 0.8) -> None:
    """Four honest clients judging duels: v0001 beats base in ``share`` of their votes."""
    for i in range(votes):
        better = rng.random() < share
        duel(store, client_id(100 + i % 4), *(("v0001", "base") if better else
                                              ("base", "v0001")), rng)


# -- the maths, by hand ------------------------------------------------------------------------


def test_binomial_tails_match_hand_computed_values() -> None:
    # P(X <= 2), X ~ Bin(20, 1/2) = (1 + 20 + 190) / 2^20
    assert binomial_cdf(2, 20, 0.5) == pytest.approx(211 / 2**20, rel=1e-12)
    assert two_sided_half(18, 20) == pytest.approx(2 * 211 / 2**20, rel=1e-12)
    assert two_sided_half(10, 20) == 1.0 and two_sided_half(0, 0) == 1.0
    # P(X >= 3), X ~ Bin(4, 0.2) = 4 * 0.2^3 * 0.8 + 0.2^4
    assert binomial_sf(3, 4, 0.2) == pytest.approx(4 * 0.2**3 * 0.8 + 0.2**4, rel=1e-12)
    assert binomial_sf(0, 7, 0.3) == 1.0 and binomial_cdf(-1, 7, 0.3) == 0.0
    # Large n stays exact in log space: P(X <= 500 | 1000, 1/2) = 1/2 + P(X = 500)/2.
    middle = binomial_cdf(500, 1000, 0.5) - binomial_cdf(499, 1000, 0.5)
    assert binomial_cdf(500, 1000, 0.5) == pytest.approx(0.5 + middle / 2, rel=1e-9)
    # Wilson lower bound of 8/10 at z = 1.96, worked out by hand: 0.6785 / 1.3842.
    assert wilson_lower(8, 10, 1.96) == pytest.approx(0.49016, abs=1e-5)


def test_verdict_boundaries() -> None:
    # 18 of 20 on one side: p = 4.0e-4 < 0.001; 17 of 20: p = 2.6e-3.
    assert position_verdict(18, 20) and position_verdict(2, 20)
    assert position_verdict(17, 20) is None
    assert position_verdict(19, 19) is None  # too few decisive votes to judge
    # Too fast: 11 of 20 at an honest 20% is p = 5.6e-4; 10 of 20 is p = 2.6e-3.
    assert speed_verdict(11, 20) and speed_verdict(10, 20) is None
    assert consensus_verdict(5, 20, 0.7) and consensus_verdict(10, 20, 0.7) is None
    assert consensus_verdict(0, 19, 0.9) is None


def ever_flagged(verdict, p: float, looks: int) -> float:
    """Exact probability that a voter whose count grows with probability ``p`` per vote is
    flagged by ``verdict(count, votes)`` at some look, looking after every vote."""
    alive, flagged = {0: 1.0}, 0.0
    for n in range(1, looks + 1):
        grown: dict[int, float] = {}
        for k, mass in alive.items():
            grown[k + 1] = grown.get(k + 1, 0.0) + mass * p
            grown[k] = grown.get(k, 0.0) + mass * (1 - p)
        for k in [k for k in grown if verdict(k, n) is not None]:
            flagged += grown.pop(k)
        alive = grown
    return flagged


def test_honest_voters_are_rarely_flagged_even_looking_after_every_vote() -> None:
    """The error rates docs/DEVELOPMENT.md states, computed exactly on the real verdicts."""
    assert 0.0003 < ever_flagged(position_verdict, 0.5, 20) < 0.001  # one look: < alpha
    assert ever_flagged(position_verdict, 0.5, 200) == pytest.approx(0.0085, abs=0.0005)
    assert ever_flagged(speed_verdict, 0.2, 100) == pytest.approx(0.0051, abs=0.0005)


# -- each signal on hand-made vote streams ------------------------------------------------------


def test_a_clicker_always_on_one_side_is_flagged_a_random_order_voter_is_not(
        store: Store) -> None:
    biased, honest = client_id(1), client_id(2)
    rng = random.Random(0)
    for i in range(25):
        cast(store, biased, "a" if i % 12 else "b")  # 22 of 25 on A
        cast(store, honest, rng.choice("ab"))
        cast(store, honest, "tie")  # no side: left out of the position test
    reasons = review_client(store, biased)
    assert len(reasons) == 1 and reasons[0].startswith("position bias: chose A in 22 of 25")
    assert review_client(store, honest) == []
    assert [f["client_id"] for f in store.flagged_clients()] == [biased]


def test_votes_faster_than_reading_are_flagged(store: Store) -> None:
    fast, careful, streamed = client_id(1), client_id(2), client_id(3)
    rng = random.Random(1)
    for _ in range(25):
        # TEXT is 148 characters: ~3 s to read at 50 characters a second.
        cast(store, fast, rng.choice("ab"), seconds=0.4)
        cast(store, careful, rng.choice("ab"), seconds=rng.uniform(4, 40))
        # Voted 1 s after the answers completed, but they streamed in for 6 s before that:
        # read while they came.
        cast(store, streamed, rng.choice("ab"), seconds=1.0, timings=(300, 6300))
    reasons = review_client(store, fast)
    assert len(reasons) == 1 and reasons[0].startswith("too fast: 25 of 25 votes")
    assert review_client(store, careful) == []
    assert review_client(store, streamed) == []


def test_a_short_answer_is_read_fast_an_honest_quick_vote_now_and_then_is_allowed(
        store: Store) -> None:
    quick = client_id(1)
    rng = random.Random(2)
    for i in range(40):
        # "Yes." and "No.": the one-second floor applies; every fifth vote is hasty.
        cast(store, quick, rng.choice("ab"), texts=("Yes.", "No."),
             seconds=0.5 if i % 5 == 0 else 1.5)
    assert review_client(store, quick) == []


def test_a_contrarian_in_duels_is_flagged_a_consensus_voter_is_not(store: Store) -> None:
    rng = random.Random(3)
    crowd(store, rng)
    contrarian, agreeing, random_voter = client_id(1), client_id(2), client_id(3)
    for _ in range(25):
        duel(store, contrarian, "base", "v0001", rng)
        duel(store, agreeing, *(("v0001", "base") if rng.random() < 0.8 else
                                ("base", "v0001")), rng)
    reasons = review_client(store, contrarian)
    assert len(reasons) == 1 and reasons[0].startswith(
        "against the consensus: agreed with the other voters' clear majority in 0 of 25")
    assert review_client(store, agreeing) == []
    # A voter who picks at random where the crowd is clear is caught too, given more votes.
    for _ in range(150):
        duel(store, random_voter, *rng.sample(["base", "v0001"], 2), rng)
    assert review_client(store, random_voter)[0].startswith("against the consensus")


def test_no_consensus_without_enough_other_votes_or_a_clear_majority(store: Store) -> None:
    rng = random.Random(4)
    crowd(store, rng, votes=40, share=0.5)  # the others are split: no clear majority
    contrarian = client_id(1)
    for _ in range(30):
        duel(store, contrarian, "base", "v0001", rng)
    assert review_client(store, contrarian) == []
    lo_wins, hi_wins = store.duel_consensus(contrarian)[("base", "v0001")]
    assert lo_wins + hi_wins == 40  # its own 30 votes are not part of the consensus


def test_the_consensus_leaves_out_flagged_clients(store: Store) -> None:
    rng = random.Random(5)
    crowd(store, rng)
    bots = client_id(9)
    for _ in range(20):
        duel(store, bots, "base", "v0001", rng)
    store.flag_client(bots, ["test"])
    assert store.duel_consensus(client_id(1)) == {}  # no duels of its own
    duel(store, client_id(1), "v0001", "base", rng)
    assert sum(store.duel_consensus(client_id(1))[("base", "v0001")]) == 40


# -- flags in the store ------------------------------------------------------------------------


def test_a_flag_holds_back_only_that_clients_votes_and_clearing_restores_them(
        store: Store) -> None:
    rng = random.Random(6)
    flagged, other = client_id(1), client_id(2)
    for _ in range(25):
        cast(store, flagged, "a")
        cast(store, flagged, "a", policies=("v0001", "base"))
    mine = {cast(store, other, "b"), duel(store, other, "v0001", "base", rng),
            cast(store, None, "a"), duel(store, None, "base", "v0001", rng)}
    everyone = (store.count_trainable(), len(list(store.trainable_pairs())),
                len(store.duel_votes()))
    assert everyone == (54, 54, 27)

    assert review_client(store, flagged)  # 50 decisive votes, all on A
    assert store.count_trainable() == 4
    assert {r["id"] for r in store.trainable_pairs()} == mine
    assert {d["pair_id"] for d in store.duel_votes()} == {
        pair_id for pair_id in mine if store.pair(pair_id)["kind"] == "duel"}
    assert store.counts()["votes"] == 54  # nothing is lost
    assert len(store.client_votes(flagged)) == 50
    assert store.flagged_clients()[0]["votes"] == 50
    # A later vote counts for neither, and a second flag changes nothing.
    cast(store, flagged, "b")
    assert store.count_trainable() == 4
    assert store.flag_client(flagged, ["again"]) is False
    assert store.client_flag(flagged)["reasons"] != ["again"]
    assert review_client(store, flagged) == store.client_flag(flagged)["reasons"]

    store.clear_client(flagged, by="admin (test)")
    assert (store.count_trainable(), len(store.duel_votes())) == (55, 27)
    assert store.flagged_clients() == []
    assert store.client_flag(flagged)["cleared_by"] == "admin (test)"
    with pytest.raises(NotFound, match="is not flagged"):
        store.clear_client(flagged)
    # The cleared evidence never flags it again; enough new one-sided votes do.
    assert review_client(store, flagged) == []
    for _ in range(19):
        cast(store, flagged, "a")
    assert review_client(store, flagged) == []  # 19 new decisive votes: too few to judge
    cast(store, flagged, "a")
    assert review_client(store, flagged)[0].startswith("position bias: chose A in 20 of 20")
    assert store.count_trainable() == 4


def test_votes_without_a_client_are_never_reviewed_or_held_back(store: Store) -> None:
    for _ in range(30):
        cast(store, None, "a", seconds=0.0)
    assert review_client(store, None) == []
    store.flag_client(client_id(1), ["someone else"])
    assert store.count_trainable() == 30


def test_the_migration_applies_to_an_existing_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = Database(sqlite3.connect(path))
    migrations.apply(old, stop_before="m004_client_flags")
    assert "client_flags" not in old.table_names()
    old.close()
    with Store(path) as store:
        assert "client_flags" in store.db.table_names()
        assert migrations.pending(store.db) == []
        for _ in range(20):
            cast(store, client_id(1), "b")
        assert review_client(store, client_id(1))
        assert store.count_trainable() == 0


def test_the_export_marks_votes_of_flagged_clients_and_keeps_them(store: Store,
                                                                   tmp_path: Path) -> None:
    for _ in range(20):
        cast(store, client_id(1), "a")
    cast(store, client_id(2), "b")
    assert review_client(store, client_id(1))
    for fmt in ("trl", "hh"):
        out = tmp_path / f"pairs.{fmt}.jsonl"
        result = CliRunner().invoke(main, ["export", "--out", str(out), "--format", fmt,
                                           "--data-dir", str(store.path.parent)])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 21
        assert [row.get("flagged_client") for row in rows] == [True] * 20 + [None]


# -- the admin API and the Admin tab -------------------------------------------------------------


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    settings = Settings(data_dir=tmp_path, rating_resamples=20)
    store = Store(settings.db_path)
    pool = AdapterPool(Endpoint(DEAD, "x"), None, 16)
    loop = Loop(settings, store, pool, base_model=tmp_path, trainer_command=("false",), seed=0)
    yield loop
    loop.stop()
    pool.close()
    store.close()


@pytest.fixture
def api(loop: Loop) -> Iterator[TestClient]:
    sampler = PairSampler(Endpoint(DEAD, "x"), sampling=Sampling(0.8, 0.95, 16),
                          max_model_len=2048)
    with TestClient(create_app(loop.settings, loop.store, sampler, loop, PASSWORD)) as client:
        yield client


def flag_one(store: Store) -> str:
    bad = client_id(0xBAD)
    for _ in range(20):
        cast(store, bad, "a", seconds=0.1)
    assert len(review_client(store, bad)) == 2  # one-sided and too fast
    return bad


def test_admin_api_lists_and_clears_flagged_clients(loop: Loop, api: TestClient) -> None:
    bad = flag_one(loop.store)
    listed = api.get("/api/v1/admin/clients/flagged", headers=AUTH)
    assert listed.status_code == 200
    [entry] = listed.json()["clients"]
    assert entry["client_id"] == bad and entry["votes"] == 20 and len(entry["reasons"]) == 2
    assert entry["reasons"][1].startswith("too fast: 20 of 20 votes")

    cleared = api.post(f"/api/v1/admin/clients/{bad}/clear", headers=AUTH)
    assert cleared.status_code == 200 and cleared.json() == {"client_id": bad, "cleared": True}
    assert api.get("/api/v1/admin/clients/flagged", headers=AUTH).json() == {"clients": []}
    assert loop.store.count_trainable() == 20
    again = api.post(f"/api/v1/admin/clients/{bad}/clear", headers=AUTH)
    assert again.status_code == 404 and "is not flagged" in again.json()["detail"]


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"}])
def test_admin_flag_routes_need_the_password(loop: Loop, api: TestClient,
                                             headers: dict | None) -> None:
    bad = flag_one(loop.store)
    assert api.get("/api/v1/admin/clients/flagged", headers=headers).status_code == 401
    assert api.post(f"/api/v1/admin/clients/{bad}/clear", headers=headers).status_code == 401
    assert api.post("/api/v1/admin/clients/nonsense/clear", headers=headers).status_code == 401
    assert [f["client_id"] for f in loop.store.flagged_clients()] == [bad]


@pytest.mark.parametrize("bad_id", ["nonsense", "A" * 32, "0" * 31, "0" * 33, "%F0%9F%99%82"])
def test_clearing_a_malformed_client_id_is_422(api: TestClient, bad_id: str) -> None:
    response = api.post(f"/api/v1/admin/clients/{bad_id}/clear", headers=AUTH)
    assert response.status_code == 422
    assert "32 lowercase hex digits" in response.json()["detail"]


def test_clearing_a_client_never_flagged_is_404(api: TestClient) -> None:
    response = api.post(f"/api/v1/admin/clients/{client_id(7)}/clear", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["detail"] == f"client {client_id(7)} is not flagged"


def test_admin_tab_lists_and_clears_flagged_clients_with_the_password(loop: Loop) -> None:
    bad = flag_one(loop.store)
    handlers = LoopHandlers(loop, PASSWORD)
    refused = handlers.flagged_view("wrong")
    assert refused.message == WRONG_PASSWORD and refused.table.empty and refused.clients == []
    assert handlers.clear_flag(None, bad).message == WRONG_PASSWORD
    assert loop.store.flagged_clients()  # still flagged

    shown = handlers.flagged_view(PASSWORD)
    assert shown.message == "1 client flagged." and shown.clients == [bad]
    assert shown.table.iloc[0]["votes held back"] == 20
    assert "position bias" in shown.table.iloc[0]["reasons"]
    assert handlers.clear_flag(PASSWORD, "x").message.startswith("⚠️ Choose a flagged client")
    done = handlers.clear_flag(PASSWORD, bad)
    assert done.message == f"✅ Cleared {bad}: its votes count again. No client is flagged."
    assert done.table.empty and done.clients == []
    assert handlers.clear_flag(PASSWORD, bad).message.startswith(
        f"⚠️ client {bad} is not flagged")
