"""The online loop inside ``prefloop serve``: rounds on a schedule, hot-swap, promotion.

:class:`Loop` owns the decisions (``loop/reports.py`` shows them); the store keeps every
state that must survive a restart (rounds, adapters, champion, paused), the adapter pool what
vLLM has loaded. Rounds run in a worker thread (the trainer itself is a subprocess), one at a
time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from prefloop.config import Settings
from prefloop.loop.duels import TurnPlan, plan_turn
from prefloop.loop.gate import GateConfig, Outcome, decide, tally
from prefloop.loop.ratings import duels_of, fit_bradley_terry
from prefloop.loop.reports import Reports
from prefloop.loop.rounds import (
    TRAINER,
    RoundFailed,
    remove_partial_adapters,
    round_config,
    run_trainer,
    snapshot_pairs,
)
from prefloop.loop.voters import review_client
from prefloop.names import BASE, AdapterState, PairKind
from prefloop.serving.adapters import AdapterError, AdapterPool, ServerUnreachable
from prefloop.serving.kl_probe import KLProbe, KLProbeError, KLReport
from prefloop.storage.store import Conflict, NotFound, Store

log = logging.getLogger(__name__)

POLICY_NAME = re.compile(r"base|v\d{4,}")


class LoopError(RuntimeError):
    """An admin action that cannot be done now; the message says why."""


def check_policy_name(policy: object) -> str:
    """``base`` or ``vNNNN``; anything else (paths, ``..``) is refused before any look-up."""
    if not isinstance(policy, str) or not POLICY_NAME.fullmatch(policy):
        raise ValueError("policy must be 'base' or an adapter name like 'v0003'")
    return policy


class Loop:
    """Scheduled DPO rounds, adapter hot-swap, duels, promotion and rollback."""

    def __init__(self, settings: Settings, store: Store, pool: AdapterPool, base_model: Path,
                 *, trainer_command: Sequence[str] = TRAINER, seed: int | None = None) -> None:
        self.settings = settings
        self.store = store
        self.pool = pool
        self.base_model = base_model
        self.trainer_command = tuple(trainer_command)
        self._rng = random.Random(seed)
        self._round_lock = threading.Lock()  # held while a round runs
        self._decide_lock = threading.Lock()  # promotion decisions one at a time
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._scheduler: BackgroundScheduler | None = None
        self.reports = Reports(self)  # the read side: leaderboard, stats, status
        self.kl_probe = None if settings.kl_probe_prompts == 0 else KLProbe(
            pool.endpoint_for, prompts=settings.kl_probe_prompts, max_tokens=settings.max_tokens,
            system_prompt=settings.system_prompt, model_name=pool.served_name)

    # -- life cycle -------------------------------------------------------------------------

    def recover(self) -> None:
        """After a (re)start: fail rounds a crash left running, load champion and candidate."""
        failed = self.store.fail_running_rounds("prefloop stopped while the round was running")
        if failed:
            log.warning("rounds %s were running when prefloop stopped; marked failed", failed)
        if removed := remove_partial_adapters(self.settings.adapters_dir):
            log.warning("removed adapter folders a crash left half-written: %s", removed)
        self.reload_adapters()

    def reload_adapters(self) -> None:
        """Load the champion and the candidate into every vLLM replica, and nothing else of
        ours (at start; a replica that restarts later is reconciled to the same set). A
        champion that no longer loads gives way to ``base``; a candidate is rejected."""
        self.pool.reload({})
        champion, candidate = self.store.champion(), self.store.candidate()
        if champion != BASE:
            try:
                self.pool.load(champion, Path(self.store.adapter(champion)["path"]))
            except (AdapterError, NotFound) as exc:
                log.error("champion %s cannot be served (%s); serving base", champion, exc)
                self.store.crown(BASE, f"{champion} could not be loaded: {exc}")
        if candidate is not None:
            try:
                self.pool.load(candidate, Path(self.store.adapter(candidate)["path"]))
            except AdapterError as exc:
                self.store.set_adapter_state(candidate, AdapterState.REJECTED,
                                             f"vLLM refused it: {exc}")

    def start(self) -> None:
        """Recover, then check for a round every ``train_every`` minutes."""
        self.recover()
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self.tick, "interval", minutes=self.settings.train_every,
                                id="round", max_instances=1, coalesce=True)
        self._scheduler.add_job(self.prune, "interval", seconds=30, id="prune",
                                max_instances=1, coalesce=True)
        self._scheduler.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the schedule and a running round (its trainer is killed, the round failed),
        and return once they have ended: the store may be closed next, and a round records
        its end in it."""
        self._stop.set()
        if self._scheduler is not None:
            # Waits for the jobs running now; a scheduled round among them sees the stop
            # event, so it ends as soon as its trainer is killed.
            self._scheduler.shutdown(wait=True)
        if self._worker is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.error("round thread %s still runs %g s after the stop; it may fail to "
                          "record its end", self._worker.name, timeout)

    # -- turns and votes --------------------------------------------------------------------

    def plan_turn(self) -> TurnPlan:
        """The policies of a new turn. A candidate or champion vLLM has not loaded (yet) is
        left out, so no request ever waits for a load."""
        champion = self.store.champion()
        if not self.pool.is_ready(champion):
            champion = BASE
        candidate = self.store.candidate()
        if candidate is not None and not self.pool.is_ready(candidate):
            candidate = None
        return plan_turn(champion, candidate, self.settings.duel_share,
                         self.settings.baseline_share, self._rng)

    def hold_turn(self) -> TurnPlan:
        """:meth:`plan_turn` with its policies marked in use (``pool.release`` them when the
        turn's answers are written): a prune between the plan and the request would unload an
        adapter just retired. Planned again if that happened; base alone as the last resort."""
        for _ in range(3):
            plan = self.plan_turn()
            if self.pool.hold(plan.policy_a, plan.policy_b):
                return plan
        self.pool.hold(BASE, BASE)
        return TurnPlan(PairKind.SAMPLE, BASE, BASE)

    def after_vote(self, pair: dict[str, Any], client_id: str | None = None) -> str | None:
        """Called once a vote on ``pair`` is stored: review the voter, then run the
        promotion test if the pair was the candidate's duel with the champion, or the
        rollback test if it was the champion's duel with ``base``. Returns ``promote``,
        ``reject``, ``exhausted`` or ``rollback`` when that happened."""
        if client_id is not None:
            review_client(self.store, client_id)
        if pair.get("kind") != PairKind.DUEL:
            return None
        sides = {pair["policy_a"], pair["policy_b"]}
        with self._decide_lock:
            champion, candidate = self.store.champion(), self.store.candidate_adapter()
            if candidate is not None and sides == {candidate["name"], champion}:
                return self._judge_candidate(candidate, champion)
            if champion != BASE and sides == {champion, BASE}:
                return self._guard_champion(champion)
        return None

    @property
    def gate(self) -> GateConfig:
        s = self.settings
        return GateConfig(s.promote_false_rate, s.promote_effect, s.promote_miss_rate,
                          s.max_duel_votes)

    def _judge_candidate(self, adapter: dict[str, Any], champion: str) -> str | None:
        """The promotion test on the candidate's duels with the current champion."""
        candidate = adapter["name"]
        votes = self.store.duel_votes(between=(candidate, champion),
                                      since=adapter["created_at"])
        decision = decide(tally(votes, candidate, champion), self.gate)
        summary = decision.summary(candidate, champion)
        if decision.outcome == Outcome.PROMOTE:
            self.store.crown(candidate, f"won its duels: {summary}")
        elif decision.outcome == Outcome.REJECT:
            self.store.set_adapter_state(candidate, AdapterState.REJECTED, f"no better: {summary}")
        elif decision.outcome == Outcome.EXHAUSTED:
            self.store.set_adapter_state(candidate, AdapterState.REJECTED,
                                         f"not shown better within the vote budget: {summary}")
        else:
            return None
        log.info("%s %s (%s)", decision.outcome, candidate, summary)
        return str(decision.outcome)

    def _guard_champion(self, champion: str) -> str | None:
        """The rollback test: ``base`` challenges the champion over their duels since it was
        crowned; a champion found worse gives way to the best earlier policy."""
        votes = self.store.duel_votes(between=(champion, BASE),
                                      since=self.store.champion_since())
        decision = decide(tally(votes, BASE, champion), self.gate)
        if decision.outcome != Outcome.PROMOTE:
            return None  # not worse (or not yet known): the champion stays
        successor, note = self.best_earlier_policy(champion), ""
        if successor != BASE:
            try:
                self.pool.load(successor, Path(self.store.adapter(successor)["path"]))
            except AdapterError as exc:
                log.error("%s cannot be served (%s); rolling back to base", successor, exc)
                successor, note = BASE, f" ({successor}, rated higher, could not be loaded)"
        reason = (f"rolled back to {successor}{note}: lost its duels against base: "
                  f"{decision.summary(BASE, champion)}")
        self.store.crown(successor, reason, old_state=AdapterState.ROLLED_BACK)
        log.warning("champion %s %s", champion, reason)
        return "rollback"

    def best_earlier_policy(self, champion: str) -> str:
        """``base`` or an earlier champion (never rolled back), whichever rates highest over
        all duel votes; ``base`` when no earlier champion rates above it."""
        earlier = {a["name"] for a in self.store.adapters()
                   if a["state"] == AdapterState.RETIRED and a["name"] != champion}
        if not earlier:
            return BASE
        ratings = fit_bradley_terry(duels_of(self.store.duel_votes()))
        return max([BASE, *earlier], key=lambda p: (ratings.get(p, -math.inf), p == BASE))

    # -- rounds -----------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.store.get_state("paused") == "1"

    @property
    def training(self) -> bool:
        return self._round_lock.locked()

    def judging(self) -> bool:
        """True while a candidate's duels are deciding its fate (``promote = "duel"``): a
        scheduled round waits for the verdict, or it would supersede the candidate untested
        (the test needs tens of duel votes; a round needs only ``min_new_pairs`` votes)."""
        return self.settings.promote == "duel" and self.store.candidate() is not None

    def tick(self) -> int | None:
        """The scheduled check: run a round when enough new trainable votes exist and no
        candidate is being judged."""
        if self.paused or self._stop.is_set():
            return None
        new = self.store.count_trainable(self.store.last_trained_vote())
        if new < self.settings.min_new_pairs or self.judging():
            return None
        if self.training:
            return self.store.record_skipped_round("schedule", "another round was running")
        return self.run_round("schedule")

    def start_round(self, trigger: str = "admin") -> int:
        """Start a round now in a worker thread; returns its id (:class:`LoopError` if one is
        running or nothing can be trained on)."""
        if self.store.count_trainable() == 0:
            raise LoopError("there are no trainable votes yet (votes for A, B or a written "
                            "answer)")
        round_id = self._begin(trigger)
        self._worker = threading.Thread(target=self._round_worker, args=(round_id,),
                                        name=f"round-{round_id}", daemon=True)
        self._worker.start()
        return round_id

    def run_round(self, trigger: str) -> int:
        """Run a round in this thread; returns its id, or that of a ``skipped`` round when
        one was already running."""
        try:
            round_id = self._begin(trigger)
        except LoopError:
            return self.store.record_skipped_round(trigger, "another round was running")
        self._round_worker(round_id)
        return round_id

    def _begin(self, trigger: str) -> int:
        """Take the round lock and record a running round (:class:`LoopError` if busy)."""
        if not self._round_lock.acquire(blocking=False):
            raise LoopError("a round is running; one round at a time")
        try:
            return self.store.start_round(trigger)
        except Conflict as exc:
            self._round_lock.release()
            raise LoopError(str(exc)) from None

    def wait_for_round(self, timeout: float | None = None) -> None:
        if self._worker is not None:
            self._worker.join(timeout)

    def _round_worker(self, round_id: int) -> None:
        try:
            self._train(round_id)
        except Exception as exc:  # the loop goes on; the round says what happened
            log.exception("round %s failed", round_id)
            self.store.update_round(round_id, status="failed", error=str(exc))
        finally:
            self._round_lock.release()

    def _train(self, round_id: int) -> None:
        s = self.settings
        parent = self.store.champion()
        name = self.next_adapter_name()
        work = s.data_dir / "rounds" / f"{round_id:04d}"
        snapshot = snapshot_pairs(self.store, work / "pairs.jsonl",
                                  self.store.last_trained_vote(), s.max_pairs_per_round,
                                  s.replay_ratio, random.Random(round_id))
        self.store.update_round(round_id, pairs=snapshot.pairs, new_pairs=snapshot.new_pairs,
                                votes_until=snapshot.votes_until, parent=parent)
        out = s.adapters_dir / name
        job = round_config(
            s, pairs=snapshot.path, out=out, model=self.base_model, seed=round_id,
            init_adapter=None if parent == BASE or s.train_from == "base"
            else Path(self.store.adapter(parent)["path"]))
        last_saved = [0.0]

        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "step" and time.monotonic() - last_saved[0] > 1.0:
                last_saved[0] = time.monotonic()
                self.store.update_round(round_id, progress=event)

        try:
            metrics = run_trainer(job, work / "trainer.log", s.trainer_timeout, on_event,
                                  self._stop, self.trainer_command)
        except RoundFailed as exc:
            # A trainer killed while saving leaves its temporary folder: nothing half-written
            # stays in the adapters folder.
            remove_partial_adapters(s.adapters_dir, name)
            self.store.update_round(round_id, status="failed", error=str(exc))
            return
        finally:
            # The trainer has read its input: from now on the votes live in the database
            # alone, so a visitor's deletion of their data leaves no copy under rounds/.
            snapshot.path.unlink(missing_ok=True)
        # Load first, book-keep after: serving the new adapter is what people wait for.
        loaded = time.monotonic()
        refused = self._load_new_adapter(name, out)
        loaded = time.monotonic() - loaded
        # Measured before it is stored: only a stored candidate reaches visitors.
        kl, refused = (None, refused) if refused else self._check_kl(round_id, name)
        self.store.add_adapter(name, out, round_id, parent, *(
            (AdapterState.REJECTED, refused) if refused else ()),
            kl_per_token=kl.per_token if kl else None,
            kl_per_answer=kl.per_answer if kl else None)
        self.store.update_round(round_id, status="succeeded", adapter=name, metrics=metrics,
                                progress={"event": "loaded", "load_seconds": loaded},
                                kl=kl.as_dict() if kl else None)
        if refused:
            self.prune()  # loaded for the probe, unloaded now
            return
        if s.promote == "immediate":
            self.store.crown(name, "promote: immediate")
        for stale in self.store.candidate_other_than(name):
            self.store.set_adapter_state(stale, AdapterState.REJECTED, f"superseded by {name}")
        self.prune()

    def _check_kl(self, round_id: int, name: str) -> tuple[KLReport | None, str | None]:
        """KL(``name`` ‖ base) from the probe, and the reason to reject the adapter (over
        ``max_kl``, or not measured: an adapter of unknown KL may be over it), or None."""
        s = self.settings
        if self.kl_probe is None:
            return None, None
        self.store.update_round(round_id, progress={"event": "kl_probe"})
        try:
            with self.pool.using(name):  # the scheduled prune must not unload it meanwhile
                report = self.kl_probe.measure_blocking(name)
        except KLProbeError as exc:
            log.error("round %s: the KL probe of %s failed: %s", round_id, name, exc)
            return None, f"KL not measured: {exc}"
        log.info("round %s: %s %s", round_id, name, report.summary())
        if s.max_kl and report.per_token > s.max_kl:
            return report, f"KL {report.per_token:.3f} nats/token over max_kl {s.max_kl:g}"
        if not s.min_relevance:
            return report, None
        try:
            base = self.kl_probe.base_blocking().relevance
        except KLProbeError as exc:
            log.error("round %s: the probe of base failed: %s", round_id, exc)
            return report, f"relevance not compared with base's: {exc}"
        report = dataclasses.replace(report, base_relevance=base)
        if report.relevance is None or base is None:
            return report, "relevance not measured: the probe needs two prompts or more"
        if report.relevance < s.min_relevance * base:
            return report, (f"relevance {report.relevance:.2f} nats/token under min_relevance "
                            f"{s.min_relevance:g} of base's {base:.2f}: answers that would do "
                            "for any question")
        return report, None

    def _load_new_adapter(self, name: str, path: Path, attempts: int = 6,
                          pause: float = 10.0) -> str | None:
        """Load a new adapter into vLLM; the reason it was refused, or ``None``. A model
        server that does not answer (restarting after a crash) is waited for, not blamed."""
        for attempt in range(attempts):
            try:
                self.pool.load(name, path)
                return None
            except ServerUnreachable as exc:
                if attempt == attempts - 1 or self._stop.wait(pause):
                    return f"vLLM did not answer: {exc}"
                log.warning("vLLM did not answer loading %s; trying again in %g s", name, pause)
            except AdapterError as exc:
                return f"vLLM refused it: {exc}"
        raise AssertionError(f"attempts must be 1 or more, not {attempts}")

    def next_adapter_name(self) -> str:
        """A version never used before: above every stored adapter and every folder."""
        used = [a["name"] for a in self.store.adapters()]
        if self.settings.adapters_dir.is_dir():  # also a ".vNNNN.tmp-*" being written
            used += [p.name for p in self.settings.adapters_dir.iterdir()]
        numbers = [int(m[1]) for n in used if (m := re.match(r"^\.?v(\d{4,})", n))]
        return f"v{max(numbers, default=0) + 1:04d}"

    # -- admin ------------------------------------------------------------------------------

    def promote(self, policy: object, reason: str = "admin") -> str:
        """Make ``policy`` champion now (an adapter or ``base``: a rollback). Returns the old
        champion."""
        policy = check_policy_name(policy)
        if policy != BASE:
            adapter = self.store.adapter(policy)  # NotFound for unknown names
            try:
                self.pool.load(policy, Path(adapter["path"]))
            except AdapterError as exc:
                raise LoopError(f"{policy} cannot be served: {exc}") from None
        with self._decide_lock:
            old = self.store.crown(policy, reason)
        self.prune()
        return old

    def pause(self) -> None:
        self.store.set_state("paused", "1")

    def resume(self) -> None:
        self.store.set_state("paused", "0")

    def prune(self) -> None:
        """Unload adapters that are neither champion nor candidate once no request uses
        them."""
        keep = {self.store.champion(), self.store.candidate() or BASE}
        self.pool.prune(keep)
