"""Image name translations, in the format of Virtlet's image translation files.

A directory holds YAML files, each one document::

    prefix: testimages            # optional; without it the rules see the whole name
    translations:
      - name: cirros              # a fixed name ...
        url: https://download.example.org/cirros-0.5.2-x86_64-disk.img
      - regexp: 'ubuntu/(\\d+\\.\\d+)'   # ... or a regular expression, matched in full
        url: 'https://cloud-images.example.org/\\1/ubuntu-\\1.qcow2'

A name ``testimages/cirros`` is looked up in the rules of the file whose prefix is
``testimages``; the rules of a file without a prefix see the whole name. Files are read in
name order and the first matching rule wins. A ``url`` may refer to groups the Python way
(``\\1``, ``\\g<name>``) or the Go way Virtlet used (``$1``, ``${1}``, ``${name}``, ``$$`` for a
dollar). A file that cannot be read, is not valid YAML, or has a bad rule is logged and
skipped as a whole; it never stops the runtime.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

_GO_REF = re.compile(r"\$\$|\$\{(\w+)\}|\$(\w+)")
_PY_REF = re.compile(r"\\g<(\w+)>|\\(\d+)")


@dataclass(frozen=True)
class TranslationRule:
    """One rule: a fixed ``name`` or a compiled ``regexp``, and the URL template."""

    url: str
    name: str | None = None
    regexp: re.Pattern[str] | None = None

    def apply(self, name: str) -> str | None:
        if self.name is not None:
            return self.url if name == self.name else None
        assert self.regexp is not None
        match = self.regexp.fullmatch(name)
        return match.expand(self.url) if match else None


@dataclass(frozen=True)
class TranslationSet:
    """The rules of one file."""

    source: str
    prefix: str
    rules: tuple[TranslationRule, ...]

    def translate(self, name: str) -> str | None:
        if self.prefix:
            head = self.prefix + "/"
            if not name.startswith(head):
                return None
            name = name[len(head) :]
        for rule in self.rules:
            url = rule.apply(name)
            if url is not None:
                return url
        return None


def _go_template_to_python(template: str) -> str:
    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return "\\g<%s>" % (m.group(1) or m.group(2))

    return _GO_REF.sub(repl, template)


def _nonempty(raw: dict[str, object], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: '{key}' must be a non-empty string")
    return value


def _parse_regexp_rule(regexp: str, url: str, where: str) -> TranslationRule:
    try:
        pattern = re.compile(regexp)
    except re.error as exc:
        raise ValueError(f"{where}: bad regexp {regexp!r}: {exc}") from exc
    template = _go_template_to_python(url)
    for m in _PY_REF.finditer(template):
        ref = m.group(1) or m.group(2)
        ok = int(ref) <= pattern.groups if ref.isdigit() else ref in pattern.groupindex
        if not ok:
            raise ValueError(f"{where}: url refers to group {ref!r} that the regexp lacks")
    return TranslationRule(url=template, regexp=pattern)


def _parse_rule(raw: object, where: str) -> TranslationRule:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a rule must be a mapping")
    unknown = set(raw) - {"name", "regexp", "url"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    url = _nonempty(raw, "url", where)
    if (raw.get("name") is None) == (raw.get("regexp") is None):
        raise ValueError(f"{where}: exactly one of 'name' and 'regexp' is needed")
    if raw.get("name") is not None:
        return TranslationRule(url=url, name=_nonempty(raw, "name", where))
    return _parse_regexp_rule(_nonempty(raw, "regexp", where), url, where)


def parse_translation_document(doc: object, source: str) -> TranslationSet:
    """Turn one loaded YAML document into a TranslationSet; ValueError says what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError("the document must be a mapping")
    prefix = doc.get("prefix") or ""
    if not isinstance(prefix, str) or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError("'prefix' must be a string without leading/trailing '/'")
    raw_rules = doc.get("translations")
    if not isinstance(raw_rules, list):
        raise ValueError("'translations' must be a list")
    rules = tuple(_parse_rule(r, f"rule {i}") for i, r in enumerate(raw_rules))
    return TranslationSet(source=source, prefix=prefix, rules=rules)


class ImageTranslator:
    """Maps image names to download URLs using the translation files of a directory."""

    def __init__(self, directory: Path | None = None, sets: Sequence[TranslationSet] = ()):
        self.directory = directory
        self._sets: tuple[TranslationSet, ...] = tuple(sets)
        if directory is not None:
            self.reload()

    @property
    def sets(self) -> tuple[TranslationSet, ...]:
        return self._sets

    def reload(self) -> None:
        """Read the directory again; bad files are logged and skipped."""
        if self.directory is None:
            return
        sets: list[TranslationSet] = []
        try:
            files = sorted(
                p
                for p in self.directory.iterdir()
                if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
            )
        except OSError as exc:
            log.warning("cannot read image translations from %s: %s", self.directory, exc)
            files = []
        for path in files:
            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8"))
                sets.append(parse_translation_document(doc, str(path)))
            except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
                log.warning("skipping image translation file %s: %s", path, exc)
        self._sets = tuple(sets)
        log.info("loaded %d image translation file(s) from %s", len(self._sets), self.directory)

    def translate(self, name: str) -> str | None:
        """The URL for ``name`` (tag and digest already stripped), or None if no rule matches."""
        for tset in self._sets:
            try:
                url = tset.translate(name)
            except (re.error, IndexError) as exc:
                log.warning("image translation in %s failed for %s: %s", tset.source, name, exc)
                continue
            if url is not None:
                return url
        return None
