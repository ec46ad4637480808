"""The store dumped for `diagnose`: a real store (service/store.py) with records as the
daemon writes them, read back read-only; secrets redacted wherever they sit, and scrubbed
from other text."""

from __future__ import annotations

import json
from pathlib import Path

from arktos_vm_runtime.service.state_dump import Redactor, dump
from arktos_vm_runtime.service.store import Store

USER_DATA = "users:\n- name: ops\n  passwd: hunter2-very-secret\n"
SSH = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyMaterial ops@node"


def test_secrets_redacted_and_scrubbed(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        store.put("sandboxes", "sb1", {
            "id": "sb1", "name": "web", "namespace": "ns", "labels": {"app": "web"},
            "annotations": {"VirtletCloudInitUserData": USER_DATA, "VirtletSSHKeys": SSH,
                            "example.com/VirtletCloudInitUserData": USER_DATA,
                            "note": "kept", "config": json.dumps({"password": "pw-in-json"})}})
        store.put("containers", "c1", {"id": "c1", "envs": [["DB_PASSWORD", "envpw-123"]],
                                       "env": [{"key": "TOKEN", "value": "tok-456"}],
                                       "log": "#cloud-config\nruncmd: [x]"},
                  sandbox_id="sb1")
    finally:
        store.close()
    red = Redactor()
    out = dump(tmp_path / "state.db", red)
    text = json.dumps(out)
    for secret in ("hunter2-very-secret", "AAAAC3NzaC1lZDI1NTE5AAAAIKeyMaterial", "envpw-123",
                   "tok-456", "pw-in-json", "runcmd"):
        assert secret not in text, secret
    sb = out["sandboxes"][0]["data"]
    assert sb["annotations"]["note"] == "kept" and sb["labels"] == {"app": "web"}
    assert sb["annotations"]["VirtletSSHKeys"].startswith("<redacted ")
    assert out["containers"][0]["sandbox_id"] == "sb1"
    # The same secrets are found in other parts of a bundle (a log line, an XML) and cut.
    scrubbed = red.scrub(f"line with {SSH} and  passwd: hunter2-very-secret and envpw-123")
    assert "hunter2" not in scrubbed and "KeyMaterial" not in scrubbed
    assert "envpw-123" not in scrubbed and scrubbed.startswith("line with <redacted>")


def test_missing_store_is_said(tmp_path: Path) -> None:
    assert "no state store" in dump(tmp_path / "none.db", Redactor())["error"]
