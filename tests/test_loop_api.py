"""The loop's JSON API (/api/v1/adapters, rounds, leaderboard, stats and the admin actions)
through the real FastAPI app on a real store and loop. Nothing here needs vLLM: the model
server is a dead endpoint (nothing listens on port 9) and the trainer a quick subprocess."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from starlette.testclient import TestClient

from prefloop.app.server import create_app
from prefloop.config import Settings
from prefloop.loop.controller import Loop
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Store

PASSWORD = "s3cret-pw"
AUTH = {"Authorization": f"Bearer {PASSWORD}"}
HI = [{"role": "user", "content": "Hi"}]
DEAD = "http://127.0.0.1:9"
ADMIN = ("rounds", "promote", "pause", "resume")
# The trainer is the command plus the job's flags; these ignore the flags.
BOOM = (sys.executable, "-c", "import sys; sys.exit('boom')")


def gated(gate: Path) -> tuple[str, ...]:
    """A trainer that runs until ``gate`` exists, then exits 0 without writing an adapter."""
    return (sys.executable, "-c", "import pathlib, time\n"
            f"while not pathlib.Path({str(gate)!r}).exists():\n    time.sleep(0.05)\n")


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    settings = Settings(data_dir=tmp_path, rating_resamples=20)
    store = Store(settings.db_path)
    pool = AdapterPool(Endpoint(DEAD, "x"), None, 16)
    loop = Loop(settings, store, pool, base_model=tmp_path, trainer_command=BOOM, seed=0)
    yield loop
    loop.stop()  # kills a trainer a failed test left running, before the store goes
    pool.close()
    store.close()


@contextmanager
def client_for(loop: Loop, password: str | None) -> Iterator[TestClient]:
    """The whole app (page and API) over ``loop``, as ``prefloop serve`` builds it."""
    sampler = PairSampler(Endpoint(DEAD, "x"), sampling=Sampling(0.8, 0.95, 16),
                          max_model_len=2048)
    app = create_app(loop.settings, loop.store, sampler, loop, password)
    with TestClient(app) as client:  # runs the lifespan: the sampler is closed on exit
        yield client


@pytest.fixture
def client(loop: Loop) -> Iterator[TestClient]:
    with client_for(loop, PASSWORD) as client:
        yield client


def vote(store: Store, a: str, b: str, choice: str, kind: str = "duel",
         answer: str | None = None) -> None:
    """One voted pair of answers by policies ``a`` and ``b``."""
    conversation = store.create_conversation()
    pair = store.add_pair(conversation, HI, Answer(a, "one", 1), Answer(b, "two", 2), kind=kind)
    store.vote(pair, choice, answer)


def fake_adapter(loop: Loop, name: str) -> Path:
    """An adapter row whose folder holds no adapter files (it cannot be served)."""
    folder = loop.settings.adapters_dir / name
    folder.mkdir(parents=True)
    loop.store.add_adapter(name, folder, None, "base")
    return folder


def complete_adapter(loop: Loop, name: str) -> None:
    """An adapter folder that passes every local check; only the model server can refuse it."""
    folder = fake_adapter(loop, name)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"lora_A": torch.zeros(8, 4)}, str(folder / "adapter_model.safetensors"))


def loop_state(loop: Loop) -> dict[str, Any]:
    """What an admin action could change."""
    store = loop.store
    return {"champion": store.champion(), "paused": loop.paused, "rounds": store.rounds(),
            "adapters": store.adapters(), "training": loop.training}


def admin(client: TestClient, action: str, headers: dict[str, Any] | None = None,
          body: Any = None):
    """POST an admin action; promote gets a valid body unless one is given."""
    if action == "promote" and body is None:
        body = {"policy": "base"}
    return client.post(f"/api/v1/admin/{action}", headers=headers, json=body)


# -- who may use admin ----------------------------------------------------------------------


def ready_for_any_action(loop: Loop, action: str) -> None:
    """A state every admin action would change: a champion to roll back, trainable votes
    for a round, and paused before a resume."""
    if not loop.store.adapters():
        fake_adapter(loop, "v0001")
        loop.store.crown("v0001", "test")
        vote(loop.store, "base", "base", "a", kind="sample")
    if action == "resume":
        loop.pause()


REFUSED = {
    "no header": None,
    "wrong password": {"Authorization": "Bearer wrong"},
    "password with a space added": {"Authorization": f"Bearer {PASSWORD} "},
    "password prefix": {"Authorization": f"Bearer {PASSWORD[:-1]}"},
    "no password": {"Authorization": "Bearer"},
    "empty password": {"Authorization": "Bearer "},
    "basic scheme": {"Authorization": "Basic xxx"},
    "right password, basic scheme": {"Authorization": f"Basic {PASSWORD}"},
    "no scheme": {"Authorization": PASSWORD},
    "other header": {"X-Admin-Password": PASSWORD},
}


@pytest.mark.parametrize("action", ADMIN)
def test_admin_refuses_without_the_password(loop: Loop, client: TestClient,
                                            action: str) -> None:
    ready_for_any_action(loop, action)
    before = loop_state(loop)
    for case, headers in REFUSED.items():
        response = admin(client, action, headers)
        assert response.status_code == 401, (case, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer", case
        assert "password" in response.json()["detail"], case
        assert loop_state(loop) == before, case


def test_unauthenticated_bad_body_is_401_not_422(loop: Loop, client: TestClient) -> None:
    """The password is checked before the body: a stranger learns nothing about its shape."""
    for body in ({"policy": 12}, {"policy": "../etc"}, "junk"):
        response = admin(client, "promote", body=body)
        assert response.status_code == 401, (body, response.text)
    assert loop.store.champion() == "base"


@pytest.mark.parametrize("password", [None, ""])
def test_admin_is_403_when_no_password_is_configured(loop: Loop,
                                                     password: str | None) -> None:
    with client_for(loop, password) as client:
        for action in ADMIN:
            ready_for_any_action(loop, action)
            before = loop_state(loop)
            for headers in (None, {"Authorization": "Bearer "}, AUTH,
                            {"Authorization": "Bearer None"}):
                response = admin(client, action, headers)
                assert response.status_code == 403, (action, headers, response.text)
                assert "PREFLOOP_ADMIN_PASSWORD" in response.json()["detail"]
                assert loop_state(loop) == before, (action, headers)
            loop.resume()
        # The read-only API stays open.
        assert client.get("/api/v1/stats").status_code == 200


def test_non_ascii_wrong_password_is_401_not_500(loop: Loop) -> None:
    """HTTP headers are bytes (latin-1 to Starlette); str headers must be ASCII in httpx, so
    these are sent as raw bytes, the way curl sends what is typed in a UTF-8 terminal."""
    password = "pässwörd-✓"
    with client_for(loop, password) as client:
        for given in ("pässwörd-✗".encode(), "pässwörd".encode("latin-1"), b"\xff\xfe\x00x",
                      password.encode("utf-16")):
            response = admin(client, "pause", {"Authorization": b"Bearer " + given})
            assert response.status_code == 401, (given, response.text)
    assert not loop.paused


def test_non_ascii_password_sent_as_utf8_works(loop: Loop) -> None:
    password = "pässwörd-✓"
    with client_for(loop, password) as client:
        response = admin(client, "pause",
                         {"Authorization": b"Bearer " + password.encode("utf-8")})
        assert response.status_code == 200, response.text
    assert loop.paused


# -- admin actions --------------------------------------------------------------------------


def test_pause_and_resume(loop: Loop, client: TestClient) -> None:
    assert client.get("/api/v1/stats").json()["loop"]["state"] == "running"
    response = admin(client, "pause", AUTH)
    assert response.status_code == 200 and response.json() == {"paused": True}
    assert loop.paused
    assert client.get("/api/v1/stats").json()["loop"]["state"] == "paused"
    # The scheme is case-insensitive (RFC 7235).
    response = admin(client, "resume", {"Authorization": f"bearer {PASSWORD}"})
    assert response.status_code == 200 and response.json() == {"paused": False}
    assert not loop.paused
    assert client.get("/api/v1/stats").json()["loop"]["state"] == "running"


def test_promote_base_rolls_back(loop: Loop, client: TestClient) -> None:
    fake_adapter(loop, "v0001")
    loop.store.crown("v0001", "test")
    response = admin(client, "promote", AUTH, {"policy": "base"})
    assert response.status_code == 200, response.text
    assert response.json() == {"champion": "base", "previous": "v0001"}
    assert loop.store.champion() == "base"
    adapters = client.get("/api/v1/adapters").json()
    assert adapters["champion"] == "base" and adapters["candidate"] is None
    assert [(a["name"], a["state"]) for a in adapters["adapters"]] == [("v0001", "retired")]
    again = admin(client, "promote", AUTH, {"policy": "base"})
    assert again.json() == {"champion": "base", "previous": "base"}


def test_promote_of_an_adapter_that_cannot_be_served_is_409(loop: Loop,
                                                            client: TestClient) -> None:
    fake_adapter(loop, "v0001")  # empty folder
    complete_adapter(loop, "v0002")  # fine locally, but the model server is down
    before = loop_state(loop)
    response = admin(client, "promote", AUTH, {"policy": "v0001"})
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert detail.startswith("v0001 cannot be served:") and "has no adapter_config.json" in detail
    response = admin(client, "promote", AUTH, {"policy": "v0002"})
    assert response.status_code == 409, response.text
    assert response.json()["detail"].startswith("v0002 cannot be served: the model server "
                                                "did not answer")
    assert loop_state(loop) == before
    assert client.get("/api/v1/adapters").json()["champion"] == "base"


def test_promote_of_an_unknown_adapter_is_404(loop: Loop, client: TestClient) -> None:
    fake_adapter(loop, "v0001")
    before = loop_state(loop)
    response = admin(client, "promote", AUTH, {"policy": "v0042"})
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "adapter 'v0042' does not exist"}
    assert loop_state(loop) == before


BAD_BODIES = {
    "parent path": {"policy": "../etc"},
    "path in name": {"policy": "v1/.."},
    "path after a name": {"policy": "v0001/../../x"},
    "empty": {"policy": ""},
    "short version": {"policy": "v001"},
    "upper case": {"policy": "BASE"},
    "spaces": {"policy": " base"},
    "number": {"policy": 12},
    "null": {"policy": None},
    "list": {"policy": ["base"]},
    "extra field": {"policy": "base", "force": True},
    "no policy": {},
    "not an object": ["base"],
    "bare string": "base",
}


def test_promote_with_a_bad_policy_is_422(loop: Loop, client: TestClient) -> None:
    fake_adapter(loop, "v0001")
    loop.store.crown("v0001", "test")  # so a wrong rollback to base would show
    before = loop_state(loop)
    for case, body in BAD_BODIES.items():
        response = admin(client, "promote", AUTH, body)
        assert response.status_code == 422, (case, response.text)
        assert loop_state(loop) == before, case


def test_promote_with_a_body_that_is_not_json_is_422(loop: Loop, client: TestClient) -> None:
    response = client.post("/api/v1/admin/promote", headers=AUTH, content=b"policy=base")
    assert response.status_code == 422, response.text
    assert loop.store.champion() == "base" and loop.store.adapters() == []


@pytest.mark.parametrize("policy", ["base\n", "v0001\n"])
def test_promote_with_a_trailing_newline_is_422(loop: Loop, client: TestClient,
                                                 policy: str) -> None:
    fake_adapter(loop, "v0001")
    response = admin(client, "promote", AUTH, {"policy": policy})
    assert response.status_code == 422, response.text


def test_start_round_without_trainable_votes_is_409(loop: Loop, client: TestClient) -> None:
    vote(loop.store, "base", "base", "tie", kind="sample")  # votes, but none DPO can use
    vote(loop.store, "base", "base", "both_bad", kind="sample")
    response = admin(client, "rounds", AUTH)
    assert response.status_code == 409, response.text
    assert response.json()["detail"] == ("there are no trainable votes yet (votes for A, B or "
                                         "a written answer)")
    assert loop.store.rounds() == [] and not loop.training


def test_start_round_reports_the_trainers_failure(loop: Loop, client: TestClient) -> None:
    vote(loop.store, "base", "base", "a", kind="sample")
    vote(loop.store, "base", "base", "b", kind="sample")
    vote(loop.store, "base", "base", "tie", kind="sample")
    response = admin(client, "rounds", AUTH)
    assert response.status_code == 200, response.text
    round_id = response.json()["round_id"]
    assert isinstance(round_id, int)
    loop.wait_for_round(30)
    assert not loop.training

    [row] = client.get("/api/v1/rounds").json()["rounds"]
    assert row["id"] == round_id and row["trigger"] == "admin"
    assert row["status"] == "failed" and "boom" in row["error"], row
    assert row["ended_at"] and row["pairs"] == row["new_pairs"] == 2  # the tie is no pair
    assert row["adapter"] is None and row["losses"] == []
    assert loop.store.adapters() == [] and loop.store.champion() == "base"
    assert client.get("/api/v1/stats").json()["loop"]["state"] == "running"


def test_one_round_at_a_time(loop: Loop, client: TestClient, tmp_path: Path) -> None:
    vote(loop.store, "base", "base", "a", kind="sample")
    gate = tmp_path / "gate"
    loop.trainer_command = gated(gate)
    first = admin(client, "rounds", AUTH)
    assert first.status_code == 200, first.text
    round_id = first.json()["round_id"]

    second = admin(client, "rounds", AUTH)
    assert second.status_code == 409, second.text
    assert second.json()["detail"] == "a round is running; one round at a time"
    status = client.get("/api/v1/stats").json()["loop"]
    assert status["state"] == "training" and status["round"]["id"] == round_id
    assert [r["status"] for r in client.get("/api/v1/rounds").json()["rounds"]] == ["running"]

    gate.touch()
    loop.wait_for_round(30)
    assert not loop.training
    [done] = client.get("/api/v1/rounds").json()["rounds"]
    # It exited 0 without writing an adapter.
    assert done["status"] == "failed" and "metrics.json" in done["error"], done
    # The lock is free again: the next round starts.
    loop.trainer_command = BOOM
    third = admin(client, "rounds", AUTH)
    assert third.status_code == 200 and third.json()["round_id"] > round_id
    loop.wait_for_round(30)


# -- read-only API --------------------------------------------------------------------------


def test_adapters_lists_versions_champion_and_candidate(loop: Loop,
                                                        client: TestClient) -> None:
    assert client.get("/api/v1/adapters").json() == {"champion": "base", "candidate": None,
                                                     "adapters": []}
    fake_adapter(loop, "v0001")
    fake_adapter(loop, "v0002")
    loop.store.crown("v0001", "won its duels")
    body = client.get("/api/v1/adapters").json()
    assert body["champion"] == "v0001" and body["candidate"] == "v0002"
    assert [(a["name"], a["state"], a["parent"]) for a in body["adapters"]] == [
        ("v0001", "champion", "base"), ("v0002", "candidate", "base")]
    assert body["adapters"][0]["reason"] == "won its duels"


def test_rounds_newest_first_with_a_summary_of_metrics(loop: Loop, client: TestClient) -> None:
    store = loop.store
    good = store.start_round("schedule")
    store.update_round(good, status="succeeded", adapter="v0001", pairs=16, new_pairs=12,
                       metrics={"steps": [{"loss": 0.69, "step": 1}, {"loss": 0.5, "step": 2}],
                                "held_out": {"before": 0.5, "after": 0.75},
                                "seconds": {"total": 12.5}})
    failed = store.start_round("admin")
    store.update_round(failed, status="failed", error="trainer exited with status 1")

    rounds = client.get("/api/v1/rounds").json()["rounds"]
    assert [r["id"] for r in rounds] == [failed, good]
    assert rounds[1]["losses"] == [0.69, 0.5] and rounds[1]["seconds"] == 12.5
    assert rounds[1]["held_out"] == {"before": 0.5, "after": 0.75}
    assert "metrics" not in rounds[1]  # the per-step detail stays out
    assert rounds[0]["error"] == "trainer exited with status 1" and rounds[0]["losses"] == []
    assert [r["id"] for r in client.get("/api/v1/rounds?limit=1").json()["rounds"]] == [failed]


def test_rounds_with_a_bad_limit_is_422(client: TestClient) -> None:
    for limit in ("0", "-1", "abc", "1001", "1.5", ""):
        response = client.get("/api/v1/rounds", params={"limit": limit})
        assert response.status_code == 422, (limit, response.text)


def test_leaderboard_rates_the_policy_that_wins_above_base(loop: Loop,
                                                           client: TestClient) -> None:
    assert client.get("/api/v1/leaderboard").json() == {"standings": [], "over_time": []}
    fake_adapter(loop, "v0001")
    # v0001 wins 6 of 8 duels against base, from either side.
    for a, b, choice in [("v0001", "base", "a")] * 3 + [("base", "v0001", "b")] * 3 \
            + [("v0001", "base", "b"), ("base", "v0001", "a")]:
        vote(loop.store, a, b, choice)
    vote(loop.store, "base", "base", "a", kind="sample")  # no duel: not counted
    vote(loop.store, "v0001", "base", "written", answer="mine")  # no duel result

    body = client.get("/api/v1/leaderboard").json()
    top, base = body["standings"]
    assert top["policy"] == "v0001" and base["policy"] == "base"
    assert base["rating"] == 1000 and base["low"] == base["high"] == 1000
    # Bradley-Terry with 0.01 virtual ties: p = 6.005 / 8.01, R = 1000 + 400 log10(p / (1-p)).
    assert top["rating"] == pytest.approx(1000 + 400 * math.log10(6.005 / 2.005), abs=0.01)
    assert top["low"] <= top["rating"] <= top["high"]
    assert top["votes"] == base["votes"] == 8
    assert top["wins"] == 6 and base["wins"] == 2
    assert top["winrate_vs_base"] == 0.75 and top["votes_vs_base"] == 8
    assert base["winrate_vs_base"] is None and base["votes_vs_base"] == 0
    assert top["state"] == "candidate" and base["state"] == "champion"

    last = {r["policy"]: r["rating"] for r in body["over_time"] if r["duel_votes"] == 8}
    assert last == {"base": 1000, "v0001": pytest.approx(top["rating"])}
    assert max(r["duel_votes"] for r in body["over_time"]) == 8


def test_stats_counts_votes_by_choice(loop: Loop, client: TestClient) -> None:
    for choice in ("a", "a", "b", "tie", "both_bad"):
        vote(loop.store, "base", "base", choice, kind="sample")
    vote(loop.store, "base", "base", "written", kind="sample", answer="Hello!")

    body = client.get("/api/v1/stats").json()
    assert body["votes_by_choice"] == {"a": 2, "b": 1, "tie": 1, "both_bad": 1, "written": 1}
    counts = body["counts"]
    assert counts["votes"] == counts["pairs"] == counts["conversations"] == 6
    assert counts["messages"] == 12 and counts["rounds"] == counts["adapters"] == 0
    assert sum(hour["votes"] for hour in body["votes_per_hour"]) == 6
    status = body["loop"]
    assert status["state"] == "running" and status["champion"] == "base"
    assert status["candidate"] is None and status["round"] is None
    assert status["new_trainable_votes"] == 4  # a, a, b, written
    assert status["min_new_pairs"] == loop.settings.min_new_pairs


def test_openapi_documents_the_loop_api(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for action in ADMIN:
        assert "post" in paths[f"/api/v1/admin/{action}"], action
    for name in ("adapters", "rounds", "leaderboard", "stats"):
        assert "get" in paths[f"/api/v1/{name}"], name
    promote = paths["/api/v1/admin/promote"]["post"]
    assert promote["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PromoteRequest"}
    assert "admin" in promote["tags"]


def test_wrong_admin_passwords_are_slowed_to_ten_a_minute(loop: Loop,
                                                          client: TestClient) -> None:
    before = loop_state(loop)
    for _ in range(10):
        assert admin(client, "pause", {"Authorization": "Bearer guess"}).status_code == 401
    for headers in ({"Authorization": "Bearer guess"}, AUTH):  # even the right one waits
        response = admin(client, "pause", headers)
        assert response.status_code == 429, response.text
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert "wrong admin passwords" in response.json()["detail"]
    assert loop_state(loop) == before


def test_a_new_adapter_is_not_blamed_for_a_model_server_that_is_down(loop: Loop) -> None:
    """vLLM restarting when a round ends: the load is tried again, then reported as the
    server's fault, not the adapter's."""
    complete_adapter(loop, "v0001")
    path = loop.settings.adapters_dir / "v0001"
    reason = loop._load_new_adapter("v0001", path, attempts=3, pause=0.01)
    assert reason.startswith("vLLM did not answer")
    complete_adapter(loop, "v0002")
    (loop.settings.adapters_dir / "v0002" / "adapter_config.json").write_text("{}")
    reason = loop._load_new_adapter("v0002", loop.settings.adapters_dir / "v0002")
    assert reason.startswith("vLLM refused it") and "LoRA" in reason  # at once, no waiting
