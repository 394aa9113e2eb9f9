"""The online loop with the real vLLM server and the real trainer on the embedded model:
votes -> a round -> an adapter answering; promotion, rejection, rollback, failures, restart."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefloop.app.chat import ChatService
from prefloop.config import Settings
from prefloop.loop.controller import Loop, LoopError
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.storage.store import Answer, NotFound, Store

pytestmark = pytest.mark.slow

TOPICS = ["boil an egg", "learn to swim", "fix a bike", "bake bread", "plant a tree",
          "tie a tie", "save money", "sleep better", "write a poem", "start running",
          "clean a window", "brew tea", "fold a shirt", "paint a wall", "read faster",
          "learn chess"]
_prefixes = itertools.count(1)


def vote_pairs(store: Store, n: int = 16) -> None:
    """``n`` voted pairs: a kind answer preferred over a rude one."""
    for topic in (TOPICS * 4)[:n]:
        conversation = store.create_conversation()
        pair = store.add_pair(conversation, [{"role": "user", "content": f"How do I {topic}?"}],
                              Answer("base", f"Happy to help you {topic}! Have a nice day.", 1),
                              Answer("base", "Figure it out yourself.", 2))
        store.vote(pair, "a")


class LoopRig:
    """A loop over its own data dir and the session's vLLM, as ``prefloop serve`` builds it."""

    def __init__(self, data_dir: Path, vllm_server, model: Path, **overrides) -> None:
        settings = {"data_dir": data_dir, "min_new_pairs": 8, "train_lr": 5e-4,
                    "train_epochs": 2, "trainer_threads": 1, "max_tokens": 16,
                    "adapter_prefix": f"t{next(_prefixes)}", "rating_resamples": 20,
                    "promote_min_votes": 3, "max_duel_votes": 6} | overrides
        self.settings = Settings(**settings)
        self.store = Store(self.settings.db_path)
        self.pool = AdapterPool(vllm_server.endpoint, model, self.settings.lora_max_rank,
                                self.settings.adapter_prefix)
        self.loop = Loop(self.settings, self.store, self.pool, model, seed=0)
        self.sampler = PairSampler(vllm_server.endpoint, max_model_len=2048,
                                   sampling=Sampling(0.8, 0.95, 16),
                                   model_name=self.pool.served_name)
        self.service = ChatService(self.settings, self.store, self.sampler, self.loop)
        self.aio = asyncio.new_event_loop()  # one loop: the sampler's HTTP clients live in it

    def turn(self, message: str):
        return self.aio.run_until_complete(self.service.turn(message))

    def close(self) -> None:
        for policy in list(self.pool.loaded):
            self.pool.unload(policy)
        self.aio.run_until_complete(self.sampler.close())
        self.aio.close()
        self.pool.close()
        self.store.close()


@pytest.fixture
def rig(tmp_path: Path, vllm_server, embedded_model: Path) -> Iterator[LoopRig]:
    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model)
    yield rig
    rig.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, vllm_server,
            embedded_model: Path) -> Iterator[LoopRig]:
    """A loop that has run one real round on 16 votes (its candidate is v0001)."""
    rig = LoopRig(tmp_path_factory.mktemp("trained") / "data", vllm_server, embedded_model,
                  train_batch_size=4, train_lora_rank=8)
    vote_pairs(rig.store)
    rig.loop.run_round("admin")
    yield rig
    rig.close()


def duel(rig: LoopRig, a: str, b: str, choice: str) -> dict:
    """Store a duel pair between ``a`` and ``b`` and vote on it through the chat service."""
    conversation = rig.store.create_conversation()
    pair = rig.store.add_pair(conversation, [{"role": "user", "content": "Hi"}],
                              Answer(a, "one", 1), Answer(b, "two", 2), kind="duel")
    return rig.service.vote(pair, choice)


def fake_adapter(rig: LoopRig, name: str) -> None:
    """An adapter row for promotion logic that never needs vLLM."""
    folder = rig.settings.adapters_dir / name
    folder.mkdir(parents=True)
    rig.store.add_adapter(name, folder, None, "base")


# -- a real round -------------------------------------------------------------------------


def test_votes_train_a_candidate_that_answers_in_duels(trained: LoopRig) -> None:
    store, loop = trained.store, trained.loop
    [round_row] = store.rounds()
    assert round_row["status"] == "succeeded", round_row["error"]
    assert round_row["pairs"] == 16 and round_row["new_pairs"] == 16
    assert round_row["adapter"] == "v0001" and round_row["parent"] == "base"
    assert round_row["metrics"]["held_out"]["after"] is not None
    assert max(step["pairs"] for step in round_row["metrics"]["steps"]) == 4  # batch size
    adapter = store.adapter("v0001")
    assert adapter["state"] == "candidate" and Path(adapter["path"]).is_dir()
    config = json.loads((Path(adapter["path"]) / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)  # train_lora_rank
    assert store.champion() == "base" and store.candidate() == "v0001"
    assert "v0001" in trained.pool.loaded
    # No new votes since: the schedule does not start another round.
    assert loop.tick() is None and len(store.rounds()) == 1

    # While the candidate exists, half the turns duel it against the champion.
    turn = None
    for _ in range(20):
        turn = trained.turn("How do I bake bread?")
        if turn.kind == "duel":
            break
        store.vote(turn.pair_id, "tie")
    assert turn is not None and turn.kind == "duel"
    pair = store.pair(turn.pair_id)
    assert {pair["policy_a"], pair["policy_b"]} == {"v0001", "base"}
    side = "a" if pair["policy_a"] == "v0001" else "b"
    assert pair[f"text_{side}"].strip(), "the adapter wrote an answer"
    revealed = trained.service.vote(turn.pair_id, "tie")
    assert {revealed["policy_a"], revealed["policy_b"]} == {"v0001", "base"}


def test_duel_votes_promote_the_candidate(rig: LoopRig) -> None:
    fake_adapter(rig, "v0001")
    results = [duel(rig, "v0001", "base", "a"), duel(rig, "base", "v0001", "b")]
    assert [r["decision"] for r in results] == [None, None]  # 2 votes < promote_min_votes
    assert duel(rig, "v0001", "base", "tie")["decision"] == "promote"  # 2.5 / 3 >= 0.55
    assert rig.store.champion() == "v0001"
    assert rig.store.adapter("v0001")["state"] == "champion"
    assert "won its duels" in rig.store.adapter("v0001")["reason"]
    assert rig.store.candidate() is None


def test_a_losing_candidate_is_rejected_once_it_cannot_win(rig: LoopRig) -> None:
    fake_adapter(rig, "v0001")
    # max_duel_votes 6, win-rate 0.55 needs 3.3 of 6: after 3 losses, 3 wins give only 3.
    decisions = [duel(rig, "v0001", "base", "b")["decision"] for _ in range(3)]
    assert decisions == [None, None, "reject"]
    assert rig.store.adapter("v0001")["state"] == "rejected"
    assert "lost its duels" in rig.store.adapter("v0001")["reason"]
    assert rig.store.champion() == "base"


def test_only_duels_against_the_champion_count(rig: LoopRig) -> None:
    fake_adapter(rig, "v0001")
    fake_adapter(rig, "v0002")
    rig.store.crown("v0001", "test")
    rig.store.set_adapter_state("v0001", "champion")
    rig.store.set_adapter_state("v0002", "candidate")
    for _ in range(3):  # wins over base say nothing about the champion
        assert duel(rig, "v0002", "base", "a")["decision"] is None
    assert rig.store.candidate() == "v0002"
    assert [duel(rig, "v0001", "v0002", "b")["decision"] for _ in range(3)] == \
        [None, None, "promote"]
    assert rig.store.champion() == "v0002"
    assert rig.store.adapter("v0001")["state"] == "retired"


def test_rollback_to_base_and_to_an_earlier_adapter(trained: LoopRig) -> None:
    loop, store = trained.loop, trained.store
    assert loop.promote("v0001") == "base"
    assert store.champion() == "v0001"
    plans = {(p.kind, p.policy_a, p.policy_b) for p in (loop.plan_turn() for _ in range(50))}
    assert ("sample", "v0001", "v0001") in plans  # champion samples
    assert {("duel", "v0001", "base"), ("duel", "base", "v0001")} & plans  # baseline duels
    assert loop.promote("base") == "v0001"  # rollback
    assert store.champion() == "base" and store.adapter("v0001")["state"] == "retired"
    assert {p.policy_a for p in (loop.plan_turn() for _ in range(20))} == {"base"}
    loop.prune()
    assert "v0001" not in trained.pool.loaded  # nothing uses it any more
    assert loop.promote("v0001") == "base"  # an earlier adapter comes back
    assert store.champion() == "v0001" and "v0001" in trained.pool.loaded
    loop.promote("base")
    for bad in ("../v0001", "v1", "v0001/..", "", None, 3):
        with pytest.raises(ValueError, match="policy must be"):
            loop.promote(bad)
    with pytest.raises(NotFound):
        loop.promote("v0099")


def test_promote_immediate_makes_each_new_adapter_champion(tmp_path: Path, vllm_server,
                                                            embedded_model: Path) -> None:
    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model, promote="immediate")
    try:
        vote_pairs(rig.store, 8)
        assert rig.loop.tick() is not None  # 8 new votes >= min_new_pairs
        assert rig.store.rounds()[0]["status"] == "succeeded", rig.store.rounds()[0]["error"]
        assert rig.store.champion() == "v0001" and rig.store.candidate() is None
        # The next round starts from the champion's adapter.
        vote_pairs(rig.store, 8)
        rig.loop.run_round("admin")
        latest = rig.store.rounds()[0]
        assert latest["status"] == "succeeded", latest["error"]
        assert latest["parent"] == "v0001" and latest["adapter"] == "v0002"
        assert latest["new_pairs"] == 8 and latest["pairs"] == 16  # 8 new + 8 replayed
        assert rig.store.champion() == "v0002"
        assert rig.store.adapter("v0001")["state"] == "retired"
    finally:
        rig.close()


# -- failures -------------------------------------------------------------------------------


def test_a_failing_trainer_fails_the_round_and_changes_nothing(tmp_path: Path, vllm_server,
                                                               embedded_model: Path) -> None:
    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model)
    rig.loop.trainer_command = (sys.executable, "-c",
                                "import sys; sys.exit('CUDA out of memory (simulated)')")
    try:
        vote_pairs(rig.store, 4)
        round_id = rig.loop.run_round("admin")
        row = rig.store.round(round_id)
        assert row["status"] == "failed" and row["ended_at"]
        assert "exited with code 1" in row["error"] and "out of memory" in row["error"]
        assert rig.store.adapters() == [] and rig.store.champion() == "base"
        assert not rig.settings.adapters_dir.exists() or \
            list(rig.settings.adapters_dir.iterdir()) == []
        # Serving goes on.
        assert rig.turn("Hello?").kind == "sample"
    finally:
        rig.close()


def test_a_trainer_past_its_timeout_is_killed(tmp_path: Path, vllm_server,
                                              embedded_model: Path) -> None:
    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model, trainer_timeout=2)
    rig.loop.trainer_command = (sys.executable, "-c", "import time; time.sleep(60)")
    try:
        vote_pairs(rig.store, 4)
        row = rig.store.round(rig.loop.run_round("admin"))
        assert row["status"] == "failed" and "timed out after 2 s" in row["error"]
        assert rig.store.adapters() == []
    finally:
        rig.close()


def test_an_adapter_vllm_cannot_serve_is_rejected(trained: LoopRig, tmp_path: Path,
                                                  vllm_server, embedded_model: Path) -> None:
    """A trainer that writes an adapter for another base model: rejected with the reason."""
    rig = LoopRig(tmp_path / "data", vllm_server, Path(tmp_path / "another-model"))
    try:
        vote_pairs(rig.store, 4)
        source = Path(trained.store.adapter("v0001")["path"])
        # A "trainer" that copies the trained adapter (made for the embedded model).
        rig.loop.trainer_command = (sys.executable, "-c", (
            "import shutil, sys; out = sys.argv[sys.argv.index('--out') + 1]; "
            f"shutil.copytree({str(source)!r}, out)"))
        row = rig.store.round(rig.loop.run_round("admin"))
        assert row["status"] == "succeeded"
        adapter = rig.store.adapter(row["adapter"])
        assert adapter["state"] == "rejected" and "not on the served model" in adapter["reason"]
        assert rig.store.champion() == "base" and rig.store.candidate() is None
        assert rig.pool.loaded == {}
    finally:
        rig.close()


def test_restart_fails_a_running_round_and_loads_champion_and_candidate(
        trained: LoopRig, tmp_path: Path, vllm_server, embedded_model: Path) -> None:
    data_dir = tmp_path / "data"
    rig = LoopRig(data_dir, vllm_server, embedded_model)
    path = Path(trained.store.adapter("v0001")["path"])
    rig.store.add_adapter("v0001", path, None, "base")
    rig.store.crown("v0001", "test")
    rig.store.add_adapter("v0002", path, None, "v0001")  # the same files under a new name
    crashed = rig.store.start_round("schedule")
    rig.close()  # "crash": nothing cleaned up

    again = LoopRig(data_dir, vllm_server, embedded_model,
                    adapter_prefix=rig.settings.adapter_prefix)
    try:
        again.loop.recover()
        row = again.store.round(crashed)
        assert row["status"] == "failed" and "stopped while the round was running" in row["error"]
        assert set(again.pool.loaded) == {"v0001", "v0002"}
        assert again.loop.plan_turn().policy_a in {"v0001", "v0002", "base"}
        with pytest.raises(LoopError, match="a round is running|no trainable"):
            again.loop.start_round()  # no votes in this store
    finally:
        again.close()
