"""The runtime's one error family.

Code below the API layer raises these; one place (api/errors.py) turns them into gRPC
status codes, so a servicer never picks a status code by hand and an unexpected
exception becomes INTERNAL with its traceback logged, never a silent UNKNOWN.
"""

from __future__ import annotations


class RuntimeError_(Exception):
    """Base of the family: a message for the caller plus optional context for the log."""

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context


class InvalidArgument(RuntimeError_):
    """The request is malformed; retrying it unchanged can never succeed."""


class PermissionDenied(RuntimeError_):
    """The request asks for something this node's policy refuses (a denied network)."""


class NotFound(RuntimeError_):
    """The named object does not exist."""


class AlreadyExists(RuntimeError_):
    """The object exists and the request would create it again with other settings."""


class FailedPrecondition(RuntimeError_):
    """The object is not in a state that allows the operation."""


class Unavailable(RuntimeError_):
    """A dependency (libvirt, a CNI plugin, the image server) cannot be reached now."""


class Cancelled(RuntimeError_):
    """The caller went away; the work was stopped and undone."""


class DeadlineExceeded(RuntimeError_):
    """A dependency did not answer in time (a hung CNI plugin, a slow download)."""


class ResourceExhausted(RuntimeError_):
    """Out of disk, memory or another limited resource."""


class Internal(RuntimeError_):
    """A bug or an unexpected state; the log has the details."""


class StartupError(Exception):
    """Stops the daemon from starting; the message is one line for the operator."""
