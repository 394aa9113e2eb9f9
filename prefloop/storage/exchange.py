"""Preference pairs in and out of the store: TRL conversational JSONL and HH-RLHF text.

Export: a decisive vote (``a``/``b``) gives one pair; a written answer gives two, the written
answer preferred over each answer shown. Ties and both-bad votes carry no preference and are
left out; votes of a flagged client are exported, marked ``"flagged_client": true``.
Import: each record becomes a conversation with one pair and its vote; a record seen before
(same prompt, chosen and rejected) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefloop.atomic import atomic_path
from prefloop.names import Choice
from prefloop.storage.store import Store

FORMATS = ("trl", "hh")
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Preference:
    prompt: Messages  # ends with a user message
    chosen: str
    rejected: str

    def fingerprint(self) -> str:
        blob = json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def export_records(store: Store, fmt: str, since: str | None = None,
                   with_client_ids: bool = False) -> Iterator[dict]:
    """The stored votes as ``fmt`` records, oldest vote first. A record from a client flagged
    as an untrustworthy voter (loop/voters.py) carries ``"flagged_client": true``: it is
    marked, never left out; ``client_id`` is added only when asked for."""
    convert = {"trl": to_trl, "hh": to_hh}[fmt]
    for row in store.voted_pairs(since):
        for pref in pair_preferences(row):
            record = convert(pref)
            if with_client_ids:
                record["client_id"] = row["voter"]
            if row["flagged_client"]:
                record["flagged_client"] = True
            yield record


def write_export(store: Store, out: Path, fmt: str, since: str | None = None,
                 with_client_ids: bool = False) -> int:
    """Write :func:`export_records` to ``out`` as JSONL, whole or not at all (an existing file
    is replaced); returns the number of records. OSError when it cannot be written."""
    count = 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in export_records(store, fmt, since, with_client_ids):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def pair_preferences(row: dict) -> Iterator[Preference]:
    """The preferences one voted pair gives (a row of :meth:`Store.voted_pairs`): one for a
    decisive vote, one per shown answer for a written answer, none for a tie or both-bad,
    and none for a decisive vote between two identical answers (two samples can coincide,
    short ones most often: such a vote prefers nothing, and the trainer refuses it)."""
    prompt, a, b = row["context"], row["text_a"], row["text_b"]
    if row["choice"] in (Choice.A, Choice.B) and a == b:
        return
    if row["choice"] == Choice.A:
        yield Preference(prompt, a, b)
    elif row["choice"] == Choice.B:
        yield Preference(prompt, b, a)
    elif row["choice"] == Choice.WRITTEN:
        for shown in dict.fromkeys((a, b)):  # both, once each if they are equal
            if shown != row["answer"]:
                yield Preference(prompt, row["answer"], shown)


def to_trl(pref: Preference) -> dict:
    return {"prompt": pref.prompt,
            "chosen": [{"role": "assistant", "content": pref.chosen}],
            "rejected": [{"role": "assistant", "content": pref.rejected}]}


def hh_transcript(messages: Messages) -> str:
    """HH-RLHF text: ``\\n\\nHuman: …\\n\\nAssistant: …`` (a system message is left out)."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages
                   if m["role"] in names)


def to_hh(pref: Preference) -> dict:
    return {"chosen": hh_transcript(pref.prompt + [{"role": "assistant", "content": pref.chosen}]),
            "rejected": hh_transcript(pref.prompt + [{"role": "assistant",
                                                      "content": pref.rejected}])}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(text: str) -> Messages:
    """Split an HH-RLHF transcript into chat messages; ValueError when it is not one."""
    if not isinstance(text, str):
        raise ValueError("chosen and rejected must be transcript strings")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("a transcript must start with '\\n\\nHuman: '")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[name], "content": content.strip()}
            for name, content in zip(parts[1::2], parts[2::2], strict=True)]


def parse_hh(obj: object) -> Preference:
    """One HH-RLHF record ``{"chosen": transcript, "rejected": transcript}``."""
    if not isinstance(obj, dict) or not {"chosen", "rejected"} <= set(obj):
        raise ValueError("an HH record is an object with 'chosen' and 'rejected' transcripts")
    chosen, rejected = parse_hh_transcript(obj["chosen"]), parse_hh_transcript(obj["rejected"])
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("both transcripts must end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected must share everything before the last answer")
    if not chosen[-2:-1] or chosen[-2]["role"] != "user":
        raise ValueError("the last answer must follow a Human turn")
    a, b = chosen[-1]["content"], rejected[-1]["content"]
    if not a or not b:
        raise ValueError("an answer is empty")
    if a == b:
        raise ValueError("chosen and rejected are the same answer")
    return Preference(chosen[:-1], a, b)


class FileFormatError(ValueError):
    """A preference file to import is not in the format given; the message names the line."""


def read_hh(path: Path, skip_invalid: bool = False) -> tuple[list[Preference], int]:
    """The preferences of an HH-RLHF JSONL file and the number of bad lines skipped. A bad
    line raises :class:`FileFormatError` naming it, unless ``skip_invalid`` is set."""
    prefs, skipped = [], 0
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prefs.append(parse_hh(json.loads(line)))
        except (ValueError, UnicodeDecodeError) as exc:
            if not skip_invalid:
                raise FileFormatError(f"{path} line {number}: {exc} (use --skip-invalid to "
                                      "skip bad lines)") from None
            skipped += 1
    if not prefs:
        raise FileFormatError(f"{path} holds no valid HH records")
    return prefs, skipped


def import_preferences(store: Store, prefs: list[Preference]) -> tuple[int, int]:
    """Add each preference as a voted pair; returns (added, skipped as duplicates)."""
    added = 0
    for pref in prefs:
        added += store.import_pair(pref.prompt, pref.chosen, pref.rejected, pref.fingerprint())
    return added, len(prefs) - added
