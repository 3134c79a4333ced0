"""`handoff eval`: accuracy, RPI and cost of small-only, large-only and hybrid runs on checked tasks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from handoff.edge.cli import (
    CloudModelOpt,
    EdgeModelOpt,
    SeedOpt,
    TemperatureOpt,
    TopPOpt,
    checked,
    edge_options,
    sampling_settings,
)
from handoff.edge.settings import EdgeSettings
from handoff.shared.cli import out
from handoff.shared.cli_options import csv_values
from handoff.shared.errors import HandoffError
from handoff.shared.settings import get_settings


def register(app: typer.Typer) -> None:
    """Add `eval` to the root command."""
    app.command("eval")(eval_command)


@edge_options
def eval_command(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Results, traces, report.md, summary.json and plots go here.")
    ] = Path("eval-out"),
    suites: Annotated[
        str, typer.Option(help="Generated suites, comma-separated; none: only the --jsonl suites.")
    ] = "arithmetic,sorting,word_problems,algorithmic,python",
    tasks: Annotated[int, typer.Option("--tasks", min=1, help="Tasks per suite (JSONL: the first N).")] = 20,
    difficulty: Annotated[
        str, typer.Option(help="1..5, for all suites or per suite: '2' or 'sorting=1,arithmetic=3'.")
    ] = "2",
    task_seed: Annotated[int, typer.Option(help="Seed of the generated suites.")] = 0,
    exclude_seed: Annotated[
        int | None,
        typer.Option(
            help="Leave out generated tasks whose prompt is among this seed's first --exclude-tasks."
        ),
    ] = None,
    exclude_tasks: Annotated[
        int, typer.Option(min=0, help="Tasks per suite of --exclude-seed held out.")
    ] = 0,
    jsonl: Annotated[
        list[Path] | None,
        typer.Option("--jsonl", exists=True, dir_okay=False, help="An external suite (repeatable)."),
    ] = None,
    thresholds: Annotated[
        str,
        typer.Option(help="Hybrid runs' thresholds tau (nats), comma-separated; none: no threshold runs."),
    ] = "0.1,0.3,1.0",
    intervals: Annotated[str, typer.Option(help="Hybrid runs' check intervals N, comma-separated.")] = "8",
    policies: Annotated[
        str,
        typer.Option(
            help="Other policies' runs, comma-separated: exact, correction, skip:TAU, budget:FRACTION, entropy:TAU, "
            "surface:TAU, char:TAU, concept:TAU (KL over surface forms / next characters / concepts), router[:G] (--router FILE), "
            "safe:W[:S] (selective ensembling: P's weight, sharpen below S; the base tau for consensus), "
            "mixture:TAU, mixture-weighted:TAU (--experts), expert:NAME[:TAU] (one expert alone)."
        ),
    ] = "",
    max_tokens: Annotated[int, typer.Option(min=1, max=8192, help="Tokens per answer at most.")] = 160,
    baselines: Annotated[
        bool, typer.Option(help="Also run small-only and large-only (RPI needs them).")
    ] = True,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Rebuild the report from --out's results; run nothing.")
    ] = False,
    traces: Annotated[
        bool, typer.Option(help="Write every generation's token trace under OUT/traces.")
    ] = True,
    sandbox_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds per Python task's tests.")] = 10.0,
    sandbox_memory: Annotated[int, typer.Option(min=64, help="MB of memory per Python task.")] = 512,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    edge: EdgeModelOpt = None,
    cloud_model: CloudModelOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    *,
    edge_settings: EdgeSettings,
) -> None:
    """Evaluate small-only, large-only and hybrid runs on auto-checked tasks: accuracy, RPI, cost, plots.

    RPI = (correct_hybrid - correct_small) / (correct_large - correct_small), with a paired bootstrap
    95% interval, per suite. Resumable: finished generations in OUT/results.jsonl are not redone.

    The edge settings set the base policy of every run (and the cloud, the context, the link); the
    hybrid runs take tau and N from --thresholds and --intervals, each --policies run changes its
    own part of the base (exact: the kind; skip:TAU, entropy:TAU: tau; budget:F: the budget). Which
    model generates is the run's choice (small, large, hybrid), so --mode must stay hybrid.
    """
    import asyncio

    from handoff.edge.evaluation.main import EvalPlan, evaluate, parse_difficulty
    from handoff.edge.evaluation.report import write_report
    from handoff.edge.evaluation.runner import read_rows, variant_spec
    from handoff.edge.evaluation.sandbox import SandboxLimits
    from handoff.edge.evaluation.tasks import SUITES

    if report_only:
        rows = read_rows(out_dir / "results.jsonl")
        if not rows:
            raise HandoffError(f"no results in {out_dir / 'results.jsonl'}")
        previous = out_dir / "summary.json"
        meta = json.loads(previous.read_text()).get("meta", {}) if previous.exists() else {}
        summary = write_report(rows, out_dir, meta)
        out.print(f"report: {out_dir / 'report.md'} ({len(rows)} rows)")
        _print_eval(summary)
        return
    # "none" (alone or in the list) names no generated suite: --suites none --jsonl FILE runs FILE only.
    chosen = tuple(s for s in (x.strip() for x in suites.split(",")) if s and s.lower() != "none")
    unknown = [s for s in chosen if s not in SUITES]
    if unknown:
        raise typer.BadParameter(
            f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}, or none",
            param_hint="'--suites'",
        )
    if not chosen and not jsonl:
        raise typer.BadParameter("no tasks: give --suites or --jsonl")
    if edge_settings.mode != "hybrid":
        raise typer.BadParameter(
            f"eval runs small-only, large-only and hybrid itself, got mode {edge_settings.mode!r} "
            "(HANDOFF_EDGE_MODE too); --no-baselines leaves the baselines out",
            param_hint="'--mode' / '--edge-only' / '--cloud-only'",
        )
    base = checked(edge_settings).policy_config()
    try:
        default_level, per_suite = parse_difficulty(difficulty)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    plan = EvalPlan(
        suites=chosen, tasks_per_suite=tasks, difficulty=per_suite, default_difficulty=default_level or 2,
        seed=task_seed, jsonl=tuple(jsonl or ()),
        thresholds=() if thresholds.strip().lower() == "none" else csv_values(thresholds, float, "--thresholds"),
        intervals=csv_values(intervals, int, "--intervals"), max_tokens=max_tokens, baselines=baselines,
        policies=tuple(v.strip() for v in policies.split(",") if v.strip()),
        exclude_seed=exclude_seed, exclude_tasks=exclude_tasks,
    )  # fmt: skip
    try:  # before any model loads
        for v in plan.policies:
            variant_spec(v, base)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if any(t < 0 for t in plan.thresholds) or any(n < 1 for n in plan.intervals):
        raise typer.BadParameter("thresholds must be >= 0 and check intervals >= 1")
    summary = asyncio.run(
        evaluate(
            plan, get_settings(), edge_settings, out_dir, edge_model=edge, cloud_model=cloud_model,
            sampling=sampling_settings(temperature, top_p, seed),
            limits=SandboxLimits(timeout_s=sandbox_timeout, cpu_s=max(1, int(sandbox_timeout) + 1),
                                 memory_mb=sandbox_memory),
            progress=progress and sys.stderr.isatty(), traces=traces,
        )
    )  # fmt: skip
    out.print(f"report: {out_dir / 'report.md'}")
    _print_eval(summary)


def _print_eval(summary: dict) -> None:
    """The headline per suite: accuracy, RPI and cloud fraction of each run."""
    table = Table(title="handoff eval")
    for col in ("suite", "run", "accuracy", "RPI [95% CI]", "cloud fraction", "s/task"):
        table.add_column(col)
    for suite in summary["suites"]:
        runs = summary["by_suite"][suite]["runs"]
        for name in (r["run"] for r in summary["runs"] if r["run"] in runs):
            run = runs[name]
            acc, r = run["accuracy"], run["rpi"]
            rpi = "n/a" if r["estimate"] is None else f"{r['estimate'] + 0.0:.2f}"  # + 0.0: no "-0.00"
            if r.get("low") is not None:
                rpi += f" [{r['low'] + 0.0:.2f}, {r['high'] + 0.0:.2f}]"
            frac = run.get("cloud_fraction")
            table.add_row(
                suite, name, f"{acc['value']:.2f}", rpi, "n/a" if frac is None else f"{frac:.2f}",
                f"{run['mean_seconds']:.1f}",
            )  # fmt: skip
    out.print(table, width=max(out.width, 120))
