"""Property-based: whatever body a client sends to the JSON API, the reply is a clear error
or a success, never a 500, and a refused request changes nothing in the database.

The app is the real one over a real store; the model server is a dead endpoint, so a pair
request that passes every check ends in 503 (and stores nothing) instead of generating.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from prefloop.app.guard import COOKIE
from prefloop.app.server import create_app
from prefloop.config import Settings
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Store

DEAD = "http://127.0.0.1:9"
CLEAR = {200, 400, 403, 404, 409, 422, 429, 503}  # 400: a body that is not UTF-8

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)
texts = st.text(max_size=60) | st.sampled_from(["", " ", "\n\t", "hi", "<script>1</script>",
                                                "a\x00b", "\ud800", "x" * 5000])


class World:
    """One app and store for all examples; the client's own pairs to aim votes at."""

    def __init__(self, tmp: Path) -> None:
        self.settings = Settings(data_dir=tmp, pairs_per_minute=0, votes_per_minute=0,
                                 max_message_chars=4000, max_answer_chars=200)
        self.store = Store(self.settings.db_path)
        sampler = PairSampler(Endpoint(DEAD, "x"), sampling=Sampling(0.8, 0.95, 16),
                              max_model_len=2048)
        self.client = TestClient(create_app(self.settings, self.store, sampler))
        self.client.get("/healthz")
        me = self.client.cookies[COOKIE]
        self.conversations, self.pairs = [], []
        for i in range(6):
            conversation = self.store.create_conversation(me)
            self.conversations.append(conversation)
            self.pairs.append(self.store.add_pair(
                conversation, [{"role": "user", "content": f"Hi {i}"}],
                Answer("base", "one", 1), Answer("base", "two", 2)))
        stranger = self.store.create_conversation("f" * 32)
        self.conversations.append(stranger)
        self.pairs.append(self.store.add_pair(stranger, [{"role": "user", "content": "Yo"}],
                                              Answer("base", "x", 1), Answer("base", "y", 2)))

    def snapshot(self) -> tuple:
        db = self.store.db
        return tuple(db.execute(f"select * from {table} order by rowid").fetchall()
                     for table in ("conversations", "messages", "pairs", "votes"))

    def post(self, path: str, **kwargs) -> None:
        if "json" in kwargs:  # ASCII-escaped: lone surrogates travel as JSON \\u escapes
            kwargs = {"content": json.dumps(kwargs.pop("json")).encode(),
                      "headers": {"Content-Type": "application/json"}}
        before = self.snapshot()
        response = self.client.post(path, **kwargs)
        assert response.status_code in CLEAR, (response.status_code, response.text)
        if response.status_code != 200:
            detail = response.json()["detail"]
            assert detail and (isinstance(detail, str) or isinstance(detail, list))
            assert self.snapshot() == before, "a refused request changed the database"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    world = World(tmp_path_factory.mktemp("fuzz"))
    yield world
    world.client.close()
    world.store.close()


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_pair_bodies(world: World, data: st.DataObject) -> None:
    body = data.draw(json_values | st.fixed_dictionaries({}, optional={
        "message": texts | json_values,
        "conversation_id": st.sampled_from(world.conversations) | texts | json_values,
        "seed": st.integers() | json_values,
        "extra": json_values}))
    world.post("/api/v1/pairs", json=body)


@FUZZ
@given(data=st.data())
def test_vote_bodies(world: World, data: st.DataObject) -> None:
    body = data.draw(json_values | st.fixed_dictionaries({}, optional={
        "pair_id": st.sampled_from(world.pairs) | texts | json_values,
        "choice": st.sampled_from(["a", "b", "tie", "both_bad", "written", "A", "c"])
        | json_values,
        "answer": texts | json_values,
        "conversation_id": st.sampled_from(world.conversations) | texts | json_values}))
    world.post("/api/v1/votes", json=body)


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_raw_bytes(world: World, raw: bytes) -> None:
    for path in ("/api/v1/pairs", "/api/v1/votes"):
        world.post(path, content=raw, headers={"Content-Type": "application/json"})


def test_invalid_utf8_and_deep_nesting_are_clear_errors(world: World) -> None:
    for raw in (b'{"message": "\xff\xfe"}', b'{"pair_id": "\xc3"}',
                ("[" * 5000 + "]" * 5000).encode(),
                json.dumps({"message": "x" * 4001}).encode()):
        for path in ("/api/v1/pairs", "/api/v1/votes"):
            world.post(path, content=raw, headers={"Content-Type": "application/json"})


def test_ids_sqlite_cannot_encode_are_unknown_ids(world: World) -> None:
    """Found by hypothesis: a lone surrogate in an id reached SQLite and made a 500."""
    for path, body in (("/api/v1/votes", {"pair_id": "\ud800", "choice": "a"}),
                       ("/api/v1/pairs", {"message": "Hi", "conversation_id": "\udfff"})):
        before = world.snapshot()
        response = world.client.post(path, content=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        assert response.status_code == 404 and "does not exist" in response.json()["detail"]
        assert world.snapshot() == before
