"""Tokens per second of vLLM's CPU build by serving precision, in one run.

One vLLM at a time, as prefloop starts it, on the embedded model; each configuration
answers the same 16 prompts with n=2 and 64 tokens (same seeds, ``ignore_eos`` so every
configuration decodes the same number of tokens), after one warm-up batch. Configurations:
bf16 and fp32 with LoRA enabled (as prefloop serves), and fp32 without LoRA. ``--rehearse-avx2``
runs vLLM with torch's and oneDNN's kernels held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``) and prefloop told the CPU has no native bf16, an approximation
of a CPU without AVX-512: vLLM's own C++ kernels still use what the CPU has.

    .venv/bin/python bench/serving_dtype.py [--repeats 2] [--rehearse-avx2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402
from prefloop.hardware import NO_NATIVE_BF16_ENV, cpu_flags, cpu_has_native_bf16  # noqa: E402
from prefloop.serving.models import prepare_model  # noqa: E402
from prefloop.serving.vllm_server import VLLMServer  # noqa: E402

PROMPTS = [f"Tell me something interesting about the number {k}." for k in range(16)]
TOKENS = 64
CONFIGS = [("bfloat16", True), ("float32", True), ("float32", False)]
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


async def batch(client: AsyncOpenAI) -> int:
    """All prompts at once, n=2 each; the number of tokens decoded."""
    async def one(k: int, prompt: str) -> int:
        reply = await client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": prompt}], n=2, seed=k,
            max_tokens=TOKENS, temperature=0.8, extra_body={"ignore_eos": True})
        return reply.usage.completion_tokens
    return sum(await asyncio.gather(*(one(k, p) for k, p in enumerate(PROMPTS))))


async def measure(server: VLLMServer, repeats: int) -> float:
    client = AsyncOpenAI(base_url=server.endpoint.v1, api_key=server.api_key, timeout=900)
    await batch(client)  # warm-up
    tokens, seconds = 0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens += await batch(client)
        seconds += time.perf_counter() - start
    await client.close()
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rehearse-avx2", action="store_true")
    args = parser.parse_args()
    if args.rehearse_avx2:
        os.environ.update(AVX2_ENV)  # vLLM inherits it
        os.environ[NO_NATIVE_BF16_ENV] = "1"  # what prefloop ships there: fp32
    model = prepare_model("embedded", Path(".cache/test/models"))
    work = Path(tempfile.mkdtemp(prefix="prefloop-dtype-"))
    rows = []
    for dtype, lora in CONFIGS:
        with VLLMServer(model, work / f"{dtype}-{lora}", dtype=dtype, lora=lora) as server:
            rate = asyncio.run(measure(server, args.repeats))
        rows.append((dtype, lora, rate))
        print(f"{dtype} lora={lora}: {rate:.1f} tokens/s", flush=True)
    bf16 = rows[0][2]
    native = cpu_has_native_bf16()
    shipped = "bfloat16" if native else "float32"
    isa = "avx512_bf16" if "avx512_bf16" in cpu_flags() else \
        "avx512f" if "avx512f" in cpu_flags() else "avx2"
    where = ("torch/oneDNN held to AVX2 (rehearsal)" if args.rehearse_avx2
             else f"this CPU ({isa}, native bf16: {'yes' if native else 'no'})")
    table = ["| vLLM dtype | LoRA enabled | tokens/s | vs bf16 with LoRA | as shipped here |",
             "|---|---|---|---|---|"]
    for dtype, lora, rate in rows:
        table.append(f"| {dtype} | {'yes' if lora else 'no'} | {rate:.1f} | {rate / bf16:.2f}x "
                     f"| {'✅' if lora and dtype == shipped else ''} |")
    write_section("serving-dtype-avx2" if args.rehearse_avx2 else "serving-dtype",
                  f"## Serving precision ({where})\n\n16 prompts × n=2 × {TOKENS} tokens, "
                  f"{args.repeats} batches after a warm-up, one vLLM at a time as prefloop "
                  "starts it. `serve_dtype = \"auto\"` serves bfloat16 where the CPU has "
                  "AVX512-BF16 or AMX, float32 elsewhere.\n\n" + "\n".join(table))


if __name__ == "__main__":
    main()
