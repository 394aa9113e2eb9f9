"""Does the loop learn, and does its gate hold? ``prefloop simulate``, timed, into the docs.

Runs ``prefloop simulate`` (its own vLLM, the embedded model, a fresh data folder) once per
seed and writes each run's report (measures, the gate's decisions, flagged voters, every
candidate's fate), the time taken and the checks into docs/BENCHMARKS.md; the plots are
copied to docs/sim/<section>/.

    .venv/bin/python bench/simulate.py --oracle sentiment      # target: win-rate >= 0.70
    .venv/bin/python bench/simulate.py --oracle concise        # target: win-rate >= 0.75
    # issue 14: the product's training defaults over seeds, win-rate and KL per token
    .venv/bin/python bench/simulate.py --oracle sentiment --seeds 0 1 2 --label defaults \
        -- --promote immediate --max-tokens 40 --temperature 1.0
    # more seeds of a recipe later: the seeds kept under bench/results/ with the same flags
    # join the section and its means
    .venv/bin/python bench/simulate.py --oracle sentiment --seeds 1 2 --label defaults \
        -- --promote immediate --max-tokens 40 --temperature 1.0
    # issue 13: nothing to learn, three seeds; at most one of the candidates crowned
    .venv/bin/python bench/simulate.py --oracle random --seeds 1 2 3 -- --promote duel
    # issue 13: a crowd with random and side voters still promotes; the side voter flagged
    .venv/bin/python bench/simulate.py --oracle sentiment -- --promote duel \\
        --noise random:0.3,side:0.1

Flags after ``--`` go to ``prefloop simulate`` as they are.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402
from prefloop.serving.models import prepare_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The held-out win-rate vs base a run without noise must reach (issue 5); None: no target.
TARGETS: dict[str, float | None] = {"sentiment": 0.70, "concise": 0.75, "random": None,
                                    "on_topic": 0.70}
# Oracles outside the product (bench/oracles.py): a preference the defaults were not tuned on.
SPECS = {"on_topic": "bench/oracles.py:on_topic"}
LABELLED_TARGET = 0.70  # issue 14: every oracle, with a --label (a recipe's runs over seeds)
CROWNED_AT_MOST = 1  # of the random oracle's candidates over all seeds (issue 13: 5% rate)
MAX_KL_PER_TOKEN = 0.2  # mean final KL(champion ‖ base) over seeds (issue 14)
MINUTES = 25  # per run (issue 14)
RESULTS = ROOT / "bench" / "results"  # each run's measures, for bench/frontier.py


def run(oracle: str, seed: int, args: argparse.Namespace, plots: Path,
        prefix: str) -> tuple[dict, str, float]:
    """One ``prefloop simulate`` run: its report, report.md and the minutes it took; its
    plots go to ``plots`` with names starting ``prefix``."""
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-sim-") as tmp:
        report_dir = Path(tmp) / "report"
        flags = [
            "--oracle", SPECS.get(oracle, oracle), "--rounds", str(args.rounds),
            "--pairs-per-round", str(args.pairs_per_round), "--seed", str(seed),
            "--report", str(report_dir), "--data-dir", str(Path(tmp) / "data"),
            "--model", str(prepare_model("embedded", ROOT / ".cache" / "test" / "models")),
            *args.extra]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prefloop", "simulate", *flags], check=True,
                       cwd=ROOT)
        minutes = (time.perf_counter() - start) / 60
        report = json.loads((report_dir / "report.json").read_text())
        text = (report_dir / "report.md").read_text()
        if not args.dry_run:
            for name in ("reward.png", "reward_vs_kl.png"):
                if (report_dir / name).exists():  # none without a reward (random)
                    plots.mkdir(parents=True, exist_ok=True)
                    shutil.copy(report_dir / name, plots / f"{prefix}{name}")
    return report, text, minutes


def kept_runs(folder: Path, flags: list[str],
              exclude: list[int]) -> dict[int, tuple[dict, str | None, float]]:
    """Seeds of a recipe run before with the same flags (``bench/results/<section>/``): seed ->
    (its measures as a report, its report text if kept, minutes)."""
    runs = {}
    for path in sorted(folder.glob("seed*.json")):
        kept = json.loads(path.read_text())
        if kept["flags"] != flags or kept["seed"] in exclude:
            continue
        text = path.with_suffix(".md")
        runs[kept["seed"]] = ({"seed": kept["seed"], "noise": {}, "points": kept["points"]},
                              text.read_text() if text.exists() else None, kept["minutes"])
    return runs


def checks(oracle: str, reports: list[dict[str, Any]], minutes: list[float],
           labelled: bool = False) -> list[tuple]:
    """(check, value, target, passed) rows for the runs of one invocation (passed None: shown,
    not checked)."""
    rows = []
    noisy = any(r["noise"] for r in reports)
    target = TARGETS[oracle]
    if labelled and target is not None:
        target = LABELLED_TARGET
    for report in reports:
        final = report["points"][-1]
        seed = report["seed"]
        winrate = final["winrate_vs_base"]
        if target is not None and not noisy:
            rows.append((f"seed {seed}: final champion's win-rate vs base (held out)",
                         "n/a" if winrate is None else f"{winrate:.2f}", f">= {target:.2f}",
                         winrate is not None and winrate >= target))
        if noisy:
            rows.append((f"seed {seed}: a candidate was promoted", final["champion"],
                         "not base", final["champion"] != "base"))
            for kind, count in final.get("flagged_by_kind", {}).items():
                # Honest voters must not be flagged, biased and hasty ones must; a random
                # voter is only caught against the consensus, given enough duel votes.
                wanted = {"honest": 0, "side": count["voters"], "fast": count["voters"]}
                rows.append((f"seed {seed}: {kind} voters flagged",
                             f"{count['flagged']}/{count['voters']}",
                             "" if kind not in wanted else "all" if wanted[kind] else "0",
                             None if kind not in wanted else count["flagged"] == wanted[kind]))
    finals = [r["points"][-1] for r in reports]
    if target is not None and not noisy and len(reports) > 1:
        rates = [f["winrate_vs_base"] or 0.0 for f in finals]
        rows.append(("mean final win-rate vs base over the seeds",
                     f"{sum(rates) / len(rates):.2f}", f">= {target:.2f}",
                     sum(rates) / len(rates) >= target))
    kls = [f.get("kl_per_token") for f in finals]
    if target is not None and not noisy and None not in kls:
        rows.append(("mean final KL(champion ‖ base), nats per token",
                     f"{sum(kls) / len(kls):.3f}", f"<= {MAX_KL_PER_TOKEN}",
                     sum(kls) / len(kls) <= MAX_KL_PER_TOKEN))
    if oracle == "random":
        fates = [a for r in reports for a in r["points"][-1].get("adapters", [])]
        crowned = sum(a["state"] in ("champion", "retired", "rolled_back") for a in fates)
        rows.append(("candidates ever crowned (a random oracle: none is better)",
                     f"{crowned} of {len(fates)}", f"<= {CROWNED_AT_MOST}",
                     crowned <= CROWNED_AT_MOST))
    rows.append(("minutes per run", ", ".join(f"{m:.1f}" for m in minutes), f"< {MINUTES}",
                 all(m < MINUTES for m in minutes)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oracle", choices=sorted(TARGETS), required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs-per-round", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dry-run", action="store_true", help="print, write nothing")
    parser.add_argument("--label", default="",
                        help="name of the recipe tried: its own section, and its measures "
                             "kept under bench/results/ for bench/frontier.py")
    parser.add_argument("--kept-only", action="store_true",
                        help="run nothing: write the label's section from the seeds kept under "
                             "bench/results/ with these flags (a run stopped before its last seed)")
    parser.add_argument("extra", nargs="*", help="more `prefloop simulate` flags (after --)")
    args = parser.parse_args()
    if args.kept_only:
        if not args.label:
            parser.error("--kept-only needs the --label whose seeds were kept")
        args.seeds = []
    noise = next((args.extra[i + 1] for i, flag in enumerate(args.extra[:-1])
                  if flag == "--noise"), None)
    section = f"simulate-{args.oracle}" + (f"-noise-{re.sub(r'[^a-z0-9.]+', '-', noise)}"
                                           if noise else "") + (
        f"-{re.sub(r'[^a-z0-9.]+', '-', args.label.lower())}" if args.label else "")
    plots = ROOT / "docs" / "sim" / section.removeprefix("simulate-")
    reports, texts, minutes = [], [], []
    kept = RESULTS / section.removeprefix("simulate-")
    seeds = args.seeds
    if args.label:  # a recipe over seeds: the ones run before with the same flags count too
        earlier = kept_runs(kept, args.extra, exclude=args.seeds)
        seeds = sorted([*args.seeds, *earlier])
    if not seeds:
        sys.exit(f"no seeds kept under {kept} with the flags {' '.join(args.extra) or '(none)'}")
    prefixes = {s: "" if len(seeds) == 1 else f"seed{s}-" for s in seeds}
    for seed in seeds:
        if seed not in args.seeds:
            report, text, took = earlier[seed]
            text = text or (f"## Seed {seed}\n\nRun before this invocation with the same "
                            f"flags; its measures: `bench/results/{kept.name}/seed{seed}.json` "
                            "(its report text was not kept).\n")
        else:
            report, text, took = run(args.oracle, seed, args, plots, prefixes[seed])
            if not args.dry_run:
                kept.mkdir(parents=True, exist_ok=True)
                (kept / f"seed{seed}.json").write_text(json.dumps({
                    "oracle": args.oracle, "label": args.label, "seed": seed,
                    "flags": args.extra, "minutes": round(took, 1),
                    "points": [{k: v for k, v in point.items() if k != "adapters"}
                               for point in report["points"]]}, indent=1) + "\n")
                (kept / f"seed{seed}.md").write_text(text)
        reports.append(report)
        minutes.append(took)
        # The report's own title goes; its sections sit one level below this section's.
        body = re.sub(r"(?m)^## ", "#### ", text.split("\n", 2)[2])
        texts.append(f"### Seed {seed} ({took:.1f} minutes)\n\n{body}")
    rows = checks(args.oracle, reports, minutes, labelled=bool(args.label))
    table = "| check | value | target | |\n|---|---|---|---|\n" + "".join(
        f"| {name} | {value} | {target} | {'' if ok is None else '✅' if ok else '❌'} |\n"
        for name, value, target, ok in rows)
    figures = "".join(f"![reward, seed {s}](sim/{plots.name}/{p}reward.png) "
                      f"![reward vs KL, seed {s}](sim/{plots.name}/{p}reward_vs_kl.png)\n"
                      for s, p in prefixes.items() if (plots / f"{p}reward.png").exists())
    body = (f"## Simulation: `{args.oracle}` oracle, {args.rounds} rounds × "
            f"{args.pairs_per_round} pairs, seeds {' '.join(map(str, seeds))}\n\n"
            f"`prefloop simulate` on this CPU, its own vLLM, the embedded model; "
            f"{sum(minutes):.1f} minutes in all. Flags beyond the command: "
            f"{' '.join(args.extra) or 'none'}.\n\n{table}\n{figures}\n" + "\n".join(texts))
    print(body)
    if not args.dry_run:
        write_section(section, body)


if __name__ == "__main__":
    main()
