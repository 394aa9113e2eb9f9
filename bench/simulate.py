"""Does the loop learn? ``prefloop simulate`` with a built-in oracle, timed, into the docs.

Runs ``prefloop simulate`` (its own vLLM, the embedded model, a fresh data folder) and writes
its table, the time taken and the target check (issue 5) into docs/BENCHMARKS.md; the plots
are copied to docs/sim/<oracle>/.

    .venv/bin/python bench/simulate.py --oracle sentiment      # target: win-rate >= 0.70
    .venv/bin/python bench/simulate.py --oracle concise        # target: win-rate >= 0.75
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"sentiment": 0.70, "concise": 0.75}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oracle", choices=sorted(TARGETS), required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs-per-round", type=int, default=64)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("extra", nargs="*", help="more `prefloop simulate` flags (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-sim-") as tmp:
        report_dir = Path(tmp) / "report"
        flags = [
            "--oracle", args.oracle, "--rounds", str(args.rounds),
            "--pairs-per-round", str(args.pairs_per_round), "--report", str(report_dir),
            "--data-dir", str(Path(tmp) / "data"),
            "--model", str(ROOT / ".cache" / "test" / "models" / "SmolLM2-135M-Instruct"),
            *args.extra]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prefloop", "simulate", *flags], check=True,
                       cwd=ROOT)
        minutes = (time.perf_counter() - start) / 60
        report = json.loads((report_dir / "report.json").read_text())
        table = (report_dir / "report.md").read_text().split("\n", 2)[2]
        plots = ROOT / "docs" / "sim" / args.oracle
        if not args.dry_run:
            plots.mkdir(parents=True, exist_ok=True)
            for name in ("reward.png", "reward_vs_kl.png"):
                shutil.copy(report_dir / name, plots / name)
    final = report["points"][-1]
    winrate = final["winrate_vs_base"]
    target = TARGETS[args.oracle]
    ok = winrate is not None and winrate >= target
    body = (f"## Simulation: `{args.oracle}` oracle, {args.rounds} rounds × "
            f"{args.pairs_per_round} pairs (issue 5)\n\n"
            f"`prefloop simulate` on this CPU, its own vLLM, the embedded model; took "
            f"{minutes:.1f} minutes. Flags beyond the command: "
            f"{' '.join(args.extra) or 'none'}.\n\n{table}\n"
            f"| check | value | target | |\n|---|---|---|---|\n"
            f"| final champion's win-rate vs base (held out) | "
            f"{'n/a' if winrate is None else f'{winrate:.2f}'} | >= {target:.2f} | "
            f"{'✅' if ok else '❌'} |\n| minutes | {minutes:.1f} | < 20 | "
            f"{'✅' if minutes < 20 else '❌'} |\n\n"
            f"![reward per round](sim/{args.oracle}/reward.png) "
            f"![reward vs KL](sim/{args.oracle}/reward_vs_kl.png)\n")
    print(body)
    if not args.dry_run:
        write_section(f"simulate-{args.oracle}", body)


if __name__ == "__main__":
    main()
