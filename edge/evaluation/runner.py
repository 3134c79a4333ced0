"""Run tasks through small-only, large-only and hybrid generation; one result row per (run, task).

Every run goes through HybridGenerator, the path `handoff generate` takes: "small" is mode edge,
"large" mode cloud, and each hybrid run a PolicyConfig (threshold, check interval). Tasks are taken
in order and every run is done for a task before the next task starts, so a partial evaluation
still pairs small, large and hybrid on the same tasks.

Rows are appended to `results.jsonl` as each generation finishes. A row's key hashes everything
that defines it (the run's policy, the task, the models, max_tokens, sampling): a resumed
evaluation skips rows whose key is there and redoes anything that changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from handoff.edge.controller import HybridGenerator
from handoff.edge.cross import CrossGenerator
from handoff.edge.evaluation.checkers import check
from handoff.edge.evaluation.sandbox import SandboxLimits
from handoff.edge.evaluation.tasks import Task
from handoff.edge.policy import PolicyConfig
from handoff.edge.records import GenerationResult
from handoff.shared.errors import ShapeError
from handoff.shared.quality import oracle_positions
from handoff.shared.sampling import SamplingSettings

logger = logging.getLogger(__name__)

RunMode = Literal["small", "large", "hybrid"]
_GENERATION_MODE = {"small": "edge", "large": "cloud", "hybrid": "hybrid"}


@dataclass(frozen=True)
class RunSpec:
    """One configuration evaluated on every task."""

    name: str
    mode: RunMode
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    family: str = "kl"  # hybrid: kl (the threshold sweep), exact, skip, budget or entropy

    def describe(self) -> dict[str, Any]:
        if self.mode != "hybrid":
            return {"run": self.name, "mode": self.mode, "threshold": None, "check_interval": None}
        return {
            "run": self.name,
            "mode": self.mode,
            "policy": self.family,
            "threshold": None
            if self.family in ("exact", "budget", "correction", "router")
            else self.policy.threshold,
            "check_interval": self.policy.check_interval,
        }


VARIANTS = ("exact", "correction", "skip", "budget", "entropy", "router", "surface", "char", "concept", "safe", "mixture",
            "mixture-weighted", "expert")  # fmt: skip


def variant_spec(text: str, base: PolicyConfig) -> RunSpec:
    """A run of another policy: "exact", "correction", "skip:TAU", "budget:FRACTION", "entropy:TAU" (nats of
    Q's entropy), "surface:TAU" / "char:TAU" / "concept:TAU" (the KL over surface forms / over the next
    character / over concepts against TAU),
    "router" / "router:G" (the learned router of the base's router file, at its own gate threshold or
    at G; the run is named after the file, with -aheadN when it drafts on behind N unanswered checks), or "safe:W" / "safe:W:S" (selective ensembling with P's
    weight W, sharpening below S; the base's tau is the consensus KL), "mixture:TAU" /
    "mixture-weighted:TAU" (the edge's experts selected / mixed by divergence, --experts), or
    "expert:NAME" / "expert:NAME:TAU" (one of the experts alone: edge-only, or the KL policy at TAU).

    Raises:
        ValueError: an unknown policy or a missing/bad parameter.
    """
    name, _, arg = text.partition(":")
    if name not in VARIANTS:
        raise ValueError(
            f"policy {text!r}: expected one of exact, correction, skip:TAU, budget:FRACTION, entropy:TAU, "
            "surface:TAU, char:TAU, concept:TAU, router[:G], safe:W[:S], mixture:TAU, mixture-weighted:TAU, expert:NAME[:TAU]"
        )
    if name == "router":
        if not base.router:
            raise ValueError(f"policy {text!r}: give the router file with --router")
        stem = Path(base.router).name.removesuffix(".json")
        try:
            gate = float(arg) if arg else None
        except ValueError:
            raise ValueError(f"policy {text!r}: router:G needs a probability, e.g. router:0.2") from None
        policy = replace(base, kind="router", gate_threshold=gate)
        name = f"router-{stem}" + ("" if gate is None else f"-g{gate:g}")
        if base.lookahead_windows:  # drafting on behind unanswered check points (edge/gated.py)
            name += f"-ahead{base.lookahead_windows}"
        if base.defer_checks:  # flagged drafts behind a check wait to be sent (edge/gated.py)
            name += "-defer"
        if base.router_turn is not None and base.router_turn > 1:  # P writes on after a gated correction
            name += f"-turn{base.router_turn}"
        return RunSpec(name, "hybrid", policy, "router")
    if name == "exact":
        return RunSpec("exact", "hybrid", replace(base, kind="exact"), "exact")
    if name == "correction":
        return RunSpec("correction", "hybrid", replace(base, kind="correction"), "correction")
    if name == "safe":
        return _safe_spec(text, arg, base)
    if name == "expert":
        expert, _, tau = arg.partition(":")
        if not expert:
            raise ValueError(f"policy {text!r}: expert:NAME[:TAU] needs an expert's name")
        if not tau:
            return RunSpec(f"expert-{expert}", "small", replace(base, use_experts=expert))
        arg, name = tau, "expert"
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"policy {text!r}: {name} needs a number, e.g. {name}:0.3") from None
    if name == "skip":
        return RunSpec(f"skip-tau{value:g}", "hybrid", replace(base, threshold=value, skip="top1"), "skip")
    if name == "budget":
        return RunSpec(f"budget{value:g}", "hybrid", replace(base, budget=value), "budget")
    if name in ("surface", "char", "concept"):
        policy = replace(base, threshold=value, divergence=name)
        return RunSpec(f"{name}-tau{value:g}", "hybrid", policy, name)
    if name == "expert":
        policy = replace(base, threshold=value, use_experts=expert)
        return RunSpec(f"expert-{expert}-tau{value:g}", "hybrid", policy, "expert")
    if name.startswith("mixture"):
        mode = "weighted" if name == "mixture-weighted" else "select"
        policy = replace(base, kind="mixture", threshold=value, mixture=mode)
        return RunSpec(f"mixture-{mode}-tau{value:g}", "hybrid", policy, "mixture")
    return RunSpec(
        f"entropy-tau{value:g}", "hybrid", replace(base, threshold=value, trigger="entropy"), "entropy"
    )


def _safe_spec(text: str, arg: str, base: PolicyConfig) -> RunSpec:
    weight, _, sharpen = arg.partition(":")
    try:
        w = float(weight)
        s = float(sharpen) if sharpen else base.sharpen_below
        policy = replace(base, kind="safe", ensemble_weight=w, sharpen_below=s)
    except (ValueError, ShapeError) as e:
        raise ValueError(
            f"policy {text!r}: safe:W[:S] needs P's weight W and S in [0, 1], e.g. safe:0.5 ({e})"
        ) from None
    return RunSpec(f"safe-w{w:g}-s{s:g}", "hybrid", policy, "safe")


def run_specs(
    thresholds: Sequence[float],
    intervals: Sequence[int],
    base: PolicyConfig,
    *,
    baselines: bool = True,
) -> list[RunSpec]:
    """small, large, then a hybrid run per (threshold, check interval), named e.g. "hybrid-tau0.2-n8"."""
    specs = [RunSpec("small", "small", base), RunSpec("large", "large", base)] if baselines else []
    for n in intervals:
        for tau in thresholds:
            policy = replace(base, threshold=float(tau), check_interval=int(n))
            specs.append(RunSpec(f"hybrid-tau{tau:g}-n{n}", "hybrid", policy))
    return specs


# PolicyConfig fields added after results were first keyed: left out of a key while at their
# defaults, so results recorded before they existed still match (and are not redone).
_LATER_FIELDS = ("draft_tokens", "draft_tokens_max", "trigger", "skip", "skip_entropy_max", "skip_top1_min",
                 "budget", "budget_window", "budget_gain", "router", "gate_threshold", "divergence",
                 "concepts", "ensemble_weight", "sharpen_below", "use_experts", "mixture",
                 "expert_decay", "mixture_temperature", "defer_checks", "router_turn")  # fmt: skip
_DEFAULTS = asdict(PolicyConfig())


def _policy_key(policy: PolicyConfig) -> dict[str, Any]:
    # The router's file matters only to the router policy: a base --router must not redo other runs.
    skip = () if policy.kind == "router" else ("router", "gate_threshold")
    return {
        k: v
        for k, v in asdict(policy).items()
        if k not in skip and (k not in _LATER_FIELDS or v != _DEFAULTS[k])
    }


def _small_key(policy: PolicyConfig) -> dict[str, str] | None:
    # Edge-only output depends on the policy only through which expert drafts.
    return {"use_experts": policy.use_experts} if policy.use_experts else None


def row_key(spec: RunSpec, task: Task, fixed: dict[str, Any], *, legacy: bool = False) -> str:
    """A hash of everything a result row depends on.

    P alone (the large run) depends on no edge policy setting: its key has none, so changing, say,
    --lookahead-windows does not redo it. `legacy`: the key such rows had before (with the policy),
    under which results files written earlier still resume.
    """
    if spec.mode == "small":
        policy = _small_key(spec.policy)
    elif spec.mode == "large" and not legacy:
        policy = None
    else:
        policy = _policy_key(spec.policy)
    blob = json.dumps({"spec": [spec.mode, policy], "task": task.digest, **fixed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """A short digest of a prompt's token ids: tasks with equal keys get one greedy generation per run
    (the report's cluster bootstrap and per-prompt RPI group them)."""
    return hashlib.sha256(json.dumps([int(t) for t in prompt_ids]).encode()).hexdigest()[:16]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file; a line cut short by a crash is skipped with a warning."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d: an incomplete row (an interrupted run?) is ignored", path, n)
    return rows


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def trace_oracle(result: GenerationResult) -> int | None:
    """Positions of a cloud-only greedy result where Q's greedy token differs (None: Q not scored)."""
    records = result.records
    if not records or any(not r.q_topk_ids for r in records):
        return None
    p = np.asarray([r.token_id for r in records], dtype=np.int64)
    q = np.asarray([r.q_topk_ids[0] for r in records], dtype=np.int64)
    return int(oracle_positions(p, q).size)


class Evaluation:
    """Tasks × runs through one Assistant's generator, resumable, with a results file and traces."""

    def __init__(
        self,
        generator: HybridGenerator,
        prompt_ids: Any,
        tasks: Sequence[Task],
        specs: Sequence[RunSpec],
        out_dir: Path,
        *,
        max_tokens: int,
        sampling: SamplingSettings | None = None,
        limits: SandboxLimits | None = None,
        fixed: dict[str, Any] | None = None,
        traces: bool = True,
        progress: bool = True,
    ) -> None:
        """Describe an evaluation; nothing runs before `run()`.

        Args:
            generator: the assistant's generator (its runner, client and vocabulary are reused).
            prompt_ids: a function from a task's user message to the prompt's token ids.
            tasks: the tasks, in the order they are run.
            specs: the runs; "small" and "large" are the baselines RPI needs.
            out_dir: where results.jsonl and traces/ go.
            max_tokens: tokens per answer at most.
            sampling: greedy by default.
            limits: the sandbox's limits for python tasks.
            fixed: what else defines a row (models, ...), part of every row's key.
            traces: write every generation's token trace under out_dir/traces.
            progress: show a progress bar.
        """
        if len({t.task_id for t in tasks}) != len(tasks):
            raise ValueError("task ids must be unique")
        if len({s.name for s in specs}) != len(specs):
            raise ValueError("run names must be unique")
        self.generator = generator
        self.prompt_ids = prompt_ids
        self.tasks = list(tasks)
        self.specs = list(specs)
        self.out_dir = out_dir
        self.max_tokens = max_tokens
        self.sampling = sampling or SamplingSettings()
        self.limits = limits or SandboxLimits()
        self.fixed = {**(fixed or {}), "max_tokens": max_tokens, "sampling": asdict(self.sampling)}
        self.traces = traces
        self.progress = progress
        self.results_path = out_dir / "results.jsonl"
        self._generators: dict[str, HybridGenerator] = {}

    def keys(self) -> dict[str, tuple[RunSpec, Task]]:
        return {row_key(s, t, self.fixed): (s, t) for t in self.tasks for s in self.specs}

    def current_rows(self) -> list[dict[str, Any]]:
        """The rows of this plan found in the results file (the latest for a key that repeats)."""
        wanted = self.keys()
        legacy = {
            row_key(s, t, self.fixed, legacy=True): k for k, (s, t) in wanted.items() if s.mode == "large"
        }
        rows: dict[str, dict[str, Any]] = {}
        for r in read_rows(self.results_path):
            key = legacy.get(r.get("key"), r.get("key"))
            if key in wanted:
                rows[key] = r | {"key": key}
        return list(rows.values())

    async def run(self) -> list[dict[str, Any]]:
        """Run what is not done yet; returns this plan's rows (done before and now)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        done = {r["key"] for r in self.current_rows()}
        todo = [(k, s, t) for k, (s, t) in self.keys().items() if k not in done]
        if done:
            logger.info("resuming: %d of %d generations are done", len(done), len(done) + len(todo))
        bar = tqdm(total=len(done) + len(todo), initial=len(done), disable=not self.progress, unit="gen")
        correct: dict[str, list[bool]] = {}
        try:
            with self.results_path.open("a", encoding="utf-8") as results:
                if _ends_mid_line(self.results_path):
                    results.write("\n")  # a row cut short by a crash stays alone on its line
                for key, spec, task in todo:
                    bar.set_description(f"{spec.name} {task.task_id}")
                    row = await self.one(spec, task)
                    row["key"] = key
                    results.write(json.dumps(row) + "\n")
                    results.flush()
                    correct.setdefault(spec.name, []).append(row["correct"])
                    bar.set_postfix_str(
                        " ".join(f"{n}={sum(c) / len(c):.2f}" for n, c in correct.items()), refresh=False
                    )
                    bar.update()
        finally:
            bar.close()
        return self.current_rows()

    async def one(self, spec: RunSpec, task: Task) -> dict[str, Any]:
        """Generate and check one task under one run; the result row."""
        base = self.generator
        gen = self._generators.get(spec.name)
        cross = isinstance(base, CrossGenerator)  # Q's tokenizer is not P's (edge/cross.py)
        mode = _GENERATION_MODE[spec.mode]
        if gen is None:  # one per run: a budget holds its share across the run's tasks
            if cross and mode != "edge":
                gen = CrossGenerator(base.runner, base.client, base.vocabulary, spec.policy,
                                     base.alignment, mode=mode, link=base.link_config)  # fmt: skip
            else:
                gen = HybridGenerator(
                    base.runner,
                    None if mode == "edge" else base.client,
                    base.vocabulary,
                    spec.policy,
                    mode=mode,  # type: ignore[arg-type]
                    link=base.link_config,
                )
            self._generators[spec.name] = gen
        ids = self.prompt_ids(task.prompt)
        result = await gen.generate(ids, self.max_tokens, sampling=self.sampling)
        text = result.answer_text(base.runner.stop_token_ids)
        # The sandbox is a blocking subprocess wait: keep it off the event loop.
        verdict = await asyncio.to_thread(check, task, text, self.limits)
        counts = result.counts()
        acc = result.accounting()
        row = {
            **spec.describe(),
            "suite": task.suite,
            "task_id": task.task_id,
            "prompt_key": prompt_key(ids),
            "correct": verdict.correct,
            "answer": verdict.answer,
            "expected": task.answer,
            "detail": verdict.detail,
            "output": text,
            "tokens": len(result.records),
            "cloud_tokens": counts["cloud"],
            "corrected_tokens": counts["corrected"],
            "unchecked_tokens": counts["unchecked"],
            "unchecked_by_design_tokens": counts["unchecked_by_design"],
            "handoffs": result.handoffs,
            "check_points": result.check_points,
            "unsent_checks": result.unsent_checks,
            "bytes_sent": result.bytes_sent,
            "bytes_received": result.bytes_received,
            # The cloud's share, each part on its own (GenerationResult.accounting); rows recorded
            # before these existed lack them, and the report shows them as unknown.
            "override_tokens": acc["override_tokens"],
            "other_cloud_tokens": acc["other_cloud_tokens"],
            "ensembled_tokens": acc["ensembled_tokens"],
            "checked_positions": acc["checked_positions"],
            # checked edge tokens P would not have chosen, kept (a threshold, an override gate)
            "kept_disagreements": result.kept_disagreements(),
            "round_trips": acc["round_trips"],
            "cloud_seconds": acc["cloud_seconds"],
            "seconds": result.seconds,
            "first_token_s": result.first_token_s,
            "stop_reason": result.stop_reason,
            "drafts": result.drafts,
            "draft_tokens": result.draft_tokens,
            "draft_accepted": result.draft_accepted,
            "skipped_uploads": result.skipped_uploads,
            "tau": gen.threshold,
            "oracle_positions": trace_oracle(result)
            if spec.mode == "large" and self.sampling.greedy
            else None,
        }
        if self.traces:
            path = self.out_dir / "traces" / f"{spec.name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                meta = {"run": spec.name, "task_id": task.task_id, "suite": task.suite,
                        "policy": asdict(spec.policy), "max_tokens": self.max_tokens,
                        "sampling": asdict(self.sampling), "correct": verdict.correct}  # fmt: skip
                result.write_trace(f, meta)
        return row
