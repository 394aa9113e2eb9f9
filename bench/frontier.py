"""The reward-KL frontier of every training recipe tried, as in Figure 2 of the DPO paper.

Reads the measures ``bench/simulate.py --label NAME`` keeps under bench/results/ (one file
per oracle, recipe and seed), and for each oracle draws the held-out win-rate against base
over KL(champion ‖ base) in nats per token: one curve per recipe, a point per round (the
mean over its seeds), the product's defaults (the labels of :data:`DEFAULTS`) drawn thick and
starred.
Writes docs/sim/frontier-<oracle>.png and a table of the final rounds into
docs/BENCHMARKS.md.

    .venv/bin/python bench/frontier.py
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402
from bench.simulate import MAX_KL_PER_TOKEN, RESULTS, ROOT, TARGETS  # noqa: E402

# The loop's training defaults since 2026-12-04, run with no training flag (concise also at
# 64 tokens, where its corrected oracle decides enough votes to learn from).
DEFAULTS = ("defaults-batch-16-replay-0", "defaults-max-tokens-64")
SHOWN = {"defaults": "defaults until 2026-12-04",  # lr 5e-4, batch 4, replay 1.0
         "defaults-min-steps-4": "the defaults with train_min_steps 4",
         # concise runs of the oracle before 2026-12-04 (the fewer words of two cut-off answers)
         "defaults-old-oracle": "defaults until 2026-12-04, old oracle",
         "defaults-batch-16-replay-0-old-oracle": "defaults-batch-16-replay-0, old oracle",
         # concise at 64 tokens before the trainer's KL check scored held-out pairs
         "max-tokens-64-check-on-trained-pairs": "defaults at 64 tokens, KL check on trained pairs",
         # concise at 64 tokens: a check over the limit goes on at half the step (off by default)
         "kl-backtracks-3": "defaults at 64 tokens, train_kl_backtracks 3",
         # sentiment, one seed: train_epochs 3 set as the default for the run (not kept)
         "defaults-epochs-3": "train_epochs 3 (the default changed for the run)",
         "defaults-temperature-1.2": "pairs sampled at temperature 1.2",
         # sentiment, 2026-12-05 (second session): a larger step, and a fresh fit each round
         "lr-1.5e-3": "the defaults at lr 1.5e-3",
         "defaults-from-base-replay-2": "a new adapter each round on every vote (replay 2)",
         "from-base-replay-2-lr-2e-3": "a new adapter each round on every vote, lr 2e-3",
         # --pairs-per-round is simulate.py's own flag, not among the flags recorded
         "defaults-128-pairs-per-round": "the defaults, 128 pairs a round (not 64)",
         # 2026-12-05 (third session): the two of four the champion's implicit reward ranks
         # furthest apart shown (a sampling flag, --pair-candidates 4)
         "candidates-4": "two of four candidates shown (pair_candidates 4)"}


def load(results: Path = RESULTS) -> dict[str, dict[str, list[dict]]]:
    """oracle -> recipe label -> the runs (one per seed), from bench/results/*/seed*.json."""
    runs: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(results.glob("*/seed*.json")):
        run = json.loads(path.read_text())
        if run["label"]:
            runs[run["oracle"]][run["label"]].append(run)
    return runs


def curve(runs: list[dict]) -> list[tuple[float, float]]:
    """(KL per token, win-rate) per round, each the mean over the runs that have it."""
    rounds = min(len(r["points"]) for r in runs)
    out = []
    for k in range(rounds):
        points = [r["points"][k] for r in runs]
        kls = [p.get("kl_per_token") or 0.0 for p in points]
        rates = [p["winrate_vs_base"] for p in points if p["winrate_vs_base"] is not None]
        if rates:
            out.append((statistics.fmean(kls), statistics.fmean(rates)))
    return out


def plot(oracle: str, recipes: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, runs in sorted(recipes.items(), key=lambda item: item[0] in DEFAULTS):
        xs, ys = zip(*curve(runs), strict=True)
        chosen = label in DEFAULTS
        ax.plot(xs, ys, "*-" if chosen else "o-", lw=2.5 if chosen else 1, ms=10 if chosen else 4,
                label=f"{SHOWN.get(label, label)} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    ax.axvline(MAX_KL_PER_TOKEN, color="grey", ls="--", lw=0.8)
    if TARGETS.get(oracle):
        ax.axhline(TARGETS[oracle], color="grey", ls=":", lw=0.8)
    ax.set_xlabel("KL(champion ‖ base), nats per token")
    ax.set_ylabel("held-out win-rate vs base")
    ax.set_title(f"{oracle}: a point per round, mean over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def table(runs_by_oracle: dict[str, dict[str, list[dict]]]) -> str:
    lines = ["| oracle | recipe | seeds | final win-rate (mean; each seed) | final KL nats/token "
             "| fluency champion / base | relevance champion / base | minutes | flags |",
             "|---|---|---|---|---|---|---|---|---|"]
    for oracle, recipes in sorted(runs_by_oracle.items()):
        for label, runs in sorted(recipes.items()):
            finals = [r["points"][-1] for r in runs]
            rates = [f["winrate_vs_base"] or 0.0 for f in finals]
            kls = [f.get("kl_per_token") or 0.0 for f in finals]
            fluency = [f.get("fluency_champion") for f in finals]
            # Each seed has its own held-out prompts, so base's fluency is averaged alike.
            base = [r["points"][0].get("fluency_base") for r in runs]
            flu = (f"{statistics.fmean(fluency):.2f} / {statistics.fmean(base):.2f}"
                   if None not in fluency and None not in base else "–")
            relevance = [f.get("relevance_champion") for f in finals]
            base = [r["points"][0].get("relevance_base") for r in runs]  # measured since 12-04
            rel = (f"{statistics.fmean(relevance):.2f} / {statistics.fmean(base):.2f}"
                   if None not in relevance and None not in base else "–")
            name = f"**{label}**" if label in DEFAULTS else SHOWN.get(label, label)
            lines.append(
                f"| {oracle} | {name} "
                f"| {' '.join(str(r['seed']) for r in runs)} "
                f"| {statistics.fmean(rates):.2f}; {', '.join(f'{x:.2f}' for x in rates)} "
                f"| {statistics.fmean(kls):.3f} | {flu} | {rel} "
                f"| {', '.join(str(r['minutes']) for r in runs)} "
                f"| `{' '.join(runs[0]['flags'])}` |")
    return "\n".join(lines)


def main() -> None:
    runs = load()
    if not runs:
        sys.exit(f"no labelled runs under {RESULTS}: run bench/simulate.py --label NAME first")
    figures = []
    for oracle, recipes in sorted(runs.items()):
        out = ROOT / "docs" / "sim" / f"frontier-{oracle}.png"
        plot(oracle, recipes, out)
        figures.append(f"![{oracle} frontier](sim/{out.name})")
    body = ("## The reward-KL frontier of the recipes tried (issue 14)\n\n"
            "Each curve is a training recipe, each point a round (mean over its seeds): the "
            "held-out win-rate against base over KL(champion ‖ base) per token; the dashed "
            f"line is the budget ({MAX_KL_PER_TOKEN} nats per token), the dotted one the "
            "win-rate target. Fluency: mean log-prob per token under base of the final "
            "champion's held-out answers, beside base's own answers (closer is more "
            "base-like). Relevance: how much likelier base finds those answers after their "
            "own prompt than after another held-out prompt, nats per token (an answer that "
            "would do for any question scores about 0; measured since 2026-12-04).\n\n"
            + " ".join(figures) + "\n\n" + table(runs))
    print(body)
    write_section("frontier", body)


if __name__ == "__main__":
    main()
