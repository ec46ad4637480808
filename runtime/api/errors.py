"""The one place where the runtime's errors become gRPC status codes."""

from __future__ import annotations

import grpc

from .. import errors

_CODES: dict[type[errors.RuntimeError_], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def status_code(exc: errors.RuntimeError_) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


class Unimplemented(errors.RuntimeError_):
    """An RPC this runtime does not implement (yet)."""


_CODES[Unimplemented] = grpc.StatusCode.UNIMPLEMENTED
