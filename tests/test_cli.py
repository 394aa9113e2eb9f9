"""The prefloop command: help everywhere, settings errors named at the edge, status output."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from prefloop import __version__
from prefloop.cli import main
from prefloop.config import env_name, setting_fields
from prefloop.serving.models import model_dir_for
from prefloop.storage.store import Answer, Store


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty folder so no ./prefloop.toml of the developer is read."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on (so status finds no server, at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                              click.Command]]:
    """Every command and group under ``command``, with the words that reach it."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(sub, (*path, name))


COMMANDS = list(walk(main))


def test_the_tree_has_the_commands_we_document() -> None:
    """The walk sees the commands that exist (so the help checks below check something)."""
    paths = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "serve", "status", "model", "model prepare"} <= paths


@pytest.mark.parametrize(("path", "command"), COMMANDS,
                         ids=[" ".join(p) or "prefloop" for p, _ in COMMANDS])
def test_every_command_has_help(path: tuple[str, ...], command: click.Command) -> None:
    """Each command, group and option explains itself, and --help works."""
    assert (command.help or "").strip(), f"{path} has no help text"
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert (param.help or "").strip(), f"{path} option {param.opts} has no help"
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")
    assert command.help.split("\n")[0].strip()[:30] in " ".join(result.output.split())


def test_version() -> None:
    """--version prints the package version."""
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_every_setting_is_a_flag_with_its_env_variable() -> None:
    """Each setting has a --flag whose help names its PREFLOOP_ variable."""
    options = {opt: param for param in main.commands["status"].params
               if isinstance(param, click.Option) for opt in param.opts}
    for f in setting_fields():
        flag = "--" + f.name.replace("_", "-")
        assert flag in options, flag
        assert f"[env: {env_name(f.name)}]" in options[flag].help


def test_bad_port_names_the_flag(tmp_path: Path) -> None:
    """`--port abc` fails with one line naming --port and what it wants, no traceback."""
    result = invoke("status", "--data-dir", str(tmp_path), "--port", "abc")
    assert result.exit_code == 1
    assert "Error: --port: expected an integer from 1 to 65535, got 'abc'" in result.output
    assert "Traceback" not in result.output


def test_out_of_range_port_names_the_flag(tmp_path: Path) -> None:
    """A parsable but out-of-range flag value also names the flag."""
    result = invoke("status", "--data-dir", str(tmp_path), "--port", "70000")
    assert result.exit_code == 1
    assert "--port: expected an integer from 1 to 65535" in result.output


def test_unknown_env_variable_fails_naming_it(tmp_path: Path, free_port: int) -> None:
    """A PREFLOOP_ variable that is not a setting stops the command and is named."""
    result = invoke("status", "--data-dir", str(tmp_path), "--port", str(free_port),
                    env={"PREFLOOP_FOO": "1"})
    assert result.exit_code == 1
    assert "unknown environment variable PREFLOOP_FOO" in result.output


def test_config_file_with_unknown_key_fails_naming_it(tmp_path: Path) -> None:
    """A typo in the config file stops the command and names the key and the file."""
    config = tmp_path / "prefloop.toml"
    config.write_text("max_tokenz = 10\n")
    result = invoke("status", "--config", str(config), "--data-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "unknown setting 'max_tokenz'" in result.output and str(config) in result.output


def test_missing_config_file_fails(tmp_path: Path) -> None:
    """--config pointing at nothing is an error, not the defaults."""
    result = invoke("status", "--config", str(tmp_path / "none.toml"))
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_status_json_without_database_or_server(tmp_path: Path, free_port: int) -> None:
    """status --json reports settings (flags over env), model, database and no server."""
    data = tmp_path / "data"
    result = invoke("status", "--json", "--data-dir", str(data), "--port", str(free_port),
                    "--max-tokens", "64",
                    env={"PREFLOOP_MAX_TOKENS": "100", "PREFLOOP_VLLM_API_KEY": "sekret",
                         "PREFLOOP_TOP_P": "0.5"})
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert set(info) == {"settings", "model", "database", "server"}
    assert info["settings"]["port"] == free_port
    assert info["settings"]["data_dir"] == str(data)
    assert info["settings"]["max_tokens"] == 64       # flag beats env
    assert info["settings"]["top_p"] == 0.5           # env beats default
    assert info["settings"]["vllm_api_key"] == "***"  # never printed
    assert "sekret" not in result.output
    assert info["model"] == {"path": str(model_dir_for("embedded", data / "models")),
                             "prepared": False}
    assert info["database"] == {"path": str(data / "prefloop.db"), "exists": False}
    assert info["server"] == {"running": False}
    assert not (data / "prefloop.db").exists()  # status does not create a database


def test_status_json_counts_the_database(tmp_path: Path, free_port: int) -> None:
    """With a database, status shows how many rows each table has."""
    store = Store(tmp_path / "prefloop.db")
    conversation_id = store.create_conversation()
    pair_id = store.add_pair(conversation_id, [{"role": "user", "content": "hi"}],
                             Answer("base", "a", 1), Answer("base", "b", 2))
    store.vote(pair_id, "a")
    store.close()
    result = invoke("status", "--json", "--data-dir", str(tmp_path), "--port", str(free_port))
    assert result.exit_code == 0, result.output
    database = json.loads(result.output)["database"]
    assert database == {"path": str(tmp_path / "prefloop.db"), "conversations": 1,
                        "messages": 2, "pairs": 1, "votes": 1, "rounds": 0, "adapters": 0}
    assert json.loads(result.output)["loop"] == {"champion": "base", "candidate": None,
                                                 "paused": False}


def test_status_text(tmp_path: Path, free_port: int) -> None:
    """Without --json, status prints one indented line per value under each section."""
    result = invoke("status", "--data-dir", str(tmp_path), "--port", str(free_port))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for section in ("settings:", "model:", "database:", "server:"):
        assert section in lines
    assert f"  port: {free_port}" in lines
    assert "  running: False" in lines


def test_status_with_ipv6_host(tmp_path: Path, free_port: int) -> None:
    """An IPv6 --host does not crash status (the URL needs brackets)."""
    result = invoke("status", "--json", "--data-dir", str(tmp_path), "--port", str(free_port),
                    "--host", "::1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["server"] == {"running": False}
