"""Simulated voters: callables that pick the better of two answers, as a person would.

An oracle is any callable ``vote(context, a, b)`` returning one of :data:`VOTES`; ``context``
is the chat messages the answers reply to (role/content dicts, the last one the user's turn).
Built-in oracles also have a ``name`` and, where a scalar score makes sense, a
``reward(context, answer) -> float`` (the judge has none: the attribute is absent, so test
with ``getattr(oracle, "reward", None)``).

- ``sentiment``: the more positive answer (VADER compound score); an easy target to check
  that the loop learns at all.
- ``concise``: the shorter answer that still finishes its sentence (two unfinished ones
  are both bad).
- ``judge``: an OpenAI-compatible chat model asked which answer is better (AI feedback).
- ``random``: a or b at random, some ties; no reward. Nothing to learn: a gate that promotes
  against it promotes noise.
- ``module:function`` or ``path/to/file.py:function``: your own function.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import httpx
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from prefloop.plugins import load_function

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Vote = Literal["a", "b", "tie", "both_bad"]
VOTES: tuple[Vote, ...] = ("a", "b", "tie", "both_bad")
Oracle = Callable[[Messages, str, str], Vote]

# Not PREFLOOP_*: prefloop's settings reject PREFLOOP_* variables they do not know.
JUDGE_API_KEY_ENV = "JUDGE_API_KEY"


class OracleError(ValueError):
    """An oracle spec cannot be loaded, or an oracle returned something that is not a vote."""


def _by_reward(reward_a: float, reward_b: float, margin: float = 0.0) -> Vote:
    """The answer with the higher reward; a tie when they are within ``margin``."""
    if abs(reward_a - reward_b) <= margin:
        return "tie"
    return "a" if reward_a > reward_b else "b"


class SentimentOracle:
    """Prefers the more positive answer by VADER's compound score (-1 to 1).

    Scores within ``margin`` of each other tie. Blank answers score 0 like neutral ones:
    this oracle rewards tone only, which is what makes it an easy, visible training target.
    """

    name = "sentiment"

    def __init__(self, margin: float = 0.05) -> None:
        if not 0 <= margin < 2:
            raise OracleError(f"sentiment margin must be from 0 to below 2, got {margin!r}")
        self.margin = margin
        self._analyzer = SentimentIntensityAnalyzer()  # loads the lexicon: do it once

    def reward(self, context: Messages, answer: str) -> float:
        """VADER's compound score of the answer, from -1 (negative) to 1 (positive)."""
        return float(self._analyzer.polarity_scores(answer)["compound"])

    def __call__(self, context: Messages, a: str, b: str) -> Vote:
        return _by_reward(self.reward(context, a), self.reward(context, b), self.margin)


# A finished sentence ends in . ! ? or an ellipsis, optionally followed by closing quotes
# or brackets: 'He said "yes."' and '(see above.)' are finished.
_SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]}\u00bb*_`]*\Z")


def is_complete(answer: str) -> bool:
    """Whether the answer, stripped of whitespace, ends its last sentence."""
    return bool(_SENTENCE_END.search(answer.strip()))


UNFINISHED = -0.5  # the concise reward of any answer cut off mid-sentence


class ConciseOracle:
    """Prefers the shorter answer that still finishes its sentence.

    The reward orders answers in three bands, and the vote follows the reward:

    - complete (ends its sentence): ``1 / (1 + words / 10)``, in (0, 1);
    - unfinished (cut off mid-sentence): -0.5, whatever its length;
    - blank: -1.

    So a complete answer beats an unfinished one whatever their lengths, any text beats a
    blank one, and of two complete answers the one with fewer words wins; equal word counts
    tie. Two unfinished answers are ``both_bad``, as are two blank ones: neither is what a
    person asking for brevity wanted, and their lengths say nothing. (Until 2026-12-04 the
    shorter unfinished answer won. Two answers cut off at the same ``max_tokens`` have the
    same length in tokens, so "fewer words" picked the one made of longer, rarer tokens,
    and the loop learned gibberish from most of its votes: docs/BENCHMARKS.md.)
    """

    name = "concise"

    def reward(self, context: Messages, answer: str) -> float:
        """Higher for shorter complete answers; see the class docstring for the bands."""
        words = len(answer.split())
        if words == 0:
            return -1.0
        return 1.0 / (1.0 + words / 10) if is_complete(answer) else UNFINISHED

    def __call__(self, context: Messages, a: str, b: str) -> Vote:
        reward_a, reward_b = self.reward(context, a), self.reward(context, b)
        if reward_a == reward_b <= UNFINISHED:  # both unfinished, or both blank
            return "both_bad"
        return _by_reward(reward_a, reward_b)


RANDOM_TIES = 0.1  # the random oracle's share of ties


class RandomOracle:
    """Votes ``a`` or ``b`` with equal odds, ``tie`` with odds ``ties``, whatever the answers.

    The vote is a function of the seed and the pair's text (context and both answers), not
    of the order of calls: a simulation that asks for votes concurrently is still
    reproducible. It has no ``reward``: there is no better answer to score.
    """

    name = "random"

    def __init__(self, seed: int = 0, ties: float = RANDOM_TIES) -> None:
        if not 0 <= ties < 1:
            raise OracleError(f"random oracle: ties must be from 0 to below 1, got {ties!r}")
        self.seed = seed
        self.ties = ties

    def __call__(self, context: Messages, a: str, b: str) -> Vote:
        # random.Random hashes a str seed with SHA-512: the same on every run and platform.
        draw = random.Random(json.dumps([self.seed, context, a, b])).random()
        if draw < self.ties:
            return "tie"
        return "a" if draw < self.ties + (1 - self.ties) / 2 else "b"


JUDGE_SYSTEM = (
    "You compare two answers an assistant wrote to the same conversation and decide which "
    "one is better for the user: more helpful, correct, clear and appropriate. Reply with "
    "exactly one word: A if answer A is better, B if answer B is better, TIE if they are "
    "equally good, BOTH_BAD if neither is acceptable."
)


def judge_messages(context: Messages, a: str, b: str) -> Messages:
    """The chat request that asks a judge model to compare answers ``a`` and ``b``."""
    turns = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in context)
    user = (f"<conversation>\n{turns}\n</conversation>\n\n"
            f"<answer_a>\n{a}\n</answer_a>\n\n<answer_b>\n{b}\n</answer_b>\n\n"
            "Which answer is the better next assistant turn? "
            "Reply with exactly one of: A, B, TIE, BOTH_BAD.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


# Keys without separators, so "BOTH_BAD", "both bad" and "Both-Bad" all match.
_VERDICTS: dict[str, Vote] = {"A": "a", "B": "b", "TIE": "tie", "BOTHBAD": "both_bad"}
# A and B only in capitals ("a" is an English word); TIE and BOTH BAD in any case.
_VERDICT_TOKEN = re.compile(r"(?<![A-Za-z0-9_])(A|B|(?i:tie)|(?i:both[ _-]?bad))(?![A-Za-z0-9_])")
_THINKING = re.compile(r"<think>.*?(</think>|\Z)", re.DOTALL)


def parse_verdict(reply: str) -> Vote | None:
    """The vote in a judge's reply, or None when it names none.

    A reply that is just a verdict ("b", "**TIE**.") counts in any case; otherwise the first
    verdict token wins. Reasoning in ``<think>`` tags is skipped.
    """
    reply = _THINKING.sub("", reply)
    bare = _verdict_key(reply.strip(" \t\r\n.!*\"'`[](){}:"))
    if bare in _VERDICTS:
        return _VERDICTS[bare]
    match = _VERDICT_TOKEN.search(reply)
    return None if match is None else _VERDICTS[_verdict_key(match.group(1))]


def _verdict_key(text: str) -> str:
    return re.sub(r"[\s_-]+", "", text).upper()


class _JudgeFailed(Exception):
    """The judge gave no usable reply after all retries (or a non-retryable error)."""


class JudgeOracle:
    """Asks an OpenAI-compatible chat model which answer is better (AI feedback).

    ``url`` is the API base (``http://host:port/v1``); requests go to
    ``{url}/chat/completions``. The key is ``api_key`` or else the environment variable
    ``api_key_env`` (no key: no Authorization header, as for a local vLLM).

    Network errors, 429 and 5xx are retried ``retries`` times with exponential backoff.
    A timeout is not retried: a judge that slow would stall the loop for ``retries *
    timeout``. A timeout, an error that outlasts the retries and a reply that names no
    verdict each give ``tie`` (a vote that trains nothing) and count in ``failures`` by kind
    ("timeout", "error", "unparseable"); ``last_error`` says what happened last. A 401, 403
    or 404 is a setup mistake (key, model or url) that retries cannot fix: it raises
    :class:`OracleError` instead of quietly turning every vote into a tie.
    """

    name = "judge"

    def __init__(self, url: str, model: str, *, api_key: str | None = None,
                 api_key_env: str = JUDGE_API_KEY_ENV, timeout: float = 60.0,
                 retries: int = 2, backoff: float = 0.5, max_tokens: int = 16) -> None:
        if not re.match(r"https?://", url):
            raise OracleError(f"judge url must start with http:// or https://, got {url!r}")
        if not model:
            raise OracleError("judge model must be named (the model the judge server serves)")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_tokens < 1:
            raise OracleError("judge needs timeout > 0, retries >= 0, backoff >= 0 and "
                              f"max_tokens >= 1; got {timeout}, {retries}, {backoff}, "
                              f"{max_tokens}")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.retries = retries
        self.backoff = backoff
        self.max_tokens = max_tokens
        self.failures: Counter[str] = Counter()
        self.last_error: str | None = None
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> JudgeOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, context: Messages, a: str, b: str) -> Vote:
        try:
            reply = self._ask(judge_messages(context, a, b))
        except httpx.TimeoutException as exc:
            return self._failed("timeout", f"no reply within the timeout ({exc!r})")
        except _JudgeFailed as exc:
            return self._failed("error", str(exc))
        vote = parse_verdict(reply)
        if vote is None:
            return self._failed("unparseable", f"reply names no verdict: {reply[:200]!r}")
        return vote

    def _failed(self, kind: str, why: str) -> Vote:
        self.failures[kind] += 1
        self.last_error = why
        log.warning("judge %s (%s): %s; counted as a tie", self.model, kind, why)
        return "tie"

    def _ask(self, messages: Messages) -> str:
        """The judge's reply text; retries network errors, 429 and 5xx."""
        payload = {"model": self.model, "messages": messages, "temperature": 0.0,
                   "max_tokens": self.max_tokens}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.post(self.url, json=payload)
            except httpx.TimeoutException:
                raise  # a TransportError too, but not retried (see the class docstring)
            except httpx.TransportError as exc:
                problem = f"cannot reach {self.url}: {exc!r}"
                continue
            if response.status_code in (401, 403, 404):
                raise OracleError(f"judge at {self.url} answered {response.status_code} "
                                  f"for model {self.model!r}: check the url, the model name "
                                  f"and the API key ({response.text[:200]})")
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"judge answered {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise _JudgeFailed(f"judge answered {response.status_code}: "
                                   f"{response.text[:200]}")
            return _reply_text(response)
        raise _JudgeFailed(f"{problem} (after {self.retries + 1} attempts)")


def _reply_text(response: httpx.Response) -> str:
    """The message content of an OpenAI chat completion ('' when the model wrote none)."""
    try:
        content = response.json()["choices"][0]["message"].get("content")
    except (ValueError, LookupError, TypeError, AttributeError):
        raise _JudgeFailed("judge reply is not an OpenAI chat completion: "
                           f"{response.text[:200]!r}") from None
    return content if isinstance(content, str) else ""


class CheckedOracle:
    """A user's oracle function, with its return value checked on every call.

    A wrong value (``"A"``, ``True``, ``None``) would otherwise be stored as a vote or crash
    far from its cause; here it raises :class:`OracleError` naming the oracle.
    """

    def __init__(self, function: Callable[..., Any], name: str) -> None:
        self.function = function
        self.name = name
        if callable(getattr(function, "reward", None)):
            self.reward = function.reward

    def __call__(self, context: Messages, a: str, b: str) -> Vote:
        vote = self.function(context, a, b)
        if not isinstance(vote, str) or vote not in VOTES:
            raise OracleError(f"oracle {self.name} returned {vote!r}; an oracle must return "
                              "one of " + ", ".join(map(repr, VOTES)))
        return vote


BUILT_IN = ("sentiment", "concise", "judge", "random")


def load_oracle(spec: str, *, seed: int = 0, **judge_options: Any) -> Oracle:
    """The oracle named by ``spec``: a built-in name, ``module:function`` or
    ``path/to/file.py:function``. ``seed`` seeds the oracles that draw (``random``);
    ``judge_options`` go to :class:`JudgeOracle` (url, model, ...) and are an error for any
    other oracle."""
    spec = spec.strip()
    if judge_options and spec != "judge":
        raise OracleError(f"options {', '.join(sorted(judge_options))} only apply to the "
                          f"judge oracle, not {spec!r}")
    if spec == "sentiment":
        return SentimentOracle()
    if spec == "concise":
        return ConciseOracle()
    if spec == "random":
        return RandomOracle(seed)
    if spec == "judge":
        missing = [k for k in ("url", "model") if not judge_options.get(k)]
        if missing:
            raise OracleError(f"the judge oracle needs {' and '.join(missing)} "
                              "(the OpenAI-compatible server and the model to ask)")
        try:
            return JudgeOracle(**judge_options)
        except TypeError as exc:  # an option JudgeOracle does not take
            raise OracleError(f"bad judge option: {exc}") from None
    if ":" not in spec:
        raise OracleError(f"unknown oracle {spec!r}: use one of {', '.join(BUILT_IN)}, "
                          "module:function or path/to/file.py:function")
    function = load_function(spec, "oracle", OracleError)
    return CheckedOracle(function, spec)
