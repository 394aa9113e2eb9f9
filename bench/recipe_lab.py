"""One training recipe's reward-KL frontier on fixed votes, without vLLM (issue 14).

A simulation measures a recipe in a quarter of an hour per seed, three points (its rounds),
each with the noise of 32 held-out answers. This lab measures the learner alone, faster and
at more points: base answers the seed's training prompts twice each (the pairs a first round
would get, sampled like the loop's: temperature 1, top-p 0.95, 40 tokens; cached in
``.cache/lab``), the oracle votes, and the trainer's own code trains the recipe on the
decisive pairs in this process. Every ``--every`` optimizer steps and after the last, the
policy answers the held-out prompts (``--samples`` answers each, temperature 1, no top-p)
and the lab records what the simulation does: the win-rate against 4 base answers per prompt
(ties excluded), the oracle's mean reward, the fluency (mean log-prob per token under base)
and KL(policy ‖ base) per answer token, here exact over the vocabulary at every position of
the policy's own answers (less variance than the simulation's sampled log-ratio).

``--scale 0.5,0.8`` also saves the final adapter and measures it with its LoRA weights
scaled towards base (interpolation towards the initialisation, as WARP's LITI): is a
shrunk, fully trained adapter a better point than an early-stopped one?

    python bench/recipe_lab.py --oracle sentiment --seed 0 --label rank-1 \\
        --set epochs=3 --set lora_r=1 --set lora_alpha=2 --set lr=1e-3

Writes ``bench/results/lab/<oracle>-<label>-s<seed>.json``; ``--extra-pairs N`` adds N more
base pairs (other prompts drawn, same held-out set) to see what more votes would buy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from prefloop.serving.models import prepare_model  # noqa: E402
from prefloop.sim.oracles import load_oracle  # noqa: E402
from prefloop.sim.prompts import PROMPTS, split_prompts  # noqa: E402
from prefloop.trainer import round as rounds  # noqa: E402
from prefloop.trainer.batch import make_batches  # noqa: E402
from prefloop.trainer.kl import KLCheck  # noqa: E402
from prefloop.trainer.settings import RoundConfig  # noqa: E402

CACHE = ROOT / ".cache" / "lab"
RESULTS = ROOT / "bench" / "results" / "lab"
PAIRS, HELD_OUT, BASE_SAMPLES, MAX_TOKENS = 192, 48, 4, 40  # 3 rounds x 64 pairs of votes
ORACLES = {name: f"{ROOT}/bench/oracles.py:{name}"  # the unseen and the retired ones
           for name in ("on_topic", "concise_until_2026_12_04")}


def chat_text(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         tokenize=False, add_generation_prompt=True)


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    return tokenizer(chat_text(tokenizer, prompt), add_special_tokens=False).input_ids


@torch.no_grad()
def sample(model: Any, tokenizer: Any, prompts: list[str], seed: int, top_p: float = 1.0,
           chunk: int = 64, temperature: float = 1.0,
           max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """One answer's token ids per prompt (its end of turn kept), at temperature 1 unless told."""
    out = []
    for k in range(0, len(prompts), chunk):
        texts = [chat_text(tokenizer, p) for p in prompts[k:k + chunk]]
        enc = tokenizer(texts, return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        torch.manual_seed(seed + k)
        rows = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                              top_k=0, max_new_tokens=max_tokens,
                              pad_token_id=tokenizer.pad_token_id)
        for row in rows[:, enc["input_ids"].shape[1]:].tolist():
            end = tokenizer.eos_token_id
            out.append(row[:row.index(end) + 1] if end in row
                       else [t for t in row if t != tokenizer.pad_token_id])
    return out


@torch.no_grad()
def score(model: Any, tokenizer: Any, prompts: list[str], answers: list[list[int]],
          chunk: int = 16) -> list[dict[str, float]]:
    """Per answer: its tokens, their log-prob under the policy and under base, and
    KL(policy ‖ base) exact over the vocabulary, summed over its positions. ``model`` is
    base with an adapter (a PeftModel), or base alone (then the policy is base)."""
    from peft import PeftModel

    out = []
    for k in range(0, len(prompts), chunk):
        heads = [chat_ids(tokenizer, p) for p in prompts[k:k + chunk]]
        rows = [h + a for h, a in zip(heads, answers[k:k + chunk], strict=True)]
        ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        policy = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        base = policy
        if isinstance(model, PeftModel):
            with model.disable_adapter():
                base = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for r, (head, row) in enumerate(zip(heads, rows, strict=True)):
            at = slice(len(head) - 1, len(row) - 1)  # positions predicting the answer
            p, b = policy[r, at], base[r, at]  # (T, V)
            taken = torch.tensor(row[len(head):], device=model.device)[:, None]
            out.append({"tokens": len(row) - len(head),
                        "policy": p.gather(1, taken).sum().item(),
                        "base": b.gather(1, taken).sum().item(),
                        "kl": (p.exp() * (p - b)).sum().item()})
    return out


def kl_and_fluency(model: Any, tokenizer: Any, prompts: list[str],
                   answers: list[list[int]]) -> tuple[float, float]:
    """KL(policy ‖ base) per answer token, exact at each position of ``answers``, and the
    mean log-prob per token base gives them."""
    scores = score(model, tokenizer, prompts, answers)
    tokens = sum(s["tokens"] for s in scores)
    return sum(s["kl"] for s in scores) / tokens, sum(s["base"] for s in scores) / tokens


def base_pairs(seed: int, extra: int, model_dir: Path) -> dict[str, Any]:
    """Base's pairs for the training prompts and its answers to the held-out ones (cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = CACHE / f"pairs-s{seed}-x{extra}.json"
    if path.exists():
        return json.loads(path.read_text())
    data = base_pairs(seed, 0, model_dir) if extra else None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    train, held_out = split_prompts(PROMPTS, seed=seed)
    rng = random.Random(seed + 100 * bool(extra))
    prompts = [rng.choice(train) for _ in range(extra or PAIRS)]
    answers = sample(model, tokenizer, [p for p in prompts for _ in range(2)],
                     10_000 * seed + (3 if extra else 1), top_p=0.95)
    decoded = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    if data:
        data = {**data, "prompts": data["prompts"] + prompts,
                "answers": data["answers"] + decoded}
    else:
        evaluation = list(held_out[:HELD_OUT])
        base = sample(model, tokenizer, [p for p in evaluation for _ in range(BASE_SAMPLES)],
                      10_000 * seed + 7)
        data = {"prompts": prompts, "answers": decoded, "held_out": evaluation,
                "base": [tokenizer.decode(a, skip_special_tokens=True) for a in base]}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def write_pairs(data: dict[str, Any], oracle: Any, path: Path) -> int:
    """The decisive votes as TRL pairs (ties, both-bad and equal answers give none)."""
    n = 0
    with open(path, "w", encoding="utf-8") as out:
        for k, prompt in enumerate(data["prompts"]):
            a, b = data["answers"][2 * k:2 * k + 2]
            context = [{"role": "user", "content": prompt}]
            vote = oracle(context, a, b)
            if vote in ("a", "b") and a != b:
                chosen, rejected = (a, b) if vote == "a" else (b, a)
                out.write(json.dumps({"prompt": context,
                                      "chosen": [{"role": "assistant", "content": chosen}],
                                      "rejected": [{"role": "assistant", "content": rejected}]})
                          + "\n")
                n += 1
    return n


class Checkpoints:
    """Stands in for the trainer's KL check: at each check it measures the policy on the
    held-out prompts, records the point and reports a KL that never stops training."""

    def __init__(self, data: dict[str, Any], oracle: Any, tokenizer: Any, samples: int):
        self.oracle, self.tokenizer = oracle, tokenizer
        self.prompts = [p for p in data["held_out"] for _ in range(samples)]
        self.base = {p: data["base"][k * BASE_SAMPLES:(k + 1) * BASE_SAMPLES]
                     for k, p in enumerate(data["held_out"])}
        self.points: list[dict[str, Any]] = []

    def measure(self, model: Any, step: int | None = None) -> KLCheck:
        start = time.perf_counter()
        model.eval()
        training_rng = torch.random.get_rng_state()  # dropout's draws: not the checkpoints'
        with torch.autocast("cpu", enabled=False):
            answers = sample(model, self.tokenizer, self.prompts, seed=555)
            kl, fluency = kl_and_fluency(model, self.tokenizer, self.prompts, answers)
        torch.random.set_rng_state(training_rng)
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        outcome = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
        for prompt, text in zip(self.prompts, texts, strict=True):
            for other in self.base[prompt]:
                outcome[self.oracle([{"role": "user", "content": prompt}], text, other)] += 1
        reward = getattr(self.oracle, "reward", None)
        point = {"kl_per_token": kl, "fluency": fluency,
                 "winrate": outcome["a"] / max(outcome["a"] + outcome["b"], 1),
                 "ties": outcome["tie"] + outcome["both_bad"],
                 "reward": (sum(reward([{"role": "user", "content": p}], t)
                             for p, t in zip(self.prompts, texts, strict=True)) / len(texts)
                            if reward else None),
                 "words": sum(len(t.split()) for t in texts) / len(texts),
                 "examples": texts[:2], "seconds": time.perf_counter() - start}
        self.points.append(point)
        print(json.dumps({k: v for k, v in point.items() if k != "examples"}), flush=True)
        return KLCheck(per_token=kl, per_answer=0.0, answers=len(texts), tokens=0)


def knobs(pairs: list[str]) -> dict[str, Any]:
    """``name=value`` recipe settings, typed by the RoundConfig field they set."""
    fields = {f.name: f for f in dataclasses.fields(RoundConfig)}
    out: dict[str, Any] = {}
    for item in pairs:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"--set {item!r}: expected name=value with a RoundConfig knob")
        default = fields[name].default
        try:
            out[name] = tuple(value.split(",")) if isinstance(default, tuple) \
                else type(default)(value) if default is not None else value
        except ValueError:
            raise SystemExit(f"--set {item!r}: {value!r} is not a {type(default).__name__}") \
                from None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oracle", default="sentiment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE")
    parser.add_argument("--every", type=int, default=24, help="Steps between checkpoints.")
    parser.add_argument("--samples", type=int, default=2, help="Answers per held-out prompt.")
    parser.add_argument("--extra-pairs", type=int, default=0)
    parser.add_argument("--scale", default="", help="Comma-separated LoRA scales to measure.")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    model_dir = prepare_model("embedded", ROOT / ".cache" / "test" / "models")
    oracle = load_oracle(ORACLES.get(args.oracle, args.oracle))
    run = f"{args.oracle}-{args.label}-s{args.seed}"
    work = CACHE / run
    try:
        config = RoundConfig(pairs=work / "pairs.jsonl", out=work / "adapter", model=model_dir,
                             seed=args.seed, max_kl=1e9, kl_check_steps=args.every,
                             **knobs(args.set))
    except ValueError as exc:
        raise SystemExit(f"--set: {exc}") from None
    data = base_pairs(args.seed, args.extra_pairs, model_dir)
    work.mkdir(parents=True, exist_ok=True)
    decisive = write_pairs(data, oracle, work / "pairs.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device, dtype, amp = rounds.pick_device(config.precision)
    pairs, _ = rounds._load_pairs(config, tokenizer)
    batches = make_batches(pairs, list(range(len(pairs))), config.batch_size, rng,
                           tokenizer.pad_token_id, config.batch_order)
    model = rounds.load_policy(config, device, dtype)
    checkpoints = Checkpoints(data, oracle, tokenizer, args.samples)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None,
                        cache_enabled=False):
        ref = rounds.reference_logps(model, batches, len(pairs), device, False)
        # min_checks 1: the checkpoints come every --every steps, however few steps in all
        steps, checks = rounds.train(model, batches, ref, config, device, rng,
                                     lambda _: None, False, checkpoints, min_checks=1)
    for point, check in zip(checkpoints.points, checks, strict=True):
        point["step"] = check["step"]
    scaled = []
    if args.scale:
        model.eval()
        lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        for scale in map(float, args.scale.split(",")):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in lora_b:
                        p.copy_(scale * lora_b[name])
            checkpoints.measure(model)
            scaled.append({"scale": scale, **checkpoints.points.pop()})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{run}.json").write_text(json.dumps({
        "oracle": args.oracle, "seed": args.seed, "label": args.label, "knobs": args.set,
        "pairs": len(data["prompts"]), "decisive": decisive, "steps": len(steps),
        "minutes": (time.perf_counter() - start) / 60, "points": checkpoints.points,
        "scaled": scaled}, indent=1) + "\n")
    print(f"{run}: {decisive} decisive pairs of {len(data['prompts'])}, {len(steps)} steps, "
          f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
