"""``prefloop simulate``: the real loop with an oracle voting instead of people.

Everything is real: vLLM serves the answers, votes go through the same service as the page
(so duel votes decide promotion, and each simulated voter is a client whose votes are
checked like a visitor's), rounds run the trainer subprocess, new adapters are hot-swapped.
Before the first round and after each, the champion and ``base`` answer the held-out
prompts, and the report records the oracle's mean reward of each, the champion's win-rate
against ``base`` (ties and both-bad excluded and counted), and KL(champion ‖ base) per
answer, estimated from the champion's samples as the mean of log π(y) − log π_base(y)
computed with the model and the adapter. The held-out answers are sampled at temperature 1
without top-p, so that they are samples of the policies themselves (the estimate is only
unbiased for those); an answer cut at ``max_tokens`` is scored without an end of turn.
It also records what the gate decided and which voters were flagged (:mod:`.report`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prefloop.app.chat import ChatService
from prefloop.app.guard import Client, Guard
from prefloop.app.server import Runtime, make_sampler, start_runtime
from prefloop.config import Settings
from prefloop.names import BASE
from prefloop.serving.context import with_system_prompt
from prefloop.serving.sampler import PairSampler, Sampling, Side
from prefloop.sim.crowd import Voter, crowd_sizes, draw_voters, make_crowd, reading_seconds
from prefloop.sim.oracles import Oracle
from prefloop.sim.report import by_kind, gate_snapshot, write_report

Messages = list[dict[str, str]]
EXAMPLES = 2  # held-out prompts whose champion answers the report quotes, every round


@dataclass(frozen=True)
class SimulationPlan:
    rounds: int
    pairs_per_round: int
    train_prompts: Sequence[str]
    eval_prompts: Sequence[str]
    seed: int = 0
    concurrency: int = 4  # pairs asked for at once (vLLM batches them)
    base_samples: int = 4  # base's answers per held-out prompt, each compared with the champion's
    voters: int = 8  # simulated voters, each its own client
    noise: Mapping[str, float] = field(default_factory=dict)  # kind -> share of the voters


def run_simulation(settings: Settings, plan: SimulationPlan, oracle: Oracle, report_dir: Path,
                   progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole simulation and write its report; returns the report as a dict.

    ``champion_engine = "auto"`` is ``lora`` here: a simulation's traffic is duels and the
    held-out comparison with base, all on the LoRA replica; a champion engine would only take
    cores from it (``merged``, when asked for, is kept)."""
    if settings.champion_engine == "auto":
        settings = dataclasses.replace(settings, champion_engine="lora")
    runtime = start_runtime(settings, log, schedule=False)
    try:
        return asyncio.run(_simulate(settings, runtime, plan, oracle, report_dir, progress, log))
    finally:
        runtime.close()


async def _simulate(settings: Settings, runtime: Runtime, plan: SimulationPlan, oracle: Oracle,
                    report_dir: Path, progress: bool, log: Callable[[str], None]) -> dict:
    sampler = make_sampler(settings, runtime)
    measure = make_sampler(settings, runtime, Sampling(1.0, 1.0, settings.max_tokens))
    # The voters are clients (their votes are stored, checked and flagged as theirs), but not
    # visitors to hold to a rate: the concurrency of the plan is the only limit.
    unlimited = dataclasses.replace(settings, pairs_per_minute=0, votes_per_minute=0,
                                    ip_pairs_per_minute=0, client_generations=1024)
    service = ChatService(settings, runtime.store, sampler, runtime.loop, Guard(unlimited))
    crowd = make_crowd(oracle, dict(plan.noise), plan.voters, plan.seed)
    rng = random.Random(plan.seed)
    voter_rng = random.Random(f"voters {plan.seed}")  # apart: same prompts as without a crowd
    total = plan.rounds * plan.pairs_per_round + (plan.rounds + 1) * len(plan.eval_prompts)
    bar = tqdm(total=total, desc="simulate", unit="pair", disable=not progress)
    report: dict[str, Any] = {
        "oracle": getattr(oracle, "name", repr(oracle)), "promote": settings.promote,
        "rounds_planned": plan.rounds, "pairs_per_round": plan.pairs_per_round,
        "eval_prompts": len(plan.eval_prompts), "base_samples": plan.base_samples,
        "seed": plan.seed, "noise": dict(plan.noise),
        "voters": crowd_sizes(dict(plan.noise), plan.voters),
        "crowd": [{"client_id": v.client_id, "kind": v.kind} for v in crowd],
        "data_dir": str(settings.data_dir), "points": []}
    try:
        start = time.monotonic()
        base_answers: list[list[Side]] = []
        point = await _measure(0, None, runtime, measure, oracle, plan, base_answers, bar)
        point["seconds"] = {"measure": round(time.monotonic() - start, 1)}
        point.update(await asyncio.to_thread(gate_snapshot, runtime.store, crowd))
        report["points"].append(point)
        for number in range(1, plan.rounds + 1):
            start = time.monotonic()
            votes = await _collect(service, plan, draw_voters(crowd, plan.pairs_per_round,
                                                              voter_rng), rng, bar)
            collected = time.monotonic()
            judged = await _judge(service, plan, crowd, voter_rng, rng, bar, runtime, votes)
            judging = time.monotonic() - collected
            started = time.monotonic()
            round_id = await asyncio.to_thread(runtime.loop.run_round, "simulate")
            training = time.monotonic() - started
            if number == plan.rounds:  # the last candidate meets its duels too
                started = time.monotonic()
                judged += await _judge(service, plan, crowd, voter_rng, rng, bar, runtime,
                                       votes)
                judging += time.monotonic() - started
            trained = time.monotonic()
            row = runtime.store.round(round_id) if round_id else None
            point = await _measure(number, row, runtime, measure, oracle, plan, base_answers,
                                   bar)
            point["fluency_base"] = report["points"][0]["fluency_base"]
            point["relevance_base"] = report["points"][0]["relevance_base"]
            point["judge_pairs"] = judged
            point["votes"] = dict(sum(votes.values(), Counter()))
            point["votes_by_kind"] = {kind: dict(counts) for kind, counts in votes.items()}
            point.update(await asyncio.to_thread(gate_snapshot, runtime.store, crowd))
            point["seconds"] = {"collect": round(collected - start, 1),
                                "judge": round(judging, 1), "train": round(training, 1),
                                "measure": round(time.monotonic() - trained, 1)}
            report["points"].append(point)
            log(_point_line(point))
            write_report(report, report_dir)
    finally:
        bar.close()
        await sampler.close()
        await measure.close()
    write_report(report, report_dir)
    return report


async def _judge(service: ChatService, plan: SimulationPlan, crowd: Sequence[Voter],
                 voter_rng: random.Random, rng: random.Random, bar: tqdm, runtime: Runtime,
                 votes: dict[str, Counter]) -> int:
    """With ``promote = "duel"``: more pairs, a batch at a time, until the promotion test has
    decided the candidate's fate (as ``prefloop serve`` waits before its next scheduled
    round); it ends at the latest when the candidate's duel votes reach ``max_duel_votes``.
    Returns the pairs it took (their votes are added to ``votes``)."""
    settings = runtime.loop.settings
    if settings.promote != "duel" or settings.duel_share == 0:
        return 0
    taken, batch = 0, max(plan.concurrency, 8)
    cap = 4 * settings.max_duel_votes / settings.duel_share  # never reached unless stuck
    while runtime.store.candidate() is not None and taken < cap:
        bar.total += batch
        more = await _collect(service, dataclasses.replace(plan, pairs_per_round=batch),
                              draw_voters(crowd, batch, voter_rng), rng, bar)
        for kind, counts in more.items():
            votes.setdefault(kind, Counter()).update(counts)
        taken += batch
    return taken


async def _collect(service: ChatService, plan: SimulationPlan, voters: Sequence[Voter],
                   rng: random.Random, bar: tqdm) -> dict[str, Counter]:
    """``pairs_per_round`` new single-turn pairs, one for each of ``voters``, each asked for
    and voted on by its voter as a client; the votes by kind of voter."""
    votes: dict[str, Counter] = {}
    gate = asyncio.Semaphore(plan.concurrency)
    jobs = [(rng.choice(plan.train_prompts), rng.randrange(2**30))
            for _ in range(plan.pairs_per_round)]

    async def one(prompt: str, seed: int, voter: Voter) -> None:
        client = Client(voter.client_id)
        async with gate:
            turn = await service.turn(prompt, client=client, seed=seed)
        pair = service.store.pair(turn.pair_id)
        if voter.reads:  # outside the gate: other pairs are written meanwhile
            await asyncio.sleep(reading_seconds(pair))
        choice = await asyncio.to_thread(voter.vote, pair["context"], pair["text_a"],
                                         pair["text_b"])
        # The loop's after_vote runs the gate and the voter checks on this client.
        await asyncio.to_thread(service.vote, turn.pair_id, choice, client=client)
        votes.setdefault(voter.kind, Counter())[choice] += 1
        bar.update()

    await asyncio.gather(*(one(prompt, seed, voter)
                           for (prompt, seed), voter in zip(jobs, voters, strict=True)))
    return votes


async def _measure(number: int, round_row: dict | None, runtime: Runtime,
                   sampler: PairSampler, oracle: Oracle, plan: SimulationPlan,
                   base_answers: list[list[Side]], bar: tqdm) -> dict[str, Any]:
    """The champion and base on the held-out prompts (same seeds every time).

    ``base_answers`` (``plan.base_samples`` per prompt) is filled on the first call and
    reused: base does not change, and its answers, sampled beside an adapter's, would pay the
    adapter's slower decode. Each champion answer is compared with each of base's answers to
    its prompt: more base samples make the win-rate less noisy at little cost.
    """
    champion = runtime.store.champion()
    gate = asyncio.Semaphore(2 * plan.concurrency)  # answers at once, as many as in a pair

    async def answer(prompt: str, policy: str, seed: int, count: bool) -> Side:
        async with gate:
            side = await sampler.answer([{"role": "user", "content": prompt}], policy, seed)
        bar.update(count)
        return side

    prompts = plan.eval_prompts
    n = plan.base_samples
    fresh = [] if base_answers else [  # seeds apart from the champion's (1000 + 2k)
        answer(p, BASE, 1_000_001 + n * k + j, False) for k, p in enumerate(prompts)
        for j in range(n)]
    sampled = await asyncio.gather(*fresh, *(answer(p, champion, 1000 + 2 * k, True)
                                             for k, p in enumerate(prompts)))
    base_answers += [sampled[k * n:(k + 1) * n] for k in range(len(fresh) // n)]
    mine = sampled[len(fresh):]
    contexts = [with_system_prompt(sampler.system_prompt, [{"role": "user", "content": prompt}])
                for prompt in prompts]
    side = random.Random(number)
    outcome: Counter = Counter()
    for context, own, theirs in zip(contexts, mine, base_answers, strict=True):
        for other in theirs:  # sides shuffled: an oracle may favour one
            if side.random() < 0.5:
                vote = await asyncio.to_thread(oracle, context, own.text, other.text)
            else:
                flipped = await asyncio.to_thread(oracle, context, other.text, own.text)
                vote = {"a": "b", "b": "a"}.get(flipped, flipped)
            outcome[{"a": "win", "b": "loss"}.get(vote, vote)] += 1
    decided = outcome["win"] + outcome["loss"]
    reward = getattr(oracle, "reward", None)
    adapter = None if champion == BASE else Path(runtime.store.adapter(champion)["path"])
    pairs = list(zip(contexts, mine, strict=True))
    base_pairs = list(zip(contexts, base_answers, strict=True))
    scored = await asyncio.to_thread(score_answers, runtime.loop.base_model, adapter,
                                     [(c, m.text) for c, m in pairs],
                                     [m.finish_reason == "length" for m in mine])
    # Fluency: how likely base finds the champion's answers, per token, beside how likely it
    # finds its own (base's samples, scored under base alone).
    # Base's answers are the same every round: scored once, when they are sampled.
    theirs = [(c, t) for c, answers in base_pairs for t in answers] if fresh else []
    base_scored = await asyncio.to_thread(score_answers, runtime.loop.base_model, None,
                                          [(c, t.text) for c, t in theirs],
                                          [t.finish_reason == "length" for _, t in theirs])
    # Relevance: how much likelier base finds each answer after its own prompt than after
    # the next held-out prompt (pointwise mutual information, nats per token). An answer
    # that would do for any question (a filler, a non-answer) scores about 0.
    relevance = await asyncio.to_thread(relevance_per_token, runtime.loop.base_model,
                                        contexts, [m.text for m in mine],
                                        [m.finish_reason == "length" for m in mine], scored)
    base_relevance = await asyncio.to_thread(
        relevance_per_token, runtime.loop.base_model,
        [c for c, _ in theirs], [t.text for _, t in theirs],
        [t.finish_reason == "length" for _, t in theirs], base_scored,
        plan.base_samples) if fresh else None
    tokens = sum(s.tokens for s in scored)
    return {
        "round": number, "champion": champion, "candidate": runtime.store.candidate(),
        "round_status": round_row["status"] if round_row else None,
        "round_error": round_row["error"] if round_row else None,
        "adapter": round_row["adapter"] if round_row else None,
        "reward_champion": _mean([reward(c, m.text) for c, m in pairs]) if reward else None,
        "reward_base": (_mean([reward(c, t.text) for c, theirs in base_pairs for t in theirs])
                        if reward else None),
        "winrate_vs_base": outcome["win"] / decided if decided else None,
        "wins": outcome["win"], "losses": outcome["loss"], "ties": outcome["tie"],
        "both_bad": outcome["both_bad"], "kl": _mean([s.log_ratio for s in scored]),
        "kl_per_token": per_token(math.fsum(s.log_ratio for s in scored), tokens),
        "fluency_champion": per_token(math.fsum(s.base for s in scored), tokens),
        "fluency_base": per_token(math.fsum(s.base for s in base_scored),
                                  sum(s.tokens for s in base_scored)),
        "relevance_champion": relevance, "relevance_base": base_relevance,
        "mean_words": _mean([len(m.text.split()) for m in mine]),
        # What the numbers stand for: a rising reward can be a policy gaming the oracle.
        "examples": [{"prompt": prompt, "answer": m.text}
                     for prompt, m in zip(prompts[:EXAMPLES], mine[:EXAMPLES], strict=True)],
    }


@dataclass(frozen=True)
class Scored:
    """One answer's log-probability under the policy and under ``base``, and its tokens."""

    policy: float
    base: float
    tokens: int

    @property
    def log_ratio(self) -> float:
        return self.policy - self.base


def score_answers(model_path: Path, adapter: Path | None,
                  items: Sequence[tuple[Messages, str]],
                  cut: Sequence[bool] | None = None) -> list[Scored]:
    """log π(y|x) and log π_base(y|x) of each (context, answer), with its token count;
    without an adapter the policy is ``base``.

    ``cut[i]``: answer i stopped at the token limit, so its end-of-turn token is not part
    of what the policy sampled and is left out.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefloop.trainer.batch import collate, completion_logps
    from prefloop.trainer.data import Message, PreferencePair
    from prefloop.trainer.tokenize import tokenize_pair

    if not items:
        return []
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    pairs = []
    for context, answer in items:
        prompt = tuple(Message(m["role"], m["content"]) for m in context)
        # The trainer's tokeniser scores pairs; the second answer is a short stand-in.
        other = "." if answer != "." else ".."
        pair = tokenize_pair(tokenizer, PreferencePair(prompt, answer, other), 4096)
        if cut and cut[len(pairs)] and pair.chosen_ids[-1] in tokenizer.all_special_ids \
                and len(pair.chosen_ids) - pair.chosen_start > 1:
            pair = dataclasses.replace(pair, chosen_ids=pair.chosen_ids[:-1])
        pairs.append(pair)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[Scored] = []
    with torch.no_grad():
        for start in range(0, len(pairs), 8):
            index = list(range(start, min(start + 8, len(pairs))))
            batch = collate(pairs, index, pad)
            if adapter is None:
                policy = reference = completion_logps(model, batch)[:len(index)]
            else:
                policy = completion_logps(model, batch)[:len(index)]
                with model.disable_adapter():
                    reference = completion_logps(model, batch)[:len(index)]
            out += [Scored(p, r, len(pairs[i].chosen_ids) - pairs[i].chosen_start)
                    for p, r, i in zip(policy.tolist(), reference.tolist(), index, strict=True)]
    return out


def relevance_per_token(model_path: Path, contexts: Sequence[Messages], answers: Sequence[str],
                        cut: Sequence[bool], scored: Sequence[Scored],
                        stride: int = 1) -> float | None:
    """Σ (log π_base(y|x) − log π_base(y|x')) over all answer tokens, per token: x the
    answer's own context (``scored`` holds its log-probs), x' the context ``stride`` places
    on in the list (the next prompt's, when each prompt has ``stride`` answers in a row)."""
    if not answers or len(set(map(repr, contexts))) < 2:
        return None  # no other prompt to compare with
    elsewhere = score_answers(model_path, None, [
        (contexts[(i + stride) % len(contexts)], answer) for i, answer in enumerate(answers)],
        cut)
    return per_token(math.fsum(s.base - e.base for s, e in zip(scored, elsewhere, strict=True)),
                     sum(s.tokens for s in scored))


def log_ratios(model_path: Path, adapter: Path | None, items: Sequence[tuple[Messages, str]],
               cut: Sequence[bool] | None = None) -> list[float]:
    """log π(y|x) − log π_base(y|x) for each (context, answer); all 0 without an adapter."""
    if adapter is None:
        return [0.0] * len(items)
    return [s.log_ratio for s in score_answers(model_path, adapter, items, cut)]


def per_token(total: float, tokens: int) -> float | None:
    return total / tokens if tokens else None


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _point_line(point: dict[str, Any]) -> str:
    def fmt(value: float | None, spec: str = ".3f") -> str:
        return "n/a" if value is None else format(value, spec)
    return (f"round {point['round']}: {point['round_status']}, champion {point['champion']}, "
            f"reward {fmt(point['reward_champion'])} (base {fmt(point['reward_base'])}), "
            f"win-rate vs base {fmt(point['winrate_vs_base'], '.2f')}, "
            f"KL {fmt(point['kl'])} nats, flagged voters {by_kind(point['flagged_by_kind'])}")
