"""KL(policy ‖ base) measured through vLLM: sample with the policy, score under both.

The probe answers a fixed list of prompts with the policy, one seeded sample per prompt at
temperature 1 and top_p 1 (samples of the policy's own distribution), then asks vLLM for the
log-probability of every answer token under the policy and under ``base``:
``POST /v1/completions`` with the prompt given as token ids (the chat-templated prompt and the
answer, exactly as vLLM returned them for the sample) and ``prompt_logprobs: 0``. With y drawn
from π, Σ_t log π(y_t) − log π_base(y_t) is an unbiased estimate of KL(π ‖ π_base) over whole
answers; the probe reports its mean over the answers (nats per answer) and its total over all
answer tokens (nats per token, the unit of the ``max_kl`` budget). An answer's tokens include
its end-of-turn token when it stopped by itself: stopping is part of the distribution.

Both policies are scored through the same endpoint in the same way, so their numerics match;
``base`` against itself is scored once and comes out exactly 0. No torch in this process.

The same answers also give their **relevance**: each answer is scored under ``base`` once
more, after the next probe prompt instead of its own, and Σ log π_base(y | x) −
log π_base(y | x') over all answer tokens, per token, is how much the answers depend on
their question (a pointwise mutual information). An answer that would do for any question
("Hmm, let me think. Maybe.") scores about 0, whatever its KL: a preference for short or
upbeat answers can drift there well inside the KL budget. The loop compares an adapter's
relevance with base's own on the same prompts and seeds (``min_relevance``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from prefloop.names import BASE
from prefloop.serving.adapters import served_name
from prefloop.serving.context import with_system_prompt
from prefloop.serving.vllm_server import Endpoint

PROBE_PROMPTS: tuple[str, ...] = (
    "What is a good way to start learning to cook?",
    "Explain what a black hole is in a few sentences.",
    "Write a short thank-you note to a colleague who helped me move.",
    "What are the pros and cons of working from home?",
    "How do vaccines train the immune system?",
    "Suggest a name for a small bakery by the sea.",
    "What should I look for when buying a used bicycle?",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "Why is the sky blue?",
    "Give me three tips for a job interview.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn rain.",
    "How can I keep my phone battery healthy?",
    "What is a prime number? Give two examples.",
    "Describe a calm morning routine in a few lines.",
    "Is it better to rent or to buy a home? Answer briefly.",
    "How does a refrigerator keep food cold?",
    "Recommend a way to remember people's names.",
    "What causes the seasons on Earth?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What is one healthy snack I can take to work?",
    "Explain recursion to a ten-year-old.",
    "What are some polite ways to decline an invitation?",
    "List four things to check before a long car drive.",
)
"""Everyday prompts, none from the simulation's prompt set: the probe asks what visitors
ask, and an adapter cannot have been trained on its exact questions."""


class KLProbeError(RuntimeError):
    """The probe could not measure the KL; the message says why."""


@dataclass(frozen=True)
class ProbeAnswer:
    """One probe answer and the log-probabilities of its tokens under both policies."""

    prompt: str
    seed: int
    text: str
    finish_reason: str
    policy_logprobs: tuple[float, ...]  # (T,) log π(y_t | x, y_<t)
    base_logprobs: tuple[float, ...]    # (T,) log π_base(y_t | x, y_<t)
    elsewhere: float | None = None      # Σ_t log π_base(y_t | x', y_<t), x' another prompt

    @property
    def tokens(self) -> int:
        return len(self.policy_logprobs)

    @property
    def kl(self) -> float:
        """Σ_t log π(y_t) − log π_base(y_t): this answer's estimate of the KL, in nats."""
        return answer_kl(self.policy_logprobs, self.base_logprobs)


def answer_kl(policy_logprobs: Sequence[float], base_logprobs: Sequence[float]) -> float:
    """The log-likelihood ratio of one answer, Σ_t (log π(y_t) − log π_base(y_t))."""
    assert len(policy_logprobs) == len(base_logprobs), "one log-prob per token under each"
    return math.fsum(p - b for p, b in zip(policy_logprobs, base_logprobs, strict=True))


def kl_estimate(policy_logprobs: Sequence[Sequence[float]],
                base_logprobs: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(nats per answer, nats per token) from each answer's token log-probs under both.

    Per answer: the mean over answers of Σ_t (log π(y_t) − log π_base(y_t)). Per token: the
    same sum over all answers divided by all their tokens (so long answers weigh more).
    """
    assert policy_logprobs and len(policy_logprobs) == len(base_logprobs)
    kls = [answer_kl(p, b) for p, b in zip(policy_logprobs, base_logprobs, strict=True)]
    tokens = sum(len(p) for p in policy_logprobs)
    total = math.fsum(kls)
    return total / len(kls), (total / tokens if tokens else 0.0)


@dataclass(frozen=True)
class KLReport:
    """What the probe measured for one policy."""

    policy: str
    answers: tuple[ProbeAnswer, ...]
    max_tokens: int
    seconds: float
    base_relevance: float | None = None  # base's own on the same prompts, where compared

    @property
    def per_answer(self) -> float:
        return kl_estimate([a.policy_logprobs for a in self.answers],
                           [a.base_logprobs for a in self.answers])[0]

    @property
    def per_token(self) -> float:
        return kl_estimate([a.policy_logprobs for a in self.answers],
                           [a.base_logprobs for a in self.answers])[1]

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.answers)

    @property
    def relevance(self) -> float | None:
        """Σ log π_base(y | x) − log π_base(y | x') over all answer tokens, per token: how
        much likelier base finds the answers after their own prompts than after others'
        (None: not measured, a probe of a single prompt)."""
        if not self.answers or any(a.elsewhere is None for a in self.answers):
            return None
        own = math.fsum(math.fsum(a.base_logprobs) for a in self.answers)
        return (own - math.fsum(a.elsewhere for a in self.answers)) / self.tokens

    def summary(self) -> str:
        relevance = "" if self.relevance is None else f", relevance {self.relevance:.2f}"
        return (f"KL {self.per_token:.3f} nats/token, {self.per_answer:.2f} nats/answer over "
                f"{len(self.answers)} answers, {self.tokens} tokens{relevance}")

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON: the two estimates, their counts, and every answer."""
        return {"policy": self.policy, "per_token": self.per_token,
                "per_answer": self.per_answer, "answers": len(self.answers),
                "tokens": self.tokens, "max_tokens": self.max_tokens,
                "cut_short": sum(a.finish_reason == "length" for a in self.answers),
                "relevance": self.relevance, "base_relevance": self.base_relevance,
                "seconds": round(self.seconds, 2),
                "samples": [{"prompt": a.prompt, "seed": a.seed, "text": a.text,
                             "tokens": a.tokens, "finish_reason": a.finish_reason,
                             "kl": a.kl} for a in self.answers]}


def probe_prompts(count: int) -> list[tuple[str, int]]:
    """``count`` (prompt, seed) pairs: the built-in prompts in order, again with new seeds
    when more are asked for than there are."""
    return [(PROBE_PROMPTS[i % len(PROBE_PROMPTS)], i) for i in range(count)]


@dataclass(frozen=True)
class _Sample:
    prompt: str
    seed: int
    text: str
    finish_reason: str
    prompt_ids: list[int]
    answer_ids: list[int]


class KLProbe:
    """Measures KL(policy ‖ base) on :func:`probe_prompts` through an OpenAI-compatible vLLM.

    The vLLM must not apply LoRA to the output layer (see ``VLLMServer.command``): its CPU
    build then fails prompt log-probs batched with other requests, killing the engine.
    """

    def __init__(self, endpoint: Endpoint | Callable[[str], Endpoint], *, prompts: int,
                 max_tokens: int,
                 system_prompt: str = "", model_name: Callable[[str], str] = served_name,
                 timeout: float = 600.0) -> None:
        assert prompts >= 1 and max_tokens >= 1
        # Where to measure a policy: one server, or a function of the policy (with several
        # replicas, one that serves it).
        self.endpoint = endpoint
        self.prompts = probe_prompts(prompts)
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.model_name = model_name  # policy -> the name vLLM serves it under
        self.timeout = timeout
        self._base: KLReport | None = None

    def base_blocking(self) -> KLReport:
        """base's own report, measured at the first call and kept (base does not change):
        the relevance an adapter's is compared with, on the same prompts and seeds."""
        if self._base is None:
            self._base = self.measure_blocking(BASE)
        return self._base

    def measure_blocking(self, policy: str) -> KLReport:
        """:meth:`measure` from a thread without an event loop (a training round's)."""
        return asyncio.run(self.measure(policy))

    async def measure(self, policy: str) -> KLReport:
        """Sample the probe answers with ``policy`` and score them under it and ``base``.
        Raises :class:`KLProbeError` if vLLM does not answer or refuses."""
        started = time.monotonic()
        endpoint = self.endpoint if isinstance(self.endpoint, Endpoint) \
            else self.endpoint(policy)
        async with httpx.AsyncClient(
                base_url=endpoint.v1, timeout=self.timeout,
                headers={"Authorization": f"Bearer {endpoint.api_key}"}) as client:
            samples = await asyncio.gather(*(self._sample(client, policy, prompt, seed)
                                             for prompt, seed in self.prompts))
            mine = await asyncio.gather(*(self._score(client, policy, s.prompt_ids,
                                                      s.answer_ids) for s in samples))
            # base against itself: the same numbers, not a second pass that a different
            # batch could round differently.
            theirs = mine if policy == BASE else await asyncio.gather(
                *(self._score(client, BASE, s.prompt_ids, s.answer_ids) for s in samples))
            # Relevance: each answer under base after the next sample's prompt.
            n = len(samples)
            elsewhere = [None] * n if len({s.prompt for s in samples}) < 2 else [
                math.fsum(lps) for lps in await asyncio.gather(*(
                    self._score(client, BASE, samples[(i + 1) % n].prompt_ids, s.answer_ids)
                    for i, s in enumerate(samples)))]
        answers = tuple(
            ProbeAnswer(s.prompt, s.seed, s.text, s.finish_reason, tuple(p), tuple(b), e)
            for s, p, b, e in zip(samples, mine, theirs, elsewhere, strict=True))
        return KLReport(policy, answers, self.max_tokens, time.monotonic() - started)

    async def _sample(self, client: httpx.AsyncClient, policy: str, prompt: str,
                      seed: int) -> _Sample:
        messages = with_system_prompt(self.system_prompt, [{"role": "user", "content": prompt}])
        # Every sampling knob set, so that a server's own defaults (a model's generation
        # config) cannot make the sample come from anything but the policy itself.
        body = {"model": self.model_name(policy), "messages": messages, "n": 1, "seed": seed,
                "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "max_tokens": self.max_tokens, "return_token_ids": True}
        reply = await _post(client, "/chat/completions", body, f"a sample of {policy}",
                            self.timeout)
        try:
            choice = reply["choices"][0]
            prompt_ids, answer_ids = list(reply["prompt_token_ids"]), list(choice["token_ids"])
        except (KeyError, IndexError, TypeError):
            raise KLProbeError("the model server returned no token ids with its answer "
                               "(return_token_ids): the KL probe needs vLLM 0.10 or later"
                               ) from None
        if not answer_ids:
            raise KLProbeError(f"{policy} answered {prompt!r} with no tokens at all")
        return _Sample(prompt, seed, choice["message"]["content"] or "",
                       choice.get("finish_reason") or "stop", prompt_ids, answer_ids)

    async def _score(self, client: httpx.AsyncClient, policy: str, prompt_ids: list[int],
                     answer_ids: list[int]) -> list[float]:
        return await answer_logprobs(client, "/completions", self.model_name(policy),
                                     prompt_ids, answer_ids, timeout=self.timeout)


async def answer_logprobs(client: httpx.AsyncClient, url: str, model: str,
                          prompt_ids: list[int], answer_ids: list[int], *,
                          timeout: float) -> list[float]:
    """log ``model``(y_t | x, y_<t) for each answer token y_t, x the prompt's ids: vLLM's
    prompt log-probs of the two as one prompt (``url``: its ``/v1/completions``).
    Raises :class:`KLProbeError` if vLLM does not answer, refuses, or returns none."""
    ids = prompt_ids + answer_ids
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": 0}
    reply = await _post(client, url, body, f"scoring under {model}", timeout)
    try:
        # Entry i: {str(token id): {"logprob": ...}} for ids[i] given ids[:i] (entry 0 is
        # None: the first token has no context).
        logprobs = reply["choices"][0]["prompt_logprobs"]
        return [float(logprobs[i][str(ids[i])]["logprob"])
                for i in range(len(prompt_ids), len(ids))]
    except (KeyError, IndexError, TypeError, ValueError):
        raise KLProbeError("the model server returned no prompt log-probs for the answer "
                           "tokens (prompt_logprobs): the KL probe needs vLLM") from None


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any], what: str,
                timeout: float) -> dict[str, Any]:
    try:
        response = await client.post(url, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise KLProbeError(f"the model server did not answer the KL probe ({what}): "
                           f"{exc!r}") from None
    if response.status_code != 200:
        raise KLProbeError(f"the model server refused the KL probe ({what}, "
                           f"{response.status_code}): {response.text[:300]}")
    return response.json()
