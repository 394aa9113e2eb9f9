"""What an oracle's votes teach, read off base's own pairs (issue 14).

DPO learns whatever separates the chosen answers from the rejected ones. This tallies an
oracle's votes on the pairs a first round would get (recipe_lab's cached base pairs: two
answers per training prompt, temperature 1, top-p 0.95, 40 tokens) by whether each answer
finished its sentence, and for the decisive ones compares the winner's and the loser's
fluency (mean log-prob per token under base) and words. A vote that reliably picks the less
fluent answer teaches the loop to write less like a language model: gibberish.

    python bench/oracle_pairs.py --oracle concise_until_2026_12_04 --oracle concise

Writes its table into docs/BENCHMARKS.md ("What the concise votes teach").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from recipe_lab import ORACLES, base_pairs, score  # noqa: E402

from bench.report import write_section  # noqa: E402
from prefloop.serving.models import prepare_model  # noqa: E402
from prefloop.sim.oracles import is_complete, load_oracle  # noqa: E402


def fluency(model: object, tokenizer: object, prompts: list[str],
            answers: list[str]) -> list[float]:
    """Each answer's mean log-prob per token under base."""
    ids = [tokenizer(a, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
           for a in answers]
    return [s["base"] / s["tokens"] for s in score(model, tokenizer, prompts, ids)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--oracle", action="append", required=True,
                        help="built-in, a bench/oracles.py name, or module:function; repeat")
    parser.add_argument("--seed", type=int, default=0, help="which cached base pairs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = prepare_model("embedded", ROOT / ".cache" / "test" / "models")
    data = base_pairs(args.seed, 0, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [p for p in data["prompts"] for _ in range(2)]
    flu = fluency(model, tokenizer, prompts, data["answers"])
    rows = []
    for spec in args.oracle:
        oracle = load_oracle(ORACLES.get(spec, spec))
        kinds: dict[str, list[tuple[float, float, int, int]]] = defaultdict(list)
        undecided: dict[str, int] = defaultdict(int)
        for i, prompt in enumerate(data["prompts"]):
            a, b = data["answers"][2 * i], data["answers"][2 * i + 1]
            finished = sum(map(is_complete, (a, b)))
            kind = ("neither", "one", "both")[finished] + " finished"
            vote = oracle([{"role": "user", "content": prompt}], a, b)
            if vote not in ("a", "b"):
                undecided[kind] += 1
                continue
            w, l_ = (2 * i, 2 * i + 1) if vote == "a" else (2 * i + 1, 2 * i)
            kinds[kind].append((flu[w], flu[l_], len(data["answers"][w].split()),
                                len(data["answers"][l_].split())))
        for kind in ("neither finished", "one finished", "both finished"):
            won = kinds[kind]
            if not won:
                rows.append(f"| {spec} | {kind} | 0 | {undecided[kind]} | – | – | – |")
                continue
            mean = [statistics.fmean(r[j] for r in won) for j in range(4)]
            rows.append(f"| {spec} | {kind} | {len(won)} | {undecided[kind]} "
                        f"| {mean[0]:.2f} / {mean[1]:.2f} "
                        f"| {sum(r[0] < r[1] for r in won)} of {len(won)} "
                        f"| {mean[2]:.1f} / {mean[3]:.1f} |")
    body = ("### What the concise votes teach (`bench/oracle_pairs.py`)\n\n"
            f"Base's {len(data['prompts'])} first-round pairs of seed {args.seed} (two answers "
            "per training prompt, temperature 1, top-p 0.95, 40 tokens), by how many of the "
            "two answers finished their sentence; for the decisive votes, the winner's and the "
            "loser's fluency (mean log-prob per token under base) and words.\n\n"
            "| oracle | pair | decisive | tie / both bad | fluency winner / loser "
            "| winner less fluent | words winner / loser |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows))
    print(body)
    write_section("oracle-pairs", body)


if __name__ == "__main__":
    main()
