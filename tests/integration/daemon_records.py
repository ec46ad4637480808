"""A daemon's own records read from its state store (read-only), for tests that run the
streaming backends in the test process against that daemon's VM: the interface of PodState
and PodNetworks.endpoint that ConsoleAttach, GuestExecStream and PortForward use."""

from __future__ import annotations

import json
import sqlite3

from arktos_vm_runtime.service.network_state import PodState as NetState
from arktos_vm_runtime.service.network_state import pod_ips
from arktos_vm_runtime.service.records import ContainerRecord, SandboxRecord


class DaemonRecords:
    """The daemon's records, read from its store on every call (read-only), at the
    interface ConsoleAttach and PortForward use of PodState and PodNetworks."""

    def __init__(self, state_dir: str) -> None:
        self.db = f"file:{state_dir}/state.db?mode=ro"

    def _rows(self, sql: str, *args: str) -> list[tuple[str]]:
        db = sqlite3.connect(self.db, uri=True)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def setting(self, key: str) -> str:
        return self._rows("SELECT value FROM settings WHERE key = ?", key)[0][0]

    def container(self, cid: str) -> ContainerRecord | None:
        rows = self._rows("SELECT data FROM containers WHERE id = ?", cid)
        return ContainerRecord.from_dict(json.loads(rows[0][0])) if rows else None

    def containers_of(self, sid: str) -> list[ContainerRecord]:
        return [ContainerRecord.from_dict(json.loads(r[0])) for r in
                self._rows("SELECT data FROM containers WHERE sandbox_id = ?", sid)]

    def sandbox(self, sid: str) -> SandboxRecord | None:
        rows = self._rows("SELECT data FROM sandboxes WHERE id = ?", sid)
        return SandboxRecord.from_dict(json.loads(rows[0][0])) if rows else None

    def endpoint(self, sid: str) -> tuple[str, str] | None:
        rows = self._rows("SELECT data FROM networks WHERE id = ?", sid)
        if not rows:
            return None
        st = NetState.from_dict(json.loads(rows[0][0]))
        return st.netns, pod_ips(st)[0]
