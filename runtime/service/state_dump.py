"""The state store as one JSON document for a bug report, with secrets removed.

The store is opened read-only (the daemon keeps running and holds it). What is removed,
replaced by "<redacted N chars>":
  - the value of any mapping key that names a secret (user-data, ssh keys, passwords,
    tokens, certificates, private keys, env): this covers the cloud-init and SSH key
    annotations (VirtletCloudInitUserData, VirtletSSHKeys, ...), whatever their prefix;
  - the value of any {"key"/"name": ..., "value": ...} pair (env variables);
  - any string that looks like a secret wherever it is (#cloud-config, a PEM block, an
    SSH public key line).
Every removed value is remembered (Redactor.secrets) so the other parts of a bundle (the
journal, domain XML, CNI results) can be scrubbed of the same text.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

SECRET_KEY = re.compile(r"user.?data|ssh|passw|secret|token|private|cert|credential|"
                        r"(^|[^a-z])env|cloud.?init|vendor.?data", re.I)
SECRET_TEXT = re.compile(r"#cloud-config|-----BEGIN [A-Z ]*(KEY|CERTIFICATE)|"
                         r"\bssh-(rsa|ed25519|dss)\b|\becdsa-sha2-", re.I)
MIN_SCRUB = 6  # shorter values are not searched for elsewhere (they would hit anything)


class Redactor:
    def __init__(self) -> None:
        self.secrets: set[str] = set()

    def _remember(self, value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                self._remember(v)
        elif isinstance(value, list):
            for v in value:
                self._remember(v)
        elif isinstance(value, str):
            for candidate in {value, *value.splitlines()}:
                if len(candidate.strip()) >= MIN_SCRUB:
                    self.secrets.add(candidate.strip())

    def _hide(self, value: Any) -> str:
        self._remember(value)  # every string inside, to scrub from the other parts
        text = value if isinstance(value, str) else json.dumps(value)
        return f"<redacted {len(text)} chars>"

    def value(self, v: Any, key: str = "") -> Any:
        if key and SECRET_KEY.search(key) and v not in ("", None, [], {}):
            return self._hide(v)
        if isinstance(v, dict):
            if "value" in v and ("key" in v or "name" in v) and len(v) <= 3:
                return {k: (self._hide(x) if k == "value" and x else self.value(x, k))
                        for k, x in v.items()}
            return {k: self.value(x, str(k)) for k, x in v.items()}
        if isinstance(v, list):
            if len(v) == 2 and all(isinstance(x, str) for x in v) and key.lower() == "envs":
                return [v[0], self._hide(v[1])]
            return [self.value(x, key) for x in v]
        if isinstance(v, str):
            if SECRET_TEXT.search(v):
                return self._hide(v)
            if v[:1] in "{[":  # JSON inside a string (annotations, stored results)
                try:
                    inner = json.loads(v)
                except ValueError:
                    return v
                return json.dumps(self.value(inner, key), sort_keys=True)
        return v

    def scrub(self, text: str) -> str:
        """Text from elsewhere, with every remembered secret replaced."""
        for s in sorted(self.secrets, key=len, reverse=True):
            if s in text:
                text = text.replace(s, "<redacted>")
        return text


def dump(db_path: Path, redactor: Redactor) -> dict[str, Any]:
    """Every table of the store: rows with their JSON `data` parsed, then redacted."""
    if not db_path.exists():
        return {"error": f"{db_path}: no state store there"}
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        out: dict[str, Any] = {"path": str(db_path),
                               "schema_version": db.execute("PRAGMA user_version").fetchone()[0]}
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        for table in tables:
            cur = db.execute(f'SELECT * FROM "{table}"')  # names from sqlite_master
            cols = [d[0] for d in cur.description]
            rows = []
            for r in cur.fetchall():
                row = dict(zip(cols, r, strict=True))
                if isinstance(row.get("data"), str):
                    with contextlib.suppress(ValueError):
                        row["data"] = json.loads(row["data"])
                rows.append(redactor.value(row))
            out[table] = rows
        return out
    except sqlite3.Error as e:
        return {"error": f"{db_path}: {e}"}
    finally:
        db.close()
