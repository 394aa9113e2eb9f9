"""Oracles the training defaults were not tuned on (issue 14: "preferences nobody tuned for").

Each is a plain ``vote(context, a, b)`` function with a ``reward(context, answer)``
attribute, loaded by ``prefloop simulate --oracle bench/oracles.py:NAME`` like any user's
oracle. They live here, not in the product: they exist to check that the recipe of
``trainer/settings.py`` is not fitted to the built-in ``sentiment`` and ``concise``.

- ``on_topic``: prefers the answer that uses more of the prompt's content words (a crude
  relevance judge; the base model at temperature 1 often drifts off the question).
- ``concise_until_2026_12_04``: the built-in ``concise`` as it was before that day (of two
  unfinished answers the one with fewer words won), kept to measure what it rewarded
  (``bench/oracle_pairs.py``).
"""

from __future__ import annotations

import re

from prefloop.sim.oracles import is_complete

# Words that say nothing about the topic; the rest of a prompt's words are its content.
STOPWORDS = frozenset("""
a about above after again all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each explain few for from
further had has have having he her here hers him his how i if in into is it its just like
me more most my no nor not now of off on once only or other our out over own same she
should so some such than that the their them then there these they this those through to
too under until up very was we were what when where which while who whom why will with
would you your yours describe tell give write short simple sentence sentences words one two
three ten year old
""".split())


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[:-len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    """Lower-cased, crudely stemmed words of three letters or more that are not stopwords."""
    return {_stem(w) for w in re.findall(r"[a-z]+", text.lower())
            if len(w) >= 3 and w not in STOPWORDS}


def _on_topic_reward(context: list[dict[str, str]], answer: str) -> float:
    """Share of the prompt's content words the answer uses (0 to 1; 0 for a prompt with
    none)."""
    prompt = content_words(context[-1]["content"])
    if not prompt:
        return 0.0
    return len(prompt & content_words(answer)) / len(prompt)


def on_topic(context: list[dict[str, str]], a: str, b: str) -> str:
    """The answer that covers more of the prompt's content words; equal cover ties."""
    reward_a, reward_b = _on_topic_reward(context, a), _on_topic_reward(context, b)
    if reward_a == reward_b:
        return "tie"
    return "a" if reward_a > reward_b else "b"


on_topic.reward = _on_topic_reward  # type: ignore[attr-defined]


def _old_concise_reward(context: list[dict[str, str]], answer: str) -> float:
    """1 / (1 + words / 10) for a complete answer, the same minus 1 for an unfinished one,
    -1 for a blank one."""
    words = len(answer.split())
    if words == 0:
        return -1.0
    score = 1.0 / (1.0 + words / 10)
    return score if is_complete(answer) else score - 1.0


def concise_until_2026_12_04(context: list[dict[str, str]], a: str, b: str) -> str:
    """The higher old concise reward; two blank answers are both bad, equal rewards tie."""
    if not a.strip() and not b.strip():
        return "both_bad"
    reward_a, reward_b = _old_concise_reward(context, a), _old_concise_reward(context, b)
    if reward_a == reward_b:
        return "tie"
    return "a" if reward_a > reward_b else "b"


concise_until_2026_12_04.reward = _old_concise_reward  # type: ignore[attr-defined]
