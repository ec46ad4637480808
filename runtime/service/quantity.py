"""Kubernetes quantities ("4Gi", "1.5Gi", "500M", "1e9") as whole bytes."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

#: a sanity cap, far above any real disk: 1 PiB
MAX_BYTES = 1 << 50

_QUANTITY = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)|[eE](?P<exp>[+-]?[0-9]{1,3}))?"
)
_SUFFIX_MULTIPLIER = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "Ei": 1 << 60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def parse_quantity_bytes(text: str, maximum: int = MAX_BYTES) -> int:
    """A Kubernetes quantity ("4Gi", "1.5Gi", "500M", "1e9", "1024") as whole bytes.

    Fractions of a byte round up, as Kubernetes' Quantity.Value() does. Raises ValueError on
    anything else (negative numbers, milli units, garbage) and above `maximum`.
    """
    s = text.strip()
    if s.startswith("+"):
        s = s[1:]
    if len(s) > 64:
        raise ValueError("too long")
    m = _QUANTITY.fullmatch(s)
    if m is None:
        raise ValueError("not a quantity")
    try:
        number = Decimal(m.group("number"))
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError("not a number") from exc
    if m.group("suffix"):
        value = number * _SUFFIX_MULTIPLIER[m.group("suffix")]
    elif m.group("exp"):
        value = number.scaleb(int(m.group("exp")))
    else:
        value = number
    if value > maximum:
        raise ValueError("too large")
    return math.ceil(value)
