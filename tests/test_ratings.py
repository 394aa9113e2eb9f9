"""Bradley-Terry ratings against values worked out by hand, and the bootstrap and leaderboard.

Two policies with score S in n duels: the maximum likelihood has p = S / n, so the rating gap is
400 log10(p / (1 - p)) = 400 log10(S / (n - S)). The default prior adds 0.01 virtual ties to
the pair, giving 400 log10((S + 0.005) / (n - S + 0.005)); ``prior=1e-9`` is the plain MLE.
"""

from __future__ import annotations

import math

import pytest

from prefloop.loop.ratings import (
    Duel,
    duel_score,
    fit_bradley_terry,
    leaderboard,
    rating_intervals,
)

MLE = 1e-9  # a prior too small to move any finite maximum-likelihood rating measurably


def _duels(a: str, b: str, wins: int = 0, losses: int = 0, ties: int = 0) -> list[Duel]:
    """``wins`` of a over b, ``losses`` and ``ties``."""
    return [Duel(a, b, 1.0)] * wins + [Duel(a, b, 0.0)] * losses + [Duel(a, b, 0.5)] * ties


def _three() -> list[Duel]:
    return (_duels("v1", "base", wins=6, losses=4) + _duels("base", "v2", wins=2, losses=8)
            + _duels("v2", "v1", wins=5, losses=3, ties=2))


def test_duel_score() -> None:
    assert duel_score("a") == 1.0 and duel_score("b") == 0.0
    assert duel_score("tie") == duel_score("both_bad") == 0.5
    assert duel_score("written") is None
    with pytest.raises(ValueError, match="unknown vote choice 'c'"):
        duel_score("c")


def test_duel_is_checked() -> None:
    with pytest.raises(ValueError, match="against itself"):
        Duel("base", "base", 1.0)
    with pytest.raises(ValueError, match=r"score_a must be in \[0, 1\]"):
        Duel("base", "v1", 1.5)


def test_three_wins_of_four() -> None:
    duels = _duels("v0001", "base", wins=3, losses=1)
    assert fit_bradley_terry(duels, prior=MLE)["v0001"] == pytest.approx(
        1000 + 400 * math.log10(3), abs=1e-6)  # 1190.85
    ratings = fit_bradley_terry(duels)
    assert ratings["v0001"] == pytest.approx(1000 + 400 * math.log10(3.005 / 1.005), abs=1e-6)
    assert ratings["v0001"] == pytest.approx(1000 + 400 * math.log10(3), abs=1.0)


def test_ties_count_half() -> None:
    """2 wins, 1 loss, 2 ties: score 3 of 5, p = 0.6, odds 1.5."""
    duels = _duels("v0001", "base", wins=2, losses=1, ties=2)
    assert fit_bradley_terry(duels, prior=MLE)["v0001"] == pytest.approx(
        1000 + 400 * math.log10(1.5), abs=1e-6)  # 1070.44


def test_scale_and_anchor_rating() -> None:
    ratings = fit_bradley_terry(_duels("v1", "base", wins=3, losses=1), anchor_rating=1500.0,
                                scale=200.0, prior=MLE)
    assert ratings == pytest.approx({"base": 1500.0, "v1": 1500 + 200 * math.log10(3)})


def test_three_policies_maximise_the_likelihood() -> None:
    """At the maximum the gradient of the log-likelihood is zero: for each policy its expected
    score over its duels equals its actual score."""
    duels = _three()
    ratings = fit_bradley_terry(duels, prior=MLE)
    gradient = dict.fromkeys(ratings, 0.0)
    for d in duels:
        p = 1 / (1 + 10 ** ((ratings[d.b] - ratings[d.a]) / 400))
        gradient[d.a] += d.score_a - p
        gradient[d.b] -= d.score_a - p
    assert max(abs(g) for g in gradient.values()) < 1e-6
    assert ratings["v2"] > ratings["v1"] > ratings["base"]


def test_anchor_is_exact() -> None:
    assert fit_bradley_terry(_three())["base"] == 1000.0
    assert fit_bradley_terry(_three(), anchor="v1")["v1"] == 1000.0


def test_swapping_sides_changes_nothing() -> None:
    duels = _three()
    swapped = [Duel(d.b, d.a, 1.0 - d.score_a) for d in duels]
    assert fit_bradley_terry(swapped) == pytest.approx(fit_bradley_terry(duels), abs=1e-9)


def test_all_wins_give_finite_ratings() -> None:
    ratings = fit_bradley_terry(_duels("v1", "base", wins=4))
    assert ratings["v1"] == pytest.approx(1000 + 400 * math.log10(4.005 / 0.005), abs=1e-6)
    duels = (_duels("v1", "base", wins=2, losses=2) + _duels("v2", "base", wins=3)
             + _duels("v2", "v1", wins=3))
    ratings = fit_bradley_terry(duels)
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["v2"] > ratings["v1"] + 500 and ratings["v2"] > ratings["base"] + 500
    assert ratings["v1"] == pytest.approx(1000.0, abs=1.0)


def test_no_anchor_and_disconnected_components_centre_on_anchor_rating() -> None:
    gap = 400 * math.log10(3.005 / 1.005)
    ratings = fit_bradley_terry(_duels("v1", "v2", wins=3, losses=1))
    assert ratings == pytest.approx({"v1": 1000 + gap / 2, "v2": 1000 - gap / 2})
    ratings = fit_bradley_terry(_duels("v1", "base", wins=3, losses=1)
                                + _duels("x", "y", wins=3, losses=1))
    assert ratings == pytest.approx({"base": 1000.0, "v1": 1000 + gap,
                                     "x": 1000 + gap / 2, "y": 1000 - gap / 2})


def test_no_duels_no_ratings() -> None:
    assert fit_bradley_terry([]) == {}
    assert rating_intervals([]) == {}
    assert leaderboard([]) == []


def test_bad_settings_say_so() -> None:
    with pytest.raises(ValueError, match="prior must be > 0"):
        fit_bradley_terry(_three(), prior=0.0)
    with pytest.raises(ValueError, match="0 < level < 1"):
        rating_intervals(_three(), level=95)


def test_bootstrap_contains_the_fit_and_is_seeded() -> None:
    duels = _three()
    ratings = fit_bradley_terry(duels)
    intervals = rating_intervals(duels, seed=1)
    assert intervals["base"] == (1000.0, 1000.0)
    for name in ("v1", "v2"):
        low, high = intervals[name]
        assert low < ratings[name] < high
    assert rating_intervals(duels, seed=1) == intervals
    assert rating_intervals(duels, seed=2) != intervals


def test_bootstrap_narrows_with_more_duels() -> None:
    def width(times: int) -> float:
        low, high = rating_intervals(_duels("v1", "base", wins=6, losses=2) * times)["v1"]
        return high - low

    few, many = width(1), width(10)
    assert many < few / 2
    low, high = rating_intervals(_duels("v1", "base", wins=6, losses=2) * 10, level=0.5)["v1"]
    assert high - low < many  # a 50% interval inside the 95% one of the same duels


def test_leaderboard_counts_and_sorts() -> None:
    duels = (_duels("v1", "base", wins=2, losses=1, ties=1)
             + _duels("base", "v2", wins=1, losses=1) + _duels("v1", "v2", wins=1))
    board = leaderboard(duels, resamples=20)
    ratings = fit_bradley_terry(duels)
    assert [s.policy for s in board] == sorted(ratings, key=ratings.get, reverse=True)
    assert [s.rating for s in board] == sorted(ratings.values(), reverse=True)
    by_name = {s.policy: s for s in board}
    v1, v2, base = by_name["v1"], by_name["v2"], by_name["base"]
    assert (v1.votes, v1.wins, v1.winrate_vs_base, v1.votes_vs_base) == (5, 3.5, 0.625, 4)
    assert (v2.votes, v2.wins, v2.winrate_vs_base, v2.votes_vs_base) == (3, 1.0, 0.5, 2)
    assert (base.votes, base.wins, base.winrate_vs_base, base.votes_vs_base) == (6, 2.5, None, 0)
    assert sum(s.wins for s in board) == len(duels)
    for s in board:
        assert s.low <= s.rating <= s.high
