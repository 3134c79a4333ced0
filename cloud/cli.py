"""The cloud's command: `handoff serve-cloud`, its options generated from CloudSettings."""

from __future__ import annotations

import typer

from handoff.cloud.ray_settings import RaySettings
from handoff.cloud.settings import CloudSettings
from handoff.shared.cli import out
from handoff.shared.cli_options import settings_options
from handoff.shared.errors import HandoffError

CLOUD_PANEL = "Cloud settings (flag > HANDOFF_CLOUD_<NAME> > default)"
RAY_PANEL = "Ray Serve, with --ray (flag > HANDOFF_RAY_<NAME> > default)"


def register(app: typer.Typer) -> None:
    """Add `serve-cloud` to the root command."""
    app.command("serve-cloud")(serve_cloud)


@settings_options(RaySettings, into="ray_settings", panel=RAY_PANEL)
@settings_options(CloudSettings, into="settings", panel=CLOUD_PANEL)
def serve_cloud(*, settings: CloudSettings, ray_settings: RaySettings) -> None:
    """Run the cloud verifier: P behind gRPC, with live per-session KV caches and batching.

    Every option can also come from the environment as HANDOFF_CLOUD_<NAME> (e.g.
    HANDOFF_CLOUD_AUTH_TOKEN to require a bearer token); a flag given wins over the environment.
    With --ray, replicas of the verifier run on Ray Serve behind its gRPC proxy on --port
    (docs/ray.md): sessions stick to a replica, replicas can autoscale and be replaced.
    """
    import asyncio

    from handoff.cloud.grpc_server import serve
    from handoff.cloud.loader import load_backend

    for path in (settings.tls_cert, settings.tls_key):
        if path is not None and not path.is_file():
            raise HandoffError(f"TLS file {path} does not exist")
    if settings.ray:
        _serve_on_ray(settings, ray_settings)
        return

    def ready(server) -> None:
        info = server.backend.info
        out.print(
            f"handoff verifier listening on {settings.host}:{server.port} "
            f"({info.model_id}, {info.backend} on {info.device}, {info.dtype})",
            highlight=False,
            soft_wrap=True,
        )

    asyncio.run(serve(settings, lambda: load_backend(settings), on_ready=ready))


def _serve_on_ray(settings: CloudSettings, ray_settings: RaySettings) -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise HandoffError(
            "--ray needs Ray Serve: pip install 'handoff[ray]' (or HANDOFF_EXTRAS=cloud,test,ray make setup)"
        )
    from handoff.cloud import ray_serve

    def ready(port: int, replicas: int) -> None:
        scaling = (
            f"autoscaling {ray_settings.min_replicas}-{ray_settings.max_replicas}, now {replicas}"
            if ray_settings.autoscaling
            else f"{replicas} replicas"
        )
        host = settings.host if ray_settings.address else "127.0.0.1"
        out.print(
            f"handoff verifier on Ray Serve listening on {host}:{port} ({settings.model}, {scaling})",
            highlight=False,
            soft_wrap=True,
        )

    ray_serve.serve_until_signal(settings, ray_settings, on_ready=ready)
