"""Two answers to one context, streamed concurrently over the OpenAI API.

One policy: a single request with ``n=2`` (vLLM seeds the second sample with ``seed + 1``).
Two policies: two requests at once, each with its own seed. Either way the caller sees one
stream of :class:`PairProgress` snapshots with both texts as they grow.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI

from prefloop.names import BASE
from prefloop.serving.adapters import served_name
from prefloop.serving.context import ContextTooLong, Messages, fit_context, with_system_prompt
from prefloop.serving.vllm_server import Endpoint


class SamplingError(RuntimeError):
    """The model server failed to produce the answers; the message is safe to show."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens}


@dataclass
class Side:
    """One answer as it streams."""

    policy: str
    seed: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class PairProgress:
    """A snapshot of both answers; ``done`` once both have finished."""

    a: Side
    b: Side
    context: Messages
    dropped_messages: int = 0
    started: float = field(default_factory=time.monotonic)
    first_token_ms: float | None = None
    total_ms: float | None = None

    @property
    def done(self) -> bool:
        return self.a.done and self.b.done


class PairSampler:
    """Samples answer pairs from an OpenAI-compatible server (vLLM)."""

    def __init__(self, endpoint: Endpoint, *, sampling: Sampling, max_model_len: int,
                 system_prompt: str = "", request_timeout: float = 300.0,
                 model_name: Callable[[str], str] = served_name) -> None:
        self.endpoint = endpoint
        self.model_name = model_name  # policy -> the name vLLM serves it under
        self.sampling = sampling
        self.max_model_len = max_model_len
        self.system_prompt = system_prompt
        self.client = AsyncOpenAI(base_url=endpoint.v1, api_key=endpoint.api_key,
                                  timeout=request_timeout, max_retries=0)
        self._http = httpx.AsyncClient(timeout=30.0,
                                       headers={"Authorization": f"Bearer {endpoint.api_key}"})

    async def close(self) -> None:
        await self.client.close()
        await self._http.aclose()

    async def count_tokens(self, messages: Messages, model: str = BASE) -> int:
        """Prompt tokens of ``messages`` under the served chat template (vLLM ``/tokenize``)."""
        response = await self._http.post(
            self.endpoint.url.rstrip("/") + "/tokenize",
            json={"model": model, "messages": messages, "add_generation_prompt": True})
        response.raise_for_status()
        return int(response.json()["count"])

    async def prepare(self, history: Messages) -> tuple[Messages, int]:
        """The messages to send for ``history`` (system prompt added, oldest turns cut)."""
        messages = with_system_prompt(self.system_prompt, history)
        budget = self.max_model_len - self.sampling.max_tokens
        return await fit_context(messages, budget, self.count_tokens)

    async def stream(self, history: Messages, policy_a: str = BASE,
                     policy_b: str = BASE,
                     seed: int | None = None) -> AsyncIterator[PairProgress]:
        """Yield snapshots of the two answers to ``history`` until both are complete.

        ``history`` is the conversation so far, ending with the user's new message.
        Raises :class:`SamplingError` (or :class:`ContextTooLong`) with a message for people.
        """
        seed = random.randrange(2**31 - 2) if seed is None else seed
        try:
            messages, dropped = await self.prepare(history)  # may raise ContextTooLong
        except httpx.HTTPError as exc:
            raise SamplingError(f"the model server is not answering ({exc})") from exc
        same = policy_a == policy_b
        progress = PairProgress(Side(policy_a, seed), Side(policy_b, seed + 1),
                                context=messages, dropped_messages=dropped)
        # Each stream task puts TICK per chunk, DONE at its end, or the exception it hit.
        updates: asyncio.Queue[object] = asyncio.Queue()

        async def pump(policy: str, n: int, sides: list[Side], request_seed: int) -> None:
            try:
                await self._stream_one(messages, policy, n, request_seed, sides, progress,
                                       updates)
                updates.put_nowait(_DONE)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                updates.put_nowait(exc)

        if same:
            tasks = [asyncio.create_task(pump(policy_a, 2, [progress.a, progress.b], seed))]
        else:
            tasks = [asyncio.create_task(pump(policy_a, 1, [progress.a], seed)),
                     asyncio.create_task(pump(policy_b, 1, [progress.b], seed + 1))]
        finished = 0
        try:
            while finished < len(tasks):
                items = [await updates.get()]
                while not updates.empty():  # coalesce deltas that arrived meanwhile
                    items.append(updates.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        raise _as_sampling_error(item)
                    finished += item is _DONE
                yield _snapshot(progress)
            progress.total_ms = (time.monotonic() - progress.started) * 1000
            yield _snapshot(progress)
        finally:
            for task in tasks:
                task.cancel()

    async def answer(self, history: Messages, policy: str = BASE,
                     seed: int | None = None) -> Side:
        """One complete answer to ``history`` from ``policy``, not streamed.

        Raises :class:`SamplingError` (or :class:`ContextTooLong`) as :meth:`stream` does.
        """
        seed = random.randrange(2**31 - 2) if seed is None else seed
        try:
            messages, _ = await self.prepare(history)  # may raise ContextTooLong
        except httpx.HTTPError as exc:
            raise SamplingError(f"the model server is not answering ({exc})") from exc
        try:
            reply = await self.client.chat.completions.create(
                model=self.model_name(policy), messages=messages, n=1, seed=seed,
                temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                max_tokens=self.sampling.max_tokens)
        except openai.APIError as exc:
            raise _as_sampling_error(exc) from exc
        choice = reply.choices[0]
        return Side(policy, seed, text=choice.message.content or "",
                    finish_reason=choice.finish_reason or "stop",
                    tokens=reply.usage.completion_tokens if reply.usage else None)

    async def _stream_one(self, messages: Messages, policy: str, n: int, seed: int,
                          sides: list[Side], progress: PairProgress,
                          updates: asyncio.Queue[object]) -> None:
        stream = await self.client.chat.completions.create(
            model=self.model_name(policy), messages=messages, n=n, seed=seed, stream=True,
            temperature=self.sampling.temperature, top_p=self.sampling.top_p,
            max_tokens=self.sampling.max_tokens,
            extra_body={"return_token_ids": True})
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    side = sides[choice.index]
                    if choice.delta and choice.delta.content:
                        if progress.first_token_ms is None:
                            progress.first_token_ms = (time.monotonic() - progress.started) * 1000
                        side.text += choice.delta.content
                    token_ids = (choice.model_extra or {}).get("token_ids")
                    if token_ids:
                        side.tokens = (side.tokens or 0) + len(token_ids)
                    if choice.finish_reason:
                        side.finish_reason = choice.finish_reason
                updates.put_nowait(_TICK)
        for side in sides:  # a server that ends the stream without a finish reason
            side.finish_reason = side.finish_reason or "stop"


_TICK = object()
_DONE = object()


def _snapshot(progress: PairProgress) -> PairProgress:
    return replace(progress, a=replace(progress.a), b=replace(progress.b))


def _as_sampling_error(exc: BaseException) -> BaseException:
    if isinstance(exc, (SamplingError, ContextTooLong, asyncio.CancelledError)):
        return exc
    if isinstance(exc, openai.APIConnectionError):
        return SamplingError("the model server is not answering; try again in a moment")
    if isinstance(exc, openai.APIStatusError):
        return SamplingError(f"the model server refused the request ({exc.status_code}: "
                             f"{_short(exc.message)})")
    if isinstance(exc, (openai.APIError, httpx.HTTPError)):
        return SamplingError(f"the answer stream broke off ({_short(str(exc))}); try again")
    return exc


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
