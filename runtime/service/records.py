"""What the runtime remembers of each sandbox and container, as stored in the state store.

Records are frozen values: a change is `dataclasses.replace`, written to the store and then
swapped into memory (see podstate.py), so a reader holding a record never sees it change
under it. Their dicts (labels, annotations) are never mutated once a record is made.
Times are nanoseconds since the epoch, as the CRI wants them. States use the CRI's names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

SANDBOX_READY, SANDBOX_NOTREADY = "SANDBOX_READY", "SANDBOX_NOTREADY"
CREATING = "CREATING"  # written before the first side effect; never shown to callers
CREATED, RUNNING, EXITED, UNKNOWN = (
    "CONTAINER_CREATED", "CONTAINER_RUNNING", "CONTAINER_EXITED", "CONTAINER_UNKNOWN")

R = TypeVar("R", bound="_Record")


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass(frozen=True)
class SandboxRecord(_Record):
    id: str
    name: str
    namespace: str
    uid: str
    tenant: str
    attempt: int
    state: str
    created_at: int
    hostname: str = ""
    log_directory: str = ""
    runtime_handler: str = ""
    #: RemovePodSandbox began (written before its first step): no container may be made
    #: in it any more, and reconcile or a repeated call finishes the removal
    removing: bool = False
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ContainerRecord(_Record):
    id: str
    sandbox_id: str
    name: str
    attempt: int
    state: str
    created_at: int
    image: str  # the name the kubelet asked for
    image_ref: str  # sha256:<hex> of the stored image
    vm_dir: str
    log_path: str = ""  # absolute: the sandbox's log_directory joined with the config's
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    vcpus: int = 1
    memory_mib: int = 0
    cpu_period: int = 0
    cpu_quota: int = 0
    memory_limit_in_bytes: int = 0
    console_offset: int = 0
    stop_requested: bool = False
    #: ContainerConfig's tty and stdin (Attach honours them); None in a record written
    #: before they were kept: unknown, taken as True (the kubelet sets both on VM containers)
    tty: bool | None = None
    stdin: bool | None = None
    #: RemoveContainer began (written before its first step); reconcile finishes it
    removing: bool = False
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
