"""The names prefloop's parts share: policies, adapter states, pair kinds, vote choices, ids.

A leaf module: it imports nothing of prefloop, so every layer (the trainer included) may
use it. The enums are ``StrEnum``s: members compare equal to their strings, so the values
stored in SQLite and sent over the API stay what they were.
"""

from __future__ import annotations

import re
import uuid
from enum import StrEnum

BASE = "base"  # the policy with no adapter: the frozen reference, champion at the start

# The embedded default model: the folder name `prefloop model prepare` writes under the
# models directory (and where the trainer looks for it when given no model).
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class AdapterState(StrEnum):
    """Where an adapter is in its life: candidate → champion → retired (or rolled_back when
    the champion loses to ``base``), or candidate → rejected."""

    CANDIDATE = "candidate"
    CHAMPION = "champion"
    RETIRED = "retired"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"


class PairKind(StrEnum):
    """``sample``: both answers from the champion; ``duel``: two policies, sides shuffled."""

    SAMPLE = "sample"
    DUEL = "duel"


class Choice(StrEnum):
    """A vote on a pair. DPO uses ``a``/``b`` and written answers; ties and both-bad count
    for ratings only."""

    A = "a"
    B = "b"
    TIE = "tie"
    BOTH_BAD = "both_bad"
    WRITTEN = "written"


CHOICES: tuple[str, ...] = tuple(c.value for c in Choice)

_HEX_ID = re.compile(r"[0-9a-f]{32}")


def new_id() -> str:
    """A fresh id: 32 lowercase hex digits (a random UUID4)."""
    return uuid.uuid4().hex


def is_hex_id(value: object) -> bool:
    """True for an id prefloop makes (client, conversation, pair): exactly 32 lowercase hex
    digits. Anything else (a lone surrogate, which SQLite cannot even encode) is not one."""
    return isinstance(value, str) and _HEX_ID.fullmatch(value) is not None
