"""The runtime's input checks, one rule per kind of value, shared by every layer.

Everything a request carries is untrusted. Each check here either returns the value (or
its normal form) or raises InvalidArgument with a message that names the field and echoes
at most a short, repr-quoted prefix of the value, so a megabyte id never reaches a log
line or a gRPC trailer whole. Callers check sizes and shapes *before* any lock, lookup or
log line. Pure functions over strings: no I/O, no imports above ``errors``.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

# What an error message echoes of a value: enough to recognise it, never all of a big one.
SHOWN = 80

# Pod UIDs as Kubernetes makes them (UUIDs), or the ids crictl and tests use; also sandbox
# ids (= pod UIDs), snapshot ids and the other names that become file or domain names.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# RFC 1123 host names: the guest's hostname comes from here (cloud-init local-hostname).
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
# C0 controls and DEL: never in a name, a CNI argument, an XML text or a log field.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# DNS search domains as resolv.conf, dnsmasq and cloud-init take them; underscores appear
# in real zones.
_SEARCH_DOMAIN = re.compile(r"[A-Za-z0-9_.-]{1,253}")
# Linux interface names: IFNAMSIZ - 1 characters, not starting with '-' or '.', so they
# can never be read as an option or as '.'/'..'.
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# CNI_ARGS keys (K=V;K=V): the CNI spec's alphanumerics plus '_', '.', '-'.
_CNI_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def shown(value: object, limit: int = SHOWN) -> str:
    """A value for an error message: repr-quoted, cut to `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text)} characters)"
    return repr(text)


def check_id(what: str, value: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidArgument(
            f"{what} {shown(value)} must be 1-128 characters of [A-Za-z0-9_.-], "
            "starting with a letter or digit")
    return value


def is_hostname(value: str) -> bool:
    """An RFC 1123 host name: dot-separated labels of [A-Za-z0-9-], at most 253 characters."""
    return isinstance(value, str) and _HOSTNAME.fullmatch(value) is not None


def check_hostname(value: str) -> str:
    if not is_hostname(value):
        raise InvalidArgument(f"hostname {shown(value)} is not an RFC 1123 host name")
    return value


def has_control(value: str) -> bool:
    return CONTROL.search(value) is not None


def check_text(what: str, value: str, *, max_len: int = 253, allow_empty: bool = True) -> str:
    """A free-text value bounded in length and free of control characters."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string")
    if not value and not allow_empty:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > max_len:
        raise InvalidArgument(f"{what} {shown(value)} is longer than {max_len} characters")
    if has_control(value):
        raise InvalidArgument(f"{what} {shown(value)} contains control characters")
    return value


def is_search_domain(value: str) -> bool:
    return isinstance(value, str) and _SEARCH_DOMAIN.fullmatch(value) is not None


def ifname_problem(name: str) -> str | None:
    """Why `name` cannot be a Linux interface name, or None when it can."""
    if not isinstance(name, str) or not _IFNAME.fullmatch(name):
        return (f"{shown(name)} is not an interface name (1-15 characters of "
                "[A-Za-z0-9_.-], not starting with '-' or '.')")
    return None


def check_ifname(what: str, name: str) -> str:
    problem = ifname_problem(name)
    if problem is not None:
        raise InvalidArgument(f"{what} {problem}")
    return name


def normalize_mac(what: str, value: str) -> str:
    """A MAC address as libvirt and the kernel print it: six lower-case hex pairs with ':'.
    Accepts '-' separators and upper case, as users write them."""
    mac = value.strip().lower().replace("-", ":") if isinstance(value, str) else ""
    if not _MAC.fullmatch(mac):
        raise InvalidArgument(f"{what} {shown(value)} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    if int(mac[:2], 16) & 1:
        raise InvalidArgument(f"{what} {mac} is a multicast address")
    return mac


def is_mac(value: str) -> bool:
    return isinstance(value, str) and _MAC.fullmatch(value) is not None


def is_uuid(value: str) -> bool:
    """A lower-case canonical UUID, as libvirt prints them."""
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def cni_value_problem(value: str, max_len: int | None = 253) -> str | None:
    """Why `value` cannot travel in CNI_ARGS (K=V;K=V), or None when it can. max_len None:
    bounded by the caller (the NICs JSON is checked as an annotation, not as one value)."""
    if max_len is not None and len(value) > max_len:
        return f"{shown(value)} is longer than {max_len} characters"
    if ";" in value or "=" in value:
        return f"{shown(value)} contains ';' or '='"
    if has_control(value):
        return f"{shown(value)} contains control characters"
    return None


def cni_key_problem(key: str) -> str | None:
    if not _CNI_KEY.fullmatch(key):
        return f"{shown(key)} is not a CNI argument name ([A-Za-z0-9_.-]+)"
    return None
