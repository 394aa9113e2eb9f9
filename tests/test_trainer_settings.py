"""The trainer's RoundConfig is the one definition of a round's knobs: its command line, the
argv the loop runs it with and the loop's ``train_*`` settings all derive from it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest

from prefloop.config import load_settings, setting_fields
from prefloop.loop.rounds import TRAIN_KL_SHARE, round_config
from prefloop.trainer.cli import train_command
from prefloop.trainer.settings import LOSSES, RoundConfig, arguments, option_name


def _parsed(args: list[str]) -> dict[str, Any]:
    """The keyword arguments (less --json) the trainer's command would be called with."""
    with train_command.make_context("train", args) as ctx:
        return {k: v for k, v in ctx.params.items() if k != "json_lines"}


def test_every_field_has_an_option_with_its_help_and_default(tmp_path: Path) -> None:
    options = {p.name: p for p in train_command.params}
    for f in fields(RoundConfig):
        option = options[f.name]
        assert option.opts == [option_name(f.name)]
        assert option.help and option.help.startswith(f.metadata["help"][:-1])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    params = _parsed(["--pairs", str(pairs), "--out", str(tmp_path / "out")])
    for f in fields(RoundConfig):
        if f.name not in ("pairs", "out", "model"):
            assert params[f.name] == f.default, f.name


def test_arguments_rebuild_the_config(tmp_path: Path) -> None:
    """argv -> the trainer's options -> the same config, for defaults and for every knob
    set away from its default."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    adapter = tmp_path / "parent"
    adapter.mkdir()
    plain = RoundConfig(pairs=pairs, out=tmp_path / "out", model=tmp_path / "model")
    changed = RoundConfig(pairs=pairs, out=tmp_path / "out", model=tmp_path / "model",
                          init_adapter=adapter, loss="robust", beta=0.25, label_smoothing=0.1,
                          lr=3e-5, epochs=3, batch_size=2, grad_accum=2, min_steps=3, micro_batch=0,
                          batch_order="file", precision="fp32", max_length=64, lora_r=4,
                          lora_alpha=8, lora_dropout=0.0, target_modules=("q_proj", "v_proj"),
                          val_fraction=0.0, seed=7, warmup_ratio=0.0, max_grad_norm=0.5,
                          max_kl=0.1, kl_check_steps=3, kl_backtracks=2, kl_pairs=5, kl_coef=0.5,
                          sft_coef=1.0,
                          skip_invalid=True,
                          threads=1)
    for config in (plain, changed):
        assert RoundConfig(**_parsed(arguments(config))) == config
    assert {f.name for f in fields(RoundConfig)
            if getattr(changed, f.name) == getattr(plain, f.name)} == {"pairs", "out", "model"}


def test_the_loop_settings_set_the_trainer_fields(tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={
        "train_lr": 5e-4, "train_beta": 0.2, "train_epochs": 3, "train_batch_size": 4,
        "train_lora_rank": 8, "lora_max_rank": 8, "train_loss": "ipo", "trainer_threads": 0,
        "train_kl_backtracks": 2})
    config = round_config(settings, pairs=tmp_path / "p.jsonl", out=tmp_path / "v0001",
                          model=tmp_path / "m", init_adapter=None, seed=5)
    assert (config.lr, config.beta, config.epochs, config.batch_size, config.lora_r,
            config.lora_alpha, config.loss, config.threads, config.seed) == \
        (5e-4, 0.2, 3, 4, 8, 16, "ipo", None, 5)
    assert config.kl_backtracks == 2
    defaults = round_config(load_settings(env={}), pairs=tmp_path / "p.jsonl",
                            out=tmp_path / "v0001", model=tmp_path / "m", init_adapter=None,
                            seed=1)
    assert (defaults.epochs, defaults.threads, defaults.lora_alpha, defaults.kl_backtracks) == \
        (2, 1, 16, 0)
    # The trainer stops at a share of the loop's KL budget; no budget, no check.
    assert defaults.max_kl == pytest.approx(0.2 * TRAIN_KL_SHARE)
    unbounded = round_config(load_settings(env={}, overrides={"max_kl": 0}),
                             pairs=tmp_path / "p.jsonl", out=tmp_path / "v0001",
                             model=tmp_path / "m", init_adapter=None, seed=1)
    assert unbounded.max_kl == 0


def test_settings_take_the_trainer_choices_and_defaults() -> None:
    knobs = {f.name: f for f in setting_fields() if f.metadata["round"]}
    assert knobs["train_loss"].metadata["choices"] == LOSSES
    trainer = {f.name: f.default for f in fields(RoundConfig)}
    for name in ("train_beta", "train_lora_rank", "train_loss", "train_kl_coef"):
        assert knobs[name].default == trainer[knobs[name].metadata["round"]]
    # The loop's own: measured on rounds of 64 votes (docs/BENCHMARKS.md); the trainer's
    # command keeps its defaults for a file of pairs of any size.
    loop = {"train_lr": 1e-3, "train_batch_size": 16, "train_epochs": 2}
    assert {name: knobs[name].default for name in loop} == loop
    assert [trainer[knobs[name].metadata["round"]] for name in loop] == [5e-4, 4, 1]
    assert knobs["train_min_steps"].default == trainer["min_steps"] == 0  # no step floor


@pytest.mark.parametrize("pairs, batch_size, min_steps, grad_accum, expected", [
    (57, 16, 0, 1, 16),   # no minimum: as set
    (57, 16, 4, 1, 15),   # a round of 64 votes: 4 steps an epoch either way (15 15 15 12)
    (200, 16, 4, 1, 16),  # plenty of pairs: as set, more steps
    (10, 16, 4, 1, 3),    # few pairs (most votes both bad): 3 3 3 1, four steps, not one
    (3, 16, 4, 1, 1),     # fewer pairs than steps: one pair a batch
    (10, 16, 4, 2, 2),    # two batches a step: 5 batches of 2 pairs, 3 steps
])
def test_a_round_of_few_pairs_makes_smaller_batches(pairs: int, batch_size: int, min_steps: int,
                                                     grad_accum: int, expected: int,
                                                     tmp_path: Path) -> None:
    from prefloop.trainer.round import batch_size_for

    config = RoundConfig(pairs=tmp_path / "p.jsonl", out=tmp_path / "o", model=tmp_path / "m",
                         batch_size=batch_size, min_steps=min_steps, grad_accum=grad_accum)
    assert batch_size_for(config, pairs) == expected


def test_a_bad_knob_is_refused_by_the_trainer_command(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    with pytest.raises(click.BadParameter):
        _parsed(["--pairs", str(pairs), "--out", str(tmp_path / "o"), "--loss", "nope"])
