"""`handoff serve-cloud --ray`: the verifier as a Ray Serve deployment behind Ray Serve's gRPC proxy.

Each replica holds one backend (one model, its KV caches) and one VerifierService, the same
transport-free core `serve-cloud` runs behind grpc.aio. Ray Serve's gRPC proxy speaks our
`handoff.v1` protocol unchanged (bidirectional `Session` streams included), so an edge connects to
the proxy as to a single server. Sessions stay on one replica: the edge sends a routing key as
`session_id` metadata, which the proxy hands to Ray's consistent-hash request router; a resync with
the same key returns to the same replica while it lives (and adopts its kept cache: cloud/resume.py)
and to the ring's next replica once it is gone.

Ray reads its own settings at start-up: this module starts a local cluster on 127.0.0.1 with no
dashboard and no usage reporting unless told to join one (`--address`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from handoff.cloud.grpc_server import (
    SERVICE_NAME,
    UNAUTHENTICATED_MESSAGE,
    HandlerCapture,
    MalformedMessage,
    has_bearer_token,
    verifier_handlers,
    well_formed,
)
from handoff.cloud.ray_settings import RaySettings
from handoff.cloud.service import VerifierService
from handoff.cloud.settings import CloudSettings
from handoff.shared.errors import HandoffError, VerifierError
from handoff.shared.models import resolve
from handoff.shared.settings import get_settings
from handoff.shared.wire import pb

logger = logging.getLogger(__name__)

CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
# What Ray Serve's gRPC proxy serves: our service, standard health checking and reflection.
SERVICER_FUNCTIONS = [
    "handoff.cloud.ray_serve.add_verifier",
    "handoff.cloud.ray_serve.add_health",
    "handoff.cloud.ray_serve.add_reflection",
]


def _generic_only(add_to_server):
    """Register a generated service as generic handlers only, which Ray Serve's proxy rewrites.

    grpcio's generated code also registers the handlers as "registered method handlers"; those take
    precedence and would call the proxy's stand-in servicer instead of routing to a replica.
    """

    def add(servicer, server) -> None:
        capture = HandlerCapture()
        add_to_server(servicer, capture)
        for service, handlers in capture.services.items():
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))

    return add


def add_verifier(servicer, server) -> None:
    """Our service on Ray's proxy; bytes that are not a message reach the replica as a MalformedMessage
    (answered INVALID_ARGUMENT there, as by serve-cloud) instead of failing inside the proxy.
    """
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, verifier_handlers(servicer)),)
    )


add_health = _generic_only(health_pb2_grpc.add_HealthServicer_to_server)
add_reflection = _generic_only(reflection_pb2_grpc.add_ServerReflectionServicer_to_server)


def ray_environment(cloud: CloudSettings, *, local: bool) -> dict[str, str]:
    """Environment for Ray's processes: no usage reporting, the proxy's message limit as ours, and on
    a local cluster every address on 127.0.0.1.
    """
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(cloud.max_message_bytes),
    }
    if local:
        # Ray replaces a node address of 127.0.0.1 by the machine's own unless "clusters" are off
        # (its single-machine mode for macOS and Windows): then gcs, raylet, agents and workers all
        # listen on and talk to 127.0.0.1.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def bind_loopback() -> None:
    """Worker setup hook of a local cluster: Serve's gRPC servers listen on 127.0.0.1, not on [::].

    Ray Serve binds its gRPC proxy and each replica's internal server to every interface, whatever
    the node address; on one machine nothing needs more than loopback.
    """
    from ray.serve._private import default_impl, replica

    def loopback(address: str) -> str:
        return address.replace("[::]", "127.0.0.1", 1) if address.startswith("[::]") else address

    add_grpc_address = default_impl.add_grpc_address
    add_port = replica.add_port_to_grpc_server
    default_impl.add_grpc_address = lambda server, address: add_grpc_address(server, loopback(address))
    replica.add_port_to_grpc_server = lambda server, address: add_port(server, loopback(address))


class VerifierReplica:
    """One Ray Serve replica: a backend and a VerifierService; its methods are the gRPC methods."""

    def __init__(self, cloud_json: str) -> None:
        from ray import serve

        from handoff.cloud.loader import load_backend

        settings = CloudSettings.model_validate_json(cloud_json)
        context = serve.get_replica_context()
        replica = context.replica_id.unique_id
        self.settings = settings.model_copy(update={"server_id": f"ray-replica-{replica}/{os.getpid()}"})
        self.backend = load_backend(self.settings)
        self.service = VerifierService(self.backend, self.settings)
        if settings.metrics_port is not None:
            # One Prometheus endpoint per replica: --metrics-port + the replica's rank on its node.
            from prometheus_client import start_http_server

            port = settings.metrics_port + context.rank.local_rank
            start_http_server(port, addr=settings.host, registry=self.service.metrics.registry)
            logger.info("replica %s: metrics on %s:%d", self.settings.server_id, settings.host, port)
        self._started: asyncio.Task | None = None
        self._reflection = reflection.aio.ReflectionServicer(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
        )
        logger.info("replica %s loaded %s", self.settings.server_id, self.backend.info.model_id)

    async def _service(self) -> VerifierService:
        # The scheduler's tasks belong on the replica's event loop, which __init__ does not run on.
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self.service.start())
        await self._started
        return self.service

    def _authorized(self, grpc_context) -> bool:
        token = self.settings.auth_token
        return not token or has_bearer_token(grpc_context.invocation_metadata(), token)

    @staticmethod
    def _fail(grpc_context, code: str, message: str) -> VerifierError:
        grpc_context.set_code(grpc.StatusCode[code])
        grpc_context.set_details(message)
        return VerifierError(code, message)

    async def GetInfo(self, request: pb.GetInfoRequest | MalformedMessage, grpc_context) -> pb.ServiceInfo:
        if not self._authorized(grpc_context):
            raise self._fail(grpc_context, "UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
        if isinstance(request, MalformedMessage):
            raise self._fail(grpc_context, "INVALID_ARGUMENT", f"GetInfo: {request.describe()}")
        try:
            return (await self._service()).get_info(request)
        except VerifierError as e:
            raise self._fail(grpc_context, e.code, str(e)) from None

    async def Session(self, request_stream: AsyncIterator[pb.EdgeMessage], grpc_context):
        if not self._authorized(grpc_context):
            raise self._fail(grpc_context, "UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
        service = await self._service()
        try:
            async for reply in service.session(well_formed(request_stream)):
                yield reply
        except VerifierError as e:
            logger.info("session aborted: %s %s", e.code, e)
            raise self._fail(grpc_context, e.code, str(e)) from None

    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        """Standard health checking: a replica exists only once its model is loaded."""
        await self._service()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: health_pb2.HealthCheckRequest):
        """The current status, once: a held stream would count as load for the autoscaler."""
        yield await self.Check(request)

    async def ServerReflectionInfo(self, request_stream):
        async for reply in self._reflection.ServerReflectionInfo(request_stream, None):
            yield reply

    def check_health(self) -> None:
        """Ray's periodic replica health check: a closed backend makes the replica restart."""
        if getattr(self.backend, "_closed", False):
            raise HandoffError("the backend is closed")

    async def __del__(self) -> None:
        # Ray calls this once the replica has drained (graceful_shutdown_timeout_s) or is torn down.
        if self._started is not None:
            await self.service.stop()
        self.backend.close()


def deployment_options(cloud: CloudSettings, ray_settings: RaySettings) -> dict[str, Any]:
    """Ray Serve deployment options from our settings (documented in docs/ray.md)."""
    from ray.serve.config import RequestRouterConfig

    options: dict[str, Any] = {
        "name": "verifier",
        # A replica takes at most max_sessions requests (session streams; unary calls are short): the
        # router passes a new session for a full replica to the next ones on the ring, Ray queues
        # what finds them all full, and refuses more with RESOURCE_EXHAUSTED (the edge falls back).
        "max_ongoing_requests": cloud.max_sessions,
        "max_queued_requests": cloud.max_sessions,
        "graceful_shutdown_timeout_s": cloud.grace_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 5.0,
        "ray_actor_options": {
            "num_cpus": ray_settings.cpus_per_replica or cloud.threads,
            "num_gpus": ray_settings.gpus_per_replica,
        },
        "request_router_config": RequestRouterConfig(
            request_router_class=CONSISTENT_HASH_ROUTER,
            request_router_kwargs={"num_fallback_replicas": ray_settings.fallback_replicas},
        ),
    }
    if ray_settings.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": ray_settings.min_replicas,
            "initial_replicas": max(1, ray_settings.min_replicas),
            "max_replicas": ray_settings.max_replicas,
            "target_ongoing_requests": ray_settings.target_sessions,
            "upscale_delay_s": ray_settings.upscale_delay_s,
            "downscale_delay_s": ray_settings.downscale_delay_s,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
        }
    else:
        options["num_replicas"] = ray_settings.replicas
    return options


def build_app(cloud: CloudSettings, ray_settings: RaySettings):
    """The Ray Serve application: VerifierReplica with our options, bound to the cloud settings."""
    from ray import serve

    deployment = serve.deployment(**deployment_options(cloud, ray_settings))(VerifierReplica)
    return deployment.bind(cloud.model_dump_json())


def start_ray(cloud: CloudSettings, ray_settings: RaySettings) -> None:
    """Join `--address`, or start a local Ray on 127.0.0.1: no dashboard, no usage stats."""
    local = not ray_settings.address
    env = ray_environment(cloud, local=local)
    os.environ.update(env)  # a local cluster's processes inherit them
    import ray
    from ray._private import ray_constants

    if not local:
        ray.init(address=ray_settings.address, runtime_env={"env_vars": env}, log_to_driver=False)
        return
    # Read when Ray was imported, which this process may have done before the variable was set.
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        runtime_env={"env_vars": env, "worker_process_setup_hook": "handoff.cloud.ray_serve.bind_loopback"},
        log_to_driver=False,
        configure_logging=False,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_settings(cloud: CloudSettings, ray_settings: RaySettings) -> None:
    """Refuse what Ray Serve's gRPC proxy cannot do, before starting anything."""
    if cloud.tls_cert or cloud.tls_key:
        raise HandoffError(
            "Ray Serve's gRPC proxy does not terminate TLS: put a TLS proxy in front (docs/ray.md)"
        )
    if cloud.port == 0:
        raise HandoffError("--ray needs a fixed --port: Ray Serve's gRPC proxy does not report a picked one")
    if not ray_settings.address and not _is_loopback(cloud.host):
        raise HandoffError(
            f"a local Ray cluster listens on 127.0.0.1 only (asked for {cloud.host}); to serve other "
            "machines start a Ray cluster (`ray start --head`) and pass --address"
        )


def deploy(cloud: CloudSettings, ray_settings: RaySettings) -> int:
    """Start Ray, Serve's gRPC proxy on cloud.port and the verifier application; returns once every
    replica has loaded its model.

    Args:
        cloud: the verifier's settings, for every replica (the model is resolved, and fetched if
            needed, here once rather than in each replica).
        ray_settings: replicas, autoscaling, cluster.

    Returns:
        The port of Ray Serve's gRPC proxy, where edges connect.
    """
    check_settings(cloud, ray_settings)
    ref = resolve(cloud.model, "cloud", get_settings())
    cloud = cloud.model_copy(update={"model": str(ref.path)})
    start_ray(cloud, ray_settings)
    from ray import serve
    from ray.serve.config import gRPCOptions

    serve.start(
        http_options={"host": "127.0.0.1", "port": 0, "location": "HeadOnly"},
        grpc_options=gRPCOptions(port=cloud.port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    serve.run(
        build_app(cloud, ray_settings),
        name=ray_settings.app_name,
        route_prefix="/",  # an ingress route: without one the gRPC proxy does not route to the app
        blocking=False,
    )
    return cloud.port


def replica_count(ray_settings: RaySettings) -> int:
    """Replicas of the verifier deployment now running (what autoscaling has chosen)."""
    from ray import serve

    app = serve.status().applications[ray_settings.app_name]
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def serve_until_signal(cloud: CloudSettings, ray_settings: RaySettings, on_ready=None) -> None:
    """`handoff serve-cloud --ray`: deploy, report, serve until SIGINT or SIGTERM, then drain and stop."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        port = deploy(cloud, ray_settings)
        if on_ready is not None:
            on_ready(port, replica_count(ray_settings))
        done.wait()
        logger.info("signal received: draining replicas for up to %.0f s", cloud.grace_s)
    finally:
        shutdown()


def shutdown() -> None:
    """Tear down Ray Serve and the local Ray cluster."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
