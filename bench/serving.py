"""Message-to-both-answers time through prefloop's /api/v1/pairs vs asking vLLM directly.

Both sides make the same request to the same vLLM: one chat completion with n=2, streamed,
same seed, same sampling, so the answers (and the work) are identical; the difference is
prefloop's overhead (validation, context fitting, storage). Batches alternate between the
two sides so drift on this noisy machine hits both. Target: ratio <= 1.10 at 1 and 8 clients.

    .venv/bin/python bench/serving.py [--rounds 3] [--requests 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import write_section  # noqa: E402
from prefloop.serving.models import prepare_model  # noqa: E402
from prefloop.serving.vllm_server import VLLMServer  # noqa: E402
from tests.conftest import ServeProcess  # noqa: E402

PROMPTS = ["Give me a tip for sleeping better.", "What is a good name for a dog?",
           "Explain rain to a child.", "Suggest a quick breakfast.",
           "How do I start running?", "Write a two-line poem about tea.",
           "Why is the sea salty?", "Recommend a board game for four people."]
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 64}


async def direct(client: AsyncOpenAI, prompt: str, seed: int) -> float:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": prompt}], n=2, seed=seed,
        stream=True, extra_body={"return_token_ids": True}, **SAMPLING)
    async for _ in stream:
        pass
    return time.perf_counter() - start


async def through_api(http: httpx.AsyncClient, url: str, prompt: str, seed: int) -> float:
    start = time.perf_counter()
    response = await http.post(url + "/api/v1/pairs", json={"message": prompt, "seed": seed})
    response.raise_for_status()
    return time.perf_counter() - start


async def run(vllm: VLLMServer, serve_url: str, rounds: int, requests: int) -> list[dict]:
    client = AsyncOpenAI(base_url=vllm.endpoint.v1, api_key=vllm.api_key, timeout=600)
    http = httpx.AsyncClient(timeout=600)
    results = []
    for clients in (1, 8):
        times: dict[str, list[float]] = {"api": [], "direct": []}
        await through_api(http, serve_url, "warm up", 1)
        await direct(client, "warm up", 1)
        for r in range(rounds):
            # Alternate which side goes first each round.
            for side in (("api", "direct") if r % 2 == 0 else ("direct", "api")):
                for k in range(requests):
                    jobs = []
                    for c in range(clients):
                        prompt, seed = PROMPTS[(c + k) % len(PROMPTS)], 1000 * r + 10 * k + c
                        jobs.append(through_api(http, serve_url, prompt, seed) if side == "api"
                                    else direct(client, prompt, seed))
                    times[side] += await asyncio.gather(*jobs)
        api, dir_ = statistics.mean(times["api"]), statistics.mean(times["direct"])
        results.append({"clients": clients, "n": len(times["api"]), "api_s": api,
                        "direct_s": dir_, "api_p95": _p95(times["api"]),
                        "direct_p95": _p95(times["direct"]), "ratio": api / dir_})
        print(results[-1], flush=True)
    await client.close()
    await http.aclose()
    return results


def _p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    model = prepare_model("embedded", Path(".cache/test/models"))
    with VLLMServer(model, work / "vllm") as vllm:
        serve = ServeProcess(work / "serve", ["--vllm-url", vllm.endpoint.url,
                                              "--vllm-api-key", vllm.api_key,
                                              "--max-tokens", str(SAMPLING["max_tokens"]),
                                              "--temperature", str(SAMPLING["temperature"]),
                                              "--top-p", str(SAMPLING["top_p"])])
        try:
            serve.wait_ready()
            results = asyncio.run(run(vllm, serve.url, args.rounds, args.requests))
        finally:
            serve.stop()
    rows = ["| clients | requests per side | /api/v1/pairs mean (p95) | vLLM direct mean (p95) "
            "| ratio | target |", "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['clients']} | {r['n']} | {r['api_s']:.2f} s ({r['api_p95']:.2f} s) "
                    f"| {r['direct_s']:.2f} s ({r['direct_p95']:.2f} s) | {r['ratio']:.3f} "
                    f"| <= 1.10 {'✅' if r['ratio'] <= 1.10 else '❌'} |")
    write_section("serving", "## Serving overhead (issue 2)\n\nMessage to both answers "
                  "(n=2, 64 tokens max, same seeds) through `POST /api/v1/pairs` vs the same "
                  "streamed completion asked of vLLM directly, embedded model, this CPU "
                  "(2 cores):\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
