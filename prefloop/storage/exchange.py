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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefloop.atomic import atomic_path
from prefloop.names import Choice
from prefloop.storage.store import Store

FORMATS = ("trl", "hh")
EXPORT_FORMATS = (*FORMATS, "hf")  # hf: a dataset folder (export only)
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


# -- a Hugging Face dataset folder ---------------------------------------------------------

HF_TEST_SHARE = 0.1
"""Share of conversations whose pairs go to the test split (by a hash of the conversation
id: every pair of one conversation lands in the same split, so no prompt prefix leaks)."""
HF_COLUMNS = {
    "prompt": "the conversation up to the user's turn (list of {role, content}; a system "
              "prompt first when one was set)",
    "chosen": "the preferred answer ([{role: assistant, content}])",
    "rejected": "the other answer ([{role: assistant, content}])",
    "pair_id": "id of the answer pair (a written answer gives two rows with one pair_id)",
    "kind": "sample: both answers from one model; duel: two models, sides shuffled; "
            "import: imported from a preference file",
    "vote": "a or b (the visitor picked that answer) or written (the visitor wrote chosen)",
    "policy_chosen": "the model that wrote chosen (base, vNNNN, human, import)",
    "policy_rejected": "the model that wrote rejected",
    "voted_at": "time of the vote (UTC, ISO 8601)",
    "terms_version": "version (a hash) of the terms the voter had accepted when the pair was "
                     "made; null where no terms were asked",
}
HF_CLIENT_COLUMN = ("client", "the voter: a hash of its random cookie id (only with "
                    "--with-client-ids; rows of one voter share it)")


def client_hash(client_id: str | None) -> str | None:
    """A voter's id as an export shows it: grouping one voter's rows, not the cookie."""
    if client_id is None:
        return None
    return hashlib.sha256(f"prefloop client {client_id}".encode()).hexdigest()[:16]


def in_test_split(conversation_id: str, share: float = HF_TEST_SHARE) -> bool:
    digest = hashlib.sha256(conversation_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def hf_rows(store: Store, since: str | None = None,
            with_client_ids: bool = False) -> tuple[dict[str, list[dict]], dict]:
    """The rows of each split and the counts the card reports. Votes of clients flagged now
    are left out (counted); ties, both-bad and votes between identical answers carry no
    preference (counted)."""
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    counts = {"votes": 0, "flagged_client_votes": 0, "no_preference_votes": 0,
              "decisive_votes": 0, "written_votes": 0, "conversations": set(),
              "first_vote": None, "last_vote": None, "terms_versions": Counter()}
    for row in store.voted_pairs(since):
        counts["votes"] += 1
        if row["flagged_client"]:
            counts["flagged_client_votes"] += 1
            continue
        prefs = list(pair_preferences(row))
        if not prefs:
            counts["no_preference_votes"] += 1
            continue
        counts["written_votes" if row["choice"] == Choice.WRITTEN else "decisive_votes"] += 1
        counts["conversations"].add(row["conversation_id"])
        counts["terms_versions"][row["terms_version"]] += 1
        counts["first_vote"] = counts["first_vote"] or row["voted_at"]
        counts["last_vote"] = row["voted_at"]
        split = "test" if in_test_split(row["conversation_id"]) else "train"
        for pref in prefs:
            record = {**to_trl(pref), "pair_id": row["id"], "kind": row["kind"],
                      "vote": row["choice"],
                      "policy_chosen": ("human" if row["choice"] == Choice.WRITTEN
                                        else _policy_of(row, pref.chosen)),
                      "policy_rejected": _policy_of(row, pref.rejected),
                      "voted_at": row["voted_at"], "terms_version": row["terms_version"]}
            if with_client_ids:
                record[HF_CLIENT_COLUMN[0]] = client_hash(row["voter"])
            splits[split].append(record)
    counts["conversations"] = len(counts["conversations"])
    return splits, counts


def _policy_of(row: dict, text: str) -> str:
    return row["policy_a"] if text == row["text_a"] else row["policy_b"]


def _hf_schema(with_client_ids: bool):
    import pyarrow as pa

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    fields = [("prompt", message), ("chosen", message), ("rejected", message)]
    fields += [(name, pa.string()) for name in HF_COLUMNS if name not in dict(fields)]
    if with_client_ids:
        fields.append((HF_CLIENT_COLUMN[0], pa.string()))
    return pa.schema(fields)


def write_hf_dataset(store: Store, out: Path, license: str, since: str | None = None,
                     with_client_ids: bool = False) -> dict[str, int]:
    """Write a Hugging Face dataset folder: ``data/{train,test}-00000-of-00001.parquet``
    and a dataset card (README.md with YAML metadata) that ``datasets.load_dataset(out)``
    reads as is. A split without rows is left out (``datasets`` cannot read an empty
    parquet file); :class:`EmptyExport` when there is no row at all. Whole or not at all (an
    existing folder is replaced). Returns the rows per split, 0 for a split left out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits, counts = hf_rows(store, since, with_client_ids)
    if not any(splits.values()):
        raise EmptyExport(f"no votes to export: {counts['votes']} stored"
                          + (f" since {since}" if since else "")
                          + ", none with a preference from a voter not flagged")
    schema = _hf_schema(with_client_ids)
    tables = {name: pa.Table.from_pylist(rows, schema=schema)
              for name, rows in splits.items() if rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, folder=True) as tmp:
        (tmp / "data").mkdir()
        for name, table in tables.items():
            pq.write_table(table, tmp / "data" / f"{name}-00000-of-00001.parquet")
        (tmp / "README.md").write_text(
            dataset_card(license, {k: (t.num_rows, t.nbytes) for k, t in tables.items()},
                         counts, since, with_client_ids), encoding="utf-8")
    return {name: len(rows) for name, rows in splits.items()}


def terms_text(versions: Counter) -> str:
    """Which terms the exported votes were given under (``terms_version`` -> votes)."""
    asked = sorted((v, n) for v, n in versions.items() if v is not None)
    lines = [f"- version `{v}`: {n} vote{'s' if n != 1 else ''}" for v, n in asked]
    if versions.get(None):
        n = versions[None]
        lines.append(f"- no terms asked: {n} vote{'s' if n != 1 else ''}")
    return ("Before anything of theirs was stored, voters accepted the operator's terms; the "
            "column `terms_version` says which (a hash of the terms file). Votes by the "
            "version in force when their pair was made:\n" + "\n".join(lines))


class EmptyExport(ValueError):
    """Nothing to export (a dataset folder needs at least one row)."""


def dataset_card(license: str, splits: dict[str, tuple[int, int]], counts: dict,
                 since: str | None, with_client_ids: bool) -> str:
    """The README.md of an exported dataset: YAML metadata (license, splits with their rows
    and Arrow bytes, where the files are), then how the votes were collected and filtered."""
    rows = {name: n for name, (n, _) in splits.items()}
    total = sum(rows.values())
    size = ("n<1K" if total < 1_000 else "1K<n<10K" if total < 10_000 else
            "10K<n<100K" if total < 100_000 else "100K<n<1M" if total < 1_000_000 else "n>1M")
    columns = dict(HF_COLUMNS)
    if with_client_ids:
        columns[HF_CLIENT_COLUMN[0]] = HF_CLIENT_COLUMN[1]
    yaml = "\n".join([
        "---", f"license: {license}", "task_categories:", "- text-generation",
        "tags:", "- dpo", "- preference", "- human-feedback", "- prefloop",
        "size_categories:", f"- {size}",
        "configs:", "- config_name: default", "  data_files:",
        *[f"  - split: {name}\n    path: data/{name}-*.parquet" for name in rows],
        "dataset_info:", "  splits:",
        *[f"  - name: {name}\n    num_bytes: {size}\n    num_examples: {n}"
          for name, (n, size) in splits.items()],
        "---"])
    since_text = f"Only votes at or after {since} (UTC) were exported. " if since else ""
    table = "\n".join(f"| `{name}` | {text} |" for name, text in columns.items())
    return f"""{yaml}

# Preference pairs collected with prefloop

Pairs of answers to the same conversation, with the answer a person preferred, in TRL's
conversational preference format (`prompt`, `chosen`, `rejected`): ready for DPO.

## How the votes were collected
Visitors chatted with a model in prefloop's arena page or API. Every turn showed two sampled
answers side by side (`kind` sample: both from the model then in use; duel: two models, sides
shuffled, names hidden until the vote), and the visitor picked the better one, called a tie,
said both were bad, or wrote a better answer. A vote could be taken back within a short
window; an undone vote was deleted and is not here.

## How they were filtered
{since_text}Of {counts['votes']} stored votes:
- {counts['decisive_votes']} picked an answer (one row each) and {counts['written_votes']}
  came with a written answer (one row per different answer shown, the written one chosen);
- {counts['no_preference_votes']} were ties, both bad, or a pick between two identical answers:
  they prefer nothing and are left out;
- {counts['flagged_client_votes']} came from voters flagged by prefloop's voter checks (a side
  always picked, answers not read, or votes against a clear majority in duels) and not
  cleared by an admin: left out.

Voter ids are {"included, hashed" if with_client_ids else "not included"}. Visitors could
download and delete their data at any time; deleted votes are not here.

## Terms
{terms_text(counts["terms_versions"])}

## Counts
| split | rows |
|---|---|
{chr(10).join(f"| {name} | {n} |" for name, n in rows.items())}

Conversations: {counts['conversations']}. Votes from {counts['first_vote'] or '-'} to
{counts['last_vote'] or '-'} (UTC). Splits are by conversation (a hash of its id, about
{HF_TEST_SHARE:.0%} of conversations in `test`; a split without rows is left out).

## Columns
| column | meaning |
|---|---|
{table}

## License
`{license}`, as the operator of this prefloop set it (`dataset_license`).
"""
