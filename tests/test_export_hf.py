"""`prefloop export --format hf`: a dataset folder that the real `datasets` library loads as
is (offline), with a train/test split by conversation and a card whose counts match the
database; flagged voters' and undone votes are not in it, client ids only hashed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from prefloop.cli import main
from prefloop.config import ConfigError, Settings
from prefloop.storage.exchange import client_hash, in_test_split
from prefloop.storage.store import Answer, Store

datasets = pytest.importorskip("datasets")  # the `test` extra pins it

GOOD, BAD, OTHER = "c" * 32, "f" * 32, "d" * 32


def voted(store: Store, client: str, choice: str, answer: str | None = None,
          a: str = "Red.", b: str = "Blue.") -> str:
    conversation = store.create_conversation(client)
    pair = store.add_pair(conversation, [{"role": "user", "content": f"Colour {conversation}?"}],
                          Answer("base", a, 1), Answer("v0001", b, 2))
    store.vote(pair, choice, answer, client_id=client)
    return conversation


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "data" / "prefloop.db") as store:
        yield store


def filled(store: Store) -> dict[str, int]:
    """Votes of every kind; returns the rows each split should get."""
    expected = {"train": 0, "test": 0}
    splits: set[str] = set()
    while splits != {"train", "test"}:  # conversation ids are random: until both splits
        for choice in ("a", "b"):
            conversation = voted(store, GOOD, choice)
            split = "test" if in_test_split(conversation) else "train"
            expected[split] += 1
            splits.add(split)
        assert len(splits) == 2 or store.counts()["votes"] < 400
    conversation = voted(store, GOOD, "written", "Green.")  # two rows
    expected["test" if in_test_split(conversation) else "train"] += 2
    voted(store, GOOD, "tie")
    voted(store, GOOD, "both_bad")
    voted(store, GOOD, "a", a="Same.", b="Same.")  # prefers nothing
    voted(store, BAD, "a")
    store.flag_client(BAD, ["always A"])
    undone = voted(store, OTHER, "b")
    store.delete_vote(store.open_pair(undone) or store.db.execute(
        "select id from pairs where conversation_id = ?", [undone]).fetchone()[0])
    return expected


def card_yaml(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return text.split("---\n")[1]


def test_the_exported_folder_loads_with_datasets_and_the_card_counts_match(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = filled(store)
    out = tmp_path / "dataset"
    monkeypatch.setenv("PREFLOOP_DATASET_LICENSE", "cc-by-4.0")
    result = CliRunner().invoke(main, ["export", "--format", "hf", "--out", str(out),
                                       "--data-dir", str(store.path.parent)])
    assert result.exit_code == 0, result.output
    total = sum(expected.values())
    assert f"wrote {total} pairs (train {expected['train']}, test {expected['test']})" \
        in result.output

    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert {name: len(split) for name, split in loaded.items()} == expected
    yaml = card_yaml(out / "README.md")
    assert "license: cc-by-4.0" in yaml
    assert {name: int(n) for name, n in re.findall(
        r"- name: (\w+)\n    num_bytes: \d+\n    num_examples: (\d+)", yaml)} == expected

    # datasets checks the card's counts itself: a wrong one fails the load.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "data").symlink_to(out / "data")
    (tampered / "README.md").write_text((out / "README.md").read_text().replace(
        f"num_examples: {expected['train']}\n", f"num_examples: {expected['train'] + 1}\n"))
    with pytest.raises(datasets.exceptions.NonMatchingSplitsSizesError):
        datasets.load_dataset(str(tampered), cache_dir=str(tmp_path / "cache2"))

    rows = [row for split in loaded.values() for row in split]
    assert set(rows[0]) == {"prompt", "chosen", "rejected", "pair_id", "kind", "vote",
                            "policy_chosen", "policy_rejected", "voted_at", "terms_version"}
    assert rows[0]["prompt"][0]["role"] == "user"
    assert rows[0]["chosen"][0]["role"] == "assistant"
    # What the database holds, row by row: no flagged voter, no undone vote, no tie.
    conversations = {json.loads(r["context"])[-1]["content"]: r["client_id"] for r in
                     store.db.query("select p.context, c.client_id from pairs p join "
                                    "conversations c on c.id = p.conversation_id")}
    assert {conversations[row["prompt"][-1]["content"]] for row in rows} == {GOOD}
    assert sorted(row["vote"] for row in rows).count("written") == 2
    written = [row for row in rows if row["vote"] == "written"]
    assert {row["chosen"][0]["content"] for row in written} == {"Green."}
    assert {row["policy_rejected"] for row in written} == {"base", "v0001"}
    assert all(row["policy_chosen"] == "human" for row in written)
    card = (out / "README.md").read_text(encoding="utf-8")
    votes = store.counts()["votes"]
    assert f"Of {votes} stored votes" in card
    assert "- 1 came from voters flagged" in card
    assert "- 3 were ties, both bad, or a pick between two identical answers" in card


def test_client_ids_only_when_asked_and_then_hashed(store: Store, tmp_path: Path) -> None:
    voted(store, GOOD, "a")
    data_dir = str(store.path.parent)
    plain, hashed = tmp_path / "plain", tmp_path / "hashed"
    assert CliRunner().invoke(main, ["export", "--format", "hf", "--out", str(plain),
                                     "--data-dir", data_dir]).exit_code == 0
    result = CliRunner().invoke(main, ["export", "--format", "hf", "--out", str(hashed),
                                       "--with-client-ids", "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    [row] = [r for split in datasets.load_dataset(str(plain), cache_dir=str(tmp_path / "c1"))
             .values() for r in split]
    assert "client" not in row
    [row] = [r for split in datasets.load_dataset(str(hashed), cache_dir=str(tmp_path / "c2"))
             .values() for r in split]
    assert row["client"] == client_hash(GOOD) and GOOD not in row["client"]
    for path in (plain, hashed):
        for file in path.rglob("*"):
            if file.is_file():
                assert GOOD.encode() not in file.read_bytes()
    assert "license: unknown" in card_yaml(plain / "README.md")
    # One conversation: one split, the other left out of the folder and the card.
    assert len(list((plain / "data").glob("*.parquet"))) == 1
    assert card_yaml(plain / "README.md").count("- split:") == 1


def test_nothing_to_export_is_a_clear_error(store: Store, tmp_path: Path) -> None:
    voted(store, GOOD, "tie")
    result = CliRunner().invoke(main, ["export", "--format", "hf", "--out",
                                       str(tmp_path / "ds"), "--data-dir",
                                       str(store.path.parent)])
    assert result.exit_code == 1 and "no votes to export: 1 stored" in result.output
    assert not (tmp_path / "ds").exists()


def test_dataset_license_is_checked() -> None:
    assert Settings(dataset_license="apache-2.0").dataset_license == "apache-2.0"
    with pytest.raises(ConfigError, match="dataset_license"):
        Settings(dataset_license="CC BY 4.0\nnot: yaml")


def test_the_card_and_rows_name_the_terms_each_vote_was_given_under(store: Store,
                                                                    tmp_path: Path) -> None:
    voted(store, GOOD, "a")  # no terms asked
    for _ in range(2):
        conversation = store.create_conversation(OTHER)
        pair = store.add_pair(conversation, [{"role": "user", "content": f"Q {conversation}"}],
                              Answer("base", "x", 1), Answer("base", "y", 2),
                              terms_version="0123456789abcdef")
        store.vote(pair, "b", client_id=OTHER)
    out = tmp_path / "ds"
    assert CliRunner().invoke(main, ["export", "--format", "hf", "--out", str(out),
                                     "--data-dir", str(store.path.parent)]).exit_code == 0
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    versions = sorted(str(r["terms_version"]) for split in loaded.values() for r in split)
    assert versions == ["0123456789abcdef", "0123456789abcdef", "None"]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "- version `0123456789abcdef`: 2 votes" in card
    assert "- no terms asked: 1 vote" in card
