"""Who may ask for what: client cookies, ownership of pairs, rate limits, generation caps,
database faults and /metrics, through the real FastAPI app on a real store.

The model server here is a dead endpoint (nothing listens on port 9): a pair that passes every
check fails with 503 at sampling, which is what tells an admitted request from a refused one.
Real generation under limits is in test_load.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from prefloop.app.arena import ArenaHandlers, ArenaState
from prefloop.app.guard import COOKIE, Client, Guard, Window, parse_client_id
from prefloop.app.server import create_app
from prefloop.config import Settings
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Store

DEAD = "http://127.0.0.1:9"
HI = [{"role": "user", "content": "Hi"}]


# -- the sliding window ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_allows_limit_events_per_period_then_says_how_long_to_wait() -> None:
    clock = Clock()
    window = Window(3, 60, clock=clock)
    assert [window.hit("k") for _ in range(3)] == [None, None, None]
    clock.now += 10
    assert window.hit("k") == pytest.approx(50)  # the first event leaves the window at +60
    assert window.hit("other") is None  # keys are counted apart
    clock.now += 50  # all three have left the window; a refused hit counts for nothing
    assert [window.hit("k") for _ in range(3)] == [None, None, None]
    assert window.hit("k") == pytest.approx(60)


def test_window_forgets_the_least_recent_keys_past_max_keys() -> None:
    window = Window(1, 60, max_keys=3, clock=Clock())
    for key in "abcd":
        assert window.hit(key) is None
    assert len(window._events) == 3
    assert window.hit("a") is None  # forgotten, so allowed again
    assert window.hit("d") is not None


@pytest.mark.parametrize("header, expected", [
    (f"{COOKIE}={'a' * 32}", "a" * 32),
    (f"theme=dark; {COOKIE}={'0123456789abcdef' * 2}", "0123456789abcdef" * 2),
    (f"{COOKIE}={'A' * 32}", None),          # upper case: not an id we issue
    (f"{COOKIE}={'a' * 31}", None),
    (f"{COOKIE}={'a' * 32}x", None),
    (f"{COOKIE}=../../etc", None),
    (f'{COOKIE}="<script>"', None),
    ("", None),
    ("garbage;;;===", None),
])
def test_parse_client_id(header: str, expected: str | None) -> None:
    assert parse_client_id(header) == expected


def test_ip_hashes_are_salted_per_process_and_never_the_address() -> None:
    settings = Settings(data_dir=Path("/nonexistent"))
    one, two = Guard(settings), Guard(settings)
    assert one.hash_ip("203.0.113.7") == one.hash_ip("203.0.113.7")
    assert one.hash_ip("203.0.113.7") != two.hash_ip("203.0.113.7")
    assert one.hash_ip("203.0.113.7") != one.hash_ip("203.0.113.8")
    assert "203" not in one.hash_ip("203.0.113.7")


def test_generation_slots_are_given_back_even_when_the_body_fails() -> None:
    guard = Guard(Settings(data_dir=Path("/nonexistent"), client_generations=1,
                           max_generations=1))
    with pytest.raises(RuntimeError), guard.generation(Client("c" * 32)):
        assert guard.running == 1
        raise RuntimeError("sampling failed")
    assert guard.running == 0 and not guard._running
    with guard.generation(Client("c" * 32)):
        pass


# -- the app -----------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, pairs_per_minute=3, votes_per_minute=4,
                    client_generations=1, max_generations=2)


@contextmanager
def app_for(settings: Settings, store: Store) -> Iterator:
    sampler = PairSampler(Endpoint(DEAD, "x"), sampling=Sampling(0.8, 0.95, 16),
                          max_model_len=2048)
    app = create_app(settings, store, sampler)
    yield app


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    with Store(settings.db_path, busy_timeout_s=1.0) as store:
        yield store


@pytest.fixture
def app(settings: Settings, store: Store):
    with app_for(settings, store) as app:
        yield app


@contextmanager
def visitor(app) -> Iterator[TestClient]:
    """A new visitor: its own cookie jar, so its own client id after the first request.
    (Not entered as a context: that would run the app's lifespan, which closes the sampler
    at its end, and the app outlives each visitor here.)"""
    client = TestClient(app)
    try:
        yield client
    finally:
        client.close()


def client_id(client: TestClient) -> str:
    if COOKIE not in client.cookies:
        assert client.get("/healthz").status_code in (200, 503)
    return client.cookies[COOKIE]


def own_pair(store: Store, owner: str | None) -> str:
    conversation = store.create_conversation(owner)
    return store.add_pair(conversation, HI, Answer("base", "one", 1), Answer("base", "two", 2))


def counts(store: Store) -> dict[str, int]:
    return store.counts()


def test_the_first_response_sets_a_random_httponly_cookie_that_is_kept(app) -> None:
    with visitor(app) as client:
        first = client.get("/healthz")
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        ident = client.cookies[COOKIE]
        assert parse_client_id(f"{COOKIE}={ident}") == ident
        again = client.get("/healthz")
        assert "set-cookie" not in again.headers  # a valid cookie is kept as it is
    with visitor(app) as other:
        assert client_id(other) != ident


def test_a_forged_cookie_is_replaced_by_a_fresh_id(app) -> None:
    with visitor(app) as client:
        client.cookies.set(COOKIE, "../../admin")
        response = client.get("/healthz")
        assert f"{COOKIE}=" in response.headers["set-cookie"]
        assert "../../admin" not in response.headers["set-cookie"]


def test_pairs_past_the_per_client_rate_get_429_with_retry_after(app, store: Store) -> None:
    before = counts(store)
    with visitor(app) as client:
        for _ in range(3):  # admitted: they reach the (dead) model server
            assert client.post("/api/v1/pairs", json={"message": "Hi"}).status_code == 503
        refused = client.post("/api/v1/pairs", json={"message": "Hi"})
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert "a minute" in refused.json()["detail"]
    with visitor(app) as other:  # another client has its own budget
        assert other.post("/api/v1/pairs", json={"message": "Hi"}).status_code == 503
    assert counts(store) == before
    metrics = scrape(app)
    assert metrics["prefloop_refused_requests_total"][("pairs_per_minute",)] == 1


def test_the_ip_limit_counts_clients_that_share_an_address(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, ip_pairs_per_minute=2)
    with Store(settings.db_path) as store, app_for(settings, store) as app:
        statuses = []
        for _ in range(3):  # three cookie ids, one address: dropping the cookie does not help
            with visitor(app) as client:
                statuses.append(client.post("/api/v1/pairs", json={"message": "Hi"}).status_code)
        assert statuses == [503, 503, 429]
        rows = store.db.execute("select * from conversations").fetchall()
        assert rows == []


def test_over_capacity_is_503_with_retry_after_and_a_client_may_hold_only_its_share(
        app, store: Store) -> None:
    guard = app.state.service.guard
    with visitor(app) as client, visitor(app) as other:
        me = guard.client(client_id(client), "testclient")
        with guard.generation(me):  # my one slot is taken: I am told to wait (429)
            response = client.post("/api/v1/pairs", json={"message": "Hi"})
            assert response.status_code == 429 and "being written" in response.json()["detail"]
            assert "Retry-After" in response.headers
            with guard.generation(None):  # now every slot is taken: everyone waits (503)
                response = other.post("/api/v1/pairs", json={"message": "Hi"})
                assert response.status_code == 503
                assert response.headers["Retry-After"] == "5"
                assert "try again" in response.json()["detail"]
        assert guard.running == 0
        # With the slots free again the request is admitted (and reaches the dead server).
        response = other.post("/api/v1/pairs", json={"message": "Hi"})
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert "model" in response.json()["detail"].lower()


def test_votes_only_on_your_own_pairs(app, store: Store) -> None:
    with visitor(app) as owner, visitor(app) as stranger:
        pair = own_pair(store, client_id(owner))
        before = counts(store)
        response = stranger.post("/api/v1/votes", json={"pair_id": pair, "choice": "a"})
        assert response.status_code == 403 and COOKIE in response.json()["detail"]
        assert counts(store) == before and store.vote_of(pair) is None
        # The pair's own conversation is checked when it is named.
        other_conversation = store.create_conversation(client_id(owner))
        response = owner.post("/api/v1/votes", json={
            "pair_id": pair, "choice": "a", "conversation_id": other_conversation})
        assert response.status_code == 409 and "another conversation" in response.text
        assert store.vote_of(pair) is None
        response = owner.post("/api/v1/votes", json={"pair_id": pair, "choice": "a"})
        assert response.status_code == 200


def test_follow_ups_only_in_your_own_conversation(app, store: Store) -> None:
    with visitor(app) as owner, visitor(app) as stranger:
        pair = own_pair(store, client_id(owner))
        conversation = store.pair(pair)["conversation_id"]
        store.vote(pair, "a")
        before = counts(store)
        response = stranger.post("/api/v1/pairs", json={"message": "Go on",
                                                        "conversation_id": conversation})
        assert response.status_code == 403
        assert counts(store) == before


def test_votes_past_the_per_client_rate_get_429(app, store: Store) -> None:
    with visitor(app) as client:
        me = client_id(client)
        pairs = [own_pair(store, me) for _ in range(5)]
        statuses = [client.post("/api/v1/votes", json={"pair_id": p, "choice": "b"}).status_code
                    for p in pairs]
        assert statuses == [200, 200, 200, 200, 429]
        assert store.vote_of(pairs[-1]) is None


def test_concurrent_votes_on_one_pair_exactly_one_wins(app, store: Store) -> None:
    with visitor(app) as client:
        pair = own_pair(store, client_id(client))
        results: list[int] = []

        def send(choice: str) -> None:
            results.append(client.post("/api/v1/votes",
                                       json={"pair_id": pair, "choice": choice}).status_code)

        threads = [threading.Thread(target=send, args=(c,)) for c in "abab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == [200, 409, 409, 409]
        assert store.db.execute("select count(*) from votes").fetchone() == (1,)


# -- database faults ---------------------------------------------------------------------------


@contextmanager
def locked(db_path: Path, seconds: float | None = None) -> Iterator[threading.Event]:
    """Another writer holds the database's write lock (for ``seconds``, or the block).
    Yields an event that is set just before the lock is let go."""
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("insert into loop_state (key, value) values ('lock', 'held')")
    releasing = threading.Event()

    def release() -> None:
        releasing.set()
        other.execute("ROLLBACK")

    timer = None
    if seconds is not None:
        timer = threading.Timer(seconds, release)
        timer.start()
    try:
        yield releasing
    finally:
        if timer is not None:
            timer.join()
        else:
            other.execute("ROLLBACK")
        other.close()


def test_a_vote_waits_for_a_short_lock_and_is_stored(app, store: Store,
                                                     settings: Settings) -> None:
    with visitor(app) as client:
        pair = own_pair(store, client_id(client))
        with locked(settings.db_path, seconds=0.5) as releasing:  # < the 1 s busy timeout
            response = client.post("/api/v1/votes", json={"pair_id": pair, "choice": "a"})
            # It was answered only once the other writer let go: it waited for the lock.
            assert releasing.is_set()
        assert response.status_code == 200
        assert store.vote_of(pair)["choice"] == "a"


def test_a_vote_behind_a_long_lock_fails_clearly_and_can_be_sent_again(
        app, store: Store, settings: Settings) -> None:
    with visitor(app) as client:
        pair = own_pair(store, client_id(client))
        with locked(settings.db_path):  # longer than the store's 1 s busy timeout
            response = client.post("/api/v1/votes", json={"pair_id": pair, "choice": "a"})
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert "locked" in response.json()["detail"]
        assert "nothing was saved" in response.json()["detail"]
        assert store.vote_of(pair) is None
        assert client.post("/api/v1/votes",
                           json={"pair_id": pair, "choice": "a"}).status_code == 200


def test_a_full_disk_refuses_the_vote_clearly_and_keeps_what_was_there(
        app, store: Store) -> None:
    with visitor(app) as client:
        me = client_id(client)
        earlier, pair = own_pair(store, me), own_pair(store, me)
        assert client.post("/api/v1/votes",
                           json={"pair_id": earlier, "choice": "b"}).status_code == 200
        pages = store.db.execute("pragma page_count").fetchone()[0]
        # SQLite's own limit makes the file "full": the same error as a full disk.
        store.db.execute(f"pragma max_page_count = {pages}")
        long_answer = "A better answer. " * 450  # needs new (overflow) pages
        response = client.post("/api/v1/votes", json={"pair_id": pair, "answer": long_answer})
        assert response.status_code == 503, response.text
        assert "full" in response.json()["detail"]
        # The page says so too, and keeps the vote buttons for another try.
        view = ArenaHandlers(app.state.service).vote(
            "written", ArenaState(pair_id=pair), long_answer)
        assert "could not be saved" in view.status and view.voting
        store.db.execute("pragma max_page_count = 1073741823")
        assert store.db.execute("pragma integrity_check").fetchone() == ("ok",)
        assert store.vote_of(earlier)["choice"] == "b" and store.vote_of(pair) is None
        assert client.post("/api/v1/votes",
                           json={"pair_id": pair, "answer": long_answer}).status_code == 200


# -- /metrics ----------------------------------------------------------------------------------


def scrape(app) -> dict[str, dict[tuple[str, ...], float]]:
    """Sample name -> label values (ordered by label name) -> value."""
    with visitor(app) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(value for _, value in sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


def test_metrics_count_what_is_stored(app, store: Store) -> None:
    with ExitStack() as stack:
        client = stack.enter_context(visitor(app))
        me = client_id(client)
        for choice in ("a", "a", "tie"):
            client.post("/api/v1/votes", json={"pair_id": own_pair(store, me),
                                                "choice": choice})
        own_pair(store, me)  # not voted on
    store.record_skipped_round("schedule", "test")
    metrics = scrape(app)
    assert metrics["prefloop_pairs_total"][()] == 4
    assert metrics["prefloop_votes_total"][("a",)] == 2
    assert metrics["prefloop_votes_total"][("tie",)] == 1
    assert metrics["prefloop_votes_total"][("written",)] == 0
    assert metrics["prefloop_rounds"][("skipped",)] == 1
    assert metrics["prefloop_rounds"][("failed",)] == 0
    assert metrics["prefloop_policy"] == {("base", "champion"): 1}  # (policy, role)
    assert metrics["prefloop_generations_running"][()] == 0
    assert "prefloop_pair_seconds_bucket" not in metrics  # no pair was written here


def test_the_page_says_when_a_client_is_over_its_limit_or_not_the_owner(app,
                                                                        store: Store) -> None:
    handlers = ArenaHandlers(app.state.service)
    me, other = Client("a" * 32, "hash-1"), Client("b" * 32, "hash-2")

    def send(message: str, state: ArenaState, client: Client) -> str:
        async def last() -> str:
            views = [view async for view in handlers.send(message, state, client)]
            return views[-1].status
        return asyncio.run(last())

    statuses = [send("Hi", ArenaState(), me) for _ in range(4)]
    assert all("model server" in s for s in statuses[:3]), statuses  # admitted, dead model
    assert "too many messages" in statuses[3] and "try again in" in statuses[3]
    # Someone else's conversation cannot be continued from the page either.
    pair = own_pair(store, me.id)
    store.vote(pair, "a")
    conversation = store.pair(pair)["conversation_id"]
    status = send("Go on", ArenaState(conversation_id=conversation), other)
    assert "belongs to another client" in status
    view = handlers.vote("a", ArenaState(conversation_id=conversation,
                                         pair_id=own_pair(store, me.id)), client=other)
    assert "belongs to another client" in view.status and view.voting
