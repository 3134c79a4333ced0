"""`handoff serve-cloud`: the verifier service behind a grpc.aio server.

Standard gRPC operations: health checking (NOT_SERVING until the model is loaded, and again while
draining), reflection, keepalive, message-size limits, optional TLS and bearer-token auth, graceful
shutdown, Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from handoff.cloud.backend import Backend
from handoff.cloud.metrics import CloudMetrics
from handoff.cloud.service import VerifierService
from handoff.cloud.settings import CloudSettings
from handoff.shared.errors import HandoffError, VerifierError
from handoff.shared.wire import pb, pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Verifier"].full_name  # "handoff.v1.Verifier"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _status(code: str) -> grpc.StatusCode:
    return grpc.StatusCode[code]


class MalformedMessage:
    """What the lenient deserializer hands on in place of bytes that are not a valid request message.

    grpc.aio calls the request deserializer inside its own machinery: an exception there ends the call
    with UNKNOWN and logs a traceback. Handing a marker to the servicer instead lets it answer
    INVALID_ARGUMENT with a one-line log entry, like any other bad request.
    """

    def __init__(self, type_name: str, size: int, error: Exception) -> None:
        self.type_name = type_name
        self.size = size
        self.error = error

    def describe(self) -> str:
        """One line: which message type the bytes failed to parse as, how many there were, and why."""
        return f"{self.size} bytes that are not a valid {self.type_name} ({self.error})"


def _lenient(deserializer: Callable[[bytes], object], type_name: str) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, or whatever else the parser raises: bad bytes either way
            return MalformedMessage(type_name, len(data), e)

    return deserialize


class HandlerCapture:
    """Stands in for a server to collect the method handlers generated code registers, by service."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers also come through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services.setdefault(service, {}).update(handlers)


def verifier_handlers(servicer) -> dict[str, grpc.RpcMethodHandler]:
    """The Verifier's method handlers as the generated code makes them, with lenient request
    deserializers: the servicer's methods receive a MalformedMessage where the bytes did not parse.
    """
    capture = HandlerCapture()
    pb_grpc.add_VerifierServicer_to_server(servicer, capture)
    methods = pb.DESCRIPTOR.services_by_name["Verifier"].methods_by_name
    return {
        name: handler._replace(
            request_deserializer=_lenient(handler.request_deserializer, methods[name].input_type.full_name)
        )
        for name, handler in capture.services[SERVICE_NAME].items()
    }


def add_verifier_to_server(servicer: VerifierServicer, server: grpc.aio.Server) -> None:
    """Register the Verifier service like the generated code does, with lenient request deserializers.

    Args:
        servicer: the servicer; its methods receive a MalformedMessage where the bytes did not parse.
        server: the grpc.aio server to register on.
    """
    handlers = verifier_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


# How long the end of a request stream waits for the call's cancellation (see _checked).
_EOF_GRACE_S = 0.05


async def well_formed(
    request_iterator: AsyncIterator[pb.EdgeMessage | MalformedMessage],
) -> AsyncIterator[pb.EdgeMessage]:
    """The stream's messages; a malformed one ends it with INVALID_ARGUMENT (counting from 1)."""
    count = 0
    async for msg in request_iterator:
        count += 1
        if isinstance(msg, MalformedMessage):
            raise VerifierError("INVALID_ARGUMENT", f"message {count} on the stream: {msg.describe()}")
        yield msg


async def _checked(
    request_iterator: AsyncIterator[pb.EdgeMessage | MalformedMessage], context: grpc.aio.ServicerContext
) -> AsyncIterator[pb.EdgeMessage]:
    """well_formed(), and a clean end of stream told apart from a vanished client.

    grpc.aio ends the request stream of a call the client cancelled with a clean end of stream and
    cancels the handler a moment later (a few event-loop turns, measured). Ending at once would make
    the session loop take a vanished client for a half-close; waiting up to _EOF_GRACE_S lets the
    cancellation land first. A real half-close (no Close message before it) ends that much later.
    """
    async for msg in well_formed(request_iterator):
        yield msg
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _EOF_GRACE_S
    while not context.cancelled() and loop.time() < deadline:
        await asyncio.sleep(0.001)


class VerifierServicer(pb_grpc.VerifierServicer):
    """Maps the transport-free VerifierService onto gRPC calls and status codes."""

    def __init__(self) -> None:
        self.service: VerifierService | None = None  # set once the model is loaded

    def _require(self) -> VerifierService:
        if self.service is None:
            raise VerifierError("UNAVAILABLE", "the model is still loading; retry shortly")
        return self.service

    async def GetInfo(
        self, request: pb.GetInfoRequest | MalformedMessage, context: grpc.aio.ServicerContext
    ) -> pb.ServiceInfo:
        if isinstance(request, MalformedMessage):
            logger.info("GetInfo refused: INVALID_ARGUMENT %s", request.describe())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"GetInfo: {request.describe()}")
        try:
            return self._require().get_info(request)
        except VerifierError as e:
            await context.abort(_status(e.code), str(e))

    async def Session(
        self,
        request_iterator: AsyncIterator[pb.EdgeMessage | MalformedMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.CloudMessage]:
        try:
            async for reply in self._require().session(_checked(request_iterator, context)):
                yield reply
        except VerifierError as e:
            logger.info("session aborted: %s %s", e.code, e)
            await context.abort(_status(e.code), str(e))


UNAUTHENTICATED_MESSAGE = "missing or wrong bearer token (metadata `authorization: Bearer <token>`)"


def has_bearer_token(metadata, token: str) -> bool:
    """True when the call's metadata ((key, value) pairs) carries `authorization: Bearer <token>`."""
    return dict(metadata or ()).get("authorization") == f"Bearer {token}"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without `authorization: Bearer <token>` (health checks stay open for probes)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_HEALTH_PREFIX):
            return handler
        if has_bearer_token(details.invocation_metadata, self._token):
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = UNAUTHENTICATED_MESSAGE

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


def server_options(settings: CloudSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients may ping as often as every 10 s without being told off (GOAWAY too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class CloudServer:
    """A running verifier: gRPC server, health, model loading, metrics, graceful shutdown."""

    def __init__(self, settings: CloudSettings, load_backend: Callable[[], Backend]) -> None:
        self.settings = settings
        self._load_backend = load_backend
        self.metrics = CloudMetrics()
        self.servicer = VerifierServicer()
        self.health = health_aio.HealthServicer()
        interceptors = [BearerTokenInterceptor(settings.auth_token)] if settings.auth_token else []
        self.server = grpc.aio.server(options=server_options(settings), interceptors=interceptors)
        add_verifier_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        address = f"{settings.host}:{settings.port}"
        if settings.tls_cert or settings.tls_key:
            if not (settings.tls_cert and settings.tls_key):
                raise HandoffError("TLS needs both --tls-cert and --tls-key")
            creds = grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
            )
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise HandoffError(f"could not listen on {address}")
        self.backend: Backend | None = None
        self.service: VerifierService | None = None
        self._metrics_http = None  # the Prometheus HTTP server, with --metrics-port

    async def start(self) -> None:
        """Listen at once (health NOT_SERVING), load the model off the event loop, then serve."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.settings.metrics_port is not None:
            from prometheus_client import start_http_server

            # On --host, like the gRPC port (the library would listen on every interface).
            self._metrics_http, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
            )
        logger.info("listening on %s:%d; loading the model", self.settings.host, self.port)
        try:
            self.backend = await asyncio.get_running_loop().run_in_executor(None, self._load_backend)
        except BaseException:
            await self.server.stop(0)  # nothing to serve: close the port before reporting why
            raise
        self.service = VerifierService(self.backend, self.settings, self.metrics)
        await self.service.start()
        self.servicer.service = self.service
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        info = self.backend.info
        logger.info("serving %s (%s on %s, %s)", info.model_id, info.backend, info.device, info.dtype)

    async def _set_health(self, status) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: stop taking new calls, give running streams `grace` seconds, then free the model."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_s if grace is None else grace)
        if self.service is not None:
            await self.service.stop()
        if self.backend is not None:
            self.backend.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        logger.info("stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve(
    settings: CloudSettings,
    load_backend: Callable[[], Backend],
    on_ready: Callable[[CloudServer], None] | None = None,
) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    server = CloudServer(settings, load_backend)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await server.start()
    if on_ready is not None:
        on_ready(server)
    await done.wait()
    logger.info("signal received: draining for up to %.0f s", settings.grace_s)
    await server.stop()
