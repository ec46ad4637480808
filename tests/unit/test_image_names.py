"""Image names: parsing, location checks and the URL a name means (pure, no I/O).

The end-to-end rejection of bad names (nothing written, InvalidArgument) is tested through
the image service in test_image_store.py.
"""

from __future__ import annotations

import pytest

from arktos_vm_runtime.checks import check_hostname, is_hostname
from arktos_vm_runtime.errors import InvalidArgument
from arktos_vm_runtime.service.image_names import (
    MAX_NAME_LENGTH,
    check_location,
    parse_id,
    parse_image_name,
    url_for,
)

H = "a" * 64
HTTPS_HTTP = frozenset({"https", "http"})


@pytest.mark.parametrize(
    ("raw", "name", "digest", "location"),
    [
        ("example.org/a/b.qcow2", "example.org/a/b.qcow2", None, "example.org/a/b.qcow2"),
        ("example.org/b.qcow2:latest", "example.org/b.qcow2", None, "example.org/b.qcow2"),
        ("example.org/b.qcow2:1.0", "example.org/b.qcow2", None, "example.org/b.qcow2"),
        ("example.org/img:v2.qcow2", "example.org/img:v2.qcow2", None, "example.org/img:v2.qcow2"),
        ("h:8080/b.img:latest@sha256:" + H, "h:8080/b.img", H, "h:8080/b.img"),
        ("h/b.img@sha256:" + H.upper(), "h/b.img", H, "h/b.img"),
        ("[::1]:8080/x/y.qcow2", "[::1]:8080/x/y.qcow2", None, "[::1]:8080/x/y.qcow2"),
        ("HTTP://h/x.img", "http://h/x.img", None, "h/x.img"),
        ("cirros:latest", "cirros", None, "cirros"),
    ],
)
def test_parse_good_names(raw: str, name: str, digest: str | None, location: str) -> None:
    ref = parse_image_name(raw)
    assert (ref.name, ref.digest, ref.location) == (name, digest, location)


def test_check_location_accepts_ip_hosts() -> None:
    for raw in ("10.0.0.1/x.img", "[2001:db8::1]:443/x.img", "a-b.example.org:1/x/y.img"):
        check_location(parse_image_name(raw), raw)


def test_image_ids() -> None:
    assert parse_id("sha256:" + H.upper()) == H
    for value in ("sha256:" + H[:-1], "sha512:" + H, H, "h/x.img", None):
        assert parse_id(value) is None  # type: ignore[arg-type]


def test_a_long_name_is_echoed_cut_short() -> None:
    raw = "h/" + "x" * MAX_NAME_LENGTH
    with pytest.raises(InvalidArgument) as exc:
        parse_image_name(raw)
    assert len(exc.value.message) < 300 and "at most 2048" in exc.value.message


def test_host_names_follow_the_shared_rule() -> None:
    for host in ("h", "a-b.example.org", "1.2.3.4", "x" * 63):
        assert is_hostname(host) and check_hostname(host) == host
    for host in ("", "-a", "a-", "a..b", "ho_st", "x" * 64, ".".join(["a" * 63] * 5)):
        assert not is_hostname(host)
        with pytest.raises(InvalidArgument):
            check_hostname(host)


class Rules:
    def __init__(self, **urls: str) -> None:
        self.urls = urls

    def translate(self, name: str) -> str | None:
        return self.urls.get(name)


def test_url_for_a_plain_name_uses_the_download_protocol() -> None:
    ref = parse_image_name("h:8080/x.qcow2:latest")
    assert url_for(ref, "h:8080/x.qcow2:latest", allowed_schemes=HTTPS_HTTP,
                   download_protocol="https") == "https://h:8080/x.qcow2"
    ref = parse_image_name("http://h/x.qcow2")
    assert url_for(ref, "http://h/x.qcow2", allowed_schemes=HTTPS_HTTP,
                   download_protocol="https") == "http://h/x.qcow2"
    ref = parse_image_name("file:///x.qcow2")
    with pytest.raises(InvalidArgument, match="scheme 'file' is not allowed"):
        url_for(ref, "file:///x.qcow2", allowed_schemes=HTTPS_HTTP, download_protocol="https")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://h/x.img", "translates to a ftp URL"),
        ("h/x.img", "schemeless"),
        ("http://u:p@h/x.img", "user info"),
        ("http://h/a b.img", "bad characters"),
        ("http:///x.img", "no host"),
        ("http://h/a/%2e%2e/b.img", "'.' or '..'"),
    ],
)
def test_url_for_checks_a_translated_url(url: str, why: str) -> None:
    ref = parse_image_name("t/x")
    with pytest.raises(InvalidArgument, match=why):
        url_for(ref, "t/x", allowed_schemes=HTTPS_HTTP, download_protocol="https",
                translations=Rules(**{"t/x": url}))
    assert url_for(ref, "t/x", allowed_schemes=HTTPS_HTTP, download_protocol="https",
                   translations=Rules(**{"t/x": "http://h:1/q?token=s"})) == "http://h:1/q?token=s"
