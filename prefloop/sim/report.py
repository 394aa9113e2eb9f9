"""The simulation's report: what the gate decided, who was flagged, and the measures.

The gate's side is read from the store after each round, as an admin would see it: every
adapter's state and reason, the duel votes it took per opponent, and the clients flagged
with the kind of simulated voter behind each. ``report.json`` holds it all; ``report.md``
shows it as tables; ``reward.png`` and ``reward_vs_kl.png`` plot the measures.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from prefloop.names import PairKind
from prefloop.sim.crowd import Voter, flagged_by_kind
from prefloop.storage.store import Store

TALLY = ("votes", "wins", "losses", "ties", "both_bad", "flagged")
UNDECIDED = {"tie": "ties", "both_bad": "both_bad"}  # choice -> its count in a tally


def adapter_fates(adapters: Sequence[dict], voted: Iterable[dict],
                  flagged: Iterable[str]) -> list[dict[str, Any]]:
    """Each adapter's state and reason, with its duel votes per opponent.

    ``adapters``: rows of :meth:`Store.adapters`; ``voted``: rows of
    :meth:`Store.voted_pairs`; ``flagged``: the flagged client ids. Wins and losses are the
    adapter's own; ``flagged`` counts the votes from flagged clients (the gate leaves them
    out); a written answer counts as a vote only.
    """
    flagged_ids = set(flagged)
    tallies: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for row in voted:
        if row["kind"] != PairKind.DUEL:
            continue
        sides = ((row["policy_a"], row["policy_b"], "a"), (row["policy_b"], row["policy_a"], "b"))
        for policy, opponent, mine in sides:
            tally = tallies[policy, opponent]
            tally["votes"] += 1
            if row["choice"] in ("a", "b"):
                tally["wins" if row["choice"] == mine else "losses"] += 1
            elif row["choice"] in UNDECIDED:
                tally[UNDECIDED[row["choice"]]] += 1
            tally["flagged"] += row["voter"] in flagged_ids
    return [{"name": a["name"], "state": a["state"], "reason": a["reason"],
             "parent": a["parent"],
             "duels": [{"opponent": opponent, **{k: tallies[name, opponent][k] for k in TALLY}}
                       for name, opponent in sorted(tallies) if name == a["name"]]}
            for a in adapters]


def gate_snapshot(store: Store, crowd: Sequence[Voter]) -> dict[str, Any]:
    """The gate and the voter checks as they stand: adapters with their duel votes, the
    flagged clients with the kind of voter each is (``votes``: its votes held back), and the
    flagged count per kind."""
    kinds = {voter.client_id: voter.kind for voter in crowd}
    flagged = [{"client_id": row["client_id"], "kind": kinds.get(row["client_id"], "unknown"),
                "reasons": list(row["reasons"]), "flagged_at": row["flagged_at"],
                "votes": row.get("votes")} for row in store.flagged_clients()]
    ids = [row["client_id"] for row in flagged]
    return {"adapters": adapter_fates(store.adapters(), store.voted_pairs(), ids),
            "flagged": flagged, "flagged_by_kind": flagged_by_kind(crowd, ids)}


def write_report(report: dict[str, Any], folder: Path) -> None:
    """report.json, report.md and the plots (reward per round, reward vs KL)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    plot(report, folder)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Simulation: oracle `{report['oracle']}`, promote `{report['promote']}`", "",
             f"{report['pairs_per_round']} pairs per round, {report['eval_prompts']} held-out "
             f"prompts, each champion answer compared with {report['base_samples']} of base's, "
             f"seed {report['seed']}. Round 0 is before any training.", ""]
    if report.get("voters"):
        lines += [f"Voters, each its own client: {crowd_line(report['voters'], report['noise'])}."
                  " Honest voters vote as the oracle does.", ""]
    lines += measures(report["points"])
    if any("adapters" in p for p in report["points"]):
        lines += ["", "## Gate decisions", "", *decisions(report["points"]),
                  "", "## Flagged voters", "", *flags(report["points"]),
                  "", "## Every candidate's fate", "", *fates(report["points"])]
    return "\n".join(lines) + "\n"


def crowd_line(sizes: dict[str, int], noise: dict[str, float]) -> str:
    """``"12 honest, 6 random (30%), 2 side (10%)"``."""
    return ", ".join(f"{count} {kind}" + (f" ({noise[kind]:.0%})" if kind in noise else "")
                     for kind, count in sizes.items())


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def measures(points: Sequence[dict]) -> list[str]:
    lines = ["| round | round status | champion | reward (champion) | reward (base) "
             "| win-rate vs base | W/L/ties/both bad | KL nats/answer | KL nats/token "
             "| fluency (champion / base) | relevance (champion / base) | mean words "
             "| seconds: collect / judge / train / measure |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(
            f"| {p['round']} | {p['round_status'] or '–'} | {p['champion']} "
            f"| {_fmt(p['reward_champion'], '.3f')} | {_fmt(p['reward_base'], '.3f')} "
            f"| {_fmt(p['winrate_vs_base'], '.2f')} "
            f"| {p['wins']}/{p['losses']}/{p['ties']}/{p['both_bad']} "
            f"| {_fmt(p['kl'], '.3f')} | {_fmt(p.get('kl_per_token'), '.3f')} "
            f"| {_fmt(p.get('fluency_champion'), '.2f')} / {_fmt(p.get('fluency_base'), '.2f')} "
            f"| {_fmt(p.get('relevance_champion'), '.2f')} "
            f"/ {_fmt(p.get('relevance_base'), '.2f')} "
            f"| {_fmt(p['mean_words'], '.1f')} "
            f"| {_phases(p.get('seconds', {}))} |")
    lines += ["", "The champion's answers to the first held-out prompts:", "",
              "| round | prompt | answer |", "|---|---|---|"]
    for p in points:
        for example in p.get("examples", []):
            lines.append(f"| {p['round']} | {_cell(example['prompt'])} "
                         f"| {_cell(example['answer'])} |")
    return lines


def duels_text(duels: Sequence[dict]) -> str:
    """``"vs base: 12 votes, 7 W / 4 L / 1 tie / 0 both bad, 2 from flagged clients"``."""
    return "; ".join(
        f"vs {d['opponent']}: {d['votes']} votes, {d['wins']} W / {d['losses']} L / "
        f"{d['ties']} tie / {d['both_bad']} both bad"
        + (f", {d['flagged']} from flagged clients" if d["flagged"] else "")
        for d in duels) or "none"


def decisions(points: Sequence[dict]) -> list[str]:
    """Per round, the adapters that are new or changed state or reason during it."""
    lines = ["Per round, each adapter that appeared or changed state during it (its duel "
             "votes so far; the gate leaves out votes from flagged clients):", "",
             "| round | adapter | state | reason | duel votes |", "|---|---|---|---|---|"]
    before: dict[str, tuple] = {}
    for p in points:
        for a in p.get("adapters", []):
            if before.get(a["name"]) != (a["state"], a["reason"]):
                lines.append(f"| {p['round']} | {a['name']} | {a['state']} "
                             f"| {_reason(a)} | {duels_text(a['duels'])} |")
            before[a["name"]] = (a["state"], a["reason"])
    return lines


def flags(points: Sequence[dict]) -> list[str]:
    """Per round, the clients newly flagged (kind and reasons) and the count per kind."""
    lines = ["| round | newly flagged (kind: reasons) | flagged so far, per kind of voter |",
             "|---|---|---|"]
    seen: set[str] = set()
    for p in points:
        if "flagged" not in p:
            continue
        new = [f for f in p["flagged"] if f["client_id"] not in seen]
        seen |= {f["client_id"] for f in p["flagged"]}
        listed = "; ".join(f"{f['client_id'][:8]} {f['kind']}: {', '.join(f['reasons'])}"
                           for f in new) or "none"
        lines.append(f"| {p['round']} | {_cell(listed)} | {by_kind(p['flagged_by_kind'])} |")
    last = next((p for p in reversed(points) if "flagged_by_kind" in p), None)
    if last is not None:
        lines += ["", f"At the end: {by_kind(last['flagged_by_kind'])} flagged."]
    return lines


def by_kind(counts: dict[str, dict[str, int]]) -> str:
    """``"side 2/2, random 1/6, honest 0/12"``: flagged of all voters, per kind."""
    return ", ".join(f"{kind} {c['flagged']}/{c['voters']}" for kind, c in counts.items())


def fates(points: Sequence[dict]) -> list[str]:
    """Every adapter as it stands at the end, with the round that trained it."""
    first_seen: dict[str, int] = {}
    for p in points:
        for a in p.get("adapters", []):
            first_seen.setdefault(a["name"], p["round"])
    final = next((p["adapters"] for p in reversed(points) if "adapters" in p), [])
    lines = ["| adapter | trained in round | parent | state | reason | duel votes |",
             "|---|---|---|---|---|---|"]
    for a in final:
        lines.append(f"| {a['name']} | {first_seen[a['name']]} | {a['parent']} | {a['state']} "
                     f"| {_reason(a)} | {duels_text(a['duels'])} |")
    if not final:
        lines.append("| (no adapter was trained) | | | | | |")
    return lines


def _phases(seconds: dict[str, float]) -> str:
    return " / ".join(f"{seconds[k]:.0f}" if k in seconds else "–"
                      for k in ("collect", "judge", "train", "measure"))


def _reason(adapter: dict) -> str:
    return _cell(adapter["reason"]) if adapter["reason"] else "–"


def _cell(text: str) -> str:
    """Text as one markdown table cell: no line breaks, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def plot(report: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in report["points"] if p["reward_champion"] is not None]
    if not points:
        return
    rounds = [p["round"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [p["reward_champion"] for p in points], "o-", label="champion")
    ax.plot(rounds, [p["reward_base"] for p in points], "s--", label="base")
    ax.set(xlabel="round", ylabel=f"mean {report['oracle']} reward", xticks=rounds,
           title="Reward on held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "reward.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    kls = [p["kl"] for p in points]
    ax.plot(kls, [p["reward_champion"] for p in points], "o-")
    for p in points:
        ax.annotate(f"round {p['round']}", (p["kl"], p["reward_champion"]),
                    textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="KL(champion ‖ base), nats per answer",
           ylabel=f"mean {report['oracle']} reward", title="Reward vs KL")
    fig.tight_layout()
    fig.savefig(folder / "reward_vs_kl.png", dpi=100)
    plt.close(fig)
