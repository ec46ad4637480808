"""Serves both CRI packages (runtime.v1alpha2 and runtime.v1) from one implementation.

Handlers are built from the services' descriptors rather than the generated servicer base
classes so that, uniformly for every method of both versions:
  - a request that fails to parse, or is larger than the CRI limit, is INVALID_ARGUMENT
    (grpcio's default would be INTERNAL / RESOURCE_EXHAUSTED with no field named);
  - sizes (limits.py), enum values and required ids are checked before the servicer
    runs, and before anything is logged;
  - a method the servicer lacks is UNIMPLEMENTED naming the method;
  - runtime errors map to status codes in one place, and anything unexpected is INTERNAL
    with its traceback logged;
  - each call is logged once with journal fields (CRI_METHOD, GRPC_CODE, ids).
A servicer method is `async def Name(self, request, call: Call) -> response`; it builds
responses with `call.pb`, the generated module of the API version the caller used. A
server-streaming method (GetContainerEvents) is an async generator of responses, with the
same checks and error mapping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from .. import errors, metrics
from . import validation
from .errors import Unimplemented, status_code

log = logging.getLogger(__name__)

MAX_MESSAGE = 16 * 1024 * 1024  # the kubelet's limit, both directions
# grpcio itself accepts a little more so that an oversized request reaches our
# deserializer and gets INVALID_ARGUMENT with a message, instead of RESOURCE_EXHAUSTED.
TRANSPORT_LIMIT = MAX_MESSAGE + 1024 * 1024

# Called every second by the kubelet: logged at DEBUG only.
_QUIET = {"Version", "Status", "ListPodSandbox", "ListContainers", "ListImages",
          "ImageFsInfo", "PodSandboxStatus", "ContainerStatus", "ListContainerStats",
          "ImageStatus", "ContainerStats", "ListPodSandboxStats", "PodSandboxStats"}
# An error message goes into a gRPC trailer (the client's metadata limit is 8 KiB by
# default) and a log line: messages cut what they echo (checks.shown); this cuts the rest.
MAX_DETAIL = 1024
# Request fields copied into the journal entry of a call.
_ID_FIELDS = {"pod_sandbox_id": "POD_SANDBOX_ID", "container_id": "CONTAINER_ID",
              "vm_id": "CONTAINER_ID", "vmID": "CONTAINER_ID", "snapshotID": "SNAPSHOT_ID"}


@dataclasses.dataclass(frozen=True)
class Call:
    method: str
    api_version: str  # "v1alpha2" or "v1"
    pb: ModuleType
    context: grpc.aio.ServicerContext


@dataclasses.dataclass(frozen=True)
class _Rejected:
    """Stands in for a request that could not be parsed."""

    message: str


def _deserializer(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if len(data) > MAX_MESSAGE:
            return _Rejected(
                f"request of {len(data)} bytes exceeds the {MAX_MESSAGE} byte message limit"
            )
        try:
            return cls.FromString(data)
        except Exception as e:  # DecodeError, or upb's own errors on garbage
            return _Rejected(f"malformed {cls.DESCRIPTOR.name}: {e}")

    return parse


def _ids(request: Any) -> dict[str, str]:
    if not isinstance(request, Message):
        return {}
    return {field: str(getattr(request, name))[:128] for name, field in _ID_FIELDS.items()
            if name in request.DESCRIPTOR.fields_by_name and getattr(request, name)}


Servicer = object  # any object with `async def Method(request, call)` attributes


def _unary(
    service: ServiceDescriptor, method: MethodDescriptor, impl: Servicer, pb: ModuleType,
    api_version: str,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    name = method.name
    full = f"/{service.full_name}/{name}"
    fn = getattr(impl, name, None)

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        detail = ""
        try:
            if isinstance(request, _Rejected):
                raise errors.InvalidArgument(request.message)
            validation.check(name, request)
            if fn is None:
                raise Unimplemented(f"{full} is not implemented by arktos-vm-runtime")
            return await fn(request, Call(name, api_version, pb, context))
        except errors.RuntimeError_ as e:
            code, detail = status_code(e), e.message
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            log.exception("%s failed unexpectedly", full, extra={"CRI_METHOD": name})
            code, detail = grpc.StatusCode.INTERNAL, f"internal error in {name}: {e}"
        finally:
            elapsed = time.monotonic() - started
            metrics.observe_rpc(name, code.name, elapsed)
            if len(detail) > MAX_DETAIL:
                detail = detail[:MAX_DETAIL] + f"... ({len(detail)} characters)"
            level = logging.DEBUG if name in _QUIET and code == grpc.StatusCode.OK else logging.INFO
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED,
                            grpc.StatusCode.NOT_FOUND):
                level = logging.WARNING
            # The journal fields only for a line that is written: the kubelet's once-a-second
            # calls are DEBUG, off by default (bench/call_cost.py).
            if log.isEnabledFor(level):
                fields = {"CRI_METHOD": name, "CRI_API": api_version, "GRPC_CODE": code.name,
                          **_ids(request)}
                log.log(level, "%s %s in %.1f ms%s", full, code.name, elapsed * 1000,
                        f": {detail}" if detail else "", extra=fields)
        # abort raises, and grpc keeps that exception in a cycle with this frame until the
        # garbage collector runs: this frame must not keep the (maybe 16 MiB) request.
        request = None
        await context.abort(code, detail)

    return handle


def _server_stream(
    service: ServiceDescriptor, method: MethodDescriptor, impl: Servicer, pb: ModuleType,
    api_version: str,
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    """A server-streaming method: the same checks, error mapping and log line as a unary
    one (logged when the stream ends). The servicer's method is an async generator
    `Name(request, call)`; a runtime error it raises ends the stream with its status."""
    name = method.name
    full = f"/{service.full_name}/{name}"
    fn = getattr(impl, name, None)

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        detail = ""
        sent = 0
        try:
            if isinstance(request, _Rejected):
                raise errors.InvalidArgument(request.message)
            validation.check(name, request)
            if fn is None:
                raise Unimplemented(f"{full} is not implemented by arktos-vm-runtime")
            log.debug("%s stream opened", full, extra={"CRI_METHOD": name})
            async for response in fn(request, Call(name, api_version, pb, context)):
                yield response
                sent += 1
        except errors.RuntimeError_ as e:
            code, detail = status_code(e), e.message
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED  # the client went away
            raise
        except Exception as e:
            log.exception("%s failed unexpectedly", full, extra={"CRI_METHOD": name})
            code, detail = grpc.StatusCode.INTERNAL, f"internal error in {name}: {e}"
        finally:
            metrics.observe_rpc(name, code.name, time.monotonic() - started)
            if len(detail) > MAX_DETAIL:
                detail = detail[:MAX_DETAIL] + f"... ({len(detail)} characters)"
            level = logging.INFO if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED,
                                             grpc.StatusCode.UNIMPLEMENTED) \
                else logging.WARNING
            log.log(level, "%s %s after %.1f s, %d messages sent%s", full, code.name,
                    time.monotonic() - started, sent, f": {detail}" if detail else "",
                    extra={"CRI_METHOD": name, "CRI_API": api_version,
                           "GRPC_CODE": code.name})
        request = None
        if code != grpc.StatusCode.OK:
            await context.abort(code, detail)

    return handle


def _streaming(
    service: ServiceDescriptor, method: MethodDescriptor
) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    """Client- and bidirectional streaming methods (none in the CRI today)."""
    full = f"/{service.full_name}/{method.name}"

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        log.info("%s UNIMPLEMENTED", full, extra={"CRI_METHOD": method.name,
                                                  "GRPC_CODE": "UNIMPLEMENTED"})
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{full} is not implemented by arktos-vm-runtime")

    return handle


def service_handler(
    service: ServiceDescriptor, impl: Servicer, pb: ModuleType, api_version: str
) -> grpc.GenericRpcHandler:
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        if method.server_streaming and not method.client_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _server_stream(service, method, impl, pb, api_version),
                request_deserializer=_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
            continue
        if method.client_streaming:
            maker = {
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler,
            }[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = maker(
                _streaming(service, method),
                request_deserializer=_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
            continue
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _unary(service, method, impl, pb, api_version),
            request_deserializer=_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def api_modules() -> dict[str, ModuleType]:
    """The generated modules of both CRI versions, by version name."""
    from .gen.v1 import api_pb2 as v1
    from .gen.v1alpha2 import api_pb2 as v1alpha2

    return {"v1alpha2": v1alpha2, "v1": v1}


def all_handlers(runtime_impl: Servicer, image_impl: Servicer) -> list[grpc.GenericRpcHandler]:
    out = []
    for version, pb in api_modules().items():
        services = pb.DESCRIPTOR.services_by_name
        out.append(service_handler(services["RuntimeService"], runtime_impl, pb, version))
        out.append(service_handler(services["ImageService"], image_impl, pb, version))
    return out
