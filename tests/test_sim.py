"""Simulated voters on hand-made cases, the judge against a real local HTTP server, oracle
loading, and the built-in prompt set."""

from __future__ import annotations

import json
import random
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from prefloop.names import is_hex_id
from prefloop.sim.crowd import (
    NoiseError,
    crowd_sizes,
    draw_voters,
    make_crowd,
    parse_noise,
    reading_seconds,
)
from prefloop.sim.oracles import (
    VOTES,
    CheckedOracle,
    ConciseOracle,
    JudgeOracle,
    OracleError,
    RandomOracle,
    SentimentOracle,
    is_complete,
    judge_messages,
    load_oracle,
    parse_verdict,
)
from prefloop.sim.prompts import PROMPTS, PromptError, read_prompts, split_prompts
from prefloop.sim.report import adapter_fates, gate_snapshot

CONTEXT = [{"role": "user", "content": "How was your day?"}]
POSITIVE = "It was a wonderful day, thank you! I loved every minute of it."
NEGATIVE = "It was a terrible day. Everything went wrong and I hate it."


# -- random ---------------------------------------------------------------------------------

def _contexts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Question {i}?"}] for i in range(n)]


def test_random_votes_a_and_b_evenly_with_some_ties():
    votes = Counter(RandomOracle(seed=7)(c, "same", "same") for c in _contexts(4000))
    assert set(votes) == {"a", "b", "tie"}
    # Seeded, so the counts are fixed; the bounds are ~4 standard deviations wide.
    assert abs(votes["a"] - votes["b"]) < 4 * (4000 * 0.9) ** 0.5
    assert 0.08 < votes["tie"] / 4000 < 0.12
    assert set(RandomOracle(seed=7, ties=0.0)(c, "x", "y") for c in _contexts(200)) == {"a", "b"}


def test_random_votes_depend_on_the_seed_and_the_pair_not_the_call_order():
    contexts = _contexts(50)
    first = [RandomOracle(seed=1)(c, "x", "y") for c in contexts]
    oracle = RandomOracle(seed=1)
    backwards = [oracle(c, "x", "y") for c in reversed(contexts)][::-1]
    assert first == backwards
    assert first != [RandomOracle(seed=2)(c, "x", "y") for c in contexts]
    assert first != [RandomOracle(seed=1)(c, "x", "z") for c in contexts]


def test_random_has_no_reward_and_takes_the_seed_through_load_oracle():
    oracle = load_oracle("random", seed=5)
    assert isinstance(oracle, RandomOracle) and oracle.seed == 5 and oracle.name == "random"
    assert getattr(oracle, "reward", None) is None  # nothing to score: the report shows –
    with pytest.raises(OracleError, match="ties"):
        RandomOracle(ties=1.0)
    with pytest.raises(OracleError, match="judge"):
        load_oracle("random", url="http://x")


# -- sentiment ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sentiment() -> SentimentOracle:
    return SentimentOracle()


def test_sentiment_prefers_the_positive_answer_on_either_side(sentiment: SentimentOracle):
    assert sentiment(CONTEXT, POSITIVE, NEGATIVE) == "a"
    assert sentiment(CONTEXT, NEGATIVE, POSITIVE) == "b"


def test_sentiment_ties_within_the_margin(sentiment: SentimentOracle):
    # Neutral text scores exactly 0; these two differ by ~0.02, inside the 0.05 margin.
    assert sentiment(CONTEXT, "The train leaves at noon.", "The report is on the desk.") == "tie"
    close_a, close_b = "This is good.", "This is nice."
    assert 0 < abs(sentiment.reward(CONTEXT, close_a) - sentiment.reward(CONTEXT, close_b)) \
        <= 0.05
    assert sentiment(CONTEXT, close_a, close_b) == "tie"
    assert SentimentOracle(margin=0.0)(CONTEXT, close_a, close_b) == "a"


def test_sentiment_reward_is_the_compound_score(sentiment: SentimentOracle):
    rewards = [sentiment.reward(CONTEXT, text) for text in (POSITIVE, NEGATIVE, "", "Okay.")]
    assert all(-1.0 <= r <= 1.0 for r in rewards)
    assert rewards[0] > 0.5 and rewards[1] < -0.5 and rewards[2] == 0.0
    assert sentiment.name == "sentiment"


def test_sentiment_rejects_a_bad_margin():
    with pytest.raises(OracleError, match="margin"):
        SentimentOracle(margin=-0.1)


# -- concise --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, complete", [
    ("Yes.", True), ("Really?", True), ("Stop!", True), ("Wait for it\u2026", True),
    ('He said "yes."', True), ("(See the manual.)", True), ("Done.  \n", True),
    ("Well, it depends on", False), ("", False), ("   ", False), ('"yes"', False),
    ("Step 1: mix the", False),
])
def test_is_complete(text: str, complete: bool):
    assert is_complete(text) is complete


def test_concise_prefers_the_shorter_complete_answer():
    short, long = "Boil it for six minutes.", ("Boil the egg for about six minutes, then cool it "
                                               "in cold water so the yolk stays runny.")
    oracle = ConciseOracle()
    assert oracle(CONTEXT, short, long) == "a"
    assert oracle(CONTEXT, long, short) == "b"


def test_concise_prefers_a_complete_answer_to_a_shorter_unfinished_one():
    complete = "Boil the egg for about six minutes, then cool it in cold water."
    assert ConciseOracle()(CONTEXT, "Boil the egg for", complete) == "b"
    assert ConciseOracle()(CONTEXT, complete, "Boil the egg for") == "a"


def test_concise_blank_answers_lose_and_two_blanks_are_both_bad():
    oracle = ConciseOracle()
    assert oracle(CONTEXT, "  \n", "Half an answer without an end") == "b"
    assert oracle(CONTEXT, "Yes.", "") == "a"
    assert oracle(CONTEXT, "", "   ") == "both_bad"


def test_concise_ties_and_two_unfinished_answers_are_both_bad():
    oracle = ConciseOracle()
    assert oracle(CONTEXT, "Yes, it is.", "No, it isn't.") == "tie"  # 3 words each
    # Cut off at the same token limit, the one with fewer words is only the one with longer
    # words: no preference, whatever the word counts.
    assert oracle(CONTEXT, "It depends on", "It depends on the weather and") == "both_bad"
    assert oracle(CONTEXT, "Hog-o-mangusta, the holy", "It is a bit like the") == "both_bad"
    assert oracle(CONTEXT, "It depends on", "") == "a"  # unfinished still beats blank


def test_concise_reward_bands_worked_by_hand():
    oracle = ConciseOracle()
    assert oracle.reward(CONTEXT, "Yes.") == pytest.approx(1 / 1.1)            # 1 word
    assert oracle.reward(CONTEXT, " ".join(["word"] * 9) + " end.") == 0.5    # 10 words
    assert oracle.reward(CONTEXT, " ".join(["word"] * 10)) == -0.5            # unfinished
    assert oracle.reward(CONTEXT, "word") == -0.5                           # any length
    assert oracle.reward(CONTEXT, "") == oracle.reward(CONTEXT, " \t") == -1.0
    # Every complete answer outranks every unfinished one, which outranks a blank one.
    assert oracle.reward(CONTEXT, " ".join(["w"] * 500) + ".") > 0
    assert oracle.reward(CONTEXT, " ".join(["w"] * 500)) == -0.5


# -- judge ----------------------------------------------------------------------------------

class JudgeServer(ThreadingHTTPServer):
    """An OpenAI-style chat server whose reply depends on the requested model name."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.requests: list[dict[str, Any]] = []
        self.hits: Counter[str] = Counter()
        self.release_slow = threading.Event()  # the "slow" model answers once this is set

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the slow reply's client has gone away: a broken pipe is expected


REPLIES = {"say-a": "A", "say-b": "B is better.", "say-tie": "tie", "say-both": "BOTH_BAD",
           "say-garbage": "I cannot decide between them"}


class JudgeHandler(BaseHTTPRequestHandler):
    server: JudgeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = body["model"]
        self.server.requests.append({"path": self.path, "body": body,
                                     "authorization": self.headers.get("Authorization")})
        self.server.hits[model] += 1
        if model == "slow":
            self.server.release_slow.wait(60)
        if model == "broken" or (model == "flaky" and self.server.hits[model] == 1):
            self._send(500, {"error": "overloaded"})
        elif model == "missing":
            self._send(404, {"error": f"model {model} does not exist"})
        else:
            content = REPLIES.get(model, "B")
            self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                   "content": content}}]})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def judge_server() -> Iterator[JudgeServer]:
    server = JudgeServer()
    # A short poll interval: shutdown() waits for it, once per test.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.release_slow.set()
    server.shutdown()
    server.server_close()
    thread.join()


def _judge(server: JudgeServer, model: str, **options: Any) -> JudgeOracle:
    return JudgeOracle(server.url, model, **{"timeout": 60.0, "backoff": 0.0, **options})


@pytest.mark.parametrize("model, vote", [("say-a", "a"), ("say-b", "b"), ("say-tie", "tie"),
                                         ("say-both", "both_bad")])
def test_judge_votes_what_the_model_says(judge_server: JudgeServer, model: str, vote: str):
    with _judge(judge_server, model) as judge:
        assert judge(CONTEXT, POSITIVE, NEGATIVE) == vote
        assert judge.failures == Counter()
    assert judge_server.hits[model] == 1


def test_judge_request_shows_the_conversation_and_both_answers(
        judge_server: JudgeServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("JUDGE_API_KEY", "sekret")
    context = [{"role": "system", "content": "Be brief."}, *CONTEXT]
    with _judge(judge_server, "say-a") as judge:
        judge(context, "first answer", "second answer")
    [request] = judge_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["authorization"] == "Bearer sekret"
    body = request["body"]
    assert body["temperature"] == 0.0 and body["max_tokens"] == 16
    assert body["messages"] == judge_messages(context, "first answer", "second answer")
    prompt = body["messages"][-1]["content"]
    assert "Be brief." in prompt and "How was your day?" in prompt
    assert prompt.index("first answer") < prompt.index("second answer")
    assert "A, B, TIE, BOTH_BAD" in prompt


def test_judge_key_argument_wins_and_no_key_sends_no_header(
        judge_server: JudgeServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    with _judge(judge_server, "say-a") as judge:
        judge(CONTEXT, "x", "y")
    with _judge(judge_server, "say-a", api_key="given") as judge:
        judge(CONTEXT, "x", "y")
    assert [r["authorization"] for r in judge_server.requests] == [None, "Bearer given"]


def test_judge_counts_an_unparseable_reply_as_a_tie(judge_server: JudgeServer):
    with _judge(judge_server, "say-garbage") as judge:
        assert judge(CONTEXT, "x", "y") == "tie"
        assert judge(CONTEXT, "x", "y") == "tie"
    assert judge.failures == Counter({"unparseable": 2})
    assert "I cannot decide" in (judge.last_error or "")


def test_judge_counts_a_timeout_as_a_tie_without_retrying(judge_server: JudgeServer):
    # The slow reply is held back until the judge has returned: only its timeout ended it.
    with _judge(judge_server, "slow", timeout=0.2, retries=2) as judge:
        assert judge(CONTEXT, "x", "y") == "tie"
    judge_server.release_slow.set()
    assert judge.failures == Counter({"timeout": 1})
    assert judge_server.hits["slow"] == 1


def test_judge_retries_server_errors_then_counts_an_error(judge_server: JudgeServer):
    with _judge(judge_server, "broken", retries=2) as judge:
        assert judge(CONTEXT, "x", "y") == "tie"
    assert judge.failures == Counter({"error": 1})
    assert judge_server.hits["broken"] == 3
    assert "500" in (judge.last_error or "") and "3 attempts" in (judge.last_error or "")


def test_judge_recovers_when_a_retry_succeeds(judge_server: JudgeServer):
    with _judge(judge_server, "flaky", retries=1) as judge:
        assert judge(CONTEXT, "x", "y") == "b"
    assert judge.failures == Counter()
    assert judge_server.hits["flaky"] == 2


def test_judge_counts_an_unreachable_server_as_an_error(judge_server: JudgeServer):
    url = judge_server.url
    judge_server.shutdown()
    judge_server.server_close()  # nothing listens on the port any more
    with JudgeOracle(url, "say-a", timeout=2.0, retries=1, backoff=0.0) as judge:
        assert judge(CONTEXT, "x", "y") == "tie"
    assert judge.failures == Counter({"error": 1})
    assert "cannot reach" in (judge.last_error or "")


def test_judge_setup_mistakes_raise(judge_server: JudgeServer):
    with _judge(judge_server, "missing") as judge, pytest.raises(OracleError, match="404"):
        judge(CONTEXT, "x", "y")
    with pytest.raises(OracleError, match="http"):
        JudgeOracle("127.0.0.1:8000/v1", "m")
    with pytest.raises(OracleError, match="timeout > 0"):
        JudgeOracle("http://127.0.0.1:1/v1", "m", timeout=0)
    assert not hasattr(JudgeOracle("http://127.0.0.1:1/v1", "m"), "reward")


@pytest.mark.parametrize("reply, vote", [
    ("A", "a"), ("b", "b"), (" B. ", "b"), ("**TIE**", "tie"), ("Tie.", "tie"),
    ("both bad", "both_bad"), ("Both-Bad", "both_bad"), ("BOTH_BAD", "both_bad"),
    ("Answer B is better.", "b"), ("Verdict: A", "a"), ("I'd call it a tie.", "tie"),
    ("<think>A looks longer, B is clearer</think>\nB", "b"),
    ("garbage", None), ("", None), ("ABBA", None), ("a b c", None),
])
def test_parse_verdict(reply: str, vote: str | None):
    assert parse_verdict(reply) == vote


# -- loading oracles ------------------------------------------------------------------------

ORACLE_FILE = '''
calls = []

def prefer_a(context, a, b):
    calls.append(context[-1]["content"])
    return "a"

def says(context, a, b):
    return a  # lets a test choose the return value

class Scored:
    def __call__(self, context, a, b):
        return "b"
    def reward(self, context, answer):
        return float(len(answer))

scored = Scored()
NOT_CALLABLE = 3
'''


@pytest.fixture()
def oracle_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_oracles.py"
    path.write_text(ORACLE_FILE)
    return path


def test_load_builtin_oracles():
    assert isinstance(load_oracle("sentiment"), SentimentOracle)
    assert isinstance(load_oracle(" concise "), ConciseOracle)
    judge = load_oracle("judge", url="http://127.0.0.1:1/v1", model="m", retries=0)
    assert isinstance(judge, JudgeOracle) and judge.retries == 0


def test_load_oracle_from_a_file_path(oracle_file: Path):
    oracle = load_oracle(f"{oracle_file}:prefer_a")
    assert isinstance(oracle, CheckedOracle) and oracle.name == f"{oracle_file}:prefer_a"
    assert oracle(CONTEXT, "x", "y") == "a"
    assert oracle.function.__module__ == "prefloop_oracle_my_oracles"
    assert not hasattr(oracle, "reward")


def test_load_oracle_from_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    name = "prefloop_test_sim_oracles"
    (tmp_path / f"{name}.py").write_text(ORACLE_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        oracle = load_oracle(f"{name}:prefer_a")
        assert oracle(CONTEXT, "x", "y") == "a"
        assert sys.modules[name].calls == ["How was your day?"]
        scored = load_oracle(f"{name}:scored")
        assert scored(CONTEXT, "x", "y") == "b"
        assert scored.reward(CONTEXT, "four") == 4.0  # type: ignore[attr-defined]
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("vote", VOTES)
def test_a_loaded_oracle_may_return_each_vote(oracle_file: Path, vote: str):
    assert load_oracle(f"{oracle_file}:says")(CONTEXT, vote, "ignored") == vote


@pytest.mark.parametrize("bad", ["A", "written", "", None, True, 1, ["a"]])
def test_a_loaded_oracle_returning_a_non_vote_raises(oracle_file: Path, bad: Any):
    oracle = CheckedOracle(lambda context, a, b: bad, "custom:thing")
    with pytest.raises(OracleError, match=r"oracle custom:thing returned .*'a', 'b', 'tie'"):
        oracle(CONTEXT, "x", "y")
    if isinstance(bad, str):
        with pytest.raises(OracleError, match=repr(bad)):
            load_oracle(f"{oracle_file}:says")(CONTEXT, bad, "y")


def test_bad_specs_raise_a_clear_error(oracle_file: Path, tmp_path: Path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    cases = {
        "nonsense": "unknown oracle 'nonsense'",
        "": "unknown oracle ''",
        "no_such_module_for_prefloop:vote": "cannot be imported",
        f"{tmp_path / 'absent.py'}:vote": "does not exist",
        f"{oracle_file}:absent": "has no attribute 'absent'",
        f"{oracle_file}:": "has no attribute ''",
        f"{oracle_file}:NOT_CALLABLE": "int, not a function",
        f"{broken}:vote": "failed while importing.*boom",
    }
    for spec, message in cases.items():
        with pytest.raises(OracleError, match=message):
            load_oracle(spec)


def test_judge_options_are_checked():
    with pytest.raises(OracleError, match="only apply to the judge"):
        load_oracle("sentiment", url="http://127.0.0.1:1/v1")
    with pytest.raises(OracleError, match="needs url and model"):
        load_oracle("judge")
    with pytest.raises(OracleError, match="needs model"):
        load_oracle("judge", url="http://127.0.0.1:1/v1")
    with pytest.raises(OracleError, match="bad judge option.*colour"):
        load_oracle("judge", url="http://127.0.0.1:1/v1", model="m", colour="red")


# -- prompts --------------------------------------------------------------------------------

def test_builtin_prompts_are_many_unique_and_non_empty():
    assert len(PROMPTS) >= 200
    assert all(isinstance(p, str) and p.strip() == p and p for p in PROMPTS)
    assert len({p.lower() for p in PROMPTS}) == len(PROMPTS)
    assert all(len(p) <= 200 for p in PROMPTS)  # one user message, not a document


def test_split_is_deterministic_disjoint_and_complete():
    train, held = split_prompts(PROMPTS)
    assert (train, held) == split_prompts(PROMPTS, seed=0)
    assert split_prompts(PROMPTS, seed=1) != (train, held)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(PROMPTS)
    assert len(held) == round(len(PROMPTS) * 0.2)


def test_split_keeps_both_parts_non_empty():
    assert split_prompts(["one", "two"], held_out=0.01) in ((("one",), ("two",)),
                                                             (("two",), ("one",)))
    train, held = split_prompts(["p1", "p2", "p3"], held_out=0.99)
    assert len(train) == 1 and len(held) == 2


@pytest.mark.parametrize("prompts, held_out, message", [
    (["only"], 0.2, "at least 2"), (["a", "b"], 0.0, "between 0 and 1"),
    (["a", "b"], 1.0, "between 0 and 1"), (["a", "b", "a"], 0.5, "repeat"),
])
def test_split_rejects_bad_input(prompts: list[str], held_out: float, message: str):
    with pytest.raises(ValueError, match=message):
        split_prompts(prompts, held_out=held_out)


def test_read_prompts_one_per_line(tmp_path: Path):
    path = tmp_path / "prompts.txt"
    path.write_text("  What is rain?  \n\n   \nName a colour.\n{\"prompt\": \"kept as text\"}\n")
    assert read_prompts(path) == ("What is rain?", "Name a colour.", '{"prompt": "kept as text"}')


def test_read_prompts_jsonl(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": "First line\nsecond line"}), "",
             json.dumps({"prompt": " Hi ", "source": "ignored"})]
    path.write_text("\n".join(lines) + "\n")
    assert read_prompts(str(path)) == ("First line\nsecond line", "Hi")


@pytest.mark.parametrize("name, text, message", [
    ("empty.txt", "", "has no prompts"),
    ("blank.txt", "\n  \n\t\n", "has no prompts"),
    ("empty.jsonl", "\n", "has no prompts"),
    ("dup.txt", "Hello\nWorld\n Hello\n", r"dup.txt:3: repeats the prompt on line 1"),
    ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": oops}\n', r"bad.jsonl:3: not valid JSON"),
    ("number.jsonl", '{"prompt": 42}\n', r"number.jsonl:1: .*non-empty string, got 42"),
    ("blankp.jsonl", '{"prompt": "  "}\n', r"blankp.jsonl:1: .*non-empty string"),
    ("nokey.jsonl", '{"prompt": "ok"}\n{"messages": []}\n', r"nokey.jsonl:2: expected an obj"),
    ("list.jsonl", '["a"]\n', r"list.jsonl:1: expected an object"),
])
def test_read_prompts_bad_files(tmp_path: Path, name: str, text: str, message: str):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PromptError, match=message):
        read_prompts(path)


def test_read_prompts_missing_or_unreadable(tmp_path: Path):
    with pytest.raises(PromptError, match="does not exist"):
        read_prompts(tmp_path / "absent.txt")
    with pytest.raises(PromptError, match="cannot be read"):
        read_prompts(tmp_path)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptError, match="cannot be read"):
        read_prompts(latin)


def test_report_quotes_answers_as_single_table_cells(tmp_path: Path):
    from prefloop.sim.report import write_report

    point = {"round": 0, "round_status": None, "champion": "base", "reward_champion": 0.5,
             "reward_base": 0.25, "winrate_vs_base": None, "wins": 0, "losses": 0, "ties": 0,
             "both_bad": 0, "kl": 0.0, "mean_words": 3.0,
             "examples": [{"prompt": "a | b?", "answer": "line one\nline | two"},
                          {"prompt": "blank?", "answer": "  "}]}
    report = {"oracle": "sentiment", "promote": "immediate", "pairs_per_round": 4,
              "eval_prompts": 2, "base_samples": 1, "seed": 0, "points": [point]}
    write_report(report, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| 0 | a \\| b? | line one line \\| two |" in text.splitlines()
    assert "| 0 | blank? | (empty) |" in text.splitlines()
    assert json.loads((tmp_path / "report.json").read_text())["points"][0]["examples"][1] == \
        {"prompt": "blank?", "answer": "  "}
    assert (tmp_path / "reward.png").read_bytes()[:4] == b"\x89PNG"


# -- crowds ---------------------------------------------------------------------------------

def test_parse_noise():
    assert parse_noise("random:0.3,side:0.1") == {"random": 0.3, "side": 0.1}
    assert parse_noise(" side : 1 ") == {"side": 1.0}
    assert parse_noise("random:0.7,side:0.2,fast:0.1") == {"random": 0.7, "side": 0.2,
                                                          "fast": 0.1}  # sums to 1 exactly
    assert parse_noise("fast:0") == {"fast": 0.0}


@pytest.mark.parametrize("text, message", [
    ("", "is not kind:share"),
    ("random", "is not kind:share"),
    ("random:", "is not kind:share"),
    (":0.3", "is not kind:share"),
    ("random:0.3,,side:0.1", "is not kind:share"),
    ("random:0.3;side:0.1", "must be a number"),
    ("honest:0.5", "unknown voter kind 'honest': use random, side, fast"),
    ("Random:0.3", "unknown voter kind"),
    ("random:abc", "must be a number"),
    ("random:30%", "must be a number"),
    ("random:1.5", "from 0 to 1, got 1.5"),
    ("side:-0.1", "from 0 to 1"),
    ("side:nan", "from 0 to 1"),
    ("side:inf", "from 0 to 1"),
    ("random:0.7,side:0.4", "add up to 1.1"),
    ("random:0.1,random:0.2", "given twice"),
])
def test_parse_noise_refuses_bad_text(text: str, message: str):
    with pytest.raises(NoiseError, match=re.escape(message)):
        parse_noise(text)


def test_crowd_sizes_add_up_by_largest_remainder():
    assert crowd_sizes({"random": 0.3, "side": 0.1}, 20) == {"honest": 12, "random": 6,
                                                            "side": 2}
    # 8 voters: quotas 4.8 / 2.4 / 0.8; the two seats left go to the largest remainders.
    assert crowd_sizes({"random": 0.3, "side": 0.1}, 8) == {"honest": 5, "random": 2,
                                                           "side": 1}
    assert crowd_sizes({}, 3) == {"honest": 3}
    assert crowd_sizes({"random": 1.0}, 4) == {"honest": 0, "random": 4}
    for size in range(3, 40):  # fewer than 3 cannot hold all three kinds
        assert sum(crowd_sizes({"random": 0.45, "side": 0.35, "fast": 0.2}, size).values()) \
            == size


def test_a_named_kind_that_would_get_no_voter_is_an_error():
    with pytest.raises(NoiseError, match="side:0.01 of 20 voters is no voter"):
        crowd_sizes({"side": 0.01}, 20)
    assert crowd_sizes({"side": 0.0}, 20) == {"honest": 20, "side": 0}  # asked for none


def test_a_crowd_is_the_same_for_a_seed_and_votes_by_kind():
    oracle = ConciseOracle()
    crowd = make_crowd(oracle, {"random": 0.25, "side": 0.25, "fast": 0.25}, 8, seed=3)
    again = make_crowd(oracle, {"random": 0.25, "side": 0.25, "fast": 0.25}, 8, seed=3)
    assert [(v.client_id, v.kind) for v in crowd] == [(v.client_id, v.kind) for v in again]
    assert Counter(v.kind for v in crowd) == {"honest": 2, "random": 2, "side": 2, "fast": 2}
    assert all(is_hex_id(v.client_id) for v in crowd)  # like the cookie ids
    assert len({v.client_id for v in crowd}) == 8
    other = make_crowd(oracle, {"random": 0.25, "side": 0.25, "fast": 0.25}, 8, seed=4)
    assert not {v.client_id for v in crowd} & {v.client_id for v in other}
    short, long_ = "Yes.", "Yes, that is right, I think."
    for voter in crowd:
        assert voter.reads == (voter.kind != "fast")
        if voter.kind in ("honest", "fast"):
            assert voter.vote(CONTEXT, long_, short) == "b"  # the oracle's vote
        if voter.kind == "side":
            assert voter.vote(CONTEXT, long_, short) == "a"
    # Two random voters draw apart from each other, each the same way every time.
    first, second = (v for v in crowd if v.kind == "random")
    votes = [[v.vote(c, "x", "y") for c in _contexts(40)] for v in (first, second, first)]
    assert votes[0] != votes[1] and votes[0] == votes[2]


def test_draw_voters_is_seeded_and_spreads_the_pairs():
    crowd = make_crowd(ConciseOracle(), {"side": 0.5}, 4, seed=0)
    drawn = draw_voters(crowd, 400, random.Random(9))
    assert drawn == draw_voters(crowd, 400, random.Random(9))
    assert drawn != draw_voters(crowd, 400, random.Random(10))
    counts = Counter(v.client_id for v in drawn)
    assert set(counts) == {v.client_id for v in crowd}
    assert all(60 < n < 140 for n in counts.values())  # 100 each expected; fixed by the seed


def test_an_honest_voter_reads_longer_than_the_voter_checks_bound():
    from prefloop.loop import voters

    pair = {"text_a": "x" * 300, "text_b": "y" * 500, "first_token_ms": 100.0,
            "total_ms": 2100.0}
    bound = voters.reading_seconds({"chars_a": 300, "chars_b": 500})
    # Twice the bound on screen: the wait after storing plus the 2 s of streaming.
    assert reading_seconds(pair) + 2.0 == pytest.approx(2 * bound)
    assert reading_seconds({**pair, "first_token_ms": None}) == pytest.approx(2 * bound)
    assert reading_seconds({**pair, "total_ms": 100_000.0}) == 0.0  # read while streaming


# -- the report's gate and voter sections ---------------------------------------------------

def _duel(a: str, b: str, choice: str, voter: str) -> dict[str, Any]:
    return {"kind": "duel", "policy_a": a, "policy_b": b, "choice": choice, "voter": voter}


def test_adapter_fates_count_each_adapters_duels_per_opponent():
    adapters = [{"name": "v0001", "state": "champion", "reason": "won its duels", "parent": "base"},
                {"name": "v0002", "state": "rejected", "reason": "no better", "parent": "v0001"}]
    voted = [
        _duel("v0001", "base", "a", "c1"), _duel("base", "v0001", "a", "c2"),
        _duel("base", "v0001", "b", "c1"), _duel("v0001", "base", "tie", "c1"),
        {"kind": "sample", "policy_a": "v0001", "policy_b": "v0001", "choice": "a",
         "voter": "c1"},
        _duel("v0002", "v0001", "b", "bad"), _duel("v0001", "v0002", "both_bad", "c1"),
        _duel("v0002", "v0001", "written", "c2"),
    ]
    fates = adapter_fates(adapters, voted, flagged=["bad"])
    assert fates[0]["name"] == "v0001" and fates[0]["state"] == "champion"
    assert fates[0]["duels"] == [
        {"opponent": "base", "votes": 4, "wins": 2, "losses": 1, "ties": 1, "both_bad": 0,
         "flagged": 0},
        {"opponent": "v0002", "votes": 3, "wins": 1, "losses": 0, "ties": 0, "both_bad": 1,
         "flagged": 1}]
    assert fates[1]["duels"] == [
        {"opponent": "v0001", "votes": 3, "wins": 0, "losses": 1, "ties": 0, "both_bad": 1,
         "flagged": 1}]
    assert fates[1]["reason"] == "no better" and fates[1]["parent"] == "v0001"


def test_gate_snapshot_reads_adapters_votes_and_flags_from_a_real_store(tmp_path: Path):
    from prefloop.storage.store import Answer, Store

    crowd = make_crowd(ConciseOracle(), {"side": 0.5}, 2, seed=0)
    honest, side = sorted(crowd, key=lambda v: v.kind)
    store = Store(tmp_path / "prefloop.db")
    try:
        store.add_adapter("v0001", tmp_path / "v0001", None, "base")
        for voter, choice in ((honest, "b"), (side, "a"), (side, "a")):
            conversation = store.create_conversation(voter.client_id)
            pair = store.add_pair(conversation, CONTEXT, Answer("v0001", "A.", 1, "stop", 2),
                                  Answer("base", "B.", 2, "stop", 2), kind="duel")
            store.vote(pair, choice, client_id=voter.client_id)
        store.flag_client(side.client_id, ["position bias: chose A in 2 of 2"])
        store.set_adapter_state("v0001", "rejected", "no better: 0.33 over 1 vote")
        snapshot = gate_snapshot(store, crowd)
    finally:
        store.close()
    assert snapshot["adapters"] == [{
        "name": "v0001", "state": "rejected", "reason": "no better: 0.33 over 1 vote",
        "parent": "base", "duels": [{"opponent": "base", "votes": 3, "wins": 2, "losses": 1,
                                     "ties": 0, "both_bad": 0, "flagged": 2}]}]
    [flag] = snapshot["flagged"]
    assert flag["client_id"] == side.client_id and flag["kind"] == "side"
    assert flag["reasons"] == ["position bias: chose A in 2 of 2"] and flag["flagged_at"]
    assert snapshot["flagged_by_kind"] == {"honest": {"voters": 1, "flagged": 0},
                                           "side": {"voters": 1, "flagged": 1}}


def _point(number: int, adapters: list[dict], flagged: list[dict],
           by_kind: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {"round": number, "round_status": "succeeded" if number else None,
            "champion": "base", "reward_champion": None, "reward_base": None,
            "winrate_vs_base": 0.5, "wins": 1, "losses": 1, "ties": 0, "both_bad": 0,
            "kl": 0.0, "mean_words": 3.0, "examples": [], "adapters": adapters,
            "flagged": flagged, "flagged_by_kind": by_kind}


def test_report_shows_gate_decisions_flags_and_every_candidates_fate(tmp_path: Path):
    from prefloop.sim.report import markdown, write_report

    duels = [{"opponent": "base", "votes": 31, "wins": 12, "losses": 17, "ties": 2,
              "both_bad": 0, "flagged": 3}]
    v1 = {"name": "v0001", "state": "candidate", "reason": None, "parent": "base", "duels": []}
    v1_out = {**v1, "state": "rejected", "reason": "no better | over 31 votes", "duels": duels}
    v2 = {"name": "v0002", "state": "candidate", "reason": None, "parent": "base", "duels": []}
    side = {"client_id": "ab" * 16, "kind": "side", "reasons": ["position bias", "too fast"],
            "flagged_at": "2025-01-01T00:00:00", "votes": 22}
    none = {"honest": {"voters": 5, "flagged": 0}, "side": {"voters": 1, "flagged": 0}}
    one = {"honest": {"voters": 5, "flagged": 0}, "side": {"voters": 1, "flagged": 1}}
    report = {"oracle": "random", "promote": "duel", "pairs_per_round": 64, "eval_prompts": 4,
              "base_samples": 2, "seed": 1, "noise": {"side": 0.1},
              "voters": {"honest": 5, "side": 1},
              "points": [_point(0, [], [], none), _point(1, [v1], [], none),
                         _point(2, [v1_out, v2], [side], one), _point(3, [v1_out, v2], [side],
                                                                      one)]}
    lines = markdown(report).splitlines()
    assert "Voters, each its own client: 5 honest, 1 side (10%). Honest voters vote as the " \
           "oracle does." in lines
    decisions = lines[lines.index("## Gate decisions"):lines.index("## Flagged voters")]
    assert [line.split(" | ")[:3] for line in decisions if line.startswith("| ") and
            line[2].isdigit()] == [["| 1", "v0001", "candidate"], ["| 2", "v0001", "rejected"],
                                   ["| 2", "v0002", "candidate"]]  # changes only
    assert "| 2 | v0001 | rejected | no better \\| over 31 votes | vs base: 31 votes, 12 W / " \
           "17 L / 2 tie / 0 both bad, 3 from flagged clients |" in decisions
    flags = lines[lines.index("## Flagged voters"):lines.index("## Every candidate's fate")]
    assert "| 1 | none | honest 0/5, side 0/1 |" in flags
    assert "| 2 | abababab side: position bias, too fast | honest 0/5, side 1/1 |" in flags
    assert "| 3 | none | honest 0/5, side 1/1 |" in flags  # flagged before: not new
    assert "At the end: honest 0/5, side 1/1 flagged." in flags
    fates = lines[lines.index("## Every candidate's fate"):]
    assert fates[-2].startswith("| v0001 | 1 | base | rejected | no better")
    assert fates[-1] == "| v0002 | 2 | base | candidate | – | none |"
    write_report(report, tmp_path)  # no reward to plot (random oracle): no plot, no error
    assert not (tmp_path / "reward.png").exists()
    assert json.loads((tmp_path / "report.json").read_text())["points"][2]["flagged"] == [side]
