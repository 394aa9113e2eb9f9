"""How fast an adapter answers on vLLM's CPU build, by LoRA rank (notes behind train_lora_rank).

For each rank: an adapter of that rank on q/k/v/o/gate/up/down of the embedded model (random
weights: speed does not depend on them), a vLLM started with ``--max-lora-rank`` equal to
it, and 48 answers of 40 tokens at once (the simulation's batch), from base and from the
adapter, alternating twice. Reported: tokens per second, and the adapter's speed as a share
of base's in the same server (a ratio: this machine is noisy).

    .venv/bin/python bench/lora_rank.py [--ranks 8 16] [--dry-run]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402
from prefloop.serving.adapters import AdapterPool  # noqa: E402
from prefloop.serving.models import prepare_model  # noqa: E402
from prefloop.serving.sampler import PairSampler, Sampling  # noqa: E402
from prefloop.serving.vllm_server import VLLMServer  # noqa: E402
from prefloop.trainer.settings import DEFAULT_TARGET_MODULES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"Tell me something kind about the number {i}." for i in range(48)]
TOKENS = 40


def random_adapter(model: Path, rank: int, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model),
        LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
                   target_modules=list(DEFAULT_TARGET_MODULES)))
    for name, weight in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a trained adapter's is not
            torch.nn.init.normal_(weight, std=1e-4)
    peft_model.save_pretrained(out)


async def tokens_per_second(sampler: PairSampler, policy: str) -> float:
    start = time.perf_counter()
    answers = await asyncio.gather(*(
        sampler.answer([{"role": "user", "content": prompt}], policy, seed=7 + k)
        for k, prompt in enumerate(PROMPTS)))
    return sum(a.tokens or 0 for a in answers) / (time.perf_counter() - start)


def measure(model: Path, rank: int, folder: Path) -> dict[str, float]:
    random_adapter(model, rank, folder / "adapter")
    with VLLMServer(model, folder / "run", lora_max_rank=rank) as server:
        pool = AdapterPool(server.endpoint, model, rank)
        pool.load("v1", folder / "adapter")

        async def run() -> dict[str, list[float]]:
            sampler = PairSampler(server.endpoint, sampling=Sampling(1.0, 1.0, TOKENS),
                                  max_model_len=2048, model_name=pool.served_name)
            speeds: dict[str, list[float]] = {"base": [], "v1": []}
            try:
                await tokens_per_second(sampler, "base")  # warm-up
                for policy in ("base", "v1", "base", "v1"):
                    speeds[policy].append(await tokens_per_second(sampler, policy))
            finally:
                await sampler.close()
            return speeds

        speeds = asyncio.run(run())
        pool.close()
    base, lora = statistics.fmean(speeds["base"]), statistics.fmean(speeds["v1"])
    return {"rank": rank, "base": base, "lora": lora, "share": lora / base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    model = prepare_model("embedded", ROOT / ".cache" / "test" / "models", progress=print)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-rank-") as tmp:
        for rank in args.ranks:
            rows.append(measure(model, rank, Path(tmp) / f"r{rank}"))
            print(rows[-1], flush=True)
    lines = ["| LoRA rank (= `--max-lora-rank`) | base tokens/s | adapter tokens/s "
             "| adapter / base |", "|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['base']:.0f} | {r['lora']:.0f} | {r['share']:.2f} |"
              for r in rows]
    body = (f"## LoRA rank and answer speed on this CPU (notes behind `train_lora_rank`)\n\n"
            f"{len(PROMPTS)} answers of {TOKENS} tokens at once, from base and from an "
            f"adapter on q/k/v/o/gate/up/down, in one vLLM started with `--max-lora-rank` "
            f"equal to the adapter's rank; means of two alternating passes.\n\n"
            + "\n".join(lines) + "\n")
    print(body)
    if not args.dry_run:
        write_section("lora-rank", body)


if __name__ == "__main__":
    main()
