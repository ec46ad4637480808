"""Shared by the VM operation tests (test_vm_ops_minimal, test_vm_ops_cloud): a module's
private directory and a watcher that records every state List and Status report."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from tests.daemon_proc import APIS, Daemon


@contextmanager
def module_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="avr-", dir="/tmp"))
    d.chmod(0o711)  # QEMU must traverse it to reach the VM's disks
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call expected to fail."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError("the call succeeded")


class StateWatch:
    """Polls ListContainers and ContainerStatus of one container (both API versions) every
    `every` s in a thread; `seen` is every state reported, in order, without repeats."""

    def __init__(self, d: Daemon, cid: str, every: float = 0.1) -> None:
        self.d, self.cid, self.every = d, cid, every
        self.seen: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _note(self, state: str) -> None:
        if not self.seen or self.seen[-1] != state:
            self.seen.append(state)

    def _run(self) -> None:
        while not self._stop.is_set():
            for api in ("v1alpha2", "v1"):
                pb, _ = APIS[api]
                rt = self.d.runtime(api)
                st = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=self.cid),
                                        timeout=10).status
                self._note(pb.ContainerState.Name(st.state))
                listed = [c for c in rt.ListContainers(pb.ListContainersRequest(),
                                                       timeout=10).containers
                          if c.id == self.cid]
                self._note(pb.ContainerState.Name(listed[0].state) if listed else "MISSING")
            self.polls += 1
            time.sleep(self.every)

    def __enter__(self) -> StateWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)
