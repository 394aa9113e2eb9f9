"""One LoRA DPO round with prefloop's trainer vs TRL's DPOTrainer: speed, memory, loss.

The same synthetic pairs, model and settings on all sides (LoRA r=16 on every linear layer
of the blocks, batch 8, 1 epoch, lr 5e-5 with linear decay and no warmup, beta 0.1, sigmoid
loss, fp32 on CPU, no dropout, same max length and thread count). Three configurations, each
in a fresh Python process so that its peak RSS is its own:

- prefloop: ``run_round``;
- TRL defaults: DPOTrainer with TRL 1.13's own defaults for everything not listed above
  (gradient checkpointing on, reference log-probs computed at every step);
- TRL best: gradient checkpointing off, reference log-probs precomputed.

Every configuration takes the same batches in the same order: the pairs file is written in
the order prefloop's trainer would batch them (pairs of similar length together, the batches
shuffled), and each side reads it in file order (prefloop ``batch_order="file"``, TRL
``train_sampling_strategy="sequential"``). So the losses of each step compare like for like,
and both sides get the same, little, padding.

Training seconds run from a loaded model to the last optimizer step: for prefloop the
reference pass and the steps, for TRL the DPOTrainer constructor (tokenisation, and with
precomputing the reference pass) plus ``train()``. Targets (issue 3): prefloop's pairs/s at
least 2x TRL's and its peak no higher; step-1 loss log 2 on all sides; final loss within 10%.

    .venv/bin/python bench/trainer_vs_trl.py            # the full run (many minutes)
    .venv/bin/python bench/trainer_vs_trl.py --pairs 8 --dry-run   # a quick check, no docs

Run it alone on the machine: anything else on the cores distorts the timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / ".cache" / "test" / "models" / "SmolLM2-135M-Instruct"
CONFIGS = ("prefloop", "trl-defaults", "trl-best")
LABELS = {"prefloop": "prefloop", "trl-defaults": "TRL defaults", "trl-best": "TRL best"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Shared by every configuration. Dropout is off because TRL disables it (disable_dropout=True,
# LoRA dropout included); the prompt + answer sequences here stay far below MAX_LENGTH.
LR, BETA, BATCH, EPOCHS, SEED = 5e-5, 0.1, 8, 1, 0
LORA_R, LORA_ALPHA, LORA_DROPOUT, MAX_LENGTH = 16, 32, 0.0, 512

# Synthetic pairs: a task and four concrete steps for it. The chosen answer is friendly and
# walks through the steps; the rejected one is dismissive and vague. Same length range, so the
# model must learn the tone and content, not the length.
TOPICS = [
    ("boil an egg", ["put the egg in a pot of cold water", "bring the water to a gentle boil",
                     "let it cook for about nine minutes", "cool it in a bowl of ice water"]),
    ("learn to swim", ["start in shallow water where you can stand", "practise floating on "
                       "your back", "learn to kick while holding the edge",
                       "add arm strokes once you feel calm"]),
    ("fix a flat bike tyre", ["take the wheel off the frame", "pull out the inner tube with "
                              "tyre levers", "find the hole and patch it",
                              "put the tube back and pump it up"]),
    ("bake bread", ["mix flour, water, yeast and salt", "knead the dough for ten minutes",
                    "let it rise until it doubles", "bake it at a high heat until golden"]),
    ("plant a tree", ["dig a hole twice as wide as the roots", "loosen the roots gently",
                      "set the tree at the same depth it grew before",
                      "water it deeply every week for the first summer"]),
    ("tie a tie", ["drape it with the wide end longer", "cross the wide end over the narrow "
                   "one", "loop it up through the neck and down the front knot",
                   "tighten it slowly while holding the narrow end"]),
    ("save money each month", ["write down what you spend for a month", "pick two costs you "
                               "can cut", "move a fixed amount to savings on payday",
                               "check your progress at the end of each month"]),
    ("sleep better", ["go to bed at the same time every night", "keep the bedroom dark and "
                      "cool", "put the phone away an hour before bed",
                      "avoid coffee after lunch"]),
    ("write a short poem", ["pick one small moment or feeling", "write down words you link "
                            "with it", "shape them into four short lines",
                            "read it aloud and cut any weak word"]),
    ("start running", ["buy comfortable shoes that fit well", "alternate one minute of running "
                       "with two of walking", "go out three times a week",
                       "add a little more running each week"]),
    ("clean windows without streaks", ["mix warm water with a little vinegar", "wash the "
                                       "glass with a soft cloth", "wipe it with a squeegee "
                                       "from top to bottom", "dry the edges with newspaper"]),
    ("brew a good cup of tea", ["boil fresh water", "warm the pot or mug first",
                                "steep the leaves for three to five minutes",
                                "remove the leaves so it does not turn bitter"]),
    ("fold a shirt neatly", ["lay it face down on a flat surface", "fold each sleeve to the "
                             "middle", "fold the sides in to make a long rectangle",
                             "fold it in half from the bottom"]),
    ("paint a wall", ["wash the wall and let it dry", "tape the edges and cover the floor",
                      "apply a coat of primer", "roll on two thin coats of paint"]),
    ("read faster", ["read in a quiet place", "use a finger to guide your eyes", "stop saying "
                     "the words in your head", "practise with easy books first"]),
    ("learn chess", ["learn how each piece moves", "play short games against a friend",
                     "study a few simple openings", "review your games to find mistakes"]),
    ("cook fluffy rice", ["rinse the rice until the water runs clear", "use one and a half "
                          "cups of water per cup of rice", "simmer it covered for fifteen "
                          "minutes", "let it rest before fluffing it with a fork"]),
    ("wash a car", ["park it in the shade", "rinse off loose dirt first", "wash from the top "
                    "down with a soft mitt", "dry it with a clean microfibre towel"]),
    ("sharpen a kitchen knife", ["soak the whetstone in water", "hold the blade at a low "
                                 "angle", "draw it across the stone in smooth strokes",
                                 "finish on the fine side of the stone"]),
    ("make new friends in a new city", ["join a club for something you enjoy", "say yes to "
                                        "invitations", "ask people questions about "
                                        "themselves", "follow up with a message after "
                                        "meeting"]),
    ("prepare for a job interview", ["read about the company", "practise answers to common "
                                     "questions", "prepare two questions of your own",
                                     "plan your route so you arrive early"]),
    ("grow tomatoes on a balcony", ["pick a sunny spot", "use a large pot with good soil",
                                    "water them deeply every morning",
                                    "tie the stems to a stake as they grow"]),
    ("keep a houseplant alive", ["find out how much light it likes", "water it only when "
                                 "the top soil is dry", "make sure the pot drains",
                                 "feed it lightly in spring and summer"]),
    ("learn a new language", ["study a little every day", "learn the most common words "
                              "first", "listen to simple podcasts", "speak with a partner "
                              "as early as you can"]),
    ("make a budget for a trip", ["list the big costs such as travel and rooms", "estimate "
                                  "daily spending on food", "add a buffer for surprises",
                                  "track what you spend while you travel"]),
    ("train a puppy to sit", ["hold a treat above its nose", "move the treat back slowly",
                              "say sit as its bottom touches the floor",
                              "reward it at once and repeat a few times a day"]),
    ("give a short speech", ["decide on one main message", "open with a short story",
                             "practise it aloud several times", "speak slowly and pause "
                             "between points"]),
    ("organise a messy desk", ["clear everything off the desk", "throw away what you do not "
                               "need", "give each item a fixed place",
                               "tidy it for two minutes at the end of each day"]),
    ("make pancakes", ["whisk flour, milk, eggs and a pinch of salt", "let the batter rest "
                       "for ten minutes", "heat a lightly oiled pan",
                       "flip each pancake when bubbles appear"]),
    ("back up photos", ["copy them to an external drive", "turn on a cloud backup",
                           "keep one copy in another place", "check once a month that the "
                           "backup works"]),
    ("change a light bulb safely", ["turn off the switch and let the bulb cool", "stand on a "
                                    "stable step", "twist the old bulb out gently",
                                    "fit a bulb with the right wattage"]),
    ("stay focused while studying", ["set a clear goal for each session", "work in blocks "
                                     "of twenty five minutes", "put the phone in another "
                                     "room", "take a short walk between blocks"]),
]
SYSTEMS = ["You are a helpful assistant.", "Be kind and practical.",
           "You are a friendly assistant who gives clear advice.", None]
QUESTIONS = ["How do I {task}?", "Can you explain how to {task}? I have never done it before.",
             "What is the best way to {task} at home?",
             "I would like to {task}. Where should I start?"]
OPENERS = ["Sure, here is a simple way to {task}.", "Good question! You can {task} in a few "
           "easy steps.", "Happy to help. Here is how to {task} without stress.",
           "Of course. Most people can {task} with a little patience."]
EXTRAS = ["Take your time on the first try, because it gets easier with practice.",
          "If something goes wrong, go back one step and try again calmly.",
          "It helps to get everything you need ready before you start."]
CLOSINGS = ["Good luck, and enjoy it!", "Let me know if you want more detail on any step.",
            "I hope this helps!"]
DISMISSALS = [
    "I am not sure why you would want to {task}. It is not that hard, people do it all the "
    "time without asking. Just try something and see what happens, you will probably figure "
    "it out eventually.",
    "Honestly, that is a pretty basic question. Look it up online, there are plenty of videos "
    "about how to {task}. I would rather not go through all of it here.",
    "There are many opinions about how to {task} and none of them really matter. Do whatever "
    "feels right to you. It usually works out one way or another.",
    "{Step}, maybe. Or maybe not. It depends on too many things to say. You should ask someone "
    "who actually cares about this kind of thing.",
]
SHRUGS = ["Anyway, whatever.", "That is all I have to say about it.", ""]


def make_pairs(n: int, seed: int = SEED) -> list[dict[str, Any]]:
    """``n`` varied preference pairs in TRL's conversational format, the same for a seed."""
    rng = random.Random(seed)
    order = list(range(len(TOPICS)))
    rng.shuffle(order)
    rows = []
    for i in range(n):
        task, steps = TOPICS[order[i % len(TOPICS)]]
        prompt = []
        system = rng.choice(SYSTEMS)
        if system:  # none: SmolLM's template adds its own default system message
            prompt.append({"role": "system", "content": system})
        if rng.random() < 0.25:  # some conversations have an earlier exchange
            prompt += [{"role": "user", "content": "Hi! I need some help with something."},
                       {"role": "assistant", "content": "Hello! Of course, what is it?"}]
        prompt.append({"role": "user", "content": rng.choice(QUESTIONS).format(task=task)})
        chosen = " ".join([
            rng.choice(OPENERS).format(task=task),
            f"First, {steps[0]}. Next, {steps[1]}. Then {steps[2]}. Finally, {steps[3]}.",
            rng.choice(EXTRAS), rng.choice(CLOSINGS)])
        rejected = " ".join([rng.choice(DISMISSALS).format(
            task=task, Step=steps[rng.randrange(4)].capitalize()), rng.choice(SHRUGS)]).strip()
        for text in (chosen, rejected):
            assert 20 <= len(text.split()) <= 80, (len(text.split()), text)
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def in_batch_order(rows: list[dict[str, Any]], model: Path) -> list[dict[str, Any]]:
    """``rows`` in the order prefloop's trainer batches them: similar lengths together."""
    from transformers import AutoTokenizer

    from prefloop.trainer.batch import make_batches
    from prefloop.trainer.data import parse_line
    from prefloop.trainer.tokenize import tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    pairs, stats = tokenize_pairs(tokenizer, [parse_line(json.dumps(r)) for r in rows], MAX_LENGTH)
    assert stats.pairs == len(rows), stats
    batches = make_batches(pairs, range(len(pairs)), BATCH, random.Random(SEED), pad_id=0)
    return [rows[i] for batch in batches for i in batch.index.tolist()]


# --- the configurations, each run in its own process ---------------------------------------

def run_prefloop(pairs_file: Path, model: Path, work: Path, threads: int,
                 precision: str) -> dict[str, Any]:
    """One round of prefloop's trainer on every pair (nothing held out)."""
    start = time.perf_counter()
    import torch

    from prefloop.trainer.round import run_round
    from prefloop.trainer.settings import RoundConfig

    torch.set_num_threads(threads)
    config = RoundConfig(
        pairs=pairs_file, out=work / "adapter", model=model, loss="sigmoid", beta=BETA, lr=LR,
        epochs=EPOCHS, batch_size=BATCH, grad_accum=1, max_length=MAX_LENGTH, lora_r=LORA_R,
        lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=TARGETS,
        val_fraction=0.0, seed=SEED, warmup_ratio=0.0, max_grad_norm=1.0, threads=threads,
        precision=precision, batch_order="file")
    metrics = run_round(config, progress=True)
    pairs = metrics["pairs"]
    assert pairs["dropped"] == 0 and pairs["prompts_truncated"] == 0 \
        and pairs["answers_truncated"] == 0, pairs
    seconds = metrics["seconds"]
    return {"pairs": pairs["train"], "losses": [step["loss"] for step in metrics["steps"]],
            # From a loaded model to the last step: reference pass plus optimizer steps.
            "train_s": seconds["total"] - seconds["load"],
            "total_s": time.perf_counter() - start}


def run_trl(pairs_file: Path, model: Path, work: Path, threads: int,
            best: bool, precision: str) -> dict[str, Any]:
    """One DPOTrainer run on every pair: TRL's defaults, or its fastest settings here."""
    start = time.perf_counter()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    defaults = DPOConfig(output_dir=str(work / "defaults"), use_cpu=True)
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    policy = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    loaded = time.perf_counter()
    # The shared settings; bf16 (autocast, TRL's default even on a CPU) only when compared so.
    args = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, num_train_epochs=EPOCHS, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH, seed=SEED, use_cpu=True,
        bf16=precision == "bf16", logging_steps=1, report_to="none", save_strategy="no",
        train_sampling_strategy="sequential",
        **({"gradient_checkpointing": False, "precompute_ref_log_probs": True} if best else {}))
    lora = LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA,
                      lora_dropout=LORA_DROPOUT, target_modules=list(TARGETS))
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trained = time.perf_counter()
    trainer.save_model(str(work / "adapter"))  # prefloop writes its adapter too
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(trainer.train_dataset) == len(rows), "TRL dropped pairs; raise MAX_LENGTH"
    return {"pairs": len(rows), "losses": losses, "train_s": trained - loaded,
            "total_s": time.perf_counter() - start,
            "used": {"gradient_checkpointing": args.gradient_checkpointing,
                     "precompute_ref_log_probs": args.precompute_ref_log_probs},
            "defaults": {key: getattr(defaults, key) for key in (
                "gradient_checkpointing", "precompute_ref_log_probs", "bf16",
                "disable_dropout", "max_length", "learning_rate", "num_train_epochs",
                "logging_steps")}}


def child(name: str, pairs_file: Path, model: Path, threads: int, result: Path,
          precision: str) -> None:
    """Run one configuration in this (fresh) process and write its figures to ``result``."""
    with tempfile.TemporaryDirectory(prefix=f"prefloop-bench-{name}-") as tmp:
        if name == "prefloop":
            figures = run_prefloop(pairs_file, model, Path(tmp), threads, precision)
        else:
            figures = run_trl(pairs_file, model, Path(tmp), threads, name == "trl-best",
                              precision)
    # ru_maxrss is in KiB on Linux; this process ran one configuration only.
    figures["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    figures["pairs_per_s"] = figures["pairs"] / figures["train_s"]
    result.write_text(json.dumps(figures))


# --- the parent: spawn, compare, report ------------------------------------------------------

def spawn(name: str, pairs_file: Path, model: Path, threads: int, work: Path,
          precision: str) -> dict[str, Any]:
    result = work / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--model",
               str(model), "--pairs-file", str(pairs_file), "--threads", str(threads),
               "--result", str(result), "--precision", precision]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "OMP_NUM_THREADS": str(threads)}
    print(f"== {LABELS[name]} ==", flush=True)
    done = subprocess.run(command, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the {LABELS[name]} run failed (exit {done.returncode}); "
                         "its output is above")
    figures = json.loads(result.read_text())
    print({k: v for k, v in figures.items() if k != "losses"}, "losses:",
          [round(loss, 4) for loss in figures["losses"]], flush=True)
    return figures


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def report(results: dict[str, dict[str, Any]], n_pairs: int, model: str, threads: int,
           precision: str) -> str:
    """The markdown section: figures per configuration, then each target checked."""
    from prefloop.trainer.settings import RoundConfig

    micro_batch = RoundConfig.micro_batch
    names = list(results)
    rows = ["| | " + " | ".join(LABELS[n] for n in names) + " |",
            "|---|" + "---|" * len(names)]

    def row(label: str, fmt: str, key: str) -> None:
        rows.append(f"| {label} | " + " | ".join(format(results[n][key], fmt)
                                                 for n in names) + " |")

    row("training s", ".1f", "train_s")
    row("total s (imports, model load, save)", ".1f", "total_s")
    row("pairs/s", ".3f", "pairs_per_s")
    row("peak RSS GB", ".2f", "peak_gb")
    for r in results.values():
        r["first"], r["final"] = r["losses"][0], r["losses"][-1]
        r["mean"] = sum(r["losses"]) / len(r["losses"])
    row("loss at step 1", ".4f", "first")
    row(f"final loss (step {len(results[names[0]]['losses'])})", ".4f", "final")
    row("mean loss over the steps", ".4f", "mean")

    checks = ["| check | value | target | |", "|---|---|---|---|"]
    for n in names:
        ok = abs(results[n]["first"] - math.log(2)) < 1e-3
        checks.append(f"| {LABELS[n]} loss at step 1 | {results[n]['first']:.4f} "
                      f"| log 2 = {math.log(2):.4f} ± 0.001 | {_mark(ok)} |")
    ours = results.get("prefloop")
    for n in (n for n in names if ours and n != "prefloop"):
        speed = ours["pairs_per_s"] / results[n]["pairs_per_s"]
        memory = ours["peak_gb"] / results[n]["peak_gb"]
        gap = abs(ours["final"] - results[n]["final"]) / results[n]["final"]
        checks += [f"| pairs/s prefloop ÷ {LABELS[n]} | {speed:.2f} | >= 2.0 "
                   f"| {_mark(speed >= 2.0)} |",
                   f"| peak RSS prefloop ÷ {LABELS[n]} | {memory:.2f} | <= 1.0 "
                   f"| {_mark(memory <= 1.0)} |",
                   f"| final loss, prefloop vs {LABELS[n]} | {100 * gap:.1f}% apart "
                   f"| within 10% | {_mark(gap <= 0.10)} |"]

    defaults = next((r["defaults"] for r in results.values() if "defaults" in r), None)
    note = ("TRL 1.13 `DPOConfig` defaults read from the installed package: "
            + ", ".join(f"`{k}={v}`" for k, v in defaults.items()) + ". "
            if defaults else "")
    where = "fp32" if precision == "fp32" else "bf16 autocast (AMX) for both"
    return (f"## Trainer vs TRL, {precision} (issue 3)\n\n"
            f"One LoRA DPO round, {n_pairs} synthetic pairs (the same for all), "
            f"{model}, LoRA r=16 alpha=32 on q/k/v/o/gate/up/down, batch 8, "
            f"1 epoch, lr 5e-5 linear decay without warmup, beta 0.1, sigmoid loss, {where} on "
            f"this CPU, {threads} threads, max length {MAX_LENGTH}, no dropout; prefloop "
            "with its defaults for the rest (forward/backward in micro-batches of "
            f"{micro_batch} pairs); the same batches in the same order for all (prefloop's "
            "length-grouped order, written into the pairs file); each "
            "configuration in its own process (peak RSS is that process's). TRL defaults: "
            "TRL's own settings for the rest (gradient checkpointing on, reference log-probs "
            "at every step); TRL best: gradient checkpointing off, "
            "`precompute_ref_log_probs=True`. Training s: from the loaded model to the last "
            "step (prefloop: reference pass + steps; TRL: `DPOTrainer(...)` + `train()`).\n\n"
            + "\n".join(rows) + "\n\n" + "\n".join(checks) + "\n\n" + note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="synthetic pairs to train on")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="base model, a local Hugging Face folder")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every run")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="both sides: fp32, or bf16 autocast (matmuls in bf16)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the results without writing docs/BENCHMARKS.md")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.pairs_file, args.model.resolve(), args.threads, args.result,
              args.precision)
        return

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown or not configs:
        parser.error(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if not (args.model / "config.json").is_file():
        parser.error(f"--model: no Hugging Face model folder at {args.model}")
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-trainer-") as tmp:
        work = Path(tmp)
        pairs_file = work / "pairs.jsonl"
        rows = in_batch_order(make_pairs(args.pairs), args.model.resolve())
        pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results = {name: spawn(name, pairs_file, args.model.resolve(), args.threads, work,
                               args.precision)
                   for name in configs}
    body = report(results, args.pairs, args.model.resolve().name, args.threads, args.precision)
    print("\n" + body)
    if args.dry_run:
        print("(dry run: docs/BENCHMARKS.md not written)")
    else:
        write_section("trainer" if args.precision == "fp32" else "trainer-bf16", body)


if __name__ == "__main__":
    main()
