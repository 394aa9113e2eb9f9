"""The promotion gate on simulated duel-vote streams: the old rule against the SPRT.

Each simulated candidate has a true win-rate p over decisive duel votes against the
champion, and a share of ties (a tie or both-bad). Votes arrive one at a time and the rule
is asked after each, as the loop does (``Loop.after_vote``), until it decides or the budget
is spent. The new rule is the loop's own code (``prefloop.loop.gate.decide`` with the
settings' defaults); the old one is the rule it replaced (``loop/duels.py:verdict`` before
issue 13: promote at 20 or more votes with a win-rate of at least 0.55, ties counting half;
reject once 0.55 cannot be reached within 60), kept here to compare. Beside the simulated
shares, the new rule's exact probabilities (dynamic programming, ``operating_point``).

    .venv/bin/python bench/gate.py [--runs 10000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402
from prefloop.config import Settings  # noqa: E402
from prefloop.loop.gate import GateConfig, Outcome, Tally, decide, operating_point  # noqa: E402

WINRATES = (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75)
TIES = (0.0, 0.2)


def old_rule(t: Tally) -> str:
    """The rule before issue 13, with its defaults (20, 0.55, 60); ties count half."""
    votes, score = t.votes, t.wins + 0.5 * t.draws
    if votes >= 20 and score >= 0.55 * votes - 1e-9:
        return "promote"
    best = (score + max(0, 60 - votes)) / max(60, votes)
    if best < 0.55 - 1e-9 or votes >= 60:
        return "reject"
    return "wait"


def new_rule(config: GateConfig):
    def rule(t: Tally) -> str:
        outcome = decide(t, config).outcome
        return "undecided" if outcome == Outcome.EXHAUSTED else str(outcome)
    return rule


def simulate(rule, p: float, ties: float, runs: int, seed: int) -> tuple[Counter, float]:
    """Share of each end and the median votes to it, over ``runs`` seeded candidates."""
    rng = random.Random(seed)
    ends: Counter = Counter()
    lengths = []
    for _ in range(runs):
        t = Tally()
        while (end := rule(t)) == "wait":
            draw = rng.random()
            t = t.add(None if draw < ties else draw < ties + (1 - ties) * p)
        ends[end] += 1
        lengths.append(t.votes)
    return ends, statistics.median(lengths)


def _ci(share: float, runs: int) -> float:
    """Half-width of the 95% interval of a simulated share."""
    return 1.96 * (share * (1 - share) / runs) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    args = parser.parse_args()
    s = Settings()
    config = GateConfig(s.promote_false_rate, s.promote_effect, s.promote_miss_rate,
                        s.max_duel_votes)
    start = time.perf_counter()
    rows = ["| true win-rate | ties | old: promoted / rejected | old: median votes "
            "| new: promoted / rejected / undecided | new: median votes "
            "| new, exact: promoted | target |", "|---|---|---|---|---|---|---|---|"]
    targets = {0.45: ("<=", 0.02), 0.50: ("<=", 0.05), 0.65: (">=", 0.80),
               0.70: (">=", 0.90)}
    for ties in TIES:
        for k, p in enumerate(WINRATES):
            seed = 1000 * k + int(ties * 100)
            old, old_median = simulate(old_rule, p, ties, args.runs, seed)
            new, new_median = simulate(new_rule(config), p, ties, args.runs, seed)
            exact = operating_point(config, p, ties=ties)
            share = {key: value / args.runs for key, value in new.items()}
            target = ""
            if p in targets and ties == 0.0:
                op, bound = targets[p]  # judged on the exact rate; the simulated one agrees
                ok = exact.promote <= bound if op == "<=" else exact.promote >= bound
                target = f"promoted {op} {bound:.0%} {'✅' if ok else '❌'}"
                if p == 0.65:
                    target += f"; median <= 40 {'✅' if new_median <= 40 else '❌'}"
            rows.append(
                f"| {p:.2f} | {ties:.0%} | {old['promote'] / args.runs:.1%} / "
                f"{old['reject'] / args.runs:.1%} | {old_median:.0f} | "
                f"{share.get('promote', 0):.1%} ± {_ci(share.get('promote', 0), args.runs):.1%} / "
                f"{share.get('reject', 0):.1%} / "
                f"{share.get('undecided', 0):.1%} | {new_median:.0f} | "
                f"{exact.promote:.2%} | {target} |")
            print(rows[-1], flush=True)
    seconds = time.perf_counter() - start
    write_section("gate", f"""## The promotion gate (issue 13)

{args.runs:,} simulated candidates per row, each asked after every vote. "Ties" is the share
of votes that are a tie or both-bad; the true win-rate is over the decisive votes. Old rule:
promote at 20+ duel votes with a win-rate of at least 0.55 (ties half), reject once 0.55
cannot be reached within 60. New rule: the truncated SPRT of `loop/gate.py` with the
defaults (`promote_false_rate` {config.false_rate}, `promote_effect` {config.effect},
`promote_miss_rate` {config.miss_rate}, `max_duel_votes` {config.max_votes}); "undecided"
spent the budget and is not promoted; ± is the simulated share's 95% interval. Median votes
count ties. The targets are the issue's, for the rows without ties, judged on the exact
probability (the simulated shares agree with it within their intervals). {seconds:.0f} s.

""" + "\n".join(rows))


if __name__ == "__main__":
    main()
