"""The cloud's command: `handoff serve-cloud`, its options generated from CloudSettings."""

from __future__ import annotations

import typer

from handoff.cloud.settings import CloudSettings
from handoff.shared.cli import out
from handoff.shared.cli_options import settings_options
from handoff.shared.errors import HandoffError

CLOUD_PANEL = "Cloud settings (flag > HANDOFF_CLOUD_<NAME> > default)"


def register(app: typer.Typer) -> None:
    """Add `serve-cloud` to the root command."""
    app.command("serve-cloud")(serve_cloud)


@settings_options(CloudSettings, into="settings", panel=CLOUD_PANEL)
def serve_cloud(*, settings: CloudSettings) -> None:
    """Run the cloud verifier: P behind gRPC, with live per-session KV caches and batching.

    Every option can also come from the environment as HANDOFF_CLOUD_<NAME> (e.g.
    HANDOFF_CLOUD_AUTH_TOKEN to require a bearer token); a flag given wins over the environment.
    """
    import asyncio

    from handoff.cloud.grpc_server import serve
    from handoff.cloud.loader import load_backend

    for path in (settings.tls_cert, settings.tls_key):
        if path is not None and not path.is_file():
            raise HandoffError(f"TLS file {path} does not exist")

    def ready(server) -> None:
        info = server.backend.info
        out.print(
            f"handoff verifier listening on {settings.host}:{server.port} "
            f"({info.model_id}, {info.backend} on {info.device}, {info.dtype})",
            highlight=False,
            soft_wrap=True,
        )

    asyncio.run(serve(settings, lambda: load_backend(settings), on_ready=ready))
