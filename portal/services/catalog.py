"""The topic catalog: parse and validate the TOML file, sync it into the database, read it.

Wording is proof of consent, so a changed wording never overwrites the old one: it becomes a
new version, and events keep pointing at the version the person saw.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.models.catalog import CHANNELS, KINDS, SWITCHES_KEY, Topic, TopicWording

LOCALES = ("en", "fr")


class CatalogError(ValueError):
    """The catalog file is not usable; the message names the topic and field."""


@dataclass(frozen=True)
class TopicSpec:
    key: str
    kind: str
    required: bool
    channels: tuple[str, ...]
    defaults: dict[str, bool]
    names: dict[str, str]
    descriptions: dict[str, str]
    wording: dict[str, str]


@dataclass(frozen=True)
class CatalogSpec:
    topics: tuple[TopicSpec, ...]
    switches_wording: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicInfo:
    """What the decision module needs to know of a topic."""

    key: str
    kind: str
    required: bool
    channels: tuple[str, ...]
    defaults: dict[str, bool]
    names: dict[str, str]
    descriptions: dict[str, str]
    wording: dict[str, str]
    wording_version: int
    wording_hash: str

    @property
    def marketing(self) -> bool:
        return self.kind == "marketing"

    def name(self, locale: str) -> str:
        return self.names.get(locale) or self.names["en"]

    def description(self, locale: str) -> str:
        return self.descriptions.get(locale) or self.descriptions.get("en", "")

    def wording_text(self, locale: str) -> str:
        return self.wording.get(locale) or self.wording["en"]


@dataclass(frozen=True)
class Catalog:
    topics: dict[str, TopicInfo]
    switches_version: int
    switches_hash: str

    def ordered(self) -> list[TopicInfo]:
        return list(self.topics.values())

    def get(self, key: str) -> TopicInfo | None:
        return self.topics.get(key)


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)
    reworded: list[str] = field(default_factory=list)
    deactivated: list[str] = field(default_factory=list)


def wording_hash(texts: dict[str, str]) -> str:
    """SHA-256 of the wording in every language, canonically serialised."""
    canonical = json.dumps(texts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _localized(raw: dict[str, Any], name: str, where: str, required: bool = True) -> dict[str, str]:
    value = raw.get(name, {})
    if not isinstance(value, dict) or any(not isinstance(v, str) for v in value.values()):
        raise CatalogError(f"{where}: '{name}' must be a table of language = text")
    if required:
        missing = [loc for loc in LOCALES if not value.get(loc, "").strip()]
        if missing:
            raise CatalogError(f"{where}: '{name}' lacks {', '.join(missing)}")
    return dict(value)


def parse_catalog(text: str) -> CatalogSpec:
    """Validate the TOML text and return its topics; every error names topic and field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog is not valid TOML: {exc}") from exc
    switches = _localized(raw.get("switches", {}), "wording", "switches")
    topics: list[TopicSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(raw.get("topics", [])):
        key = item.get("key")
        where = f"topic #{index + 1}" if not key else f"topic '{key}'"
        if not isinstance(key, str) or not key.isidentifier() or len(key) > 64:
            raise CatalogError(f"{where}: 'key' must be a short identifier")
        if key in seen:
            raise CatalogError(f"{where}: duplicate key")
        seen.add(key)
        kind = item.get("kind")
        if kind not in KINDS:
            raise CatalogError(f"{where}: 'kind' must be one of {', '.join(KINDS)}")
        channels = item.get("channels")
        if not isinstance(channels, list) or not channels:
            raise CatalogError(f"{where}: 'channels' must be a non-empty list")
        unknown = [c for c in channels if c not in CHANNELS]
        if unknown:
            raise CatalogError(f"{where}: unknown channel(s) {', '.join(map(str, unknown))}")
        required = bool(item.get("required", False))
        if required and kind != "service":
            raise CatalogError(f"{where}: only service topics can be required")
        defaults_raw = item.get("defaults", {})
        if not isinstance(defaults_raw, dict):
            raise CatalogError(f"{where}: 'defaults' must be a table of channel = true/false")
        defaults = {c: bool(defaults_raw.get(c, required)) for c in channels}
        stray = [c for c in defaults_raw if c not in channels]
        if stray:
            raise CatalogError(f"{where}: default for channel(s) not offered: {', '.join(stray)}")
        if kind == "marketing" and any(defaults.values()):
            raise CatalogError(f"{where}: marketing topics must default to not consented")
        topics.append(
            TopicSpec(
                key=key,
                kind=kind,
                required=required,
                channels=tuple(c for c in CHANNELS if c in channels),
                defaults=defaults,
                names=_localized(item, "name", where),
                descriptions=_localized(item, "description", where),
                wording=_localized(item, "wording", where),
            )
        )
    if not topics:
        raise CatalogError("catalog has no topics")
    extra = {k: v for k, v in raw.items() if k not in {"topics", "switches"}}
    return CatalogSpec(topics=tuple(topics), switches_wording=switches, extra=extra)


def load_catalog_file(path: str | Path) -> CatalogSpec:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc}") from exc
    return parse_catalog(text)


def _record_wording(session: Session, key: str, texts: dict[str, str], digest: str) -> int:
    latest = session.scalars(
        select(TopicWording)
        .where(TopicWording.topic_key == key)
        .order_by(TopicWording.version.desc())
        .limit(1)
    ).first()
    if latest is not None and latest.hash == digest:
        return latest.version
    version = 1 if latest is None else latest.version + 1
    session.add(TopicWording(topic_key=key, version=version, texts=texts, hash=digest))
    return version


def sync_catalog(session: Session, spec: CatalogSpec) -> SyncReport:
    """Make the database match the file; safe to run at every start."""
    report = SyncReport()
    _record_wording(session, SWITCHES_KEY, spec.switches_wording,
                    wording_hash(spec.switches_wording))
    existing = {t.key: t for t in session.scalars(select(Topic))}
    for position, topic_spec in enumerate(spec.topics):
        digest = wording_hash(topic_spec.wording)
        version = _record_wording(session, topic_spec.key, topic_spec.wording, digest)
        topic = existing.pop(topic_spec.key, None)
        if topic is None:
            topic = Topic(key=topic_spec.key)
            session.add(topic)
            report.added.append(topic_spec.key)
        elif topic.wording_hash != digest:
            report.reworded.append(topic_spec.key)
        topic.kind = topic_spec.kind
        topic.required = topic_spec.required
        topic.position = position
        topic.channels = list(topic_spec.channels)
        topic.defaults = dict(topic_spec.defaults)
        topic.names = dict(topic_spec.names)
        topic.descriptions = dict(topic_spec.descriptions)
        topic.wording = dict(topic_spec.wording)
        topic.wording_version = version
        topic.wording_hash = digest
        topic.active = True
    for topic in existing.values():
        if topic.active:
            topic.active = False
            report.deactivated.append(topic.key)
    session.flush()
    return report


def get_catalog(session: Session) -> Catalog:
    """The active topics in catalog order, with their current wording version."""
    topics = session.scalars(
        select(Topic).where(Topic.active.is_(True)).order_by(Topic.position)
    ).all()
    switches = session.scalars(
        select(TopicWording)
        .where(TopicWording.topic_key == SWITCHES_KEY)
        .order_by(TopicWording.version.desc())
        .limit(1)
    ).first()
    return Catalog(
        topics={
            t.key: TopicInfo(
                key=t.key,
                kind=t.kind,
                required=t.required,
                channels=tuple(t.channels),
                defaults=dict(t.defaults),
                names=dict(t.names),
                descriptions=dict(t.descriptions),
                wording=dict(t.wording),
                wording_version=t.wording_version,
                wording_hash=t.wording_hash,
            )
            for t in topics
        },
        switches_version=switches.version if switches else 0,
        switches_hash=switches.hash if switches else "",
    )


def wording_exists(session: Session, topic_key: str, version: int) -> TopicWording | None:
    return session.scalars(
        select(TopicWording).where(
            TopicWording.topic_key == topic_key, TopicWording.version == version
        )
    ).first()
