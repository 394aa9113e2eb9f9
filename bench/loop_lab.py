"""The loop's rounds without vLLM or the web service, for many seeds of a recipe (issue 14).

A simulation (``bench/simulate.py``) runs the whole product, a quarter of an hour per seed
on two cores, and one seed's final win-rate spreads by about ±0.08: three seeds cannot tell
two recipes apart. This lab replays what a simulation's rounds do to the model, with the
product's own parts in this process, so that a GPU can run many seeds of several recipes in
minutes:

- each round the champion answers the seed's training prompts twice, drawn as the simulation
  draws them, at the settings' temperature and top-p (Hugging Face ``generate`` here, vLLM
  there: the same distribution, other draws), and the oracle votes;
- the round's pairs are the loop's own :func:`prefloop.loop.rounds.snapshot_pairs` of those
  votes (new ones plus the replayed older ones), its trainer job the loop's own
  :func:`~prefloop.loop.rounds.round_config` of the settings (seed = round number, started
  from the champion), run by the trainer's :func:`~prefloop.trainer.round.run_round`;
- the KL probe's prompts, one answer each, judge the candidate against ``max_kl`` as the
  loop's probe does (the sampled log-ratio per token), and ``promote immediate`` crowns it;
- before the first round and after each, the champion (``--samples`` answers per held-out
  prompt; the simulation takes 1) and base (4 answers each) answer the held-out prompts: the
  win-rate (sides shuffled, ties left out), the sampled KL per token as the simulation
  reports it, the exact KL per token and the fluency.

Left out: the duel gate, voters' noise, the web service's checks. Weights stay in fp32 on a
GPU, as on the CPU.

    python bench/loop_lab.py --oracle sentiment --seeds 0,1,2 --label defaults
    python bench/loop_lab.py --oracle sentiment --seeds 0 --label b16 \\
        --set train_batch_size=16 --set train_lr=1e-3

``--set`` takes any setting of ``prefloop.toml`` (the simulation's ``--temperature 1.0
--max-tokens 40`` are the lab's defaults). Writes ``bench/results/loop-lab/<oracle>-<label>-
s<seed>.json`` per seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from recipe_lab import ORACLES, sample, score  # noqa: E402

from prefloop.config import Settings, setting_fields  # noqa: E402
from prefloop.loop.rounds import round_config, snapshot_pairs  # noqa: E402
from prefloop.serving.kl_probe import probe_prompts  # noqa: E402
from prefloop.serving.models import prepare_model  # noqa: E402
from prefloop.sim.oracles import load_oracle  # noqa: E402
from prefloop.sim.prompts import PROMPTS, split_prompts  # noqa: E402
from prefloop.trainer.round import run_round  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "loop-lab"
WORK = ROOT / ".cache" / "loop-lab"
SIMULATION = {"temperature": 1.0, "max_tokens": 40, "promote": "immediate"}
BASE_SAMPLES = 4


def overrides(items: list[str]) -> dict[str, Any]:
    """``name=value`` settings, typed by the Settings field they set (bad ones: SystemExit)."""
    fields = {f.name: f for f in setting_fields()}
    out: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"--set {item!r}: expected name=value with a prefloop setting")
        kind = type(fields[name].default)
        try:
            out[name] = (value.lower() in ("1", "true", "yes")) if kind is bool \
                else kind(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {value!r} is not a {kind.__name__}") from None
    return out


class VoteRows:
    """The store's side of :func:`snapshot_pairs`: the voted pairs as rows, vote rowids in
    the order the votes came."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, prompt: str, a: str, b: str, choice: str) -> None:
        if choice in ("a", "b"):
            self.rows.append({"context": [{"role": "user", "content": prompt}], "text_a": a,
                              "text_b": b, "choice": choice, "vote_rowid": len(self.rows) + 1})

    def trainable_pairs(self) -> list[dict[str, Any]]:
        return self.rows


class Policies:
    """Base on the device, with the champion's adapter (or none) on top of it."""

    def __init__(self, model_dir: Path, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir, self.device = model_dir, device
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).to(device).eval()
        self.model: Any = self.base

    def use(self, adapter: Path | None) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.base = self.model.unload()  # base's own weights back, the adapter dropped
        self.model = self.base if adapter is None else \
            PeftModel.from_pretrained(self.base, str(adapter)).to(self.device).eval()

    @torch.no_grad()
    def answer(self, prompts: list[str], seed: int, temperature: float, top_p: float,
               max_tokens: int) -> list[list[int]]:
        return sample(self.model, self.tokenizer, prompts, seed, top_p=top_p,
                      temperature=temperature, max_tokens=max_tokens)

    def score(self, prompts: list[str], answers: list[list[int]]) -> list[dict[str, float]]:
        return score(self.model, self.tokenizer, prompts, answers)


def per_token(scores: list[dict[str, float]], key: str) -> float:
    tokens = sum(s["tokens"] for s in scores)
    if key == "log_ratio":
        return math.fsum(s["policy"] - s["base"] for s in scores) / max(tokens, 1)
    return math.fsum(s[key] for s in scores) / max(tokens, 1)


def run_seed(settings: Settings, oracle: Any, seed: int, label: str, plan: argparse.Namespace,
             model_dir: Path, device: torch.device) -> dict[str, Any]:
    """The simulation's rounds for one seed: its points (round 0 is base), as the report's."""
    started = time.perf_counter()
    work = WORK / f"{label}-s{seed}"
    shutil.rmtree(work, ignore_errors=True)
    policies = Policies(model_dir, device)
    tok = policies.tokenizer
    train, held_out = split_prompts(PROMPTS, seed=seed)
    evaluation = list(held_out[:32])
    rng = random.Random(seed)  # the simulation's draw of training prompts
    votes = VoteRows()

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    base_eval = policies.answer([p for p in evaluation for _ in range(BASE_SAMPLES)],
                                1_000_001 + seed, 1.0, 1.0, settings.max_tokens)
    base_scores = policies.score([p for p in evaluation for _ in range(BASE_SAMPLES)],
                                 base_eval)
    base_texts = [decode(a) for a in base_eval]

    def measure(number: int, champion: str, status: str | None) -> dict[str, Any]:
        prompts = [p for p in evaluation for _ in range(plan.samples)]
        mine = policies.answer(prompts, 1000, 1.0, 1.0, settings.max_tokens)  # same every time
        scores = policies.score(prompts, mine)
        texts = [decode(a) for a in mine]
        side = random.Random(number)
        outcome = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
        for prompt, text in zip(prompts, texts, strict=True):
            context = [{"role": "user", "content": prompt}]
            at = evaluation.index(prompt) * BASE_SAMPLES
            for other in base_texts[at:at + BASE_SAMPLES]:
                if side.random() < 0.5:
                    outcome[oracle(context, text, other)] += 1
                else:
                    flipped = oracle(context, other, text)
                    outcome[{"a": "b", "b": "a"}.get(flipped, flipped)] += 1
        reward = getattr(oracle, "reward", None)
        point = {"round": number, "champion": champion, "round_status": status,
                 "winrate_vs_base": outcome["a"] / max(outcome["a"] + outcome["b"], 1),
                 "ties": outcome["tie"] + outcome["both_bad"],
                 "kl_per_token": per_token(scores, "log_ratio"),
                 "kl_exact_per_token": per_token(scores, "kl"),
                 "fluency_champion": per_token(scores, "base"),
                 "fluency_base": per_token(base_scores, "base"),
                 "reward_champion": (sum(reward([{"role": "user", "content": p}], t)
                                         for p, t in zip(prompts, texts, strict=True))
                                     / len(texts)) if reward else None,
                 "mean_words": sum(len(t.split()) for t in texts) / len(texts),
                 "examples": [{"prompt": prompts[k * plan.samples],
                               "answer": texts[k * plan.samples]}
                              for k in range(2)]}
        print(json.dumps({k: v for k, v in point.items() if k != "examples"}), flush=True)
        return point

    points = [measure(0, "base", None)]
    champion: Path | None = None
    trained_until = 0
    for number in range(1, plan.rounds + 1):
        # The simulation's draw: a prompt and vLLM's seed per pair (the seed unused here).
        jobs = [(rng.choice(train), rng.randrange(2**30))[0]
                for _ in range(plan.pairs_per_round)]
        prompts = [p for p in jobs for _ in range(2)]
        answers = [decode(a) for a in policies.answer(prompts, 77 * seed + number,
                                                      settings.temperature, settings.top_p,
                                                      settings.max_tokens)]
        for k, prompt in enumerate(jobs):
            a, b = answers[2 * k:2 * k + 2]
            votes.add(prompt, a, b, oracle([{"role": "user", "content": prompt}], a, b))
        snapshot = snapshot_pairs(votes, work / f"round-{number}" / "pairs.jsonl",
                                  trained_until, settings.max_pairs_per_round,
                                  settings.replay_ratio, random.Random(number))
        trained_until = snapshot.votes_until
        out = work / f"round-{number}" / "adapter"
        job = round_config(settings, pairs=snapshot.path, out=out, model=model_dir,
                           seed=number, init_adapter=None if settings.train_from == "base"
                           else champion)
        if device.type == "cuda":  # the trainer would take bf16 weights there; CPU's fp32
            job = dataclasses.replace(job, precision="fp32")
        round_start = time.perf_counter()
        metrics = run_round(job, progress=False)
        train_seconds = time.perf_counter() - round_start
        policies.use(out)
        probe = probe_prompts(settings.kl_probe_prompts)
        probe_answers = policies.answer([p for p, _ in probe], 31 * number + seed, 1.0, 1.0,
                                        settings.max_tokens)
        probe_kl = per_token(policies.score([p for p, _ in probe], probe_answers),
                             "log_ratio")
        if settings.max_kl and probe_kl > settings.max_kl:
            status = f"rejected: probe KL {probe_kl:.3f} over {settings.max_kl:g}"
            policies.use(champion)
        else:
            status, champion = "crowned", out
        point = measure(number, f"round-{number}" if champion == out else
                        (champion.parent.name if champion else "base"), status)
        point.update({"pairs": snapshot.pairs, "new_pairs": snapshot.new_pairs,
                      "probe_kl_per_token": probe_kl, "train_seconds": train_seconds,
                      "steps": len(metrics["steps"]),
                      "stopped_early": metrics["stopped_early"]})
        points.append(point)
    return {"seed": seed, "label": label, "points": points,
            "minutes": (time.perf_counter() - started) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oracle", default="sentiment")
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds.")
    parser.add_argument("--label", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE")
    parser.add_argument("--samples", type=int, default=4,
                        help="Champion answers per held-out prompt.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs-per-round", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="Folder of the results.")
    args = parser.parse_args()
    try:
        settings = Settings(**{**SIMULATION, **overrides(args.set)})
    except ValueError as exc:
        raise SystemExit(f"--set: {exc}") from None
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = prepare_model("embedded", ROOT / ".cache" / "test" / "models")
    oracle = load_oracle(ORACLES.get(args.oracle, args.oracle))
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        result = run_seed(settings, oracle, seed, f"{args.oracle}-{args.label}", args,
                          model_dir, device)
        result.update({"oracle": args.oracle, "settings": args.set, "device": str(device)})
        path = args.out / f"{args.oracle}-{args.label}-s{seed}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        last = result["points"][-1]
        print(f"{path.name}: win {last['winrate_vs_base']:.2f} at "
              f"{last['kl_per_token']:.3f} nats/token, {result['minutes']:.1f} min", flush=True)


if __name__ == "__main__":
    main()
