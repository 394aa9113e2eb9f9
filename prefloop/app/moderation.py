"""Moderation: a check on every message, every answer and every written answer.

The ``moderation`` setting names the check: ``off``; ``builtin`` (:data:`BUILTIN_PHRASES`, a
short list: a floor, not a filter for a public demo); the URL of an OpenAI-compatible
``/v1/moderations`` endpoint (both answers go in one request, each judged on its own); or
``module:function``, called with one text and returning a reason (or True) when it is
flagged and None (or False, or "") when it is not.

A flagged message is refused (:class:`Flagged`, 422) before anything is generated; a flagged
answer is withheld: its text is neither shown nor stored, and its pair takes no vote, so it
never trains. When the check itself fails (the service is down, the function raises),
``moderation_fail`` decides: ``closed`` refuses (:class:`ModerationDown`, 503 with
Retry-After: nothing is generated or stored), ``open`` lets the text through unchecked. Both
are counted, as are the flags, for ``/metrics`` and the Admin tab.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from prefloop.app.guard import Refused
from prefloop.config import ConfigError, Settings, moderation_kind
from prefloop.plugins import load_function

log = logging.getLogger(__name__)

WHAT = ("message", "answer", "written_answer")  # what is checked, as counted
RETRY_AFTER_S = 5.0
BUILTIN_PHRASES: dict[str, tuple[str, ...]] = {
    "self-harm": ("kill yourself", "kill urself", "go die", "you should die"),
    "sexual/minors": ("child porn", "child pornography", "csam", "sexy kids"),
    "weapons": ("make a pipe bomb", "build a pipe bomb", "make a nail bomb", "make sarin",
                "make ricin", "make nerve gas"),
}
"""The ``builtin`` check: phrases matched as whole words, case and width folded."""


class ModerationError(RuntimeError):
    """The check could not be made (service down, bad answer, the function raised)."""


class Flagged(ValueError):
    """A message or written answer moderation flagged: refused (HTTP 422)."""


class ModerationDown(Refused):
    """The check failed and ``moderation_fail`` is ``closed``: refused for now (HTTP 503)."""

    status = 503


Check = Callable[[list[str]], list[str | None]]
"""Texts in, one reason per text out (None: not flagged); ModerationError on failure."""


def _fold(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def builtin_check(phrases: dict[str, tuple[str, ...]] = BUILTIN_PHRASES) -> Check:
    patterns = {category: re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b")
                for category, words in phrases.items()}

    def check(texts: list[str]) -> list[str | None]:
        reasons = []
        for text in texts:
            hits = [category for category, pattern in patterns.items()
                    if pattern.search(_fold(text))]
            reasons.append(", ".join(hits) or None)
        return reasons

    return check


def function_check(function: Callable[[str], Any], spec: str) -> Check:
    def check(texts: list[str]) -> list[str | None]:
        reasons: list[str | None] = []
        for text in texts:
            try:
                said = function(text)
            except Exception as exc:
                raise ModerationError(f"moderation {spec} raised {exc!r}") from exc
            if said is None or said is False or said == "":
                reasons.append(None)
            elif said is True:
                reasons.append("flagged")
            elif isinstance(said, str):
                reasons.append(said)
            else:
                raise ModerationError(f"moderation {spec} returned {said!r}: expected a "
                                      "reason (str), True, or None/False when not flagged")
        return reasons

    return check


def url_check(settings: Settings) -> Check:
    headers = ({"Authorization": f"Bearer {settings.moderation_api_key}"}
               if settings.moderation_api_key else {})
    client = httpx.Client(timeout=settings.moderation_timeout, headers=headers)
    url = settings.moderation

    def check(texts: list[str]) -> list[str | None]:
        body: dict[str, Any] = {"input": texts}
        if settings.moderation_model:
            body["model"] = settings.moderation_model
        try:
            response = client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise ModerationError(f"the moderation service is not answering "
                                  f"({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise ModerationError(f"the moderation service answered {response.status_code}")
        try:
            results = response.json()["results"]
            assert isinstance(results, list) and len(results) == len(texts)
            return [_reason(r) if r["flagged"] else None for r in results]
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ModerationError("the moderation service's answer is not one result per "
                                  "input ({'results': [{'flagged': ...}, ...]})") from None

    return check


def _reason(result: dict[str, Any]) -> str:
    categories = result.get("categories") or {}
    return ", ".join(sorted(k for k, v in categories.items() if v)) or "flagged"


class Moderator:
    """The check the settings name, its failure mode, and counts since the process started."""

    def __init__(self, settings: Settings) -> None:
        """:class:`~prefloop.config.ConfigError` when ``module:function`` cannot be
        loaded."""
        self.spec = settings.moderation
        self.fail_open = settings.moderation_fail == "open"
        kind = moderation_kind(self.spec)
        self._check: Check | None = {
            "off": lambda: None, "builtin": builtin_check,
            "url": lambda: url_check(settings),
            "function": lambda: function_check(
                load_function(self.spec, "moderation", ConfigError), self.spec)}[kind]()
        self._lock = threading.Lock()
        self.flagged: Counter[str] = Counter({what: 0 for what in WHAT})
        self.failures: Counter[str] = Counter({"refused": 0, "allowed": 0})

    @property
    def active(self) -> bool:
        return self._check is not None

    def check(self, texts: list[str], what: str) -> list[str | None]:
        """The reason each text is flagged (None: it is not). When the check fails:
        :class:`ModerationDown` (fail closed), or every text passes (fail open)."""
        assert what in WHAT, what
        if self._check is None:
            return [None] * len(texts)
        try:
            reasons = self._check(texts)
        except ModerationError as exc:
            outcome = "allowed" if self.fail_open else "refused"
            with self._lock:
                self.failures[outcome] += 1
            log.warning("moderation failed (%s): %s %s unchecked", exc, what,
                        "let through" if self.fail_open else "refused")
            if self.fail_open:
                return [None] * len(texts)
            raise ModerationDown(f"{exc}, and nothing goes out unchecked on this server: "
                                 f"try again in {RETRY_AFTER_S:g} s", RETRY_AFTER_S) from None
        with self._lock:
            self.flagged[what] += sum(reason is not None for reason in reasons)
        return reasons

    def refuse_flagged(self, text: str, what: str, name: str) -> None:
        """:class:`Flagged` when ``text`` (a ``what``, called ``name`` to the visitor) is."""
        reason = self.check([text], what)[0]
        if reason is not None:
            raise Flagged(f"{name} was flagged by moderation ({reason}); nothing was "
                          "stored. Please rephrase it.")

    def summary(self, withheld_pairs: int) -> str:
        """One line for the Admin tab."""
        if not self.active:
            return "Moderation: **off**."
        f, fails = self.flagged, self.failures
        mode = "open: let through" if self.fail_open else "closed: refused"
        return (f"Moderation: **{_kind_name(self.spec)}**, failing {mode}. Since the start: "
                f"{f['message']} messages and {f['written_answer']} written answers refused, "
                f"{f['answer']} answers withheld; the check failed {fails['refused']} times "
                f"with the text refused, {fails['allowed']} with it let through. Pairs with "
                f"a withheld answer stored: {withheld_pairs}.")


def _kind_name(spec: str) -> str:
    kind = moderation_kind(spec)
    return {"url": "a moderation service", "function": spec}.get(kind, kind)
