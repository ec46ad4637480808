"""The pod's SSH keys (VirtletSSHKeys): OpenSSH public key lines, checked one by one.

A key reaches the guest's authorized_keys through cloud-init, so only plain public keys
pass: "TYPE BASE64 [COMMENT]" whose blob really is a key of TYPE; no authorized_keys
options (command=..., from=...), no control characters.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct

from ..checks import has_control, shown

# OpenSSH public key types (the plain keys and their certificates).
SSH_KEY_TYPES = frozenset(
    {
        "ssh-rsa",
        "ssh-dss",
        "ssh-ed25519",
        "ssh-ed448",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
        "ssh-rsa-cert-v01@openssh.com",
        "ssh-dss-cert-v01@openssh.com",
        "ssh-ed25519-cert-v01@openssh.com",
        "ecdsa-sha2-nistp256-cert-v01@openssh.com",
        "ecdsa-sha2-nistp384-cert-v01@openssh.com",
        "ecdsa-sha2-nistp521-cert-v01@openssh.com",
        "sk-ssh-ed25519-cert-v01@openssh.com",
        "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
    }
)
_SSH_KEY_LINE = re.compile(r"(?P<type>\S+) (?P<blob>[A-Za-z0-9+/]+={0,2})(?: (?P<comment>.*))?")


def check_ssh_public_key(line: str) -> str:
    """Return `line` normalised (single spaces) if it is an OpenSSH public key, else raise
    ValueError saying why.

    Accepts "TYPE BASE64 [COMMENT]" where BASE64 decodes to a key blob that starts with the
    same TYPE; authorized_keys options (command=..., from=...) are not accepted.
    """
    text = re.sub(r"[ \t]+", " ", line.strip(" \t"))
    if has_control(text):
        raise ValueError("contains control characters")
    m = _SSH_KEY_LINE.fullmatch(text)
    if m is None:
        raise ValueError("not of the form 'TYPE BASE64 [COMMENT]'")
    key_type = m.group("type")
    if key_type not in SSH_KEY_TYPES:
        raise ValueError(f"unknown key type {shown(key_type, 40)}")
    try:
        blob = base64.b64decode(m.group("blob"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key is not valid base64") from None
    if len(blob) < 4:
        raise ValueError("the key blob is too short")
    (length,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + length] != key_type.encode() or len(blob) <= 4 + length:
        raise ValueError("the key blob does not match its type")
    return text


def parse_ssh_keys(text: str) -> tuple[str, ...]:
    """The keys of `text`, one a line (blank lines and CRLF endings allowed), normalised;
    ValueError naming the first bad line."""
    keys: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            keys.append(check_ssh_public_key(line))
        except ValueError as exc:
            raise ValueError(f"line {number} is not an OpenSSH public key: {exc}") from None
    return tuple(keys)
