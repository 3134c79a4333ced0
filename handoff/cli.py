"""The `handoff` command line: the root app, its global options, and each layer's commands.

Each layer owns its commands (shared/cli.py: models, divergence; cloud/cli.py: serve-cloud;
edge/cli.py: generate, chat, serve-edge; edge/evaluation/cli.py: eval; edge/routing/cli.py: router;
edge/simulation/cli.py: simulate); this module only composes them, in the order `handoff --help` lists them.
"""

from __future__ import annotations

import sys

import typer

from handoff.cloud import cli as cloud_cli
from handoff.edge import cli as edge_cli
from handoff.edge.evaluation import cli as eval_cli
from handoff.edge.evaluation.checkers import passes
from handoff.edge.evaluation.tasks import generated_task
from handoff.edge.routing import cli as router_cli
from handoff.edge.simulation import cli as simulate_cli
from handoff.shared import cli as shared_cli
from handoff.shared.cli import DEFAULT_PROMPT, err
from handoff.shared.cli_options import settings_options
from handoff.shared.errors import HandoffError
from handoff.shared.logs import setup_logging
from handoff.shared.settings import HandoffSettings

__all__ = ["DEFAULT_PROMPT", "app", "main"]  # DEFAULT_PROMPT: scripts/bench_edge.py's default prompt

app = typer.Typer(
    name="handoff",
    help="Hybrid edge-cloud LLM inference: a small model on the device, a large one in the cloud.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# No docstring: typer would show it instead of the app's help.
@app.callback()
@settings_options(
    HandoffSettings,
    into="settings",
    only=("log_level", "log_format", "verbose"),
    panel="Global options (flag > HANDOFF_<NAME> > default)",
)
def _root(*, settings: HandoffSettings) -> None:
    # llama.cpp's own log (model loading notes, warnings about the model files) is noise to a user
    # of a working model: shown only when asked for.
    setup_logging(
        settings.log_level, settings.log_format, native=settings.verbose or settings.log_level == "DEBUG"
    )


for layer in (shared_cli, cloud_cli, edge_cli, eval_cli, router_cli, simulate_cli):
    layer.register(app)
# `router label` judges continuations with the evaluation's tasks: the leaves do not import each other.
router_cli.use_tasks(generated_task, passes)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one clear line (exit 2), never a traceback.

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        The exit status.
    """
    try:
        rc = app(args=argv, standalone_mode=False)
    except HandoffError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except typer.TyperException as e:  # usage errors: typer (>= 0.29) vendors click's exceptions
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
