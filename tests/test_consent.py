"""Consent: with `terms_file` set, nothing of a client is stored until it accepts the terms'
current version; the version (a hash of the file) is stored with every pair it makes, and
changed terms ask again. Bad terms files are config errors at start.

A real SQLite store and the real FastAPI app through TestClient; the model server is a
stand-in OpenAI server (tests/openai_stub.py). The page in Chromium: test_browser_consent.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from prefloop.app.arena import ACCEPT_FIRST, ArenaHandlers, ArenaState
from prefloop.app.chat import ChatService
from prefloop.app.guard import COOKIE, Client
from prefloop.app.privacy import Consent, ConsentRequired, load_terms
from prefloop.app.server import build_page, create_app
from prefloop.cli import main
from prefloop.config import ConfigError, Settings, load_settings
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint
from prefloop.storage.store import Answer, Conflict, NotFound, Store
from tests.conftest import visitor
from tests.openai_stub import StubServer, stub_server

TERMS = "# Terms\n\nConversations may be published.\n"
ME = "a" * 32


@pytest.fixture
def terms_file(tmp_path: Path) -> Path:
    path = tmp_path / "terms.md"
    path.write_text(TERMS, encoding="utf-8")
    return path


@pytest.fixture
def settings(tmp_path: Path, terms_file: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", terms_file=terms_file)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    with Store(settings.db_path) as store:
        yield store


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with stub_server() as server:
        yield server


def sampler_for(stub: StubServer) -> PairSampler:
    return PairSampler(Endpoint(stub.url, "x"), sampling=Sampling(0.8, 0.95, 16),
                       max_model_len=2048)


def counts(store: Store) -> dict[str, int]:
    return {**store.counts(), "consents": store.db["consents"].count}


# -- the terms file ----------------------------------------------------------------------------


def test_the_terms_version_is_a_hash_of_the_file(terms_file: Path) -> None:
    terms = load_terms(terms_file)
    assert terms is not None and terms.text == TERMS
    assert len(terms.version) == 16 and int(terms.version, 16) >= 0
    assert load_terms(terms_file) == terms
    terms_file.write_text(TERMS + "\nAnd one more line.\n", encoding="utf-8")
    assert load_terms(terms_file).version != terms.version
    assert load_terms(None) is None


def test_a_bad_terms_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty.md").write_text("  \n\t\n")
    (tmp_path / "latin1.md").write_bytes("Conditions d'\xe9t\xe9".encode("latin-1"))
    (tmp_path / "folder.md").mkdir()
    cases = {"absent.md": "does not exist", "empty.md": "is empty",
             "latin1.md": "not UTF-8", "folder.md": "cannot be read"}
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=f"terms_file: .*{name}.* {message}"):
            load_terms(tmp_path / name)
        with pytest.raises(ConfigError, match=message):  # ... and so is the service
            ChatService(Settings(data_dir=tmp_path, terms_file=tmp_path / name),
                        Store(":memory:"), sampler=None)  # type: ignore[arg-type]


def test_terms_file_setting_from_toml_env_and_flag(tmp_path: Path, terms_file: Path) -> None:
    assert Settings().terms_file is None
    config = tmp_path / "prefloop.toml"
    config.write_text(f'terms_file = "{terms_file}"\n')
    assert load_settings(config, env={}).terms_file == terms_file
    config.write_text('terms_file = ""\n')  # TOML has no null: "" is none
    assert load_settings(config, env={}).terms_file is None
    env = {"PREFLOOP_TERMS_FILE": str(terms_file)}
    assert load_settings(None, env=env).terms_file == terms_file
    with pytest.raises(ConfigError, match="terms-file: expected a file path"):
        load_settings(config, env={}, overrides={"terms_file": 3})


def test_serve_refuses_a_missing_terms_file_before_starting_anything(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "data"),
                                       "--terms-file", str(tmp_path / "absent.md")])
    assert result.exit_code == 1
    assert "terms_file" in result.output and "does not exist" in result.output
    assert not (tmp_path / "data").exists()  # no store, no model, no vLLM


# -- the store and the consent -----------------------------------------------------------------


def test_consent_is_asked_until_the_current_version_is_accepted(store: Store,
                                                              terms_file: Path) -> None:
    consent = Consent(store, load_terms(terms_file))
    me = Client(ME)
    assert consent.required and not consent.accepted(me)
    assert consent.accepted(None)  # internal callers (the simulator) are asked nothing
    with pytest.raises(ConsentRequired, match="accept the terms first.*POST /api/v1/consent"):
        consent.require(me)
    with pytest.raises(Conflict, match="not the version sent"):
        consent.accept(me, "0" * 16)
    assert store.consent(ME) is None
    accepted = consent.accept(me, consent.terms.version)
    assert accepted["version"] == consent.terms.version == consent.require(me)
    assert store.consent(ME)["terms_version"] == consent.terms.version

    terms_file.write_text(TERMS + "\nChanged.\n", encoding="utf-8")
    changed = Consent(store, load_terms(terms_file))  # what a restart with new terms sees
    with pytest.raises(ConsentRequired, match="have changed since you accepted"):
        changed.require(me)
    changed.accept(me, changed.terms.version)
    assert changed.require(me) == changed.terms.version
    assert store.db["consents"].count == 1  # the new acceptance replaced the old


def test_without_terms_nothing_is_asked(store: Store) -> None:
    consent = Consent(store, None)
    assert not consent.required and consent.accepted(Client(ME))
    assert consent.require(Client(ME)) is None
    with pytest.raises(NotFound, match="no terms_file"):
        consent.accept(Client(ME), "anything")
    assert consent.status(Client(ME)) == {"required": False, "version": None, "terms": None,
                                          "accepted": True}


def test_the_terms_version_migration_keeps_old_pairs(tmp_path: Path) -> None:
    """A database from before consent: the migration adds the table and a NULL version."""
    path = tmp_path / "old.db"
    with Store(path) as store:
        pair = store.add_pair(store.create_conversation(ME), [{"role": "user", "content": "x"}],
                              Answer("base", "one", 1), Answer("base", "two", 2))
    with sqlite3.connect(path) as db:  # as the database was before m006
        db.execute("drop table consents")
        db.execute("alter table pairs drop column terms_version")
        assert db.execute("delete from _sqlite_migrations where name = 'm006_consent'"
                          ).rowcount == 1
    with Store(path) as store:
        assert store.pair(pair)["terms_version"] is None
        assert store.db["consents"].exists()


# -- the API -----------------------------------------------------------------------------------


@pytest.fixture
def app(settings: Settings, store: Store, stub: StubServer):
    return create_app(settings, store, sampler_for(stub))



def test_nothing_is_stored_until_the_terms_are_accepted(app, store: Store,
                                                        terms_file: Path) -> None:
    version = load_terms(terms_file).version
    with visitor(app) as http:
        status = http.get("/api/v1/consent").json()
        assert status == {"required": True, "version": version, "terms": TERMS,
                          "accepted": False}

        response = http.post("/api/v1/pairs", json={"message": "Hi", "seed": 0})
        assert response.status_code == 403
        detail = response.json()["detail"]
        assert "accept the terms first" in detail and "POST /api/v1/consent" in detail
        assert version in detail
        response = http.post("/api/v1/votes", json={"pair_id": "f" * 32, "choice": "a"})
        assert response.status_code == 403 and "accept the terms" in response.json()["detail"]
        assert set(counts(store).values()) == {0}  # not even a conversation

        for body, status_code, fragment in [
                ({"version": "0" * 16}, 409, "not the version sent"),
                ({"version": 42}, 422, "valid string"),
                ({"version": "x" * 65}, 422, "at most 64"),
                ({}, 422, "missing"),
                ({"version": version, "extra": 1}, 422, "not permitted")]:
            response = http.post("/api/v1/consent", json=body)
            assert response.status_code == status_code, (body, response.text)
            assert fragment in str(response.json()["detail"])
        assert set(counts(store).values()) == {0}

        response = http.post("/api/v1/consent", json={"version": version})
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] and response.json()["version"] == version
        assert http.get("/api/v1/consent").json()["accepted"] is True

        pair = http.post("/api/v1/pairs", json={"message": "Hi", "seed": 0})
        assert pair.status_code == 200, pair.text
        pair_id = pair.json()["pair_id"]
        assert store.pair(pair_id)["terms_version"] == version
        assert http.post("/api/v1/votes", json={"pair_id": pair_id, "choice": "a"}
                         ).status_code == 200

    with visitor(app) as stranger:  # another cookie: asked again
        assert stranger.get("/api/v1/consent").json()["accepted"] is False
        assert stranger.post("/api/v1/pairs", json={"message": "Hi"}).status_code == 403


def test_changed_terms_ask_again_through_the_api(settings: Settings, store: Store,
                                                 stub: StubServer, terms_file: Path) -> None:
    with visitor(create_app(settings, store, sampler_for(stub))) as http:
        old = http.get("/api/v1/consent").json()["version"]
        assert http.post("/api/v1/consent", json={"version": old}).status_code == 200
        cookie = http.cookies[COOKIE]
    terms_file.write_text(TERMS + "\nNow with more.\n", encoding="utf-8")
    with visitor(create_app(settings, store, sampler_for(stub)), cookie) as http:  # restarted
        assert http.cookies[COOKIE] == cookie
        status = http.get("/api/v1/consent").json()
        assert status["version"] != old and status["accepted"] is False
        response = http.post("/api/v1/pairs", json={"message": "Hi"})
        assert response.status_code == 403 and "have changed" in response.json()["detail"]
        response = http.post("/api/v1/consent", json={"version": old})
        assert response.status_code == 409 and status["version"] in response.json()["detail"]
        assert http.post("/api/v1/consent", json={"version": status["version"]}
                         ).status_code == 200
        assert http.post("/api/v1/pairs", json={"message": "Hi", "seed": 0}).status_code == 200
    assert store.db.execute("select terms_version from pairs").fetchall() == [
        (status["version"],)]


def test_without_terms_the_api_stores_at_once(tmp_path: Path, stub: StubServer) -> None:
    settings = Settings(data_dir=tmp_path)
    with Store(settings.db_path) as store, \
            visitor(create_app(settings, store, sampler_for(stub))) as http:
        assert http.get("/api/v1/consent").json()["required"] is False
        response = http.post("/api/v1/consent", json={"version": "anything"})
        assert response.status_code == 404 and "no terms_file" in response.json()["detail"]
        pair = http.post("/api/v1/pairs", json={"message": "Hi", "seed": 0})
        assert pair.status_code == 200
        assert store.pair(pair.json()["pair_id"])["terms_version"] is None


# -- the page's handlers -----------------------------------------------------------------------


def test_the_page_shows_the_terms_until_accepted(settings: Settings, store: Store,
                                                 stub: StubServer) -> None:
    service = ChatService(settings, store, sampler_for(stub))
    handlers = ArenaHandlers(service)
    me = Client(ME)
    assert handlers.terms_shown(me)

    async def send() -> list:
        return [view async for view in handlers.send("Hello", ArenaState(), me)]

    views = asyncio.run(send())
    assert [v.status for v in views] == [ACCEPT_FIRST] and views[-1].typing
    assert set(counts(store).values()) == {0}

    shown, said = handlers.accept_terms(me)
    assert not shown and "Thank you" in said and not handlers.terms_shown(me)
    views = asyncio.run(send())
    assert views[-1].status.endswith("Which answer is better?") and views[-1].voting
    assert store.pair(views[-1].state.pair_id)["terms_version"] == service.consent.terms.version


def test_the_page_has_the_terms_and_an_accept_button(settings: Settings, store: Store) -> None:
    service = ChatService(settings, store, sampler=None)  # type: ignore[arg-type]
    page = build_page(service)
    ids = {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert {"terms", "terms-text", "accept-terms"} <= ids.keys()
    assert ids["terms-text"].value == TERMS.strip()
    assert any(fn.name == "on_load" for fn in page.fns.values())

    plain = build_page(ChatService(Settings(data_dir=settings.data_dir), store,
                                   sampler=None))  # type: ignore[arg-type]
    ids = {b.elem_id for b in plain.blocks.values() if getattr(b, "elem_id", None)}
    assert not {"terms", "accept-terms"} & ids


def test_the_terms_template_is_usable_and_says_what_deletion_cannot_do() -> None:
    template = Path(__file__).resolve().parent.parent / "docs" / "TERMS_TEMPLATE.md"
    terms = load_terms(template)
    assert terms is not None
    text = " ".join(terms.text.split())
    assert "may be **published**" in text
    assert "not retrained" in text and "cannot be recalled" in text
