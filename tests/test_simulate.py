"""``prefloop simulate`` with the real components: vLLM, store, trainer subprocess, hot-swap."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from prefloop.cli import main
from prefloop.sim.simulate import log_ratios

pytestmark = pytest.mark.slow


def test_a_short_simulation_records_a_round_an_adapter_and_a_report(
        tmp_path: Path, external_args: list[str], embedded_model: Path) -> None:
    data_dir, report = tmp_path / "data", tmp_path / "report"
    result = CliRunner().invoke(main, [
        "simulate", "--oracle", "concise", "--rounds", "1", "--pairs-per-round", "16",
        "--eval-prompts", "6", "--base-samples", "2",
        "--voters", "4", "--noise", "random:0.25,side:0.25",
        "--report", str(report), "--data-dir", str(data_dir),
        "--promote", "immediate", "--max-tokens", "32", "--train-lr", "5e-4",
        "--adapter-prefix", "sim", "--trainer-threads", "2", *external_args])
    assert result.exit_code == 0, result.output
    figures = json.loads((report / "report.json").read_text())
    before, after = figures["points"]
    assert before["round"] == 0 and before["champion"] == "base"
    assert before["kl"] == 0.0  # base against itself
    assert after["round_status"] == "succeeded" and after["champion"] == "v0001"
    assert sum(after["votes"].values()) == 16
    assert after["wins"] + after["losses"] + after["ties"] + after["both_bad"] == 6 * 2
    assert after["kl"] > 0, f"KL {after['kl']}: the policy's samples should be likelier under it"
    assert -1 <= after["reward_champion"] <= 1 and -1 <= after["reward_base"] <= 1
    assert after["reward_base"] == before["reward_base"]  # base's answers are sampled once
    # Base's answers are likelier after their own prompt than after another: relevance > 0.
    assert before["relevance_base"] > 0 and after["relevance_base"] == before["relevance_base"]
    assert isinstance(after["relevance_champion"], float)
    assert set(after["seconds"]) == {"collect", "judge", "train", "measure"}
    assert after["judge_pairs"] == 0 and after["seconds"].pop("judge") == 0  # immediate
    assert all(seconds > 0 for seconds in after["seconds"].values()), after["seconds"]
    assert [len(point["examples"]) for point in figures["points"]] == [2, 2]
    assert all(example["prompt"] for point in figures["points"] for example in point["examples"])
    assert (report / "report.md").read_text().count("\n| ") >= 3 + 4
    for plot in ("reward.png", "reward_vs_kl.png"):
        assert (report / plot).read_bytes()[:4] == b"\x89PNG"
    with sqlite3.connect(data_dir / "prefloop.db") as db:
        assert db.execute("select count(*) from votes").fetchone()[0] == 16
        assert db.execute("select status, adapter from rounds").fetchall() == \
            [("succeeded", "v0001")]
    assert (data_dir / "adapters" / "v0001" / "adapter_config.json").is_file()

    # The crowd: each voter its own client, the votes stored as theirs.
    assert "voters: 2 honest, 1 random (25%), 1 side (25%)" in result.output
    assert figures["voters"] == {"honest": 2, "random": 1, "side": 1}
    kinds = {voter["client_id"]: voter["kind"] for voter in figures["crowd"]}
    assert len(kinds) == 4 and all(len(client_id) == 32 for client_id in kinds)
    assert sum(sum(v.values()) for v in after["votes_by_kind"].values()) == 16
    assert set(after["votes_by_kind"].get("side", {"a": 0})) == {"a"}
    with sqlite3.connect(data_dir / "prefloop.db") as db:
        owners = db.execute("select v.client_id, c.client_id from votes v join pairs p on "
                            "p.id = v.pair_id join conversations c on c.id = "
                            "p.conversation_id").fetchall()
    assert all(voter == owner and voter in kinds for voter, owner in owners), owners
    # The gate's side: the adapter, its state and reason; flags (16 votes: too few for any).
    assert before["adapters"] == [] and before["flagged"] == []
    [adapter] = after["adapters"]
    assert (adapter["name"], adapter["state"], adapter["reason"]) == \
        ("v0001", "champion", "promote: immediate")
    assert after["flagged"] == []
    assert after["flagged_by_kind"] == {kind: {"voters": n, "flagged": 0}
                                        for kind, n in figures["voters"].items()}
    text = (report / "report.md").read_text()
    assert "| 1 | v0001 | champion | promote: immediate | none |" in text
    assert "| v0001 | 1 | base | champion | promote: immediate | none |" in text
    assert "At the end: honest 0/2, random 0/1, side 0/1 flagged." in text

    # The KL estimate itself: 0 without an adapter; the trained adapter moves log-probs.
    items = [([{"role": "user", "content": "Name a fruit."}], "An apple.")]
    assert log_ratios(embedded_model, None, items) == [0.0]
    assert log_ratios(embedded_model, data_dir / "adapters" / "v0001", items)[0] != 0.0


@pytest.mark.parametrize("args, message", [
    (["--oracle", "nonsense"], "oracle"),
    (["--oracle", "concise", "--rounds", "0"], "--rounds"),
    (["--oracle", "concise", "--base-samples", "0"], "--base-samples"),
    (["--oracle", "concise", "--prompts", "/nope/prompts.txt"], "does not exist"),
    (["--oracle", "judge"], "judge"),
    (["--oracle", "random", "--noise", "lazy:0.2"], "'--noise': unknown voter kind 'lazy'"),
    (["--oracle", "random", "--noise", "side:1.2"], "'--noise': the share of side must be"),
    (["--oracle", "random", "--noise", "random:0.6,side:0.6"], "add up to 1.2"),
    (["--oracle", "random", "--noise", "random=0.3"], "'--noise': 'random=0.3' is not"),
    (["--oracle", "random", "--noise", "side:0.1", "--voters", "4"],
     "side:0.1 of 4 voters is no voter at all"),
    (["--oracle", "random", "--voters", "0"], "--voters"),
])
def test_bad_simulate_arguments_are_refused(tmp_path: Path, args: list[str],
                                            message: str) -> None:
    result = CliRunner().invoke(main, ["simulate", *args, "--data-dir", str(tmp_path / "d")])
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "d").exists()  # refused before anything started


def test_with_promote_duel_the_last_candidate_is_judged_before_the_end(
        tmp_path: Path, external_args: list[str]) -> None:
    """The simulation collects more pairs until the gate has decided (here within a budget
    of 6 duel votes), as ``prefloop serve`` waits for the verdict before its next round."""
    report = tmp_path / "report"
    result = CliRunner().invoke(main, [
        "simulate", "--oracle", "random", "--rounds", "1", "--pairs-per-round", "8",
        "--eval-prompts", "2", "--base-samples", "1", "--report", str(report),
        "--data-dir", str(tmp_path / "data"), "--promote", "duel", "--max-duel-votes", "6",
        "--duel-share", "1.0", "--baseline-share", "0", "--max-tokens", "16",
        "--adapter-prefix", "simduel", "--trainer-threads", "2", *external_args])
    assert result.exit_code == 0, result.output
    after = json.loads((report / "report.json").read_text())["points"][-1]
    [adapter] = after["adapters"]
    assert adapter["state"] in ("champion", "rejected"), adapter  # decided, not pending
    assert after["judge_pairs"] >= 6 and after["seconds"]["judge"] > 0
    assert after["champion"] == ("v0001" if adapter["state"] == "champion" else "base")
