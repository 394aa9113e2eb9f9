"""The round's own KL check: the estimate, the early stop, and the weights it keeps.

A tiny random Llama with the embedded tokenizer (tests/test_trainer_round.py's): seconds.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefloop.trainer.batch import answer_logits, collate
from prefloop.trainer.cli import train_command
from prefloop.trainer.kl import KLEstimator, pair_token_kl
from prefloop.trainer.round import (
    chosen_tokens,
    kl_check_indices,
    load_policy,
    run_round,
    split_indices,
)
from prefloop.trainer.tokenize import TokenizedPair
from tests.test_trainer_round import _config, _write_pairs, tiny_model  # noqa: F401

PAIRS = [TokenizedPair([5, 6, 7, 8, 9], 2, [5, 6, 7, 10], 3),
         TokenizedPair([11, 12, 13], 1, [11, 12, 14, 15, 16, 17], 2),
         TokenizedPair([20, 21, 22, 23], 2, [20, 21, 24], 2)]


def test_the_estimate_is_the_mean_token_kl_over_the_answers(tiny_model: Path,  # noqa: F811
                                                            tmp_path: Path) -> None:
    policy = load_policy(_config(tmp_path, tiny_model), torch.device("cpu"), torch.float32)
    estimator = KLEstimator(PAIRS, pad_id=2, device=torch.device("cpu"), chunk=2)
    assert estimator.measure(policy).per_token == 0.0  # a new adapter changes nothing yet
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    check = estimator.measure(policy)
    # The plain way: every answer position, the full distributions under both.
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for pair in PAIRS:
            for ids, start in ((pair.chosen_ids, pair.chosen_start),
                               (pair.rejected_ids, pair.rejected_start)):
                p = policy(torch.tensor([ids])).logits[0, start - 1:len(ids) - 1].log_softmax(-1)
                q = base(torch.tensor([ids])).logits[0, start - 1:len(ids) - 1].log_softmax(-1)
                total += (p.exp() * (p - q)).sum().item()
                tokens += len(ids) - start
    assert check.tokens == tokens and check.answers == 6
    assert check.per_token == pytest.approx(total / tokens, rel=1e-4)
    assert check.per_answer == pytest.approx(total / 6, rel=1e-4)
    assert check.per_token > 0


def test_the_cached_base_and_the_penalty_give_the_same_kl(tiny_model: Path,  # noqa: F811
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    policy = load_policy(_config(tmp_path, tiny_model), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    cached = KLEstimator(PAIRS, pad_id=2, device=torch.device("cpu"), chunk=2)
    first = cached.measure(policy).per_token
    assert cached.base and cached.measure(policy).per_token == first  # the tables kept
    monkeypatch.setattr("prefloop.trainer.kl.CACHE_BYTES", 0)
    fresh = KLEstimator(PAIRS, pad_id=2, device=torch.device("cpu"), chunk=2)
    assert fresh.measure(policy).per_token == pytest.approx(first, rel=1e-6)
    assert fresh.base == []  # too big for the cache: made again at each check
    # The loss's penalty: per pair, the mean over its answer tokens of the same exact KL.
    batch = collate(PAIRS, range(3), pad_id=2)
    per_pair = pair_token_kl(policy, batch, answer_logits(policy, batch))
    for k, pair in enumerate(PAIRS):
        alone = KLEstimator([pair], pad_id=2, device=torch.device("cpu")).measure(policy)
        assert per_pair[k].item() == pytest.approx(alone.per_token, rel=1e-4)


def test_the_kl_penalty_keeps_a_round_nearer_the_base(tiny_model: Path,  # noqa: F811
                                                      tmp_path: Path) -> None:
    common = {"n_pairs": 16, "lr": 3e-2, "epochs": 3, "warmup_ratio": 0.0}
    free = run_round(_config(tmp_path / "free", tiny_model, **common), progress=False)
    config = _config(tmp_path / "held", tiny_model, kl_coef=20.0, **common)
    held = run_round(config, progress=False)
    assert "kl_per_token" not in free["steps"][0]
    assert all(step["kl_per_token"] >= 0 for step in held["steps"])
    assert held["steps"][0]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)  # starts at base
    from transformers import AutoTokenizer

    from prefloop.trainer.round import _load_pairs
    pairs, _ = _load_pairs(config, AutoTokenizer.from_pretrained(tiny_model))
    kl_free = _kl_of(tmp_path / "free" / "adapters" / "v0001", tiny_model, pairs)
    kl_held = _kl_of(config.out, tiny_model, pairs)
    assert 0 < kl_held < kl_free / 2, (kl_held, kl_free)
    # It still learns the preference: the held-out margin moves the same way.
    assert held["held_out"]["after"]["margin"] > held["held_out"]["before"]["margin"]


def test_the_nll_term_is_the_chosen_answers_nll_per_token(tiny_model: Path,  # noqa: F811
                                                          tmp_path: Path) -> None:
    assert chosen_tokens(collate(PAIRS, range(3), pad_id=2)).tolist() == [3, 2, 2]
    common = {"n_pairs": 8, "lr": 3e-2, "epochs": 1, "warmup_ratio": 0.0, "batch_size": 8}
    plain = run_round(_config(tmp_path / "plain", tiny_model, **common), progress=False)
    rpo = run_round(_config(tmp_path / "rpo", tiny_model, sft_coef=2.0, **common),
                    progress=False)
    assert "nll_chosen" not in plain["steps"][0]
    # The first step starts at base: DPO's loss is log 2, the term adds 2 x the chosen
    # answers' mean NLL per token (the sum of their log-probs over fewer than all tokens).
    step = rpo["steps"][0]
    assert plain["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert step["loss"] == pytest.approx(math.log(2) + 2.0 * step["nll_chosen"], rel=1e-5)
    assert 0 < step["nll_chosen"] < -step["logps_chosen"]


def _kl_of(adapter: Path, model: Path, pairs: list[TokenizedPair]) -> float:
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(adapter))
    return KLEstimator(pairs, pad_id=2, device=torch.device("cpu")).measure(policy).per_token


def test_a_round_stops_before_the_budget_and_keeps_weights_under_it(
        tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    free = run_round(_config(tmp_path / "free", tiny_model, n_pairs=16, lr=3e-2, epochs=4,
                             warmup_ratio=0.0), progress=False)
    assert free["kl_checks"] == [] and free["stopped_early"] is False
    budget = 0.009  # the tiny model: about 0.006 nats/token after a step, 0.011 after two
    config = _config(tmp_path / "kept", tiny_model, n_pairs=16, lr=3e-2, epochs=4,
                     warmup_ratio=0.0, max_kl=budget, kl_check_steps=1, kl_pairs=4,
                     kl_backtracks=0)
    events: list[dict] = []
    metrics = run_round(config, on_event=events.append, progress=False)
    checks = metrics["kl_checks"]
    assert metrics["stopped_early"] is True and metrics["kl_backtracks"] == 0
    assert checks[0]["step"] == 0 and checks[0]["kl_per_token"] == 0.0
    assert [c["over"] for c in checks] == [False] * (len(checks) - 1) + [True]
    assert all(c["kl_per_token"] <= budget for c in checks[:-1])
    assert checks[-1]["kl_per_token"] > budget
    assert checks[-1]["kept_step"] == checks[-2]["step"]
    assert len(metrics["steps"]) == checks[-1]["step"] < len(free["steps"])
    assert [e for e in events if e["event"] == "kl_check"] == [
        {"event": "kl_check", **c} for c in checks]
    # The saved adapter is the one of the last check under the budget, not the last step's.
    from transformers import AutoTokenizer

    from prefloop.trainer.round import _load_pairs  # the round's own tokenisation
    pairs, _ = _load_pairs(config, AutoTokenizer.from_pretrained(tiny_model))
    train_index, val_index = split_indices(len(pairs), config.val_fraction,
                                           random.Random(config.seed))
    assert metrics["kl_check_pairs"] == {"pairs": 4, "held_out": True}
    pairs = [pairs[i] for i in val_index]  # the pairs the check scored: the held-out ones
    saved = _kl_of(config.out, tiny_model, pairs)
    assert saved <= budget + 1e-6
    assert _kl_of(tmp_path / "free" / "adapters" / "v0001", tiny_model, pairs) > budget


def test_an_overshooting_step_is_taken_back_and_the_round_goes_on_at_half_the_step(
        tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    common = {"n_pairs": 16, "lr": 3e-2, "epochs": 4, "warmup_ratio": 0.0, "max_kl": 0.009,
              "kl_check_steps": 2, "kl_pairs": 4}
    stop = run_round(_config(tmp_path / "stop", tiny_model, kl_backtracks=0, **common),
                     progress=False)
    config = _config(tmp_path / "back", tiny_model, kl_backtracks=2, **common)
    metrics = run_round(config, progress=False)
    checks, steps = metrics["kl_checks"], metrics["steps"]
    first_over = next(k for k, c in enumerate(checks) if c["over"])
    # Up to the first overshoot both rounds are the same round.
    assert checks[:first_over + 1] == [{**c, "seconds": checks[k]["seconds"]}
                                       for k, c in enumerate(stop["kl_checks"][:first_over + 1])]
    backtracks = [c for c in checks[:-1] if c["over"]]
    assert 1 <= metrics["kl_backtracks"] == len(backtracks) <= 2
    assert len(steps) > len(stop["steps"])  # it went on where the other stopped
    # Each overshoot halves the step from there on (the schedule's linear decay kept), and
    # every step after the first overshoot is checked.
    total = steps[0]["of"]
    for step in steps:
        halvings = sum(c["step"] < step["step"] for c in backtracks)
        scheduled = common["lr"] * (total - step["step"] + 1) / total
        assert step["lr"] == pytest.approx(scheduled * 0.5 ** halvings, rel=1e-6)
    after = [c["step"] for c in checks if c["step"] > checks[first_over]["step"]]
    assert after == list(range(checks[first_over]["step"] + 1, len(steps) + 1))
    for k, check in enumerate(checks):
        if check["over"]:  # the weights of the last check under the budget come back
            assert check["kept_step"] == max(c["step"] for c in checks[:k] if not c["over"])
    assert metrics["stopped_early"] is checks[-1]["over"]
    if metrics["stopped_early"]:
        assert metrics["kl_backtracks"] == 2 or len(steps) == total
    # Whatever happened, the adapter written is under the budget on the checked pairs.
    from transformers import AutoTokenizer

    from prefloop.trainer.round import _load_pairs
    pairs, _ = _load_pairs(config, AutoTokenizer.from_pretrained(tiny_model))
    _, val_index = split_indices(len(pairs), config.val_fraction, random.Random(config.seed))
    assert _kl_of(config.out, tiny_model, [pairs[i] for i in val_index]) <= 0.009 + 1e-6


def test_the_check_scores_held_out_pairs_and_trained_ones_only_without_them() -> None:
    assert kl_check_indices([0, 2, 3, 5], [1, 4], 8) == [1, 4]
    assert kl_check_indices([0, 2, 3, 5], [1, 4], 1) == [1]
    assert kl_check_indices([0, 2, 3, 5], [], 3) == [0, 2, 3]


@pytest.mark.parametrize(("n_pairs", "val_fraction", "batch_size", "epochs", "every",
                          "check_steps", "check_pairs", "held_out"), [
    # 6 training pairs in batches of 4: 2 steps an epoch, 4 in all; every step is checked.
    (8, 0.25, 4, 2, 4, [0, 1, 2, 3, 4], 2, True),
    # 16 steps: every kl_check_steps (4), or every 4 when kl_check_steps is larger.
    (8, 0.0, 1, 2, 4, [0, 4, 8, 12, 16], 8, False),
    (8, 0.0, 1, 2, 8, [0, 4, 8, 12, 16], 8, False),
    (8, 0.0, 1, 2, 3, [0, 3, 6, 9, 12, 15, 16], 8, False),
])
def test_a_round_of_few_steps_checks_its_kl_more_often(
        tiny_model: Path, tmp_path: Path, n_pairs: int, val_fraction: float,  # noqa: F811
        batch_size: int, epochs: int, every: int, check_steps: list[int], check_pairs: int,
        held_out: bool) -> None:
    metrics = run_round(_config(tmp_path, tiny_model, n_pairs=n_pairs, lr=1e-3, epochs=epochs,
                                val_fraction=val_fraction, batch_size=batch_size,
                                max_kl=50.0, kl_check_steps=every), progress=False)
    assert [c["step"] for c in metrics["kl_checks"]] == check_steps
    assert metrics["kl_check_pairs"] == {"pairs": check_pairs, "held_out": held_out}
    assert metrics["stopped_early"] is False


def test_a_round_that_starts_over_the_budget_takes_no_step(tiny_model: Path,  # noqa: F811
                                                           tmp_path: Path) -> None:
    first = _config(tmp_path / "a", tiny_model, n_pairs=8, lr=3e-2, epochs=3, warmup_ratio=0.0)
    run_round(first, progress=False)
    config = _config(tmp_path / "b", tiny_model, n_pairs=8, init_adapter=first.out,
                     max_kl=1e-6, kl_check_steps=1)
    metrics = run_round(config, progress=False)
    assert metrics["steps"] == [] and metrics["stopped_early"] is True
    assert [c["step"] for c in metrics["kl_checks"]] == [0]
    assert metrics["kl_checks"][0]["kept_step"] is None  # nothing under the budget was seen
    assert (config.out / "adapter_model.safetensors").is_file()


def test_kl_options_on_the_command_line(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    pairs = _write_pairs(tmp_path / "p.jsonl", 6)
    base = ["--pairs", str(pairs), "--out", str(tmp_path / "out"), "--model", str(tiny_model)]
    runner = CliRunner()
    for flag, value, message in (("--max-kl", "-0.1", "max_kl must be >= 0"),
                                 ("--kl-check-steps", "0", "kl_check_steps must be at least 1"),
                                 ("--kl-pairs", "0", "kl_pairs must be at least 1"),
                                 ("--kl-backtracks", "-1", "kl_backtracks must be 0"),
                                 ("--kl-backtracks", "half", "'half' is not a valid integer"),
                                 ("--kl-coef", "-1", "kl_coef must be >= 0"),
                                 ("--sft-coef", "-0.5", "sft_coef must be >= 0"),
                                 ("--max-kl", "lots", "'lots' is not a valid float")):
        result = runner.invoke(train_command, [*base, flag, value])
        assert result.exit_code != 0 and message in result.output, result.output
    result = runner.invoke(train_command, [*base, "--batch-size", "2", "--max-kl", "5",
                                           "--kl-check-steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert events.count("kl_check") == 1 + events.count("step")
    assert not math.isnan(json.loads((tmp_path / "out" / "metrics.json").read_text())
                          ["kl_checks"][-1]["kl_per_token"])


def test_the_command_reports_a_round_that_took_no_step(tiny_model: Path,  # noqa: F811
                                                       tmp_path: Path) -> None:
    pairs = _write_pairs(tmp_path / "p.jsonl", 6)
    common = ["--pairs", str(pairs), "--model", str(tiny_model), "--batch-size", "2",
              "--lr", "3e-2"]
    runner = CliRunner()
    first = runner.invoke(train_command, [*common, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    over = [*common, "--init-adapter", str(tmp_path / "a"), "--max-kl", "1e-9"]
    result = runner.invoke(train_command, [*over, "--out", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout.splitlines()[-1])
    assert (done["event"], done["steps"], done["final_loss"], done["stopped_early"]) == \
        ("done", 0, None, True)
    result = runner.invoke(train_command, [*over, "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "0 steps," in result.output
    assert "stopped at step 0" in result.output and "over --max-kl 1e-09" in result.output
