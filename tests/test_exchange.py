"""Export of votes as preference pairs (TRL, HH) and import of preference files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from prefloop.cli import main
from prefloop.loop.rounds import snapshot_pairs
from prefloop.storage.exchange import (
    Preference,
    pair_preferences,
    parse_hh,
    to_hh,
    to_trl,
)
from prefloop.storage.store import Answer, Store
from prefloop.trainer.data import read_pairs

CONTEXT = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": "Name a colour."}]


def voted(store: Store, choice: str, answer: str | None = None, a: str = "Red.",
          b: str = "Blue.") -> str:
    conversation = store.create_conversation()
    pair_id = store.add_pair(conversation, CONTEXT, Answer("base", a, 1), Answer("base", b, 2))
    store.vote(pair_id, choice, answer)
    return pair_id


def preferences(store: Store, since: str | None = None) -> list[Preference]:
    """The stored votes as preferences, oldest vote first (as export and rounds see them)."""
    return [pref for row in store.voted_pairs(since) for pref in pair_preferences(row)]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "data" / "prefloop.db")
    yield store
    store.close()


def test_votes_become_preferences(store: Store):
    voted(store, "a")
    voted(store, "b")
    voted(store, "tie")
    voted(store, "both_bad")
    voted(store, "written", "Green.")
    voted(store, "written", "Same.", a="Same.", b="Other.")
    got = [(p.chosen, p.rejected) for p in preferences(store)]
    assert got == [("Red.", "Blue."), ("Blue.", "Red."), ("Green.", "Red."),
                   ("Green.", "Blue."), ("Same.", "Other.")]
    assert all(p.prompt == CONTEXT for p in preferences(store))


def test_a_vote_between_identical_answers_prefers_nothing(store: Store, tmp_path: Path):
    """Two samples can coincide (short answers most often); a round's pairs file with such a
    line would be refused by the trainer, so it never becomes a preference."""
    voted(store, "a", a="Sure.", b="Sure.")
    voted(store, "b", a="Sure.", b="Sure.")
    voted(store, "a")
    assert [(p.chosen, p.rejected) for p in preferences(store)] == [("Red.", "Blue.")]
    snapshot = snapshot_pairs(store, tmp_path / "pairs.jsonl", 0, 100, 0.0, random.Random(0))
    assert snapshot.pairs == 1
    assert len(read_pairs(snapshot.path).pairs) == 1  # the trainer reads it as it is


def test_the_same_votes_in_another_order_give_the_same_round_file(tmp_path: Path):
    """Concurrent voters number the same votes differently from run to run; a round's pairs
    file (replay sample and shuffle included) depends on the votes, not on that order."""
    old = [(f"Colour {i}.", f"Shade {i}.") for i in range(6)]
    new = [(f"Colour {i}.", f"Shade {i}.") for i in range(6, 12)]
    files = []
    for run, (first, then) in enumerate([(old, new), (old[::-1], new[::-1]),
                                         (old[2:] + old[:2], new[3:] + new[:3])]):
        with Store(tmp_path / f"run{run}.db") as store:
            for a, b in first:
                voted(store, "a", a=a, b=b)
            after = max(row["vote_rowid"] for row in store.trainable_pairs())
            for a, b in then:
                voted(store, "a", a=a, b=b)
            snapshot = snapshot_pairs(store, tmp_path / f"run{run}.jsonl", after, 100, 0.5,
                                      random.Random(7))
        assert (snapshot.pairs, snapshot.new_pairs) == (9, 6)  # 3 of the older ones replayed
        files.append(snapshot.path.read_text())
    assert files[0] == files[1] == files[2]


def test_since_filters_by_vote_time(store: Store):
    voted(store, "a")
    assert len(list(preferences(store, since="2999-01-01"))) == 0
    assert len(list(preferences(store, since="2000-01-01"))) == 1


def test_trl_and_hh_records():
    pref = Preference(CONTEXT, "Red.", "Blue.")
    assert to_trl(pref) == {"prompt": CONTEXT,
                            "chosen": [{"role": "assistant", "content": "Red."}],
                            "rejected": [{"role": "assistant", "content": "Blue."}]}
    hh = to_hh(pref)
    assert hh == {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Red.",
                  "rejected": "\n\nHuman: Name a colour.\n\nAssistant: Blue."}
    back = parse_hh(hh)
    assert back == Preference([CONTEXT[1]], "Red.", "Blue.")


@pytest.mark.parametrize("record, problem", [
    ({"chosen": "no turns here", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "start with"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "'chosen' and 'rejected'"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: c"},
     "share everything"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"},
     "same answer"),
    ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a"}, "end with an Assistant"),
    ({"chosen": 5, "rejected": 6}, "transcript strings"),
    (["not", "an", "object"], "an object"),
])
def test_bad_hh_records(record, problem):
    with pytest.raises(ValueError, match=problem):
        parse_hh(record)


def cli(*args: str, data_dir: Path):
    return CliRunner().invoke(main, [*args, "--data-dir", str(data_dir)])


def test_export_import_round_trip(store: Store, tmp_path: Path):
    voted(store, "a")
    voted(store, "written", "Green.")
    data_dir = store.path.parent
    for fmt in ("trl", "hh"):
        out = tmp_path / f"pairs.{fmt}.jsonl"
        result = cli("export", "--out", str(out), "--format", fmt, data_dir=data_dir)
        assert result.exit_code == 0 and "wrote 3 pairs" in result.output, result.output
        assert len(out.read_text().splitlines()) == 3

        other = tmp_path / f"other-{fmt}"
        result = cli("import", str(out), "--format", fmt, data_dir=other)
        assert result.exit_code == 0 and "imported 3 pairs, 0 already stored" in result.output
        result = cli("import", str(out), "--format", fmt, data_dir=other)
        assert "imported 0 pairs, 3 already stored" in result.output
        again = tmp_path / f"again.{fmt}.jsonl"
        assert cli("export", "--out", str(again), "--format", fmt,
                   data_dir=other).exit_code == 0
        if fmt == "trl":
            assert again.read_text() == out.read_text()
        else:  # HH has no system message; the rest survives
            assert [json.loads(line) for line in again.read_text().splitlines()] == \
                   [json.loads(line) for line in out.read_text().splitlines()]
        with Store(other / "prefloop.db") as check:
            assert check.counts()["votes"] == 3


def test_import_bad_lines_name_the_line(tmp_path: Path):
    good = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n{broken\n" + json.dumps(good | {"chosen": ""}) + "\n")
    result = cli("import", str(path), data_dir=tmp_path / "d")
    assert result.exit_code == 1 and "line 2" in result.output and "not valid JSON" in \
        result.output
    assert not (tmp_path / "d" / "prefloop.db").exists()
    result = cli("import", str(path), "--skip-invalid", data_dir=tmp_path / "d")
    assert result.exit_code == 0 and "imported 1 pairs" in result.output
    assert "2 invalid lines skipped" in result.output

    hh = tmp_path / "hh.jsonl"
    hh.write_text('{"chosen": "x", "rejected": "y"}\n')
    result = cli("import", str(hh), "--format", "hh", data_dir=tmp_path / "d")
    assert result.exit_code == 1 and "line 1" in result.output


def test_export_errors(tmp_path: Path, store: Store):
    result = cli("export", "--out", str(tmp_path / "x.jsonl"), data_dir=tmp_path / "none")
    assert result.exit_code == 1 and "no database" in result.output
    result = cli("export", "--out", str(tmp_path / "x.jsonl"), "--since", "yesterday",
                 data_dir=store.path.parent)
    assert result.exit_code == 1 and "--since" in result.output
    result = cli("export", "--out", str(tmp_path / "missing" / "x.jsonl"),
                 data_dir=store.path.parent)
    assert result.exit_code == 1 and "cannot write" in result.output


def test_exports_carry_client_ids_only_when_asked(store: Store, tmp_path: Path):
    conversation = store.create_conversation("c" * 32)
    pair_id = store.add_pair(conversation, CONTEXT, Answer("base", "Red.", 1),
                             Answer("base", "Blue.", 2))
    store.vote(pair_id, "b", client_id="c" * 32)
    out = tmp_path / "plain.jsonl"
    assert cli("export", "--out", str(out), data_dir=store.path.parent).exit_code == 0
    assert "c" * 32 not in out.read_text()
    assert set(json.loads(out.read_text())) == {"prompt", "chosen", "rejected"}
    for fmt in ("trl", "hh"):
        out = tmp_path / f"ids.{fmt}.jsonl"
        result = cli("export", "--out", str(out), "--format", fmt, "--with-client-ids",
                     data_dir=store.path.parent)
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["client_id"] == "c" * 32
