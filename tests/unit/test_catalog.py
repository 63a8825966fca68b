"""The topic catalog: parse errors name topic and field; sync adds, rewords (keeping every old
wording as proof) and deactivates."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import select

from portal.models.catalog import Topic, TopicWording
from portal.services.catalog import (
    CatalogError,
    get_catalog,
    load_catalog_file,
    parse_catalog,
    sync_catalog,
    wording_hash,
)
from tests.conftest import CATALOG

SWITCHES = """
[switches]
wording.en = "Pause everything."
wording.fr = "Tout mettre en pause."
"""


def topic(key="recipes", kind="marketing", channels='["email"]', extra=""):
    return f"""
[[topics]]
key = "{key}"
kind = "{kind}"
channels = {channels}
name.en = "Recipes"
name.fr = "Recettes"
description.en = "A recipe a week."
description.fr = "Une recette par semaine."
wording.en = "I agree to receive recipes."
wording.fr = "J’accepte de recevoir des recettes."
{extra}
"""


def test_the_shipped_catalog_parses():
    spec = load_catalog_file(CATALOG)
    keys = [t.key for t in spec.topics]
    assert "newsletter" in keys and "account" in keys
    account = next(t for t in spec.topics if t.key == "account")
    assert account.required and all(account.defaults.values())
    assert all(not any(t.defaults.values()) for t in spec.topics if t.kind == "marketing")


def test_a_valid_topic_parses_with_channels_in_canonical_order():
    spec = parse_catalog(SWITCHES + topic(channels='["sms", "email"]'))
    [recipes] = spec.topics
    assert recipes.channels == ("email", "sms")
    assert recipes.defaults == {"email": False, "sms": False}
    assert recipes.names == {"en": "Recipes", "fr": "Recettes"}


@pytest.mark.parametrize(("text", "expected"), [
    (SWITCHES + topic().replace('name.fr = "Recettes"\n', ""),
     "topic 'recipes': 'name' lacks fr"),
    (SWITCHES + topic().replace('wording.fr = "J’accepte de recevoir des recettes."\n', ""),
     "topic 'recipes': 'wording' lacks fr"),
    (SWITCHES + topic(channels='["email", "fax"]'), "topic 'recipes': unknown channel(s) fax"),
    (SWITCHES + topic(extra="defaults = { email = true }"),
     "topic 'recipes': marketing topics must default to not consented"),
    (SWITCHES + topic() + topic(), "topic 'recipes': duplicate key"),
    (SWITCHES + topic(kind="gossip"), "topic 'recipes': 'kind' must be one of"),
    (SWITCHES + topic(channels="[]"), "topic 'recipes': 'channels' must be a non-empty list"),
    (SWITCHES + topic(extra="required = true"),
     "topic 'recipes': only service topics can be required"),
    (SWITCHES + topic(kind="service", extra="defaults = { sms = true }"),
     "topic 'recipes': default for channel(s) not offered: sms"),
    (SWITCHES + topic(key="2bad"), "topic '2bad': 'key' must be a short identifier"),
    (SWITCHES, "catalog has no topics"),
    (topic(), "switches: 'wording' lacks en, fr"),
    ("this is = not toml [", "catalog is not valid TOML"),
])
def test_parse_errors_name_the_topic_and_field(text, expected):
    with pytest.raises(CatalogError) as raised:
        parse_catalog(text)
    assert expected in str(raised.value)


def test_a_missing_file_is_a_catalog_error(tmp_path):
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog_file(tmp_path / "nope.toml")


def base_spec():
    return load_catalog_file(CATALOG)


def test_sync_is_idempotent(session):
    report = sync_catalog(session, base_spec())
    assert (report.added, report.reworded, report.deactivated) == ([], [], [])


def test_sync_adds_topics(session):
    text = CATALOG.read_text(encoding="utf-8") + topic()
    report = sync_catalog(session, parse_catalog(text))
    assert report.added == ["recipes"]
    catalog = get_catalog(session)
    recipes = catalog.get("recipes")
    assert recipes is not None
    assert recipes.wording_version == 1
    assert recipes.wording_hash == wording_hash(recipes.wording)
    assert [t.key for t in catalog.ordered()][-1] == "recipes"


def test_changing_a_wording_bumps_the_version_and_keeps_the_old_text(session):
    before = get_catalog(session).get("newsletter")
    offers = get_catalog(session).get("offers")
    spec = base_spec()
    reworded = tuple(
        dataclasses.replace(t, wording={**t.wording, "en": "I want the newsletter."})
        if t.key == "newsletter" else t
        for t in spec.topics
    )
    report = sync_catalog(session, dataclasses.replace(spec, topics=reworded))
    assert report.reworded == ["newsletter"]
    after = get_catalog(session).get("newsletter")
    assert after.wording_version == before.wording_version + 1
    assert after.wording["en"] == "I want the newsletter."
    assert after.wording_hash != before.wording_hash

    versions = {w.version: w for w in session.scalars(
        select(TopicWording).where(TopicWording.topic_key == "newsletter"))}
    old = versions[before.wording_version]
    assert old.texts == before.wording
    assert old.hash == before.wording_hash
    assert versions[after.wording_version].texts["en"] == "I want the newsletter."
    assert get_catalog(session).get("offers").wording_version == offers.wording_version
    assert sync_catalog(session, dataclasses.replace(spec, topics=reworded)).reworded == []


def test_rewording_back_makes_a_new_version_not_a_rollback(session):
    spec = base_spec()
    original = get_catalog(session).get("surveys")

    def with_wording(text):
        return dataclasses.replace(spec, topics=tuple(
            dataclasses.replace(t, wording={**t.wording, "en": text}) if t.key == "surveys"
            else t for t in spec.topics))

    sync_catalog(session, with_wording("Ask me things."))
    sync_catalog(session, spec)
    now = get_catalog(session).get("surveys")
    assert now.wording == original.wording
    assert now.wording_version == original.wording_version + 2


def test_removing_a_topic_deactivates_it(session):
    spec = base_spec()
    without = dataclasses.replace(spec, topics=tuple(t for t in spec.topics
                                                     if t.key != "surveys"))
    report = sync_catalog(session, without)
    assert report.deactivated == ["surveys"]
    assert get_catalog(session).get("surveys") is None
    row = session.get(Topic, "surveys")
    assert row is not None and row.active is False
    assert session.scalars(select(TopicWording).where(TopicWording.topic_key == "surveys")
                           ).first() is not None
    # Putting it back reactivates it.
    report = sync_catalog(session, spec)
    assert report.added == [] and report.deactivated == []
    assert get_catalog(session).get("surveys") is not None
