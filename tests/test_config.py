"""Settings: defaults < TOML file < PREFLOOP_* environment < overrides, and every way to get it
wrong fails with a ConfigError that names the key or variable and what is allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from prefloop.config import (
    LORA_RANKS,
    ConfigError,
    Settings,
    _parse_text,
    _setting,
    env_name,
    load_settings,
    read_toml,
    setting_fields,
)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty folder so no ./prefloop.toml of the developer is read."""
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- defaults ----------------------------------------------------------------------------------


def test_defaults_without_file_env_or_overrides(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """With nothing given, the dataclass defaults apply; data_dir follows XDG_DATA_HOME."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    settings = load_settings(env={})
    assert settings.model == "embedded"
    assert settings.host == "127.0.0.1"
    assert settings.port == 7860
    assert settings.vllm_url == () and settings.local_replicas == 1
    assert settings.max_tokens == 128
    assert settings.data_dir == tmp_path / "xdg" / "prefloop"
    assert settings.db_path == tmp_path / "xdg" / "prefloop" / "prefloop.db"
    assert settings.models_dir == settings.data_dir / "models"
    assert settings.adapters_dir == settings.data_dir / "adapters"
    assert settings.logs_dir == settings.data_dir / "logs"


def test_every_setting_has_help_and_an_env_name() -> None:
    """Each field documents itself; its variable is PREFLOOP_ + the name in upper case."""
    for f in setting_fields():
        assert f.metadata["help"].strip(), f.name
        assert env_name(f.name) == "PREFLOOP_" + f.name.upper()


def test_settings_are_frozen() -> None:
    """A Settings object cannot be changed after it was checked."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]


@pytest.mark.parametrize(("key", "value"), [
    ("port", "80"), ("port", True), ("port", 0), ("port", 65536), ("temperature", float("nan")),
    ("temperature", float("inf")), ("temperature", -0.1), ("model", 3), ("data_dir", "/x"),
])
def test_direct_construction_checks_types_and_bounds(key: str, value: object) -> None:
    """Settings(...) itself refuses wrong types and values outside the bounds."""
    with pytest.raises(ConfigError, match=f"^{key}: expected"):
        Settings(**{key: value})


# -- precedence --------------------------------------------------------------------------------


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    """Each later source wins over the earlier ones, key by key."""
    config = write(tmp_path / "c.toml", 'port = 1111\ntemperature = 0.5\nmodel = "a/b"\n'
                                        "max_tokens = 100\n")
    env = {"PREFLOOP_PORT": "2222", "PREFLOOP_MAX_TOKENS": "200"}
    settings = load_settings(config, env=env, overrides={"port": "3333", "model": None})
    assert settings.port == 3333          # override beats env beats file
    assert settings.max_tokens == 200     # env beats file
    assert settings.temperature == 0.5    # file beats default
    assert settings.model == "a/b"        # a None override (flag not given) is ignored
    assert settings.top_p == 0.95         # default


def test_overrides_accept_python_values_and_strings(tmp_path: Path) -> None:
    """CLI strings are parsed; Python values (e.g. a Path) are checked as they are."""
    settings = load_settings(env={}, overrides={"data_dir": tmp_path, "temperature": "1.25",
                                                "max_turns": 3})
    assert settings.data_dir == tmp_path
    assert settings.temperature == 1.25
    assert settings.max_turns == 3


def test_prefloop_toml_in_the_current_folder_is_read(tmp_path: Path) -> None:
    """Without --config, ./prefloop.toml is used when it exists."""
    write(tmp_path / "prefloop.toml", "port = 4321\n")
    assert load_settings(env={}).port == 4321


def test_prefloop_config_env_names_the_file(tmp_path: Path) -> None:
    """PREFLOOP_CONFIG picks the file; an explicit config_file wins over it."""
    by_env = write(tmp_path / "env.toml", "port = 1001\n")
    explicit = write(tmp_path / "explicit.toml", "port = 1002\n")
    assert load_settings(env={"PREFLOOP_CONFIG": str(by_env)}).port == 1001
    assert load_settings(explicit, env={"PREFLOOP_CONFIG": str(by_env)}).port == 1002


# -- TOML files --------------------------------------------------------------------------------


def test_toml_under_a_prefloop_table(tmp_path: Path) -> None:
    """Settings may sit under [prefloop], so the file can be shared with other tools."""
    config = write(tmp_path / "c.toml", '[prefloop]\nport = 8123\nsystem_prompt = "Be brief."\n')
    settings = load_settings(config, env={})
    assert settings.port == 8123
    assert settings.system_prompt == "Be brief."


def test_toml_prefloop_table_beside_other_tables_is_refused(tmp_path: Path) -> None:
    """Only a file whose one table is [prefloop] is unwrapped; anything else is unknown."""
    config = write(tmp_path / "c.toml", "[prefloop]\nport = 8123\n[other]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(config, env={})


def test_toml_converts_only_lossless(tmp_path: Path) -> None:
    """An integer is a fine float; a string becomes a Path; '~' is expanded."""
    config = write(tmp_path / "c.toml", 'temperature = 1\ndata_dir = "~/pf"\n')
    settings = load_settings(config, env={})
    assert settings.temperature == 1.0 and isinstance(settings.temperature, float)
    assert settings.data_dir == Path.home() / "pf"


def test_toml_empty_string_means_none_for_optional(tmp_path: Path) -> None:
    """TOML has no null: vllm_url = "" means no URL, as PREFLOOP_VLLM_URL= does."""
    config = write(tmp_path / "c.toml",
                   'vllm_url = ""\nvllm_api_key = ""\nvllm_replicas = ""\n')
    settings = load_settings(config, env={})
    assert settings.vllm_url == ()
    assert settings.vllm_api_key == ()
    assert settings.vllm_replicas is None


def test_toml_unknown_key_names_it_and_the_known_ones(tmp_path: Path) -> None:
    """A typo in the file is an error that says which key and what would be right."""
    config = write(tmp_path / "c.toml", "prot = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    message = str(info.value)
    assert "'prot'" in message and str(config) in message
    assert "port" in message and "max_tokens" in message


@pytest.mark.parametrize(("line", "key", "allowed"), [
    ('port = "abc"', "port", "an integer from 1 to 65535"),
    ("port = true", "port", "an integer from 1 to 65535"),
    ("port = 80.5", "port", "an integer from 1 to 65535"),
    ("port = 70000", "port", "an integer from 1 to 65535"),
    ('temperature = "hot"', "temperature", "a number from 0 to 2"),
    ("temperature = nan", "temperature", "a number from 0 to 2"),
    ("model = 3", "model", "a string"),
    ("data_dir = 5", "data_dir", "a folder path"),
    ('data_dir = ""', "data_dir", "a folder path"),
    ("vllm_url = 1", "vllm_url", "a string or a list of strings (or empty for none)"),
    ('vllm_url = ["http://a:1", 2]', "vllm_url",
     "a string or a list of strings (or empty for none)"),
    ("system_prompt = [1]", "system_prompt", "a string"),
])
def test_toml_wrong_types_name_key_and_allowed(tmp_path: Path, line: str, key: str,
                                                allowed: str) -> None:
    """A value of the wrong type or out of range names the file, the key and what is allowed."""
    config = write(tmp_path / "c.toml", line + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert str(info.value).startswith(f"{config}: {key}: expected {allowed}, got ")


def test_invalid_toml(tmp_path: Path) -> None:
    """A file that is not TOML says so and names the file."""
    config = write(tmp_path / "c.toml", "port = = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        load_settings(config, env={})
    assert str(config) in str(info.value)


def test_toml_that_is_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are reported as invalid TOML, not a traceback."""
    config = tmp_path / "c.toml"
    config.write_bytes(b'model = "\xff"\n')
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_toml(config)


def test_missing_config_file(tmp_path: Path) -> None:
    """A config file that is not there is an error, not silently the defaults."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_config_file_that_is_a_folder(tmp_path: Path) -> None:
    """A folder given as the config file is a ConfigError, not an OSError traceback."""
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path, env={})


# -- environment -------------------------------------------------------------------------------


def test_env_unknown_variable_names_it() -> None:
    """A mistyped PREFLOOP_ variable fails and lists the ones that exist."""
    with pytest.raises(ConfigError) as info:
        load_settings(env={"PREFLOOP_FOO": "1"})
    assert "PREFLOOP_FOO" in str(info.value)
    assert "PREFLOOP_PORT" in str(info.value)


def test_env_ignores_other_variables_and_allows_admin_password() -> None:
    """Variables without the prefix are not ours; PREFLOOP_ADMIN_PASSWORD is not a setting."""
    settings = load_settings(env={"PATH": "/bin", "prefloop_port": "1",
                                  "PREFLOOP_ADMIN_PASSWORD": "secret"})
    assert settings.port == 7860


@pytest.mark.parametrize(("var", "text", "allowed"), [
    ("PREFLOOP_PORT", "abc", "an integer from 1 to 65535"),
    ("PREFLOOP_PORT", "99999", "an integer from 1 to 65535"),
    ("PREFLOOP_PORT", "80.0", "an integer from 1 to 65535"),
    ("PREFLOOP_TEMPERATURE", "nan", "a number from 0 to 2"),
    ("PREFLOOP_TEMPERATURE", "inf", "a number from 0 to 2"),
    ("PREFLOOP_TOP_P", "0", "a number from 0.01 to 1"),
    ("PREFLOOP_DATA_DIR", "", "a folder path"),
    ("PREFLOOP_MAX_TOKENS", "", "an integer from 1 to 32768"),
    ("PREFLOOP_TRAIN_FROM", "parent", "one of champion, base"),
    ("PREFLOOP_TRAIN_KL_COEF", "-1", "a number from 0 to 100"),
])
def test_env_bad_values_name_the_variable(var: str, text: str, allowed: str) -> None:
    """Unparsable and out-of-range values both name the variable and what is allowed."""
    with pytest.raises(ConfigError) as info:
        load_settings(env={var: text})
    assert str(info.value).startswith(f"{var}: expected {allowed}, got ")


def test_env_parses_types() -> None:
    """Environment strings become ints, floats, paths; '' clears an optional setting."""
    settings = load_settings(env={"PREFLOOP_PORT": " 8080 ", "PREFLOOP_TEMPERATURE": "0",
                                  "PREFLOOP_DATA_DIR": "~/d", "PREFLOOP_VLLM_URL": "",
                                  "PREFLOOP_SYSTEM_PROMPT": ""})
    assert settings.port == 8080
    assert settings.temperature == 0.0
    assert settings.data_dir == Path.home() / "d"
    assert settings.vllm_url == ()
    assert settings.system_prompt == ""


@pytest.mark.parametrize("f", setting_fields(), ids=lambda f: f.name)
def test_every_default_round_trips_through_its_env_variable(f: dataclasses.Field) -> None:
    """Each setting can be given in the environment, as text of its own default."""
    default = getattr(Settings(), f.name)
    text = "" if default is None else ",".join(default) if isinstance(default, tuple) \
        else str(default)
    settings = load_settings(env={env_name(f.name): text})
    assert getattr(settings, f.name) == default


# -- overrides (CLI flags) ---------------------------------------------------------------------


def test_override_unknown_key() -> None:
    """An override that is not a setting is refused by name."""
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load_settings(env={}, overrides={"colour": "red"})


@pytest.mark.parametrize("value", ["abc", "99999", 99999, True, 1.5])
def test_override_bad_port_names_the_flag(value: object) -> None:
    """Bad flag values, as text or as Python values, name the flag --port."""
    with pytest.raises(ConfigError, match=r"^--port: expected an integer from 1 to 65535"):
        load_settings(env={}, overrides={"port": value})


# -- cross-field checks ------------------------------------------------------------------------


def test_max_tokens_must_be_below_max_model_len() -> None:
    """An answer must leave room for the prompt: max_tokens < max_model_len."""
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides={"max_tokens": 512, "max_model_len": 512})
    assert "max_tokens (512)" in str(info.value) and "max_model_len (512)" in str(info.value)
    ok = load_settings(env={}, overrides={"max_tokens": 511, "max_model_len": 512})
    assert (ok.max_tokens, ok.max_model_len) == (511, 512)


@pytest.mark.parametrize("rank", LORA_RANKS)
def test_lora_max_rank_accepts_vllm_ranks(rank: int) -> None:
    """Every rank vLLM allows is accepted (with new adapters no larger)."""
    env = {"PREFLOOP_LORA_MAX_RANK": str(rank), "PREFLOOP_TRAIN_LORA_RANK": str(min(rank, 16))}
    assert load_settings(env=env).lora_max_rank == rank


@pytest.mark.parametrize("rank", [2, 12, 100])
def test_lora_max_rank_refuses_other_ranks(rank: int) -> None:
    """A rank vLLM would refuse at start is refused here, listing the allowed ones."""
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides={"lora_max_rank": rank})
    assert "lora_max_rank" in str(info.value)
    assert "1, 8, 16, 32, 64" in str(info.value)


# -- text parsing of bool and optional fields ---------------------------------------------------


@dataclasses.dataclass
class _Kinds:
    flag: bool = _setting(False, "a flag")
    limit: int | None = _setting(None, "an optional count", lo=0, hi=10)


_FLAG, _LIMIT = dataclasses.fields(_Kinds)


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("true", True), (" YES ", True), ("On", True),
    ("0", False), ("false", False), ("no", False), ("OFF", False),
])
def test_parse_bool(text: str, value: bool) -> None:
    """Booleans accept the usual spellings, in any case, around whitespace."""
    assert _parse_text(_FLAG, text, "PREFLOOP_FLAG") is value


@pytest.mark.parametrize("text", ["", "maybe", "2", "y"])
def test_parse_bool_refuses_other_text(text: str) -> None:
    """Anything else is an error that says true or false."""
    with pytest.raises(ConfigError, match="PREFLOOP_FLAG: expected true or false"):
        _parse_text(_FLAG, text, "PREFLOOP_FLAG")


def test_parse_optional() -> None:
    """'' is None for an optional field; other text is parsed and bounded."""
    assert _parse_text(_LIMIT, "", "--limit") is None
    assert _parse_text(_LIMIT, "7", "--limit") == 7
    with pytest.raises(ConfigError, match=r"--limit: expected an integer from 0 to 10 "
                                          r"\(or empty for none\)"):
        _parse_text(_LIMIT, "11", "--limit")


def test_train_lora_rank_above_the_served_maximum_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train_lora_rank \(32\) must be at most "
                                          r"lora_max_rank \(16\)"):
        load_settings(env={}, overrides={"train_lora_rank": 32})
    settings = load_settings(env={}, overrides={"train_lora_rank": 8, "lora_max_rank": 8})
    assert (settings.train_lora_rank, settings.lora_max_rank) == (8, 8)
