"""Reading preference files: both TRL formats, and every kind of bad line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefloop.trainer.data import Message, PairsFileError, read_pairs


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


GOOD = json.dumps({"prompt": _user("Hi"), "chosen": _assistant("Hello!"),
                   "rejected": _assistant("Go away.")})


def _write(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def test_conversational_format(tmp_path: Path) -> None:
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    line = json.dumps({"prompt": prompt, "chosen": _assistant("Goodbye!"),
                       "rejected": _assistant("Whatever."), "id": 7, "score_chosen": 1.0})
    result = read_pairs(_write(tmp_path, line))
    (pair,) = result.pairs
    assert pair.prompt == (Message("system", "Be kind."), Message("user", "Hi"),
                           Message("assistant", "Hello."), Message("user", "Bye"))
    assert (pair.chosen, pair.rejected) == ("Goodbye!", "Whatever.")
    assert result.skipped == 0


def test_standard_format_and_blank_lines(tmp_path: Path) -> None:
    line = json.dumps({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"})
    result = read_pairs(_write(tmp_path, "", line, "   ", GOOD, ""))
    assert len(result.pairs) == 2
    assert result.pairs[0].prompt == (Message("user", "What is 2+2?"),)
    assert (result.pairs[0].chosen, result.pairs[0].rejected) == ("4", "5")


BAD_LINES = [
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"chosen": "a", "rejected": "b"}), "missing key: prompt"),
    (json.dumps({"prompt": "hi"}), "missing keys: chosen, rejected"),
    (json.dumps({"prompt": _user("hi"), "chosen": _user("a"), "rejected": _assistant("b")}),
     "chosen[0] has role 'user'; it must be 'assistant'"),
    (json.dumps({"prompt": _user("hi") + _assistant("x"), "chosen": "a", "rejected": "b"}),
     "prompt must end with a user message, not 'assistant'"),
    (json.dumps({"prompt": [{"role": "bot", "content": "x"}] + _user("hi"), "chosen": "a",
                 "rejected": "b"}), "prompt[0] has role 'bot'"),
    (json.dumps({"prompt": _user("hi") + [{"role": "system", "content": "x"}] + _user("hi"),
                 "chosen": "a", "rejected": "b"}), "prompt[1] is a system message"),
    (json.dumps({"prompt": "hi", "chosen": "", "rejected": "b"}), "chosen is empty"),
    (json.dumps({"prompt": "hi", "chosen": "a", "rejected": _assistant("  \n")}),
     "rejected is empty"),
    (json.dumps({"prompt": "hi", "chosen": "same", "rejected": "same"}),
     "chosen and rejected are the same answer"),
    (json.dumps({"prompt": _user("hi"), "chosen": _assistant("x"), "rejected": _assistant("x")}),
     "chosen and rejected are the same answer"),
    (json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}),
     "the prompt's last user message is empty"),
    (json.dumps({"prompt": [], "chosen": "a", "rejected": "b"}), "prompt is an empty list"),
    (json.dumps({"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"}),
     "prompt must be a string or a list of messages, got dict"),
    (json.dumps({"prompt": "hi", "chosen": 3, "rejected": "b"}),
     "chosen must be a string or a list with one assistant message, got int"),
    (json.dumps({"prompt": "hi", "chosen": "a", "rejected": _assistant("b") * 2}),
     "rejected must hold exactly one assistant message, got 2"),
    (json.dumps({"prompt": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"}),
     "prompt[0] needs a string content"),
    (json.dumps({"prompt": ["hi"], "chosen": "a", "rejected": "b"}),
     "prompt[0] must be an object with role and content, got str"),
    (json.dumps({"prompt": "hi", "chosen": [{"content": "a"}], "rejected": "b"}),
     "chosen[0] needs a string role"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES)
def test_bad_line_names_line_and_problem(tmp_path: Path, line: str | bytes, problem: str) -> None:
    path = _write(tmp_path, GOOD, "", line, GOOD)
    with pytest.raises(PairsFileError) as info:
        read_pairs(path)
    assert f"line 3: {problem}" in str(info.value)
    assert "--skip-invalid" in str(info.value)


def test_skip_invalid_counts(tmp_path: Path) -> None:
    lines = [GOOD, BAD_LINES[0][0], GOOD, BAD_LINES[3][0], BAD_LINES[11][0]]
    result = read_pairs(_write(tmp_path, *lines), skip_invalid=True)
    assert len(result.pairs) == 2
    assert result.skipped == 3
    assert [p.split(":")[0] for p in result.problems] == ["line 2", "line 4", "line 5"]


def test_all_invalid_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = _write(tmp_path, BAD_LINES[0][0], BAD_LINES[9][0])
    with pytest.raises(PairsFileError, match="all 2 lines are invalid; first: line 1"):
        read_pairs(path, skip_invalid=True)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(PairsFileError, match="holds no pairs"):
        read_pairs(path, skip_invalid=True)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PairsFileError, match="cannot read pairs file"):
        read_pairs(tmp_path / "nope.jsonl")
