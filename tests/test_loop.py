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
from prefloop.app.loop_tabs import LoopHandlers
from prefloop.config import Settings
from prefloop.loop.controller import Loop, LoopError
from prefloop.loop.reports import round_summaries
from prefloop.loop.rounds import TRAIN_KL_SHARE
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.storage.store import Answer, NotFound, Store
from tests.conftest import PROBE_PROMPTS

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
        # Two trainer threads (one as shipped, beside a busy vLLM): a test waits for its round.
        settings = {"data_dir": data_dir, "min_new_pairs": 8, "train_lr": 5e-4,
                    "train_epochs": 2, "trainer_threads": 2, "max_tokens": 16,
                    "adapter_prefix": f"t{next(_prefixes)}", "rating_resamples": 20,
                    "kl_probe_prompts": PROBE_PROMPTS,
                    # Four short probe answers are too few to hold an adapter to base's
                    # relevance: the floor's own tests below set it.
                    "min_relevance": 0.0} | overrides
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
    """A loop that has run one real round on 16 votes (its candidate is v0001).

    Its KL budget is loose (5 nats/token): the trainer checks its KL but never stops on it,
    so v0001 is trained (the hand-written test answers are far from the model's own, and
    the default budget would stop the round in its first steps)."""
    rig = LoopRig(tmp_path_factory.mktemp("trained") / "data", vllm_server, embedded_model,
                  train_batch_size=4, train_lora_rank=8, kl_probe_prompts=16, max_kl=5.0)
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


# The promotion test with its defaults (false rate 0.05, effect 0.65, miss rate 0.2): a win
# adds log(1.3) = 0.262 to the log-likelihood ratio, a loss log(0.7) = -0.357; it promotes at
# +2.677 (calibrated; 11 straight wins: 10 give 2.62) and rejects at log(0.2/0.95) = -1.558
# (5 straight losses: 4 give -1.43). Ties count against the budget only.


def test_duel_votes_promote_the_candidate(rig: LoopRig) -> None:
    fake_adapter(rig, "v0001")
    results = [duel(rig, *(("v0001", "base", "a") if k % 2 else ("base", "v0001", "b")))
               for k in range(10)]
    assert [r["decision"] for r in results] == [None] * 10  # 10 wins: LLR 2.62 < 2.68
    assert duel(rig, "v0001", "base", "tie")["decision"] is None  # no evidence either way
    assert duel(rig, "v0001", "base", "a")["decision"] == "promote"
    assert rig.store.champion() == "v0001"
    assert rig.store.adapter("v0001")["state"] == "champion"
    reason = rig.store.adapter("v0001")["reason"]
    assert "won its duels" in reason and "11 wins, 0 losses, 1 ties" in reason
    assert rig.store.candidate() is None


def test_a_losing_candidate_is_rejected(rig: LoopRig) -> None:
    fake_adapter(rig, "v0001")
    decisions = [duel(rig, "v0001", "base", "b")["decision"] for _ in range(5)]
    assert decisions == [None, None, None, None, "reject"]
    assert rig.store.adapter("v0001")["state"] == "rejected"
    assert "no better" in rig.store.adapter("v0001")["reason"]
    assert rig.store.champion() == "base"


def test_a_candidate_not_shown_better_within_the_budget_is_not_promoted(
        tmp_path: Path, vllm_server, embedded_model: Path) -> None:
    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model, max_duel_votes=6)
    try:
        fake_adapter(rig, "v0001")
        decisions = [duel(rig, "v0001", "base", c)["decision"]
                     for c in ("a", "b", "tie", "both_bad", "a", "tie")]
        assert decisions == [None] * 5 + ["exhausted"]
        adapter = rig.store.adapter("v0001")
        assert adapter["state"] == "rejected" and "vote budget" in adapter["reason"]
        assert rig.store.champion() == "base"
    finally:
        rig.close()


def test_a_scheduled_round_waits_for_the_candidates_verdict(rig: LoopRig) -> None:
    fake_adapter(rig, "v0001")
    vote_pairs(rig.store, 8)  # enough new votes for a round (min_new_pairs 8)
    duel(rig, "v0001", "base", "a")
    assert rig.loop.tick() is None and rig.store.rounds() == []
    status = rig.loop.reports.status()
    assert status["waiting_for_verdict"] and status["candidate_duel_votes"] == 1
    assert "waits for the candidate's verdict (1 of at most 150" in \
        LoopHandlers(rig.loop, None).status_text()
    for _ in range(6):  # 1 win, 6 losses: 0.262 - 6 x 0.357 = -1.88 <= -1.558, rejected
        duel(rig, "v0001", "base", "b")
    assert (rig.store.candidate() is None
            and not rig.loop.reports.status()["waiting_for_verdict"])
    rig.loop.trainer_command = (sys.executable, "-c", "import sys; sys.exit('no trainer')")
    assert rig.loop.tick() is not None  # now the schedule trains again
    assert rig.store.rounds()[0]["trigger"] == "schedule"


def test_only_duels_against_the_champion_count(rig: LoopRig) -> None:
    fake_adapter(rig, "v0001")
    fake_adapter(rig, "v0002")
    rig.store.crown("v0001", "test")
    rig.store.set_adapter_state("v0002", "candidate")
    for _ in range(12):  # wins over base say nothing about the champion
        assert duel(rig, "v0002", "base", "a")["decision"] is None
    assert rig.store.candidate() == "v0002"
    assert [duel(rig, "v0001", "v0002", "b")["decision"] for _ in range(11)] == \
        [None] * 10 + ["promote"]
    assert rig.store.champion() == "v0002"
    assert rig.store.adapter("v0001")["state"] == "retired"


def test_a_champion_that_loses_to_base_is_rolled_back(rig: LoopRig) -> None:
    fake_adapter(rig, "v0001")
    rig.store.crown("v0001", "test")
    # Duels against base before the crowning are not the champion's record since.
    decisions = [duel(rig, "base", "v0001", "a")["decision"] for _ in range(10)]
    assert decisions == [None] * 10 and rig.store.champion() == "v0001"
    assert duel(rig, "v0001", "base", "b")["decision"] == "rollback"  # base's 11th win
    assert rig.store.champion() == "base"
    adapter = rig.store.adapter("v0001")
    assert adapter["state"] == "rolled_back"
    assert adapter["reason"].startswith("rolled back to base: lost its duels against base")
    assert "base vs v0001: 11 wins, 0 losses" in adapter["reason"]


def test_a_champion_that_holds_against_base_stays(rig: LoopRig) -> None:
    fake_adapter(rig, "v0001")
    rig.store.crown("v0001", "test")
    for choice in ["a", "b"] * 20:  # even: the rollback test settles on "not worse"
        assert duel(rig, "v0001", "base", choice)["decision"] is None
    assert rig.store.champion() == "v0001"


def test_rollback_skips_an_earlier_champion_that_cannot_be_served(rig: LoopRig) -> None:
    fake_adapter(rig, "v0001")  # an empty folder: vLLM would refuse it
    fake_adapter(rig, "v0002")
    rig.store.crown("v0001", "test")
    for _ in range(11):  # v0001 beats base: rated above it
        duel(rig, "v0001", "base", "a")
    rig.store.crown("v0002", "test")
    assert rig.loop.best_earlier_policy("v0002") == "v0001"
    for _ in range(11):
        decision = duel(rig, "base", "v0002", "a")["decision"]
    assert decision == "rollback" and rig.store.champion() == "base"
    assert "v0001, rated higher, could not be loaded" in rig.store.adapter("v0002")["reason"]


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


def test_a_champion_that_loses_to_base_is_rolled_back_while_serving(trained: LoopRig) -> None:
    """No admin action: base's wins in the baseline duels roll the real adapter back, and
    every turn before, during and after is answered."""
    loop, store = trained.loop, trained.store
    loop.promote("v0001")
    decisions = []
    for k in range(11):
        turn = trained.turn(f"How do I {TOPICS[k]}?")
        pair = store.pair(turn.pair_id)
        assert pair["text_a"].strip() and pair["text_b"].strip()
        assert trained.service.vote(turn.pair_id, "tie")["decision"] is None
        decisions.append(duel(trained, "base", "v0001", "a")["decision"])
    assert decisions == [None] * 10 + ["rollback"]
    assert store.champion() == "base" and store.adapter("v0001")["state"] == "rolled_back"
    turn = trained.turn("How do I brew tea?")
    pair = store.pair(turn.pair_id)
    assert (pair["policy_a"], pair["policy_b"]) == ("base", "base") and pair["text_a"].strip()
    assert store.adapter("v0001")["reason"].startswith("rolled back to base: lost its duels")
    # Shown in the rounds API and the Training tab's rounds table.
    [summary] = [r for r in round_summaries(store, 10) if r["adapter"] == "v0001"]
    assert summary["adapter_state"] == "rolled_back"
    assert summary["adapter_reason"].startswith("rolled back to base")
    table = LoopHandlers(loop, None).training_view().rounds
    row = table[table["adapter"] == "v0001"].iloc[0]
    assert row["adapter state"] == "rolled_back" and "lost its duels" in row["decision"]


def test_promote_immediate_makes_each_new_adapter_champion(tmp_path: Path, vllm_server,
                                                            embedded_model: Path) -> None:
    # Replay on (the default is none): round 2 also trains on round 1's pairs.
    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model, promote="immediate",
                  replay_ratio=1.0)
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


@pytest.mark.parametrize("train_from", ["champion", "base"])
def test_a_round_starts_from_the_champion_or_afresh(train_from: str, tmp_path: Path,
                                                    vllm_server, embedded_model: Path) -> None:
    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model, train_from=train_from)
    told = tmp_path / "argv.json"  # a stand-in trainer that records what it was told
    rig.loop.trainer_command = (sys.executable, "-c", "import json, sys; json.dump(sys.argv[1:], "
                                f"open({str(told)!r}, 'w')); sys.exit('stand-in')")
    try:
        fake_adapter(rig, "v0001")
        rig.store.crown("v0001", "test")
        vote_pairs(rig.store, 4)
        rig.loop.run_round("admin")
        argv = json.loads(told.read_text())
        assert rig.store.rounds()[0]["parent"] == "v0001"
        if train_from == "champion":
            assert argv[argv.index("--init-adapter") + 1] == \
                str(rig.settings.adapters_dir / "v0001")
        else:
            assert "--init-adapter" not in argv
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


# -- the KL budget ----------------------------------------------------------------------------


def copying_trainer(source: Path) -> tuple[str, ...]:
    """A "trainer" that writes a copy of ``source`` as its adapter: a round without training."""
    return (sys.executable, "-c", (
        "import shutil, sys; out = sys.argv[sys.argv.index('--out') + 1]; "
        f"shutil.copytree({str(source)!r}, out)"))


def test_kl_of_a_trained_adapter_is_measured_before_it_meets_visitors(trained: LoopRig,
                                                                      embedded_model: Path):
    [row] = [r for r in trained.store.rounds() if r["adapter"] == "v0001"]
    # The loop gave the trainer its share of the budget; the trainer checked along the way.
    checks = row["metrics"]["kl_checks"]
    assert row["metrics"]["config"]["max_kl"] == pytest.approx(5.0 * TRAIN_KL_SHARE)
    assert checks[0]["step"] == 0 and checks[0]["kl_per_token"] == 0.0
    assert checks[-1]["step"] == len(row["metrics"]["steps"]) and checks[-1]["kl_per_token"] > 0
    assert row["metrics"]["stopped_early"] is False
    report = row["kl"]
    assert (report["policy"], report["answers"], report["max_tokens"]) == ("v0001", 16, 16)
    assert report["per_token"] > 0 and report["per_answer"] > 0, report
    assert 16 <= report["tokens"] <= 16 * 16
    adapter = trained.store.adapter("v0001")
    assert (adapter["kl_per_token"], adapter["kl_per_answer"]) == \
        (report["per_token"], report["per_answer"])
    assert len(report["samples"]) == 16 and all(s["text"].strip() for s in report["samples"])
    # Its relevance is measured and kept; with no floor it is not compared with base's.
    assert isinstance(report["relevance"], float) and report["base_relevance"] is None
    [summary] = [r for r in round_summaries(trained.store, 10) if r["adapter"] == "v0001"]
    assert summary["kl"]["per_token"] == report["per_token"] and "samples" not in summary["kl"]
    cells = LoopHandlers(trained.loop, None).training_view().rounds
    assert cells[cells["adapter"] == "v0001"]["KL/token"].tolist() == \
        [f"{report['per_token']:.3f}"]

    # vLLM's numbers against the same answers scored in torch at fp32 (the simulation's
    # estimate, with the trainer's code). vLLM serves in bf16 where the CPU has it: single
    # token log-probs then differ by up to ~0.35 nats, one answer's sum by up to ~0.7, the
    # probe's mean per token by ~0.004 nats (0.008 vs 0.004 here); the budget is 0.2.
    from prefloop.sim.simulate import log_ratios

    samples = report["samples"]
    scored = log_ratios(embedded_model, Path(adapter["path"]),
                        [([{"role": "user", "content": s["prompt"]}], s["text"])
                         for s in samples], [s["finish_reason"] == "length" for s in samples])
    torch_per_token = sum(scored) / report["tokens"]
    print(f"KL per token: probe {report['per_token']:.4f}, torch fp32 {torch_per_token:.4f}")
    assert abs(report["per_token"] - torch_per_token) < 0.02, (report["per_token"], scored)


def test_a_trained_adapters_turn_shows_its_best_and_worst_of_four(trained: LoopRig,
                                                                  vllm_server,
                                                                  embedded_model: Path):
    """pair_candidates 4 on the real vLLM: one request for four answers, each scored under
    the adapter and base; the pair shown is the highest and lowest implicit reward, and the
    rewards are the answers' log-ratios as torch computes them."""
    from prefloop.sim.simulate import log_ratios

    sampler = PairSampler(vllm_server.endpoint, max_model_len=2048,
                          sampling=Sampling(0.8, 0.95, 16, candidates=4),
                          model_name=trained.pool.served_name)
    history = [{"role": "user", "content": "How do I plant a tree?"}]

    async def pair():
        try:
            return [p async for p in sampler.stream(history, "v0001", "v0001", seed=11)]
        finally:
            await sampler.close()

    [final] = asyncio.run(pair())
    assert final.done and len(final.candidates) == len(final.rewards) == 4
    assert [c.seed for c in final.candidates] == [11, 12, 13, 14]
    assert all(c.text.strip() and c.tokens for c in final.candidates)
    rewards = list(final.rewards)
    assert len(set(rewards)) == 4, rewards  # a trained adapter: each answer its own reward
    shown = {final.a.seed: final.a.text, final.b.seed: final.b.text}
    best, worst = (final.candidates[rewards.index(f(rewards))] for f in (max, min))
    assert shown == {best.seed: best.text, worst.seed: worst.text}
    adapter = Path(trained.store.adapter("v0001")["path"])
    scored = log_ratios(embedded_model, adapter, [(history, c.text) for c in (best, worst)],
                        [c.finish_reason == "length" for c in (best, worst)])
    print(f"rewards {rewards}; best, worst in torch fp32 {scored}")
    # vLLM may serve in bf16: one answer's sum then differs by up to ~0.7 nats (above).
    assert scored == pytest.approx([max(rewards), min(rewards)], abs=1.0)


def test_an_adapter_over_max_kl_never_reaches_visitors(trained: LoopRig, tmp_path: Path,
                                                       vllm_server, embedded_model: Path):
    """Even with promote = "immediate": rejected with the reason, unloaded, never planned."""
    measured = trained.store.adapter("v0001")["kl_per_token"]
    budget = round(measured / 4, 6)
    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model, max_kl=budget,
                  promote="immediate")
    rig.loop.trainer_command = copying_trainer(Path(trained.store.adapter("v0001")["path"]))
    try:
        vote_pairs(rig.store, 4)
        row = rig.store.round(rig.loop.run_round("admin"))
        assert row["status"] == "succeeded" and row["adapter"] == "v0001", row["error"]
        adapter = rig.store.adapter("v0001")
        assert adapter["state"] == "rejected"
        assert adapter["reason"] == \
            f"KL {row['kl']['per_token']:.3f} nats/token over max_kl {budget:g}"
        assert adapter["kl_per_token"] == row["kl"]["per_token"] > budget
        assert rig.store.candidate() is None and rig.store.champion() == "base"
        assert rig.pool.loaded == {}
        plans = [rig.loop.plan_turn() for _ in range(50)]
        assert {(p.policy_a, p.policy_b) for p in plans} == {("base", "base")}
        pair = rig.store.pair(rig.turn("How do I fold a shirt?").pair_id)
        assert (pair["policy_a"], pair["policy_b"]) == ("base", "base")
        [cells] = LoopHandlers(rig.loop, None).training_view().rounds.to_dict("records")
        assert cells["adapter state"] == "rejected" and "over max_kl" in cells["decision"]
    finally:
        rig.close()


def test_an_adapter_under_the_relevance_floor_never_reaches_visitors(
        trained: LoopRig, tmp_path: Path, vllm_server, embedded_model: Path):
    """A floor of 10 times base's relevance: no adapter keeps that much, so v0001 is
    rejected with the reason, and base's relevance, measured by the same probe, is kept."""
    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model, promote="immediate",
                  min_relevance=10.0, max_kl=5.0)
    rig.loop.trainer_command = copying_trainer(Path(trained.store.adapter("v0001")["path"]))
    try:
        vote_pairs(rig.store, 4)
        row = rig.store.round(rig.loop.run_round("admin"))
        assert row["status"] == "succeeded" and row["adapter"] == "v0001", row["error"]
        relevance, base = row["kl"]["relevance"], row["kl"]["base_relevance"]
        assert base > 0, "base's answers are likelier after their own prompts"
        adapter = rig.store.adapter("v0001")
        assert adapter["state"] == "rejected"
        assert adapter["reason"] == (
            f"relevance {relevance:.2f} nats/token under min_relevance 10 of base's "
            f"{base:.2f}: answers that would do for any question")
        assert rig.store.candidate() is None and rig.store.champion() == "base"
        assert rig.pool.loaded == {}
        [cells] = LoopHandlers(rig.loop, None).training_view().rounds.to_dict("records")
        assert cells["relevance (base's)"] == f"{relevance:.2f} ({base:.2f})"
        assert "under min_relevance" in cells["decision"]
    finally:
        rig.close()


def test_an_adapter_whose_kl_cannot_be_measured_is_rejected(trained: LoopRig, tmp_path: Path,
                                                            vllm_server, embedded_model: Path):
    from prefloop.serving.kl_probe import KLProbe
    from prefloop.serving.vllm_server import Endpoint

    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model)
    rig.loop.trainer_command = copying_trainer(Path(trained.store.adapter("v0001")["path"]))
    rig.loop.kl_probe = KLProbe(Endpoint("http://127.0.0.1:9", "x"), prompts=2, max_tokens=8)
    try:
        vote_pairs(rig.store, 4)
        row = rig.store.round(rig.loop.run_round("admin"))
        assert row["status"] == "succeeded" and row["kl"] is None
        adapter = rig.store.adapter(row["adapter"])
        assert adapter["state"] == "rejected" and adapter["kl_per_token"] is None
        assert adapter["reason"].startswith("KL not measured: the model server did not answer")
        assert rig.store.candidate() is None and rig.pool.loaded == {}
    finally:
        rig.close()
