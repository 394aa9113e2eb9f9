"""The promotion test (a truncated SPRT): hand-computed steps and thresholds, its exact error
rates, and seeded vote streams through the same decision the loop makes."""

from __future__ import annotations

import math
import random

import pytest

from prefloop.config import ConfigError, load_settings
from prefloop.loop.gate import (
    GateConfig,
    Outcome,
    Tally,
    decide,
    operating_point,
    tally,
    thresholds,
)

DEFAULT = GateConfig()


def test_steps_and_thresholds_by_hand() -> None:
    win, loss = DEFAULT.steps
    assert win == pytest.approx(math.log(1.3)) and loss == pytest.approx(math.log(0.7))
    upper, lower = thresholds(DEFAULT)
    assert lower == pytest.approx(math.log(0.2 / 0.95))  # Wald's, -1.558
    # Calibrated: below Wald's conservative log(0.8 / 0.05) = 2.77, above 10 straight wins.
    assert 10 * win < upper < 11 * win and upper < math.log(0.8 / 0.05)


def test_decisions_on_short_streams() -> None:
    assert decide(Tally(10, 0, 0), DEFAULT).outcome == Outcome.WAIT
    assert decide(Tally(11, 0, 0), DEFAULT).outcome == Outcome.PROMOTE
    assert decide(Tally(0, 4, 0), DEFAULT).outcome == Outcome.WAIT
    assert decide(Tally(0, 5, 0), DEFAULT).outcome == Outcome.REJECT
    assert decide(Tally(0, 0, 149), DEFAULT).outcome == Outcome.WAIT  # ties: no evidence
    assert decide(Tally(0, 0, 150), DEFAULT).outcome == Outcome.EXHAUSTED
    # 13 wins and 4 losses: 13 log 1.3 + 4 log 0.7 = 3.411 - 1.427 = 1.984, still waiting.
    decision = decide(Tally(13, 4, 0), DEFAULT)
    assert decision.llr == pytest.approx(1.984, abs=1e-3) and decision.outcome == Outcome.WAIT


def test_tally_reads_sides_and_skips_other_duels() -> None:
    rows = [{"policy_a": "v2", "policy_b": "v1", "choice": "a"},  # v2 wins
            {"policy_a": "v1", "policy_b": "v2", "choice": "a"},  # v2 loses
            {"policy_a": "v1", "policy_b": "v2", "choice": "b"},  # v2 wins
            {"policy_a": "v2", "policy_b": "v1", "choice": "tie"},
            {"policy_a": "v1", "policy_b": "v2", "choice": "both_bad"},
            {"policy_a": "v1", "policy_b": "v2", "choice": "written"},  # no duel result
            {"policy_a": "v2", "policy_b": "base", "choice": "a"}]  # another duel
    assert tally(rows, "v2", "v1") == Tally(2, 1, 2)
    assert tally(rows, "v1", "v2") == Tally(1, 2, 2)


def test_the_false_promotion_rate_holds_however_often_it_is_checked() -> None:
    point = operating_point(DEFAULT, 0.5)
    assert point.promote <= 0.05 and point.promote > 0.045  # calibrated, not loose
    assert point.promote + point.reject + point.exhausted == pytest.approx(1.0)
    assert operating_point(DEFAULT, 0.45).promote <= 0.02
    rates = [operating_point(DEFAULT, p).promote for p in (0.4, 0.45, 0.5, 0.55, 0.6, 0.65)]
    assert rates == sorted(rates)  # a worse challenger is promoted less often still


def test_the_defaults_find_a_real_improvement() -> None:
    at65, at70 = operating_point(DEFAULT, 0.65), operating_point(DEFAULT, 0.70)
    assert at65.promote >= 0.80 and at70.promote >= 0.90
    assert at65.median_votes <= 40


@pytest.mark.parametrize(("p", "ties"), [(0.5, 0.0), (0.65, 0.0), (0.65, 0.2), (0.45, 0.2)])
def test_seeded_vote_streams_match_the_exact_rates(p: float, ties: float) -> None:
    """2,000 seeded candidates through decide() vote by vote, as the loop does; the share
    promoted is within 4 standard errors of the exact probability."""
    rng = random.Random(1234)
    promoted = 0
    runs = 2000
    for _ in range(runs):
        t = Tally()
        while (d := decide(t, DEFAULT)).outcome == Outcome.WAIT:
            draw = rng.random()
            t = t.add(None if draw < ties else draw < ties + (1 - ties) * p)
        promoted += d.outcome == Outcome.PROMOTE
    exact = operating_point(DEFAULT, p, ties=ties).promote
    assert abs(promoted / runs - exact) <= 4 * math.sqrt(exact * (1 - exact) / runs) + 1e-3


@pytest.mark.parametrize("bad", [
    {"false_rate": 0.0}, {"false_rate": 0.5}, {"effect": 0.5}, {"effect": 1.0},
    {"miss_rate": 0.6}, {"max_votes": 0}])
def test_bad_gate_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="must be"):
        GateConfig(**bad)


@pytest.mark.parametrize(("where", "kwargs"), [
    ("PREFLOOP_PROMOTE_WINRATE", {"env": {"PREFLOOP_PROMOTE_WINRATE": "0.55"}}),
    ("--promote-min-votes", {"env": {}, "overrides": {"promote_min_votes": 20}}),
])
def test_the_old_promotion_settings_say_what_replaced_them(where: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=f"{where}: promote_.* was removed: .*promote_"):
        load_settings(**kwargs)


def test_the_old_settings_in_a_file(tmp_path) -> None:
    path = tmp_path / "prefloop.toml"
    path.write_text("promote_winrate = 0.55\n")
    with pytest.raises(ConfigError, match="promote_winrate was removed.*promote_effect"):
        load_settings(path, env={})


def test_gate_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="PREFLOOP_PROMOTE_EFFECT"):
        load_settings(env={"PREFLOOP_PROMOTE_EFFECT": "0.4"})
    settings = load_settings(env={"PREFLOOP_PROMOTE_FALSE_RATE": "0.01"})
    assert settings.promote_false_rate == 0.01
