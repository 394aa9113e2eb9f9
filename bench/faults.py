"""Fault drills: run the fault tests and record each drill's outcome and time in the docs.

The drills are the tests themselves (real vLLM, real trainer, real SQLite): vLLM killed
mid-pair, ``prefloop serve`` killed during a burst of votes, the trainer killed mid-round or
while saving, out of memory, out of disk, a corrupt adapter, the database locked or full.

    .venv/bin/python bench/faults.py              # writes docs/BENCHMARKS.md
    .venv/bin/python bench/faults.py --dry-run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DRILLS = {
    "test_lifecycle.py::test_crash_restart_and_shutdown":
        "vLLM SIGKILLed while a pair streams: 503 + Retry-After for that pair, vLLM restarted "
        "with champion and candidate loaded again, next duel served; then `prefloop serve` "
        "SIGKILLed after a burst of votes: every acknowledged vote on disk, integrity_check ok, "
        "no vLLM left; the same data dir serves again",
    "test_lifecycle.py::test_sigterm_stops_vllm_too": "SIGTERM stops serve and its vLLM",
    "test_faults.py::test_trainer_killed_mid_round":
        "trainer SIGKILLed mid-round: round failed, serving on, adapters folder empty",
    "test_faults.py::test_trainer_killed_while_saving_leaves_no_partial_adapter":
        "trainer killed after writing the adapter, before the rename: temporary folder removed",
    "test_faults.py::test_trainer_out_of_memory":
        "trainer out of memory (MemoryError in a step): round failed with the reason",
    "test_faults.py::test_disk_full_while_writing_the_adapter":
        "disk full while writing the adapter (1 MB file-size limit): round failed, nothing left",
    "test_faults.py::test_recovery_removes_what_a_crash_left_half_written":
        "a half-written adapter folder from a crash is removed at start",
    "test_faults.py::test_a_corrupt_adapter_is_refused_with_its_reason_and_the_champion_stays":
        "adapter cut short, weights missing, config not JSON, other base model: refused with "
        "the reason, champion unchanged",
    "test_guard.py::test_a_vote_waits_for_a_short_lock_and_is_stored":
        "database locked 0.5 s by another writer: the vote waits and is stored",
    "test_guard.py::test_a_vote_behind_a_long_lock_fails_clearly_and_can_be_sent_again":
        "database locked past the busy timeout: 503 'nothing was saved', then stored on retry",
    "test_guard.py::test_a_full_disk_refuses_the_vote_clearly_and_keeps_what_was_there":
        "database full: 503 on the API, a clear message on the page, earlier votes intact",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--from-junit", type=Path, metavar="XML",
                        help="read the outcomes from a JUnit XML file of a test run (e.g. "
                             "PYTEST_ADDOPTS=--junitxml=FILE make test) instead of running")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        junit = args.from_junit or Path(tmp) / "junit.xml"
        if args.from_junit is None:
            ids = [f"tests/{name}" for name in DRILLS]
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={junit}", *ids], cwd=ROOT,
                           env=os.environ | {"HF_HUB_OFFLINE": "1"})
        cases = [c for c in ET.parse(junit).getroot().iter("testcase")
                 if f"{c.get('classname').split('.')[-1]}.py::{c.get('name')}" in DRILLS]
        results = {}
        for case in cases:
            name = f"{case.get('classname').split('.')[-1]}.py::{case.get('name')}"
            failed = case.find("failure") is not None or case.find("error") is not None
            results[name] = (not failed, float(case.get("time")))
    rows = []
    for name, what in DRILLS.items():
        ok, seconds = results.get(name, (False, float("nan")))
        rows.append(f"| {what} | {'✅' if ok else '❌'} | {seconds:.0f} |")
    source = (f"read from the JUnit report of a full test run, `{args.from_junit.name}`"
              if args.from_junit else "run by this command")
    body = ("## Fault drills (issue 6)\n\n"
            "Each drill is a test on the real components (`python bench/faults.py` runs them "
            f"and writes this table; here {source}); seconds include starting what the drill "
            "needs.\n\n"
            "| drill | passed | seconds |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    print(body)
    if not args.dry_run:
        write_section("faults", body)
    if not all(ok for ok, _ in results.values()) or len(results) != len(DRILLS):
        sys.exit(1)


if __name__ == "__main__":
    main()
