"""The champion's pairs on a plain vLLM (``champion_engine = "merged"``) against today's LoRA
engine, and the blue-green switch under load (issue 15, part B).

Part 1, speed. Four vLLM engines of the embedded model, started one after another and then
measured in turns (``--rounds`` rounds, each engine once a round, so that drift on this noisy
machine hits all of them alike):

- ``plain``: no LoRA, all cores, serving ``base``: the reference, a plain model;
- ``lora``: LoRA enabled, all cores (today's single replica), serving ``base`` (the
  champion before any promotion) and a rank-8 adapter on the trainer's modules (after one);
- ``merged``: no LoRA, on the cores ``champion_engine = "merged"`` gives it (on a CPU the
  share after the LoRA replica's: one of two cores here), serving ``base`` and then the
  adapter merged into the weights (``serving/merged.py``), two engines.

Each measure is a sample pair as the page asks for it (one streamed chat completion with
n=2, ``--tokens`` tokens per answer with ``ignore_eos`` so that every engine does the same
work): the median time of ``--single`` pairs one after another (what one visitor waits), and
pairs/s with ``--clients`` visitors at once. Reported: each against ``plain`` (target:
champion / plain <= 1.1 before and after a promotion), the merged engine also against a
plain engine on its own cores, start time and memory of each engine.

Part 2, the switch. A real ``prefloop serve --champion-engine merged`` (the champion's turns
only: no duels, no baseline), ``--visitors`` visitors asking for pairs and voting without
pause; an adapter is promoted by the admin API while they go on: the merge, the green
engine's start and health check, the switch, blue's drain. Counted: every request by outcome
(target: 0 failed), the pairs each engine answered, the time from the promotion to the merged
engine taking the traffic, the green engine's start time and memory.

Run it alone on the machine (about 15 minutes on 2 cores):

    .venv/bin/python bench/champion.py              # writes docs/BENCHMARKS.md
    .venv/bin/python bench/champion.py --dry-run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.lora_rank import random_adapter  # noqa: E402
from bench.report import write_section  # noqa: E402
from prefloop.config import ADMIN_PASSWORD_ENV, Settings  # noqa: E402
from prefloop.names import BASE  # noqa: E402
from prefloop.serving.merged import ensure_merged  # noqa: E402
from prefloop.serving.models import prepare_model  # noqa: E402
from prefloop.serving.vllm_server import (  # noqa: E402
    VLLMServer,
    group_rss,
    is_cpu_build,
    replica_env,
)
from prefloop.storage.store import Store  # noqa: E402
from tests.conftest import START_TIMEOUT, ServeProcess, wait_for  # noqa: E402
from tests.replica_drill import Burst, Request  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = "v0001"
PASSWORD = "bench-champion"
PROMPTS = ["Give me a tip for sleeping better.", "What is a good name for a dog?",
           "Explain rain to a child.", "Suggest a quick breakfast.",
           "How do I start running?", "Write a two-line poem about tea.",
           "Why is the sea salty?", "Recommend a board game for four people."]


@dataclass
class Engine:
    """A started vLLM and the policies measured on it."""

    name: str
    server: VLLMServer
    start_seconds: float
    cores: str
    memory_bytes: int | None = None  # its process group's, once measured


@dataclass
class Config:
    """One policy on one engine: the times measured for it."""

    label: str
    engine: Engine
    model: str  # the name the engine serves it under
    single: list[float] = field(default_factory=list)  # seconds per pair, one at a time
    rates: list[float] = field(default_factory=list)  # pairs/s with many visitors

    @property
    def median(self) -> float:
        return statistics.median(self.single)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


async def pair(client: AsyncOpenAI, model: str, prompt: str, seed: int, tokens: int) -> float:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], n=2, seed=seed,
        stream=True, temperature=0.8, top_p=0.95, max_tokens=tokens,
        extra_body={"ignore_eos": True})
    async for _ in stream:
        pass
    return time.perf_counter() - start


async def measure(config: Config, args: argparse.Namespace, round_: int) -> None:
    endpoint = config.engine.server.endpoint
    client = AsyncOpenAI(base_url=endpoint.v1, api_key=endpoint.api_key, timeout=600)
    try:
        await pair(client, config.model, "warm up", 0, 4)
        for k in range(args.single):
            config.single.append(await pair(client, config.model, PROMPTS[k % len(PROMPTS)],
                                            1000 * round_ + k, args.tokens))
        start = time.perf_counter()
        await asyncio.gather(*(pair(client, config.model, PROMPTS[k % len(PROMPTS)],
                                    2000 * round_ + k, args.tokens)
                               for k in range(args.clients)))
        config.rates.append(args.clients / (time.perf_counter() - start))
    finally:
        await client.close()


def start(name: str, model: Path, work: Path, *, lora: bool, served: str = BASE,
          env: dict[str, str] | None = None, fraction: float) -> Engine:
    server = VLLMServer(model, work / "logs", lora=lora, served_name=served, name=name,
                        memory_fraction=fraction, env=env, start_timeout=START_TIMEOUT)
    began = time.monotonic()
    server.start()
    seconds = time.monotonic() - began
    cores = (env or {}).get("VLLM_CPU_OMP_THREADS_BIND") or (env or {}).get(
        "CUDA_VISIBLE_DEVICES") or "all"
    print(f"  {name}: up in {seconds:.0f} s (cores {cores})", flush=True)
    return Engine(name, server, seconds, cores)


def speed(model: Path, work: Path, args: argparse.Namespace) -> list[Config]:
    """Part 1: the four engines, measured in turns."""
    settings = Settings()
    adapter = work / "adapter"
    random_adapter(model, 8, adapter)
    merged = ensure_merged(ADAPTER, adapter, model, work / "merged")
    # The champion engine's share, as `prefloop serve` gives it beside one LoRA replica.
    share = replica_env(1, 2, cpu_build=is_cpu_build(), cpus=sorted(os.sched_getaffinity(0)),
                        visible_gpus=os.environ.get("CUDA_VISIBLE_DEVICES"))
    fraction = args.memory_fraction
    engines: list[Engine] = []
    try:
        plain = start("plain", model, work, lora=False, fraction=fraction)
        engines.append(plain)
        lora = start("lora", model, work, lora=True, fraction=fraction)
        engines.append(lora)
        merged_base = start("merged-base", model, work, lora=False, env=share,
                            fraction=fraction)
        engines.append(merged_base)
        merged_adapter = start("merged-adapter", merged, work, lora=False, env=share,
                               served=ADAPTER, fraction=fraction)
        engines.append(merged_adapter)
        lora_name = f"{settings.adapter_prefix}-{ADAPTER}"
        response = httpx.post(lora.server.endpoint.v1 + "/load_lora_adapter", timeout=300,
                              headers={"Authorization": f"Bearer {lora.server.api_key}"},
                              json={"lora_name": lora_name, "lora_path": str(adapter)})
        response.raise_for_status()
        configs = [Config("plain vLLM, base", plain, BASE),
                   Config("LoRA engine, base (lora: before a promotion)", lora, BASE),
                   Config("LoRA engine, adapter (lora: after)", lora, lora_name),
                   Config("plain engine on its share, base (merged: before)", merged_base,
                          BASE),
                   Config("plain engine on its share, merged adapter (merged: after)",
                          merged_adapter, ADAPTER)]
        for r in range(args.rounds):
            for config in configs:
                asyncio.run(measure(config, args, r))
            print(f"  round {r + 1}: " + ", ".join(
                f"{c.engine.name}/{c.model}: {c.median:.2f} s" for c in configs), flush=True)
        for engine in engines:
            engine.memory_bytes = group_rss(engine.server.pid) if engine.server.pid else None
        return configs
    finally:
        for engine in engines:
            engine.server.stop()


@dataclass
class Switch:
    log: list[Request]
    to_traffic: float  # seconds from the promotion to the merged engine taking the traffic
    drained: float  # ... to blue stopped
    green: dict  # the green engine's row (start_seconds, memory_bytes)
    by_engine: Counter


def switch(model: Path, work: Path, args: argparse.Namespace) -> Switch:
    """Part 2: a promotion under load with ``champion_engine = "merged"``."""
    data_dir = work / "serve"
    adapter = data_dir / "adapters" / ADAPTER
    random_adapter(model, 8, adapter)
    with Store(data_dir / "prefloop.db") as store:
        store.add_adapter(ADAPTER, adapter, None, BASE)
    env = os.environ | {ADMIN_PASSWORD_ENV: PASSWORD, "HF_HUB_OFFLINE": "1"}
    serve = ServeProcess(data_dir, [
        "--model", str(model), "--champion-engine", "merged", "--max-tokens", "32",
        "--duel-share", "0", "--baseline-share", "0", "--train-every", "10000",
        "--pairs-per-minute", "0", "--votes-per-minute", "0"], env=env)
    url = serve.url
    try:
        serve.wait_ready(timeout=2 * START_TIMEOUT)

        def engine() -> dict:
            return httpx.get(url + "/api/v1/stats", timeout=60).json()["loop"]["champion_engine"]

        wait_for(lambda: engine()["policy"] == BASE and engine()["up"], START_TIMEOUT,
                 "the plain engine to serve base")
        print("  serving base on the plain engine", flush=True)
        served = Counter()
        with Burst(url, args.visitors) as burst:
            wait_for(lambda: len(burst.pairs()) >= args.visitors, 600, "the visitors' pairs")
            promoted = time.monotonic()
            reply = httpx.post(url + "/api/v1/admin/promote", json={"policy": ADAPTER},
                               headers={"Authorization": f"Bearer {PASSWORD}"}, timeout=600)
            if reply.status_code != 200:
                raise SystemExit(f"promotion refused: {reply.text}")
            wait_for(lambda: engine()["policy"] == ADAPTER, 2 * START_TIMEOUT,
                     "the merged engine to take the traffic", poll=0.2)
            to_traffic = time.monotonic() - promoted
            print(f"  merged engine serving after {to_traffic:.0f} s", flush=True)
            wait_for(lambda: len(engine()["engines"]) == 1, 600, "blue to drain and stop",
                     poll=0.2)
            drained = time.monotonic() - promoted
            after = time.monotonic()
            wait_for(lambda: len(burst.pairs(since=after, policy=ADAPTER)) >= args.visitors,
                     600, "pairs from the merged engine")
        [green] = engine()["engines"]
        for r in burst.log():
            if r.kind == "pair" and r.ok:
                served[r.policy] += 1
        return Switch(burst.log(), to_traffic, drained, green, served)
    finally:
        serve.stop()


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}"


def report(configs: list[Config], sw: Switch, args: argparse.Namespace) -> tuple[str, bool]:
    plain, lora_base, lora_adapter, merged_base, merged_adapter = configs
    rows = ["| engine, policy | cores | s per pair, 1 visitor | ÷ plain | pairs/s, "
            f"{args.clients} visitors | plain ÷ it |", "|---|---|---|---|---|---|"]
    for c in configs:
        rows.append(f"| {c.label} | {c.engine.cores} | {c.median:.2f} | "
                    f"{ratio(c.median, plain.median)} | {c.rate:.2f} | "
                    f"{ratio(plain.rate, c.rate)} |")
    engines = {c.engine.name: c.engine for c in configs}
    mem = ", ".join(f"{n} {e.start_seconds:.0f} s and "
                    f"{(e.memory_bytes or 0) / 2**30:.2f} GiB"
                    for n, e in engines.items())
    outcomes = Counter("ok" if r.ok else f"{r.kind} {r.status}"
                       + (" with Retry-After" if r.retry_after else "") for r in sw.log)
    failed = sum(not r.ok for r in sw.log)
    same_cores = merged_adapter.median / merged_base.median
    after = {"lora": lora_adapter.median / plain.median,
             "merged": merged_adapter.median / plain.median}
    before = {"lora": lora_base.median / plain.median,
              "merged": merged_base.median / plain.median}
    met = failed == 0
    body = f"""## The champion engine (issue 15, part B)

Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; the embedded
model, fp32/bf16 as `serve_dtype = auto` picks; sample pairs of 2 × {args.tokens} tokens
(`ignore_eos`), the median of {args.rounds} rounds taken in turns.

{chr(10).join(rows)}

Champion ÷ plain, one visitor: **lora** (today) {before['lora']:.2f} before a promotion,
{after['lora']:.2f} after; **merged** {before['merged']:.2f} before, {after['merged']:.2f}
after against a plain vLLM on all cores, and {same_cores:.2f} against a plain engine on its
own cores (the merged model costs what base costs). Start time and memory (whole process
group): {mem}.

The switch under load (`prefloop serve --champion-engine merged`, {args.visitors} visitors
asking for pairs and voting without pause, an adapter promoted by the admin API): the merged
engine took the traffic {sw.to_traffic:.0f} s after the promotion (merge, start, health
check, one answer), blue had drained and stopped at {sw.drained:.0f} s; requests:
{dict(outcomes)}; **{failed} failed**; pairs answered by policy: {dict(sw.by_engine)}. The
green engine: started in {sw.green.get('start_seconds')} s, {(sw.green.get('memory_bytes')
or 0) / 2**30:.2f} GiB.
"""
    return body, met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single", type=int, default=4, help="pairs one after another")
    parser.add_argument("--clients", type=int, default=8, help="pairs at once")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--visitors", type=int, default=4, help="visitors during the switch")
    parser.add_argument("--memory-fraction", type=float, default=0.12,
                        help="of the host's memory, each engine (its process and KV cache)")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the doc")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = prepare_model("embedded", ROOT / ".cache" / "test" / "models", progress=print)
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-champion-") as tmp:
        work = Path(tmp)
        print("part 1: speed", flush=True)
        configs = speed(model, work / "speed", args)
        print("part 2: the switch", flush=True)
        sw = switch(model, work / "switch", args)
    body, met = report(configs, sw, args)
    print(body)
    if not args.dry_run:
        write_section("champion", body)
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
