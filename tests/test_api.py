"""The JSON API of a real ``prefloop serve`` (on the shared vLLM): happy path and bad input."""

from __future__ import annotations

import sqlite3

import httpx
import pytest

pytestmark = pytest.mark.slow


def counts(served) -> dict[str, int]:
    with sqlite3.connect(served.data_dir / "prefloop.db") as db:
        return {t: db.execute(f"select count(*) from {t}").fetchone()[0]
                for t in ("conversations", "messages", "pairs", "votes")}


def new_pair(served, message: str = "Name a fruit.", conversation_id: str | None = None,
             seed: int | None = 11) -> dict:
    response = served.http.post("/api/v1/pairs", json={
        "message": message, "conversation_id": conversation_id, "seed": seed})
    assert response.status_code == 200, response.text
    return response.json()


def vote(served, body: dict) -> httpx.Response:
    return served.http.post("/api/v1/votes", json=body)


def test_pair_then_vote_then_next_turn(served):
    pair = new_pair(served, "What colour is the sky?")
    assert pair["a"]["text"].strip() and pair["b"]["text"].strip()
    assert pair["a"]["text"] != pair["b"]["text"]
    assert pair["a"]["policy"] == pair["b"]["policy"] == "base"

    response = vote(served, {"pair_id": pair["pair_id"], "choice": "b"})
    assert response.status_code == 200 and response.json()["choice"] == "b"
    with sqlite3.connect(served.data_dir / "prefloop.db") as db:
        assert db.execute("select choice from votes where pair_id = ?",
                          [pair["pair_id"]]).fetchone() == ("b",)
        kept = db.execute("select role, content from messages where conversation_id = ? "
                          "order by position", [pair["conversation_id"]]).fetchall()
    assert kept == [("user", "What colour is the sky?"), ("assistant", pair["b"]["text"])]

    second = new_pair(served, "And at night?", pair["conversation_id"])
    assert second["conversation_id"] == pair["conversation_id"]
    assert vote(served, {"pair_id": second["pair_id"], "answer": "Dark blue."}).json() == {
        "pair_id": second["pair_id"], "choice": "written", "stored": True, "kind": "sample",
        "policy_a": "base", "policy_b": "base", "decision": None}


def test_second_vote_is_409_and_changes_nothing(served):
    pair = new_pair(served)
    assert vote(served, {"pair_id": pair["pair_id"], "choice": "a"}).status_code == 200
    before = counts(served)
    response = vote(served, {"pair_id": pair["pair_id"], "choice": "b"})
    assert response.status_code == 409 and "already" in response.json()["detail"]
    assert counts(served) == before


def test_a_new_turn_waits_for_the_vote(served):
    pair = new_pair(served)
    before = counts(served)
    response = served.http.post("/api/v1/pairs", json={
        "message": "next", "conversation_id": pair["conversation_id"]})
    assert response.status_code == 409 and pair["pair_id"] in response.json()["detail"]
    assert counts(served) == before


@pytest.mark.parametrize("body, status, fragment", [
    ({"message": ""}, 422, "empty"),
    ({"message": "   \n\t "}, 422, "empty"),
    ({"message": "x" * 4001}, 422, "limit is 4,000"),
    ({"message": 42}, 422, "valid string"),
    ({"message": ["hi"]}, 422, "valid string"),
    ({}, 422, "missing"),
    ({"message": "hi", "extra": 1}, 422, "not permitted"),
    ({"message": "bell \x07"}, 422, "control characters"),
    ({"message": "hi", "conversation_id": "no-such-id"}, 404, "does not exist"),
    ({"message": "hi", "seed": -1}, 422, "greater than"),
])
def test_bad_pair_requests_are_refused_and_store_nothing(served, body, status, fragment):
    before = counts(served)
    response = served.http.post("/api/v1/pairs", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.text
    assert counts(served) == before


@pytest.mark.parametrize("body, status, fragment", [
    ({"pair_id": "0" * 32, "choice": "a"}, 404, "does not exist"),
    ({"pair_id": "PAIR", "choice": "best"}, 422, "literal_error"),
    ({"pair_id": "PAIR", "choice": "a", "answer": "mine"}, 422, "written"),
    ({"pair_id": "PAIR", "choice": "written"}, 422, "needs the answer"),
    ({"pair_id": "PAIR", "answer": "  "}, 422, "empty"),
    ({"pair_id": "PAIR", "answer": "y" * 8001}, 422, "limit is 8,000"),
    ({"pair_id": 5, "choice": "a"}, 422, "valid string"),
    ({"choice": "a"}, 422, "missing"),
])
def test_bad_votes_are_refused_and_store_nothing(served, body, status, fragment):
    pair = new_pair(served)
    body = {k: (pair["pair_id"] if v == "PAIR" else v) for k, v in body.items()}
    before = counts(served)
    response = vote(served, body)
    assert response.status_code == status, response.text
    assert fragment in response.text
    assert counts(served) == before
    assert vote(served, {"pair_id": pair["pair_id"], "choice": "tie"}).status_code == 200


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[]", b"null", b"\xff\xfe"])
def test_malformed_bodies_are_422(served, raw):
    before = counts(served)
    for path in ("/api/v1/pairs", "/api/v1/votes"):
        response = served.http.post(path, content=raw,
                              headers={"content-type": "application/json"})
        assert response.status_code == 422, (path, raw, response.text)
    assert counts(served) == before


def test_health_and_openapi(served):
    health = httpx.get(served.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"database": True, "model": True}
    spec = httpx.get(served.url + "/openapi.json", timeout=10).json()
    assert {"/api/v1/pairs", "/api/v1/votes", "/healthz"} <= set(spec["paths"])
    assert "vote" in spec["paths"]["/api/v1/votes"]["post"]["description"].lower()
