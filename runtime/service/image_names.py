"""Image names: which CRI ``image`` strings the runtime accepts, and the URL each one means.

Pure functions over strings, no I/O. They live in the service layer because they are
policy, not mechanism: which characters, hosts, schemes and translated URLs are allowed is
the runtime's decision, and only the image service asks. The fetch adapter gets a URL
that has passed these checks.

Image names are URLs without a scheme, e.g. ``download.example.org:8080/images/guest.qcow2``,
optionally followed by ``@sha256:<64 hex>``, which is kept and verified against the
downloaded bytes. Tags are ignored; the rule for telling a tag from a colon in a file name
is in :func:`parse_image_name`. A name may instead be looked up in the operator's image
translations (Virtlet's format, adapters/image_translations.py), whose URL is then checked.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from typing import Protocol

from ..checks import is_hostname, shown
from ..errors import InvalidArgument

MAX_NAME_LENGTH = 2048

_ID_RE = re.compile(r"sha256:([0-9a-fA-F]{64})")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_FILE_EXT_RE = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORBIDDEN_CHARS = frozenset('"<>\\^`{|}#?')
_PATH_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:%/"
)
_USER_INFO = "(user info in image names is not supported)"


class Translator(Protocol):
    def translate(self, name: str) -> str | None: ...


@dataclass(frozen=True)
class ImageName:
    """A parsed image name: ``name`` is the canonical form (no tag, no digest)."""

    name: str
    digest: str | None  # lower-case hex from "@sha256:", if any
    scheme: str | None  # an explicit "scheme://" the name started with, lower-case
    location: str  # the name without the scheme: "host[:port]/path"


def parse_id(value: str) -> str | None:
    """The lower-case hex of an image id ``sha256:<64 hex>``, or None for anything else."""
    m = _ID_RE.fullmatch(value) if isinstance(value, str) else None
    return m.group(1).lower() if m else None


def _check_characters(raw: str) -> None:
    if not isinstance(raw, str) or not raw:
        raise InvalidArgument("image name is empty")
    if len(raw) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"image name {shown(raw)} is {len(raw)} characters long; at most "
            f"{MAX_NAME_LENGTH} are allowed"
        )
    for ch in raw:
        if not ("\x21" <= ch <= "\x7e"):
            raise InvalidArgument(
                f"image name {shown(raw)} contains {ch!r}: whitespace, control and non-ASCII "
                "characters are not allowed (percent-encode them)"
            )
        if ch in _FORBIDDEN_CHARS:
            raise InvalidArgument(
                f"image name {shown(raw)} contains {ch!r}, which is not allowed "
                "(no query strings or fragments; use an image translation for such URLs)"
            )
    if _BAD_PERCENT.search(raw):
        raise InvalidArgument(f"image name {shown(raw)} has a '%' not followed by two hex digits")


def _split_digest(raw: str) -> tuple[str, str | None]:
    if "@" not in raw:
        return raw, None
    body, _, suffix = raw.rpartition("@")
    digest = parse_id(suffix)
    if digest is None:
        raise InvalidArgument(
            f"image name {shown(raw)}: only '@sha256:<64 hex digits>' may follow '@' "
            + _USER_INFO
        )
    if "@" in body:
        raise InvalidArgument(
            f"image name {shown(raw)}: '@' is only allowed before a sha256 digest " + _USER_INFO
        )
    return body, digest


def _split_scheme(body: str, raw: str) -> tuple[str | None, str]:
    if "://" not in body:
        return None, body
    scheme, _, location = body.partition("://")
    if not _SCHEME_RE.fullmatch(scheme):
        raise InvalidArgument(f"image name {shown(raw)} has a malformed scheme {scheme!r}")
    return scheme.lower(), location


def _drop_tag(location: str) -> str:
    head, slash, last = location.rpartition("/")
    if ":" in last:
        base, _, tag = last.rpartition(":")
        if base and _TAG_RE.fullmatch(tag) and not _FILE_EXT_RE.search(tag):
            return head + slash + base
    return location


def parse_image_name(raw: str) -> ImageName:
    """Check the characters of an image name and split off its digest and tag.

    The tag rule: when the last path segment contains ``:``, the text after the last ``:`` is a
    tag, and dropped, if it is a valid Docker tag (``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``) that
    does not end like a file extension (a dot followed by a letter and letters/digits). So
    ``guest.qcow2:latest`` and ``guest.qcow2:1.0`` lose their tag, while in ``guest:v2.qcow2``
    the colon is part of the file name and stays in the URL.

    Raises InvalidArgument. The host part is checked by :func:`check_location`.
    """
    _check_characters(raw)
    body, digest = _split_digest(raw)
    scheme, location = _split_scheme(body, raw)
    location = _drop_tag(location)
    if not location:
        raise InvalidArgument(f"image name {shown(raw)} names no image")
    name = f"{scheme}://{location}" if scheme else location
    return ImageName(name=name, digest=digest, scheme=scheme, location=location)


def _split_ipv6(authority: str, raw: str) -> str | None:
    """The port of ``[v6addr]:port`` (None without one), after checking the address."""
    end = authority.find("]")
    host, rest = authority[1:end], authority[end + 1 :]
    try:
        if end < 0 or "%" in host:
            raise ValueError("malformed")
        ipaddress.IPv6Address(host)
    except ValueError:
        raise InvalidArgument(
            f"image name {shown(raw)} has a malformed IPv6 host [{host}]"
        ) from None
    if rest and not rest.startswith(":"):
        raise InvalidArgument(f"image name {shown(raw)}: junk after the IPv6 host")
    return rest[1:] if rest else None


def _split_host(authority: str, raw: str) -> str | None:
    """The port of ``host[:port]`` (None without one), after checking the host."""
    host, colon, port = authority.partition(":")
    if not is_hostname(host):
        raise InvalidArgument(
            f"image name {shown(raw)}: {host!r} is not a valid host name or IPv4 address"
        )
    if host.rpartition(".")[2].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidArgument(
                f"image name {shown(raw)}: {host!r} is not a valid IPv4 address"
            ) from None
    return port if colon else None


def _check_host(authority: str, raw: str) -> None:
    if not authority:
        raise InvalidArgument(f"image name {shown(raw)} has no host")
    ipv6 = authority.startswith("[")
    port = _split_ipv6(authority, raw) if ipv6 else _split_host(authority, raw)
    if port is not None and not (
        port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536
    ):
        raise InvalidArgument(f"image name {shown(raw)} has an invalid port {port!r}")


def check_location(ref: ImageName, raw: str) -> None:
    """Strict check of ``host[:port]/path`` (or ``/path`` for file://); InvalidArgument if bad."""
    authority, slash, path = ref.location.partition("/")
    if ref.scheme == "file":
        if authority not in ("", "localhost"):
            raise InvalidArgument(f"image name {shown(raw)}: a file:// URL names no host")
    else:
        _check_host(authority, raw)
    if not slash or not path:
        raise InvalidArgument(f"image name {shown(raw)} has no path after the host")
    bad = sorted(set(path) - _PATH_CHARS)
    if bad:
        raise InvalidArgument(f"image name {shown(raw)}: characters {bad} are not allowed")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgument(
                f"image name {shown(raw)}: empty, '.' and '..' path segments are not allowed"
            )


def _check_translated(url: str, raw: str, allowed: frozenset[str]) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in allowed:
        raise InvalidArgument(
            f"image {shown(raw)} translates to a {scheme or 'schemeless'} URL; allowed "
            f"schemes are {sorted(allowed)}"
        )
    if "@" in parts.netloc or any(not ("\x21" <= c <= "\x7e") for c in url):
        raise InvalidArgument(
            f"image {shown(raw)} translates to a URL with user info or bad characters"
        )
    if scheme != "file" and not parts.hostname:
        raise InvalidArgument(f"image {shown(raw)} translates to a URL with no host")
    # The name fills the rule's groups: it must not climb out of the rule's path.
    segments = urllib.parse.unquote(parts.path).split("/")
    if any(seg in (".", "..") for seg in segments):
        raise InvalidArgument(
            f"image {shown(raw)} translates to a URL with '.' or '..' path segments"
        )
    return url


def url_for(ref: ImageName, raw: str, *, allowed_schemes: frozenset[str],
            download_protocol: str, translations: Translator | None = None) -> str:
    """The URL to download ``ref`` from: its translation if a rule matches, else the name
    itself with ``download_protocol`` unless it names an allowed scheme. InvalidArgument if
    that URL is not allowed."""
    url = translations.translate(ref.name) if translations is not None else None
    if url is not None:
        return _check_translated(url, raw, allowed_schemes)
    if ref.scheme is not None and ref.scheme not in allowed_schemes:
        raise InvalidArgument(
            f"image name {shown(raw)}: scheme {ref.scheme!r} is not allowed (allowed: "
            f"{sorted(allowed_schemes)}); image names are URLs without a scheme"
        )
    check_location(ref, raw)
    return f"{ref.scheme or download_protocol}://{ref.location}"
