"""One training round of the loop: snapshot the votes, run the trainer as a subprocess.

The trainer is ``python -m prefloop.trainer`` in its own process group: the web process stays
responsive, memory returns when it ends, and a timeout or shutdown kills the whole group. Its
``--json`` step events become the round's progress; its stderr goes to a log file.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.atomic import temporary_prefix
from prefloop.config import Settings, setting_fields
from prefloop.serving.vllm_server import die_with_parent
from prefloop.storage.exchange import Preference, pair_preferences, to_trl
from prefloop.storage.store import Store
from prefloop.trainer.settings import RoundConfig, arguments

TRAINER = (sys.executable, "-m", "prefloop.trainer")


class RoundFailed(RuntimeError):
    """The trainer did not produce an adapter; the message says why."""


@dataclass(frozen=True)
class Snapshot:
    path: Path
    pairs: int
    new_pairs: int
    votes_until: int  # highest vote rowid in it


def _content(pref: Preference) -> str:
    return json.dumps(to_trl(pref), ensure_ascii=False, sort_keys=True)


def snapshot_pairs(store: Store, path: Path, after_vote: int, max_pairs: int,
                   replay_ratio: float, rng: random.Random) -> Snapshot:
    """Write the trainable votes after ``after_vote`` (newest kept if over ``max_pairs``)
    plus a random replay sample of older ones, as TRL-format JSONL at ``path``.

    The same votes and ``rng`` give the same file: votes are numbered in the order they
    arrive, which concurrent voters change from run to run, so the replay sample is drawn
    from, and the shuffle applied to, the preferences sorted by their content."""
    new: list[Preference] = []
    old: list[Preference] = []
    votes_until = after_vote
    for row in store.trainable_pairs():
        prefs = list(pair_preferences(row))
        (new if row["vote_rowid"] > after_vote else old).extend(prefs)
        votes_until = max(votes_until, row["vote_rowid"])
    new = new[-max_pairs:]
    room = max_pairs - len(new)
    old.sort(key=_content)
    replay = rng.sample(old, min(len(old), room, round(replay_ratio * len(new))))
    chosen = sorted(new + replay, key=_content)
    rng.shuffle(chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for pref in chosen:
            out.write(json.dumps(to_trl(pref), ensure_ascii=False) + "\n")
    return Snapshot(path, len(chosen), len(new), votes_until)


TRAIN_KL_SHARE = 0.9
"""The trainer stops at this share of ``max_kl``: the probe that judges the adapter after its
round samples other prompts and its own answers, so the two estimates differ. Measured (the
sentiment simulation, docs/BENCHMARKS.md): weights the trainer read at 0.134 nats/token
measured 0.125 on the held-out prompts and 0.091 in the probe; at 0.75 the final champion
ended at 0.143, a quarter of the budget unspent."""


def round_config(settings: Settings, *, pairs: Path, out: Path, model: Path,
                 init_adapter: Path | None, seed: int) -> RoundConfig:
    """What the loop tells the trainer: the ``train_*`` settings (each names the
    :class:`RoundConfig` field it sets), LoRA alpha twice the rank, and this round's files."""
    knobs = {f.metadata["round"]: getattr(settings, f.name) for f in setting_fields()
             if f.metadata["round"]}
    knobs["threads"] = knobs["threads"] or None  # trainer_threads = 0: torch's one per core
    return RoundConfig(pairs=pairs, out=out, model=model, init_adapter=init_adapter, seed=seed,
                       lora_alpha=2 * knobs["lora_r"],
                       max_kl=settings.max_kl * TRAIN_KL_SHARE, **knobs)


def run_trainer(job: RoundConfig, log_path: Path, timeout: float,
                on_event: Callable[[dict[str, Any]], None],
                stop: threading.Event, command: Sequence[str] = TRAINER) -> dict[str, Any]:
    """Run the trainer to completion and return its metrics; :class:`RoundFailed` if it
    exits badly, runs past ``timeout`` seconds, or ``stop`` is set."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if job.threads:
        env["OMP_NUM_THREADS"] = str(job.threads)
    with open(log_path, "ab") as log:
        # Its own process group (a timeout kills all of it), and SIGTERM when this thread
        # ends, so a crash of prefloop leaves no trainer behind.
        proc = subprocess.Popen([*command, *arguments(job), "--json"], stdout=subprocess.PIPE,
                                stderr=log, env=env, preexec_fn=_background)
        done = threading.Event()  # the trainer said "done": its adapter folder is complete
        reader = threading.Thread(target=_read_events, args=(proc, on_event, done),
                                  daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not done.is_set():
            if stop.is_set() or time.monotonic() > deadline:
                _kill(proc)
                reason = "stopped (prefloop is shutting down)" if stop.is_set() \
                    else f"timed out after {timeout:g} s (trainer_timeout)"
                raise RoundFailed(f"the trainer {reason}; log: {log_path}")
            time.sleep(0.05)
        if done.is_set():
            # Do not wait for torch to tear down: the adapter can be loaded now. The process
            # is reaped in the background.
            threading.Thread(target=proc.wait, daemon=True).start()
            return _metrics(job.out)
        reader.join(timeout=5)
    if proc.returncode != 0:
        raise RoundFailed(f"the trainer exited with code {proc.returncode}: "
                          f"{_last_error(log_path)} (log: {log_path})")
    return _metrics(job.out)


def remove_partial_adapters(adapters_dir: Path, name: str = "v*") -> list[str]:
    """Delete the temporary folders a trainer that died while saving left behind
    (``.vNNNN.tmp-*``); finished adapters are renamed into place, so they are never here."""
    removed = []
    if adapters_dir.is_dir():
        for partial in adapters_dir.glob(temporary_prefix(Path(name)) + "*"):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial.name)
    return removed


def _background() -> None:
    """In the trainer's process before it starts: die with prefloop, and yield the CPU to
    serving (nice 10). Under load the page and /healthz waited up to 13 s for the CPU while
    a round trained at normal priority (bench/load.py)."""
    die_with_parent()
    os.nice(10)


def _metrics(out: Path) -> dict[str, Any]:
    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        raise RoundFailed(f"the trainer finished but wrote no {metrics_file}")
    return json.loads(metrics_file.read_text())


def _read_events(proc: subprocess.Popen, on_event: Callable[[dict[str, Any]], None],
                 done: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # not an event line
        if isinstance(event, dict):
            on_event(event)
            if event.get("event") == "done":
                done.set()


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM the trainer's group (it removes its temporary folder), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


_PROGRESS_BAR = re.compile(r"\d+/\d+ \[[^\]]*\]\s*$")
_EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def _last_error(log_path: Path) -> str:
    """The trainer's error message from its log: the last exception line of a traceback, else
    the last line that is not a progress bar."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    lines = [line for line in lines if line and not _PROGRESS_BAR.search(line)]
    for line in reversed(lines[-20:]):
        if _EXCEPTION.match(line):
            return line[:500]
    return lines[-1][:500] if lines else "no output"
