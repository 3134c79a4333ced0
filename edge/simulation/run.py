"""`handoff simulate`: recorded and replayed configurations under network/cost models; JSON, table, plots."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from handoff.edge.policy import PolicyConfig
from handoff.edge.simulation.cloud_latency import CloudLatencyModel
from handoff.edge.simulation.replay import replay_policy
from handoff.edge.simulation.simulate import CostModel, EdgeModel, NetworkModel, Timeline, simulate
from handoff.edge.simulation.traces import Generation, in_place

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Generations to simulate together, and how faithful they are to what a real run would do."""

    name: str
    mode: str  # edge | cloud | hybrid
    generations: tuple[Generation, ...]
    fidelity: str  # "exact replay" | "approximate (...)"
    threshold: float | None = None
    check_interval: int | None = None
    accuracy: float | None = None  # from eval traces ("correct" in each generation's meta)
    exact_fraction: float | None = None  # replays: generations whose replay is exact


def recorded_configs(gens: Iterable[Generation]) -> list[Config]:
    """One configuration per recorded run (eval run name, else mode and policy): exact replays."""
    groups: dict[str, list[Generation]] = {}
    for g in gens:
        key = g.run
        if key == g.mode == "hybrid":
            p = g.policy
            key = f"hybrid-tau{p.get('threshold')}-n{p.get('check_interval')}"
        groups.setdefault(key, []).append(g)
    out = []
    for name, gs in groups.items():
        modes = {g.mode for g in gs}
        if len(modes) != 1:
            raise ValueError(f"run {name!r} mixes modes {sorted(modes)}")
        mode = modes.pop()
        correct = [g.meta["correct"] for g in gs if "correct" in g.meta]
        p = gs[0].policy
        out.append(
            Config(
                name, mode, tuple(gs), "exact replay",
                threshold=p.get("threshold") if mode == "hybrid" else None,
                check_interval=p.get("check_interval") if mode == "hybrid" else None,
                accuracy=float(np.mean(correct)) if len(correct) == len(gs) else None,
            )
        )  # fmt: skip
    return out


def replayed_configs(
    gens: Sequence[Generation],
    thresholds: Sequence[float],
    intervals: Sequence[int],
    base: PolicyConfig,
    divergences: dict[str, np.ndarray | None] | None = None,
) -> list[Config]:
    """Hybrid configurations replayed offline on the full traces among gens (P's text, both views).

    Args:
        divergences: divergence name -> its concept map (None for "token"); default token only.
    """
    full = [g for g in gens if g.full and g.mode == "cloud"]
    if not full:
        return []
    out = []
    for name, concept_of in (divergences or {"token": None}).items():
        out += _replayed(full, thresholds, intervals, replace(base, divergence=name), concept_of)
    return out


def _replayed(full, thresholds, intervals, base: PolicyConfig, concept_of) -> list[Config]:
    prefix = "replay" if base.divergence == "token" else f"replay-{base.divergence}"
    out = []
    for n in intervals:
        for tau in thresholds:
            policy = replace(base, threshold=float(tau), check_interval=int(n))
            replays = [replay_policy(g, policy, concept_of) for g in full]
            exact = sum(info.exact for _, info in replays)
            fidelity = "exact replay" if exact == len(replays) else (
                f"approximate ({len(replays) - exact} of {len(replays)} generations keep an edge token "
                "that is not P's: their real text would differ from there on)"
            )  # fmt: skip
            out.append(
                Config(
                    f"{prefix}-tau{tau:g}-n{n}", "hybrid", tuple(g for g, _ in replays), fidelity,
                    threshold=float(tau), check_interval=int(n), exact_fraction=exact / len(replays),
                )
            )  # fmt: skip
    return out


def _percentile(x: np.ndarray, q: float) -> float | None:
    return float(np.percentile(x, q)) if x.size else None


def measure(config: Config, net: NetworkModel, edge: EdgeModel, cloud: CloudLatencyModel, cost: CostModel,
            lookahead: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Simulate every generation of a configuration; the figures a deployer compares."""
    timelines: list[Timeline] = [
        simulate(g, net, edge, cloud, cost, lookahead=lookahead) for g in config.generations
    ]
    tokens = sum(len(t.commits) for t in timelines)
    seconds = sum(t.seconds for t in timelines)
    gaps = np.concatenate([np.diff(t.commits) for t in timelines if len(t.commits) > 1] or [np.zeros(0)])
    ttft = np.asarray([t.first_token_s for t in timelines if t.first_token_s is not None])
    up = sum(t.bytes_up for t in timelines)
    down = sum(t.bytes_down for t in timelines)
    gpu = sum(t.gpu_seconds for t in timelines)
    money = gpu / 3600 * cost.gpu_per_hour + (up + down) / 1e9 * cost.per_gb
    per_k = 1000 / tokens if tokens else 0.0
    override = sum(sum(r["source"] == "corrected" for r in g.records) for g in config.generations)
    other = sum(sum(r["source"] == "cloud" for r in g.records) for g in config.generations)
    ensembled = sum(sum(r["source"] == "ensembled" for r in g.records) for g in config.generations)

    def per_token(x: float) -> float | None:
        return x / tokens if tokens else None

    return {
        "config": config.name,
        "mode": config.mode,
        "fidelity": config.fidelity,
        "threshold": config.threshold,
        "check_interval": config.check_interval,
        "generations": len(timelines),
        "tokens": tokens,
        "rtt_ms": net.rtt_s * 1000,
        "wall_s": seconds,
        "ttft_mean_s": float(ttft.mean()) if ttft.size else None,
        "ttft_p50_s": _percentile(ttft, 50),
        "tokens_per_s": tokens / seconds if seconds else None,
        "itl_p50_s": _percentile(gaps, 50),
        "itl_p95_s": _percentile(gaps, 95),
        "itl_p99_s": _percentile(gaps, 99),
        "gpu_s_per_1k_tokens": gpu * per_k,
        "cost_per_1k_tokens": money * per_k,
        "up_bytes_per_token": up / tokens if tokens else None,
        "down_bytes_per_token": down / tokens if tokens else None,
        "check_points_per_100_tokens": 100 * sum(t.check_points for t in timelines) / tokens
        if tokens
        else None,
        "handoffs_per_100_tokens": 100 * sum(t.handoffs for t in timelines) / tokens if tokens else None,
        "cloud_fraction": per_token(override + other),
        # The cloud's share, each part on its own (as GenerationResult.accounting counts it).
        "override_fraction": per_token(override),
        "other_cloud_fraction": per_token(other),
        "ensembled_fraction": per_token(ensembled),  # placed by the edge (safe): not cloud tokens
        "checked_fraction": per_token(sum(t.checked_positions for t in timelines)),
        "round_trips_per_generation": sum(t.round_trips for t in timelines) / len(timelines)
        if timelines
        else None,
        "gpu_estimated": cloud.estimated,  # GPU seconds from an estimated profile, not a measured one
        "accuracy": config.accuracy,
        "exact_fraction": config.exact_fraction,
    }


def edge_model_from_traces(gens: Iterable[Generation]) -> EdgeModel:
    """The edge's costs as recorded in traces (means: a wall-time prediction needs sums).

    - token_s: drafting steps inside a window (t_generated of consecutive edge tokens);
    - append_s: a cloud token's arrival to its commit (t_received -> t_committed), when recorded;
    - upload_s / settle_s: a checked window's last draft to its upload (not a deferred check's: it
      waited for the answer ahead of it), its answer to its commit;
    - correct_s: a gated correction in place, its check point's answer to its commit (when any);
    - prefill_s_per_token: edge-only generations' first step, less one step, per prompt token.

    Raises:
        ValueError: no drafting times in the traces (give the edge's speed instead).
    """
    gens = list(gens)
    steps, scoring, upload, settle, prefill, correct = [], [], [], [], [], []
    for g in gens:
        recs = g.records
        gated = g.gated
        for a, b in itertools.pairwise(recs):
            if a["source"] == b["source"] == "edge" and a.get("t_uploaded") == b.get("t_uploaded"):
                if a.get("t_generated") is not None and b["t_generated"] > a["t_generated"]:
                    steps.append(b["t_generated"] - a["t_generated"])
        for r in recs:
            if r["source"] != "edge" and r.get("t_received") is not None and r.get("t_committed") is not None:
                scoring.append(r["t_committed"] - r["t_received"])
            elif (in_place(r, gated) or r["source"] == "ensembled") and None not in (
                r.get("t_answered"),
                r.get("t_committed"),
            ):
                correct.append(max(0.0, r["t_committed"] - r["t_answered"]))
        windows: dict[float, list[dict[str, Any]]] = {}
        for r in recs:
            if r["source"] == "edge" and r.get("t_uploaded") is not None and r.get("t_committed") is not None:
                windows.setdefault(r["t_uploaded"], []).append(r)
        deferring = bool(g.policy.get("defer_checks"))
        answered_before: float | None = None  # the previous check's answer
        for _, ws in sorted(windows.items()):
            last = ws[-1]
            # A deferred check (edge/gated.py) went up when the check ahead of it was answered: its
            # wait is the round trip's, not the edge's upload cost.
            if not (
                deferring
                and answered_before is not None
                and last["t_generated"] < answered_before <= last["t_uploaded"]
            ):
                upload.append(max(0.0, last["t_uploaded"] - last["t_generated"]))
            if last.get("t_answered") is not None:
                settle.append(max(0.0, last["t_committed"] - last["t_answered"]))
                answered_before = last["t_answered"]
    if not steps:
        raise ValueError("no edge drafting times in these traces: give the edge's speed (--edge-tok-s)")
    token_s = float(np.mean(steps))
    for g in gens:
        if g.mode == "edge" and g.records and g.prompt_len and g.records[0].get("t_generated") is not None:
            prefill.append(max(0.0, g.records[0]["t_generated"] - token_s) / g.prompt_len)
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    return EdgeModel(
        token_s=token_s,
        append_s=mean(scoring) or None,
        prefill_s_per_token=float(np.median(prefill)) if prefill else 0.0,
        upload_s=mean(upload),
        settle_s=mean(settle),
        correct_s=mean(correct) if correct else None,
    )


def gpu_label(rows: Sequence[dict[str, Any]]) -> str:
    """The GPU-seconds column's name: it says when the figures come from an estimated profile."""
    return "GPU s/1k tok (estimated)" if any(r.get("gpu_estimated") for r in rows) else "GPU s/1k tok"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the simulated figures."""
    head = ["config", "RTT ms", "fidelity", "cloud", "override", "other cloud", "ensembled", "checked", "RT/gen",
            "TTFT s",
            "tok/s", "ITL p50/p95/p99 ms", gpu_label(rows), "$/1k tok", "up B/tok", "down B/tok",
            "accuracy"]  # fmt: skip

    def f(x: Any, d: int = 2) -> str:
        return "n/a" if x is None else f"{x:.{d}f}"

    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        itl = "/".join(f((r[k] or 0) * 1000, 0) for k in ("itl_p50_s", "itl_p95_s", "itl_p99_s"))
        fid = "exact" if r["fidelity"] == "exact replay" else "approx."
        lines.append(
            "| " + " | ".join([
                r["config"], f(r["rtt_ms"], 0), fid, f(r["cloud_fraction"]), f(r["override_fraction"], 3),
                f(r["other_cloud_fraction"], 3), f(r.get("ensembled_fraction"), 3), f(r["checked_fraction"]), f(r["round_trips_per_generation"], 1),
                f(r["ttft_mean_s"]), f(r["tokens_per_s"], 1), itl, f(r["gpu_s_per_1k_tokens"], 2),
                f(r["cost_per_1k_tokens"], 4),
                f(r["up_bytes_per_token"], 0), f(r["down_bytes_per_token"], 0), f(r["accuracy"]),
            ]) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def plot_latency_vs_rtt(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Seconds per token (wall / tokens) and p95 inter-token latency against RTT, one line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["rtt_ms"])
        x = [r["rtt_ms"] for r in rs]
        style = "--" if rs[0]["fidelity"] != "exact replay" else "-"
        axes[0].plot(x, [1000 / r["tokens_per_s"] for r in rs], style, marker="o", label=name)
        axes[1].plot(x, [1000 * (r["itl_p95_s"] or 0) for r in rs], style, marker="o", label=name)
    axes[0].set(
        xlabel="round-trip time (ms)", ylabel="wall time per token (ms)", title="Latency per token vs RTT"
    )
    axes[1].set(
        xlabel="round-trip time (ms)", ylabel="p95 inter-token latency (ms)", title="Tail latency vs RTT"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.text(0.01, 0.01, "dashed: approximate (offline replay of other thresholds)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost_vs_quality(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Cost per 1,000 tokens against accuracy (runs with a measured accuracy) or cloud fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    with_acc = [r for r in rows if r["accuracy"] is not None]
    if with_acc:
        for r in with_acc:
            ax.scatter(r["cost_per_1k_tokens"], r["accuracy"], s=30)
            ax.annotate(r["config"], (r["cost_per_1k_tokens"], r["accuracy"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set(ylabel="accuracy (handoff eval)")
    else:
        for r in rows:
            ax.scatter(r["cost_per_1k_tokens"], r["cloud_fraction"], s=30)
            ax.annotate(r["config"], (r["cost_per_1k_tokens"], r["cloud_fraction"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set(ylabel="cloud-token fraction")
    ax.set(xlabel="cost per 1,000 tokens ($: GPU time + data)", title="Cost vs quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def models_meta(
    net: NetworkModel, edge: EdgeModel, cloud: CloudLatencyModel, cost: CostModel
) -> dict[str, Any]:
    return {
        "network": asdict(net),
        "edge": asdict(edge),
        "cloud_profile": {
            k: getattr(cloud, k)
            for k in ("model", "backend", "device", "dtype", "threads", "rtt_s", "estimated")
        },
        "cost": asdict(cost),
    }


def run_simulation(
    traces: Sequence[Path],
    cloud: CloudLatencyModel,
    out_dir: Path,
    *,
    rtts_ms: Sequence[float] = (0.0, 20.0, 100.0),
    rtt_sigma: float = 0.0,
    uplink_bytes_per_s: float | None = None,
    downlink_bytes_per_s: float | None = None,
    edge: EdgeModel | None = None,
    cost: CostModel | None = None,
    thresholds: Sequence[float] = (),
    intervals: Sequence[int] = (8,),
    lookahead: int | None = None,
    meta: dict[str, Any] | None = None,
    divergences: dict[str, np.ndarray | None] | None = None,
) -> list[dict[str, Any]]:
    """Simulate every recorded run (and offline replays of other policies) at each RTT; write the report.

    Writes simulate.json, simulate.md, latency_vs_rtt.png and cost_vs_quality.png under out_dir.
    """
    import json

    from handoff.edge.simulation.traces import iter_generations

    gens = list(iter_generations(list(traces)))
    if not gens:
        raise ValueError("no generations in the traces")
    edge = edge or edge_model_from_traces(gens)
    cost = cost or CostModel()
    base = PolicyConfig(
        **{k: v for k, v in (gens[0].policy or {}).items() if k in PolicyConfig.__dataclass_fields__}
    )
    configs = recorded_configs(gens) + replayed_configs(gens, thresholds, intervals, base, divergences)
    rows = []
    for rtt in rtts_ms:
        net = NetworkModel(rtt_s=rtt / 1000, rtt_sigma=rtt_sigma, uplink_bytes_per_s=uplink_bytes_per_s,
                           downlink_bytes_per_s=downlink_bytes_per_s)  # fmt: skip
        rows += [measure(c, net, edge, cloud, cost, lookahead) for c in configs]
    out_dir.mkdir(parents=True, exist_ok=True)
    info = (
        (meta or {})
        | models_meta(NetworkModel(rtt_sigma=rtt_sigma), edge, cloud, cost)
        | {
            "traces": [str(t) for t in traces],
            "generations": len(gens),
            "rtts_ms": list(rtts_ms),
        }
    )
    (out_dir / "simulate.json").write_text(json.dumps({"meta": info, "rows": rows}, indent=1) + "\n")
    md = ["# Handoff simulation", ""]
    md += [f"- **{k}:** `{v}`" if k == "command" else f"- **{k}:** {json.dumps(v)}" for k, v in info.items()]
    md += ["", "![latency vs RTT](latency_vs_rtt.png)", "", "![cost vs quality](cost_vs_quality.png)", ""]
    md += [
        "Exact: the recorded structure replayed under the model. Approx.: a policy replayed offline on "
        "P's text (full traces); where it keeps an edge token that is not P's, the real text would differ. "
        "Override, other cloud, checked: per output token (checked positions include drafts a cut "
        "dropped); ensembled: tokens the edge placed from P's and Q's ensemble (safe); RT/gen: round trips per generation (opens, check points, handoffs, rollbacks).",
        "",
    ]
    if cloud.estimated:
        md += [
            "**The cloud profile is estimated** from hardware figures, not measured: its latencies and "
            "GPU-seconds are estimates (the profile file holds the derivation).",
            "",
        ]
    md += [table(rows), ""]  # fmt: skip
    (out_dir / "simulate.md").write_text("\n".join(md))
    plot_latency_vs_rtt(rows, out_dir / "latency_vs_rtt.png")
    mid = [r for r in rows if r["rtt_ms"] == sorted(rtts_ms)[len(rtts_ms) // 2]]
    plot_cost_vs_quality(mid, out_dir / "cost_vs_quality.png")
    return rows
