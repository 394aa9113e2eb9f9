"""Simulated crowds: many voters, each its own client, some of them careless or biased.

A crowd is ``size`` voters. Each has its own client id (32 hex digits, like the
``prefloop_client`` cookie), so its votes are stored, checked and flagged per client as a
visitor's would be. ``--noise random:0.3,side:0.1`` makes 30% of the voters ``random``
and 10% ``side``; the rest are ``honest`` (they vote as the oracle does). The kinds are
:data:`KINDS`; add one there and ``--noise`` takes it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefloop.loop import voters
from prefloop.sim.oracles import RANDOM_TIES, Messages, Oracle, RandomOracle, Vote

HONEST = "honest"


class NoiseError(ValueError):
    """A ``--noise`` text that cannot be read, or a crowd that cannot be made from it."""


class SideOracle:
    """Always picks answer A, whatever it says: the position bias of a careless voter."""

    name = "side"

    def __call__(self, context: Messages, a: str, b: str) -> Vote:
        return "a"


@dataclass(frozen=True)
class VoterKind:
    """How a kind of voter votes: ``make(oracle, seed)`` gives its vote function (the honest
    oracle is passed in for kinds that use it); ``reads``: it waits until the answers could
    have been read before voting, as a person would."""

    help: str
    make: Callable[[Oracle, int], Oracle]
    reads: bool = True


KINDS: dict[str, VoterKind] = {
    "random": VoterKind(f"votes a or b at random ({RANDOM_TIES:.0%} ties), ignoring the answers",
                        lambda oracle, seed: RandomOracle(seed)),
    "side": VoterKind("always picks answer A (position bias)", lambda oracle, seed: SideOracle()),
    "fast": VoterKind("votes as the oracle does, but at once, before the answers could be "
                      "read", lambda oracle, seed: oracle, reads=False),
}


@dataclass(frozen=True)
class Voter:
    client_id: str
    kind: str  # HONEST or a key of KINDS
    vote: Oracle
    reads: bool = True


def parse_noise(text: str) -> dict[str, float]:
    """``"random:0.3,side:0.1"`` as ``{"random": 0.3, "side": 0.1}``: each kind of
    :data:`KINDS` at most once, shares from 0 to 1 summing to at most 1."""
    kinds = ", ".join(KINDS)
    shares: dict[str, float] = {}
    for item in text.split(","):
        kind, colon, share_text = (part.strip() for part in item.partition(":"))
        if not colon or not kind or not share_text:
            raise NoiseError(f"{item.strip()!r} is not kind:share (e.g. random:0.3); "
                             f"write kind:share pairs separated by commas")
        if kind not in KINDS:
            raise NoiseError(f"unknown voter kind {kind!r}: use {kinds}")
        if kind in shares:
            raise NoiseError(f"voter kind {kind!r} is given twice")
        try:
            share = float(share_text)
        except ValueError:
            raise NoiseError(f"the share of {kind} must be a number from 0 to 1, "
                             f"got {share_text!r}") from None
        if not 0 <= share <= 1:  # also refuses nan
            raise NoiseError(f"the share of {kind} must be from 0 to 1, got {share_text}")
        shares[kind] = share
    if math.fsum(shares.values()) > 1 + 1e-9:
        raise NoiseError(f"the shares add up to {math.fsum(shares.values()):g}; at most 1 "
                         "(the rest of the voters are honest)")
    return shares


def crowd_sizes(noise: dict[str, float], size: int) -> dict[str, int]:
    """Voters of each kind, ``honest`` first: the shares of ``size`` rounded by largest
    remainder, so they add up to ``size``. A kind with a share above 0 that would get no
    voter is an error (it would be silently left out)."""
    if size < 1:
        raise NoiseError(f"a crowd needs at least one voter, got {size}")
    shares = {HONEST: max(0.0, 1 - math.fsum(noise.values())), **noise}
    quotas = {kind: round(share * size, 9) for kind, share in shares.items()}
    sizes = {kind: math.floor(quota) for kind, quota in quotas.items()}
    by_remainder = sorted(quotas, key=lambda kind: quotas[kind] - sizes[kind], reverse=True)
    for kind in by_remainder[:size - sum(sizes.values())]:
        sizes[kind] += 1
    for kind, share in noise.items():
        if share > 0 and sizes[kind] == 0:
            raise NoiseError(f"{kind}:{share:g} of {size} voters is no voter at all; "
                             "raise the share or the number of voters")
    return sizes


def make_crowd(oracle: Oracle, noise: dict[str, float], size: int, seed: int) -> list[Voter]:
    """``size`` voters in the shares of ``noise``, honest ones voting with ``oracle``; the
    same seed gives the same client ids, kinds and votes."""
    rng = random.Random(f"crowd {seed}")
    voters = []
    for kind, count in crowd_sizes(noise, size).items():
        for _ in range(count):
            client_id = f"{rng.getrandbits(128):032x}"
            if kind == HONEST:
                voters.append(Voter(client_id, kind, oracle))
            else:
                spec = KINDS[kind]
                voters.append(Voter(client_id, kind, spec.make(oracle, rng.getrandbits(64)),
                                    spec.reads))
    return voters


# An honest voter reads at half the speed the voter checks take for too fast: it reads both
# answers, where the checks' bound (prefloop.loop.voters) is the shorter one at skimming speed.
READING_SLOWER = 2.0


def reading_seconds(pair: Mapping[str, Any]) -> float:
    """How long an honest voter waits, once the pair is stored, before it votes: twice the
    voter checks' reading bound, less the time the answers were already streaming (which the
    checks count as reading, as a person reads while the text comes in)."""
    bound = voters.reading_seconds({"chars_a": len(pair["text_a"]),
                                    "chars_b": len(pair["text_b"])})
    streamed = 0.0
    if pair.get("total_ms") is not None and pair.get("first_token_ms") is not None:
        streamed = max(0.0, pair["total_ms"] - pair["first_token_ms"]) / 1000
    return max(0.0, READING_SLOWER * bound - streamed)


def draw_voters(crowd: Sequence[Voter], count: int, rng: random.Random) -> list[Voter]:
    """The voter of each of ``count`` pairs: one of the crowd, each equally likely."""
    return [rng.choice(crowd) for _ in range(count)]


def flagged_by_kind(crowd: Sequence[Voter], flagged: Sequence[str]) -> dict[str, dict]:
    """Per kind of voter: how many there are and how many of them are flagged."""
    flagged_ids = set(flagged)
    sizes = Counter(voter.kind for voter in crowd)
    caught = Counter(voter.kind for voter in crowd if voter.client_id in flagged_ids)
    return {kind: {"voters": sizes[kind], "flagged": caught[kind]} for kind in sizes}
