"""Read preference pairs from a JSONL file.

Two line formats are accepted, as in TRL:

- conversational: ``{"prompt": [{"role": "user", "content": ...}, ...],
  "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}``
- standard: ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` (the prompt becomes one
  user message).

Other keys on a line are ignored. Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_ROLES = ("system", "user", "assistant")


class PairsFileError(ValueError):
    """The pairs file cannot be used; the message names the line and the problem."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class PreferencePair:
    """One prompt (a conversation ending with a user turn) and two answers to it."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PairsFile:
    pairs: list[PreferencePair]
    skipped: int  # invalid lines skipped (only with skip_invalid=True)
    problems: list[str]  # "line N: problem" for each skipped line


def read_pairs(path: Path | str, skip_invalid: bool = False) -> PairsFile:
    """Read and check every line of ``path``.

    A bad line raises :class:`PairsFileError` naming it, unless ``skip_invalid`` is set, in
    which case it is skipped and counted. A file with no valid pair is always an error.
    """
    path = Path(path)
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise PairsFileError(f"cannot read pairs file {path}: {exc.strerror or exc}") from None

    pairs: list[PreferencePair] = []
    problems: list[str] = []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            pairs.append(parse_line(raw))
        except ValueError as exc:
            problem = f"line {number}: {exc}"
            if not skip_invalid:
                raise PairsFileError(f"{path} {problem} (use --skip-invalid to skip bad lines)") \
                    from None
            problems.append(problem)

    if not pairs:
        if problems:
            raise PairsFileError(f"{path}: all {len(problems)} lines are invalid; first: "
                                 f"{problems[0]}")
        raise PairsFileError(f"{path} holds no pairs; write one JSON object a line with "
                             "prompt, chosen and rejected")
    return PairsFile(pairs=pairs, skipped=len(problems), problems=problems)


def parse_line(raw: bytes | str) -> PreferencePair:
    """One line of JSON as a pair; ValueError says what is wrong with it."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    try:
        obj = json.loads(text.removeprefix("\ufeff"))  # a byte-order mark some editors write
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in obj]
    if missing:
        raise ValueError(f"missing key{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")

    prompt = _parse_prompt(obj["prompt"])
    chosen = _parse_answer(obj["chosen"], "chosen")
    rejected = _parse_answer(obj["rejected"], "rejected")
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same answer; there is nothing to prefer")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def _parse_message(value: Any, where: str) -> Message:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object with role and content, "
                         f"got {type(value).__name__}")
    role, content = value.get("role"), value.get("content")
    if not isinstance(role, str):
        raise ValueError(f"{where} needs a string role")
    if not isinstance(content, str):
        raise ValueError(f"{where} needs a string content")
    return Message(role, content)


def _parse_prompt(value: Any) -> tuple[Message, ...]:
    if isinstance(value, str):
        messages = (Message("user", value),)
    elif isinstance(value, list):
        messages = tuple(_parse_message(m, f"prompt[{i}]") for i, m in enumerate(value))
    else:
        raise ValueError(f"prompt must be a string or a list of messages, "
                         f"got {type(value).__name__}")
    if not messages:
        raise ValueError("prompt is an empty list")
    for i, message in enumerate(messages):
        if message.role not in PROMPT_ROLES:
            raise ValueError(f"prompt[{i}] has role {message.role!r}; "
                             f"allowed: {', '.join(PROMPT_ROLES)}")
        if message.role == "system" and i > 0:
            raise ValueError(f"prompt[{i}] is a system message; only the first may be")
    if messages[-1].role != "user":
        raise ValueError(f"prompt must end with a user message, not {messages[-1].role!r}")
    if not messages[-1].content.strip():
        raise ValueError("the prompt's last user message is empty")
    return messages


def _parse_answer(value: Any, key: str) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{key} must hold exactly one assistant message, got {len(value)}")
        message = _parse_message(value[0], f"{key}[0]")
        if message.role != "assistant":
            raise ValueError(f"{key}[0] has role {message.role!r}; it must be 'assistant'")
        text = message.content
    else:
        raise ValueError(f"{key} must be a string or a list with one assistant message, "
                         f"got {type(value).__name__}")
    if not text.strip():
        raise ValueError(f"{key} is empty")
    return text
