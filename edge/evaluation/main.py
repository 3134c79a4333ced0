"""`handoff eval`: build the task list, run every configuration, write results, report and plots."""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from handoff.edge.evaluation.report import write_report
from handoff.edge.evaluation.runner import Evaluation, RunSpec, run_specs, variant_spec
from handoff.edge.evaluation.sandbox import SandboxLimits
from handoff.edge.evaluation.tasks import SUITES, Task, generate_suite, load_jsonl
from handoff.edge.settings import EdgeSettings
from handoff.shared.sampling import SamplingSettings
from handoff.shared.settings import HandoffSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate: which tasks, which runs, how long the answers may be."""

    suites: tuple[str, ...] = SUITES
    tasks_per_suite: int = 20
    difficulty: dict[str, int] = field(default_factory=dict)  # suite -> 1..5; default_difficulty else
    default_difficulty: int = 2
    seed: int = 0
    jsonl: tuple[Path, ...] = ()
    thresholds: tuple[float, ...] = (0.1, 0.3, 1.0)
    intervals: tuple[int, ...] = (8,)
    max_tokens: int = 128
    baselines: bool = True
    policies: tuple[
        str, ...
    ] = ()  # other policies' runs: exact, correction, skip:TAU, budget:FRACTION, entropy:TAU
    # Held-out tasks: generated tasks whose prompt is one of this seed's first exclude_tasks per suite
    # are left out (training data for a router must not share a prompt with its test tasks).
    exclude_seed: int | None = None
    exclude_tasks: int = 0


def parse_difficulty(spec: str | None) -> tuple[int | None, dict[str, int]]:
    """ "2" -> (2, {}); "arithmetic=3,sorting=1" -> (None, {...}); a bare number and pairs may mix."""
    default, per_suite = None, {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, value = part.rpartition("=")
        try:
            level = int(value)
        except ValueError:
            raise ValueError(f"difficulty {part!r}: expected N or SUITE=N") from None
        if not 1 <= level <= 5:
            raise ValueError(f"difficulty {part!r}: levels are 1..5")
        if name:
            if name not in SUITES:
                raise ValueError(f"difficulty {part!r}: unknown suite {name!r}")
            per_suite[name] = level
        else:
            default = level
    return default, per_suite


def build_tasks(plan: EvalPlan) -> list[Task]:
    """The plan's generated suites (less the held-out prompts, each prompt once), then its JSONL suites."""
    tasks: list[Task] = []
    for suite in plan.suites:
        level = plan.difficulty.get(suite, plan.default_difficulty)
        made = generate_suite(suite, plan.tasks_per_suite, seed=plan.seed, difficulty=level)
        if plan.exclude_seed is not None and plan.exclude_tasks:
            held = generate_suite(suite, plan.exclude_tasks, seed=plan.exclude_seed, difficulty=level)
            seen = {t.prompt for t in held}
            kept = []
            for t in made:
                if t.prompt not in seen:
                    seen.add(t.prompt)
                    kept.append(t)
            made = kept
        tasks += made
    for path in plan.jsonl:
        tasks += load_jsonl(path, limit=plan.tasks_per_suite)
    return tasks


async def evaluate(
    plan: EvalPlan,
    settings: HandoffSettings,
    edge: EdgeSettings,
    out_dir: Path,
    *,
    edge_model: str | None = None,
    cloud_model: str | None = None,
    sampling: SamplingSettings | None = None,
    limits: SandboxLimits | None = None,
    progress: bool = True,
    traces: bool = True,
) -> dict[str, Any]:
    """Run (or resume) an evaluation and write its report; the report's summary.

    Args:
        plan: tasks and runs.
        settings: process settings (models, threads).
        edge: the cloud's address and the base policy every hybrid run starts from.
        out_dir: results.jsonl, traces/, summary.json, report.md and the plots go here.
    """
    from handoff.edge.assistant import Assistant

    sampling = sampling or SamplingSettings()
    tasks = build_tasks(plan)
    base = edge.policy_config()
    specs: list[RunSpec] = run_specs(plan.thresholds, plan.intervals, base, baselines=plan.baselines)
    specs += [variant_spec(v, base) for v in plan.policies]
    # Every run needs the cloud except small-only; the assistant starts in hybrid mode for them all.
    edge = edge.model_copy(update={"mode": "hybrid"})
    async with Assistant(settings, edge, edge_model=edge_model, cloud_model=cloud_model) as assistant:
        assert assistant.generator is not None
        fixed = {
            "edge_model": assistant.model_name,
            "cloud_model": assistant.cloud_info.get("model"),
        }

        def prompt_ids(message: str) -> list[int]:
            return assistant.chat_prompt_ids([{"role": "user", "content": message}])

        evaluation = Evaluation(
            assistant.generator, prompt_ids, tasks, specs, out_dir, max_tokens=plan.max_tokens,
            sampling=sampling, limits=limits, fixed=fixed, traces=traces, progress=progress,
        )  # fmt: skip
        logger.info(
            "%d tasks x %d runs (%s) -> %s", len(tasks), len(specs), ", ".join(s.name for s in specs), out_dir
        )
        rows = await evaluation.run()
        cloud_info = assistant.cloud_info
    meta = {
        "command": "handoff " + shlex.join(sys.argv[1:]),  # also under `python -m handoff`
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "edge_model": fixed["edge_model"],
        "cloud": cloud_info,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "tasks": len(tasks),
        "runs": [s.name for s in specs],
        "plan": {k: (list(map(str, v)) if k == "jsonl" else v) for k, v in asdict(plan).items()},
        "base_policy": asdict(base),
        "sampling": asdict(sampling),
        "wall_seconds_generating": round(sum(r["seconds"] for r in rows), 1),
    }
    return write_report(rows, out_dir, meta)
