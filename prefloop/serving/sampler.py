"""Two answers to one context, streamed concurrently over the OpenAI API.

One policy: a single request with ``n=2`` (vLLM seeds the second sample with ``seed + 1``).
Two policies: two requests at once, each with its own seed. Either way the caller sees one
stream of :class:`PairProgress` snapshots with both texts as they grow. With
``Sampling.candidates`` n > 2, an adapter's own turns are one request with ``n`` answers,
not streamed, of which the two its implicit reward ranks furthest apart are shown
(``serving/candidates.py``): the caller then sees a single, complete snapshot.

Both answers of a pair come from one vLLM replica (``serving/replicas.py``): the least busy
that serves both policies. A replica that fails before either answer has any text is taken
out and the pair starts again on another; one that fails later ends the pair with a
:class:`SamplingError` (a visitor saw half an answer: it is not replaced behind their back).

With a champion engine (``serving/champion.py``), a pair whose two answers come from one
policy goes to it when it serves that policy (the champion's own turns), and to the LoRA
replicas otherwise or when it fails before any text.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI

from prefloop.names import BASE
from prefloop.serving.adapters import served_name
from prefloop.serving.candidates import furthest_apart
from prefloop.serving.champion import ChampionEngine
from prefloop.serving.context import ContextTooLong, Messages, fit_context, with_system_prompt
from prefloop.serving.kl_probe import KLProbeError, answer_kl, answer_logprobs
from prefloop.serving.replicas import NoReplica, Replica, Replicas
from prefloop.serving.vllm_server import Endpoint

log = logging.getLogger(__name__)
WATCH_S = 1.0  # how often a waiting pair looks whether its replica was taken out
# Seeds below this: a request's answers take seed, seed + 1, … (up to 16 candidates) and
# each must still be a 32-bit seed for vLLM.
SEED_LIMIT = 2**31 - 17


class SamplingError(RuntimeError):
    """The model server failed to produce the answers; the message is safe to show."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256
    candidates: int = 2  # answers sampled for an adapter's own turn, two of them shown

    def __post_init__(self) -> None:
        assert self.candidates >= 2, "a pair needs two answers"

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "candidates": self.candidates}


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
    # Where two were chosen among: every answer sampled, and each one's implicit reward
    # log π(y) − log π_base(y) in nats.
    candidates: tuple[Side, ...] = ()
    rewards: tuple[float, ...] = ()

    @property
    def done(self) -> bool:
        return self.a.done and self.b.done


class PairSampler:
    """Samples answer pairs from OpenAI-compatible servers (vLLM replicas).

    ``engines``: one :class:`Endpoint` (one server, as before replicas) or the
    :class:`Replicas` the adapter pool keeps in sync; ``champion``: the plain engine that
    takes the champion's own turns, if any.
    """

    def __init__(self, engines: Endpoint | Replicas, *, sampling: Sampling,
                 max_model_len: int, system_prompt: str = "", request_timeout: float = 300.0,
                 model_name: Callable[[str], str] = served_name,
                 champion: ChampionEngine | None = None) -> None:
        self.replicas = engines if isinstance(engines, Replicas) else Replicas.single(
            engines, lambda name: False)
        self.champion = champion
        self.model_name = model_name  # policy -> the name vLLM serves it under
        self.sampling = sampling
        self.max_model_len = max_model_len
        self.system_prompt = system_prompt
        self.request_timeout = request_timeout
        # Per replica (by URL and key: a champion engine started later may get a port an
        # earlier one had), made on first use: an HTTP pool and the OpenAI client on it.
        self._clients: dict[Endpoint, tuple[AsyncOpenAI, httpx.AsyncClient]] = {}

    @property
    def endpoint(self) -> Endpoint:
        """The first replica's endpoint (one server: its only one)."""
        return self.replicas.replicas[0].endpoint

    def _client(self, replica: Replica) -> tuple[AsyncOpenAI, httpx.AsyncClient]:
        endpoint = replica.endpoint
        if endpoint not in self._clients:
            self._clients[endpoint] = (
                AsyncOpenAI(base_url=endpoint.v1, api_key=endpoint.api_key,
                            timeout=self.request_timeout, max_retries=0),
                httpx.AsyncClient(timeout=30.0,
                                  headers={"Authorization": f"Bearer {endpoint.api_key}"}))
        return self._clients[endpoint]

    @property
    def client(self) -> AsyncOpenAI:
        """The OpenAI client of the first replica."""
        return self._client(self.replicas.replicas[0])[0]

    async def close(self) -> None:
        for client, http in self._clients.values():
            await client.close()
            await http.aclose()
        self._clients.clear()

    async def count_tokens(self, messages: Messages, model: str = BASE,
                           replica: Replica | None = None) -> int:
        """Prompt tokens of ``messages`` under the served chat template (vLLM ``/tokenize``)."""
        replica = replica or self.replicas.replicas[0]
        response = await self._client(replica)[1].post(
            replica.endpoint.url.rstrip("/") + "/tokenize",
            json={"model": model, "messages": messages, "add_generation_prompt": True})
        response.raise_for_status()
        return int(response.json()["count"])

    async def prepare(self, history: Messages, replica: Replica | None = None,
                      policy: str = BASE) -> tuple[Messages, int]:
        """The messages to send for ``history`` (system prompt added, oldest turns cut)."""
        messages = with_system_prompt(self.system_prompt, history)
        budget = self.max_model_len - self.sampling.max_tokens
        # A champion engine serves its policy's name alone (the same tokenizer as base).
        model = self.model_name(policy) if replica is not None and self._plain(replica) \
            else BASE
        count = functools.partial(self.count_tokens, model=model, replica=replica)
        return await fit_context(messages, budget, count)

    def _plain(self, replica: Replica) -> bool:
        """True for a champion engine's replica (not one of the LoRA replicas)."""
        return self.champion is not None and self.champion.owns(replica)

    def _release(self, replica: Replica) -> None:
        if self.champion is not None and self.champion.owns(replica):
            self.champion.release(replica)
        else:
            self.replicas.release(replica)

    def _route(self, policies: set[str], tried: list[Replica]) -> Replica:
        if self.champion is not None and len(policies) == 1:  # the champion's own turns
            [policy] = policies
            if (plain := self.champion.acquire(self.model_name(policy), tried)) is not None:
                return plain
        try:
            return self.replicas.acquire({self.model_name(p) for p in policies}, tried)
        except NoReplica as exc:
            log.warning("no replica for a request: %s", exc)
            raise SamplingError("the model server is not answering; try again in a "
                                "moment") from None

    async def stream(self, history: Messages, policy_a: str = BASE,
                     policy_b: str = BASE,
                     seed: int | None = None) -> AsyncIterator[PairProgress]:
        """Yield snapshots of the two answers to ``history`` until both are complete.

        ``history`` is the conversation so far, ending with the user's new message.
        Raises :class:`SamplingError` (or :class:`ContextTooLong`) with a message for people.
        """
        seed = random.randrange(SEED_LIMIT) if seed is None else seed
        started = time.monotonic()
        tried: list[Replica] = []
        # An adapter's own turn with candidates to choose among: scored under it and base,
        # so on a replica that serves both (never a champion engine: it serves one policy).
        choose = policy_a == policy_b != BASE and self.sampling.candidates > 2
        while True:
            replica = self._route({policy_a, policy_b, BASE} if choose
                                  else {policy_a, policy_b}, tried)
            try:
                async with aclosing(
                        self._choose_on(replica, history, policy_a, seed, started) if choose
                        else self._stream_on(replica, history, policy_a, policy_b, seed,
                                             started)) as snapshots:
                    async for progress in snapshots:
                        yield progress
                return
            except _Failover as exc:  # nothing written yet: the pair starts again elsewhere
                tried.append(replica)
                log.warning("pair moved off replica %s: %s", replica.name, exc)
            finally:
                self._release(replica)

    async def _stream_on(self, replica: Replica, history: Messages, policy_a: str,
                         policy_b: str, seed: int,
                         started: float) -> AsyncIterator[PairProgress]:
        """:meth:`stream` on one replica; :class:`_Failover` when it fails before any text."""
        try:
            messages, dropped = await self.prepare(history, replica, policy_a)  # ContextTooLong
        except httpx.HTTPError as exc:
            raise self._failure(replica, exc, started=False) from exc
        progress = PairProgress(Side(policy_a, seed), Side(policy_b, seed + 1),
                                context=messages, dropped_messages=dropped, started=started)
        # Each stream task puts TICK per chunk, DONE at its end, or the exception it hit.
        updates: asyncio.Queue[object] = asyncio.Queue()
        client = self._client(replica)[0]

        async def pump(policy: str, n: int, sides: list[Side], request_seed: int) -> None:
            try:
                await self._stream_one(client, messages, policy, n, request_seed, sides,
                                       progress, updates)
                updates.put_nowait(_DONE)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                updates.put_nowait(exc)

        if policy_a == policy_b:
            tasks = [asyncio.create_task(pump(policy_a, 2, [progress.a, progress.b], seed))]
        else:
            tasks = [asyncio.create_task(pump(policy_a, 1, [progress.a], seed)),
                     asyncio.create_task(pump(policy_b, 1, [progress.b], seed + 1))]
        finished = 0
        try:
            while finished < len(tasks):
                items = [await self._next_update(updates, replica, progress)]
                while not updates.empty():  # coalesce deltas that arrived meanwhile
                    items.append(updates.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        raise self._failure(replica, item, _started(progress))
                    finished += item is _DONE
                yield _snapshot(progress)
            progress.total_ms = (time.monotonic() - progress.started) * 1000
            yield _snapshot(progress)
        finally:
            for task in tasks:
                task.cancel()

    async def _choose_on(self, replica: Replica, history: Messages, policy: str, seed: int,
                         started: float) -> AsyncIterator[PairProgress]:
        """:meth:`stream` of ``policy``'s own turn with candidates on one replica: sample
        them all, score each under ``policy`` and base, yield the pair furthest apart."""
        model = self.model_name(policy)
        client, http = self._client(replica)
        try:
            messages, dropped = await self.prepare(history, replica, policy)  # ContextTooLong
            reply = await client.chat.completions.create(
                model=model, messages=messages, n=self.sampling.candidates, seed=seed,
                temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                max_tokens=self.sampling.max_tokens, extra_body={"return_token_ids": True})
        except (openai.APIError, httpx.HTTPError) as exc:
            if isinstance(exc, openai.NotFoundError):
                exc.prefloop_policies = (policy,)  # type: ignore[attr-defined]
            raise self._failure(replica, exc, started=False) from exc
        choices = sorted(reply.choices, key=lambda c: c.index)
        try:
            prompt_ids = list((reply.model_extra or {})["prompt_token_ids"])
            answer_ids = [list((c.model_extra or {})["token_ids"]) for c in choices]
        except (KeyError, TypeError):
            raise SamplingError("the model server returned no token ids with its answers "
                                "(return_token_ids): choosing among candidates needs vLLM "
                                "0.10 or later") from None
        url = replica.endpoint.v1 + "/completions"
        # vLLM's prompt log-probs, as the KL probe scores them (the same numerics).
        score = functools.partial(answer_logprobs, http, url, timeout=self.request_timeout)
        # Under the adapter, then under base, as the probe does. Sent together, test_loop.py's
        # module read every answer's scores under its adapter equal to base's (twice, after
        # the module's other rounds; not on a fresh vLLM with one adapter): not understood.
        try:
            mine = await asyncio.gather(*(score(model, prompt_ids, ids) for ids in answer_ids))
            theirs = await asyncio.gather(*(score(self.model_name(BASE), prompt_ids, ids)
                                            for ids in answer_ids))
        except KLProbeError as exc:
            raise SamplingError(f"the answers could not be scored to choose two ({exc}); "
                                "try again") from None
        candidates = tuple(Side(policy, seed + c.index, text=c.message.content or "",
                                finish_reason=c.finish_reason or "stop", tokens=len(ids))
                           for c, ids in zip(choices, answer_ids, strict=True))
        rewards = tuple(answer_kl(p, b) for p, b in zip(mine, theirs, strict=True))
        i, j = furthest_apart(rewards)
        now_ms = (time.monotonic() - started) * 1000
        yield PairProgress(replace(candidates[i]), replace(candidates[j]), context=messages,
                           dropped_messages=dropped, started=started, first_token_ms=now_ms,
                           total_ms=now_ms, candidates=candidates, rewards=rewards)

    async def _next_update(self, updates: asyncio.Queue[object], replica: Replica,
                           progress: PairProgress) -> object:
        """The next update; a pair with no text yet leaves a replica taken out meanwhile
        (stopped answering) as soon as another one is up."""
        # One getter across the waits: a get cancelled by a timeout could lose its item.
        getter = asyncio.ensure_future(updates.get())
        try:
            while not (await asyncio.wait({getter}, timeout=WATCH_S))[0]:
                if not replica.up and not _started(progress) \
                        and self.replicas.others_up(replica):
                    raise _Failover(f"replica {replica.name} was taken out")
            return getter.result()
        finally:
            getter.cancel()  # nothing if it is done

    def _failure(self, replica: Replica, exc: BaseException, started: bool) -> BaseException:
        """What to raise for ``exc`` from ``replica``: :class:`_Failover` when the pair can
        start again elsewhere, else the error for people. A replica that broke is taken
        out either way."""
        if isinstance(exc, (SamplingError, ContextTooLong, asyncio.CancelledError, _Failover)):
            return exc
        broke = isinstance(exc, (openai.APIConnectionError, httpx.TransportError)) or (
            isinstance(exc, openai.APIStatusError) and exc.status_code >= 500) or (
            isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code >= 500)
        missing = isinstance(exc, openai.NotFoundError)  # it lost an adapter (restarted?)
        # Only where another replica can take the pair: a single engine stays in, and a
        # failed request fails alone, as before replicas.
        if not (broke or missing) or not self.replicas.others_up(replica):
            return _as_sampling_error(exc)
        if self.champion is not None and self.champion.owns(replica):
            # Out of routing: the LoRA replicas take the champion's turns meanwhile.
            self.champion.failed(replica, f"a request failed: {_short(repr(exc))}")
            return _as_sampling_error(exc) if started else _Failover(_short(repr(exc)))
        if broke:
            self.replicas.failed(replica, f"a request failed: {_short(repr(exc))}")
        for policy in getattr(exc, "prefloop_policies", ()):
            self.replicas.lost(replica, self.model_name(policy))
        return _as_sampling_error(exc) if started else _Failover(_short(repr(exc)))

    async def answer(self, history: Messages, policy: str = BASE,
                     seed: int | None = None) -> Side:
        """One complete answer to ``history`` from ``policy``, not streamed.

        Raises :class:`SamplingError` (or :class:`ContextTooLong`) as :meth:`stream` does.
        """
        seed = random.randrange(SEED_LIMIT) if seed is None else seed
        tried: list[Replica] = []
        while True:
            replica = self._route({policy}, tried)
            try:
                return await self._answer_on(replica, history, policy, seed)
            except _Failover as exc:
                tried.append(replica)
                log.warning("answer moved off replica %s: %s", replica.name, exc)
            finally:
                self._release(replica)

    async def _answer_on(self, replica: Replica, history: Messages, policy: str,
                         seed: int) -> Side:
        try:
            messages, _ = await self.prepare(history, replica, policy)  # may raise ContextTooLong
            reply = await self._client(replica)[0].chat.completions.create(
                model=self.model_name(policy), messages=messages, n=1, seed=seed,
                temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                max_tokens=self.sampling.max_tokens)
        except (openai.APIError, httpx.HTTPError) as exc:
            raise self._failure(replica, exc, started=False) from exc
        choice = reply.choices[0]
        return Side(policy, seed, text=choice.message.content or "",
                    finish_reason=choice.finish_reason or "stop",
                    tokens=reply.usage.completion_tokens if reply.usage else None)

    async def _stream_one(self, client: AsyncOpenAI, messages: Messages, policy: str, n: int,
                          seed: int, sides: list[Side], progress: PairProgress,
                          updates: asyncio.Queue[object]) -> None:
        try:
            stream = await client.chat.completions.create(
                model=self.model_name(policy), messages=messages, n=n, seed=seed,
                stream=True, temperature=self.sampling.temperature,
                top_p=self.sampling.top_p, max_tokens=self.sampling.max_tokens,
                extra_body={"return_token_ids": True})
        except openai.NotFoundError as exc:
            exc.prefloop_policies = (policy,)  # type: ignore[attr-defined]
            raise
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


class _Failover(Exception):
    """A replica failed before the pair had any text: start it again on another one."""


def _started(progress: PairProgress) -> bool:
    """True once a visitor may have seen some of the answers."""
    return bool(progress.a.text or progress.b.text)


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
