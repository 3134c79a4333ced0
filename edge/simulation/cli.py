"""`handoff simulate`: latency and cost of recorded generations under a network, device and price model."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from handoff.shared.cli import out
from handoff.shared.cli_options import csv_values
from handoff.shared.errors import HandoffError


def register(app: typer.Typer) -> None:
    """Add `simulate` to the root command."""
    app.command("simulate")(simulate_command)


def simulate_command(
    traces: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, help="Trace files (generate --trace, eval).")
    ],
    cloud_profile: Annotated[
        Path,
        typer.Option(
            exists=True, dir_okay=False, help="The cloud's latency profile (bench_cloud.py --profile)."
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="simulate.json, simulate.md and plots go here.")
    ] = Path("simulate-out"),
    rtt_ms: Annotated[
        str, typer.Option(help="Round-trip times to simulate (ms), comma-separated.")
    ] = "0,20,100",
    rtt_sigma: Annotated[float, typer.Option(min=0, help="Log-normal jitter of each message's delay.")] = 0.0,
    uplink_kbps: Annotated[float | None, typer.Option(min=0.001, help="Uplink bandwidth (kbit/s).")] = None,
    downlink_kbps: Annotated[
        float | None, typer.Option(min=0.001, help="Downlink bandwidth (kbit/s).")
    ] = None,
    edge_tok_s: Annotated[
        float | None, typer.Option(min=0.001, help="Edge decode speed; default: measured in the traces.")
    ] = None,
    edge_prefill_tok_s: Annotated[
        float | None, typer.Option(min=0.001, help="Edge prompt processing speed (default: not counted).")
    ] = None,
    gpu_per_hour: Annotated[float, typer.Option(min=0, help="GPU price per hour ($).")] = 3.0,
    per_gb: Annotated[float, typer.Option(min=0, help="Price per GB moved ($).")] = 0.09,
    sessions: Annotated[int, typer.Option(min=1, help="Concurrent sessions batched on one GPU.")] = 1,
    replay_thresholds: Annotated[
        str, typer.Option(help="Thresholds to replay offline on full (cloud-only) traces; '' for none.")
    ] = "0.1,0.2,0.3,0.5,1.0",
    replay_intervals: Annotated[str, typer.Option(help="Check intervals to replay offline.")] = "8",
    replay_divergences: Annotated[
        str,
        typer.Option(
            help="Divergences to replay (token, surface, concept; concept maps of the default edge "
            "model's vocabulary), comma-separated."
        ),
    ] = "token",
    lookahead: Annotated[
        int | None, typer.Option(min=0, help="Windows drafted ahead (default: each trace's policy).")
    ] = None,
) -> None:
    """Latency and cost of recorded generations under a network, device and price model.

    Recorded runs are exact replays of their structure; thresholds replayed offline on full traces
    (cloud-only runs, where both models scored every position) are approximations where the policy
    keeps an edge token that is not P's.
    """
    from handoff.edge.simulation.cloud_latency import CloudLatencyModel
    from handoff.edge.simulation.run import edge_model_from_traces, run_simulation
    from handoff.edge.simulation.simulate import CostModel, EdgeModel
    from handoff.edge.simulation.traces import iter_generations

    try:
        cloud = CloudLatencyModel.from_bench(cloud_profile)
        rtts = csv_values(rtt_ms, float, "--rtt-ms")
        taus = (
            csv_values(replay_thresholds, float, "--replay-thresholds") if replay_thresholds.strip() else ()
        )
        intervals = csv_values(replay_intervals, int, "--replay-intervals")
        divergences = _divergence_maps(list(csv_values(replay_divergences, str, "--replay-divergences")))
        if edge_tok_s is None:
            edge = edge_model_from_traces(iter_generations(list(traces)))
        else:
            edge = EdgeModel(token_s=1 / edge_tok_s)
        if edge_prefill_tok_s is not None:
            # replace() keeps the measured upload, settle and correction costs.
            edge = replace(edge, prefill_s_per_token=1 / edge_prefill_tok_s)
        kb = 1000 / 8
        rows = run_simulation(
            traces, cloud, out_dir, rtts_ms=rtts, rtt_sigma=rtt_sigma,
            uplink_bytes_per_s=uplink_kbps * kb if uplink_kbps else None,
            downlink_bytes_per_s=downlink_kbps * kb if downlink_kbps else None,
            edge=edge, cost=CostModel(gpu_per_hour, per_gb, sessions), thresholds=taus, intervals=intervals,
            lookahead=lookahead, meta={"command": "handoff " + " ".join(sys.argv[1:])}, divergences=divergences,
        )  # fmt: skip
    except ValueError as e:
        raise HandoffError(str(e)) from None
    from handoff.edge.simulation.run import gpu_label

    estimated = " — cloud profile ESTIMATED, not measured" if cloud.estimated else ""
    title = f"handoff simulate (edge {1 / edge.token_s:.1f} tok/s; {out_dir / 'simulate.md'}){estimated}"
    table = Table(title=title)
    columns = ("config", "RTT ms", "fidelity", "cloud", "override", "checked", "RT/gen", "TTFT s", "tok/s",
               "ITL p95 ms", gpu_label(rows), "$/1k tok", "up B/tok")  # fmt: skip
    for col in columns:
        table.add_column(col)

    def f(x: float | None, digits: int) -> str:
        return "n/a" if x is None else f"{x:.{digits}f}"

    for r in rows:
        table.add_row(
            r["config"], f(r["rtt_ms"], 0), "exact" if r["fidelity"] == "exact replay" else "approx.",
            f(r["cloud_fraction"], 2), f(r["override_fraction"], 3), f(r["checked_fraction"], 2),
            f(r["round_trips_per_generation"], 1), f(r["ttft_mean_s"], 2), f(r["tokens_per_s"], 1),
            f(1000 * (r["itl_p95_s"] or 0), 0), f(r["gpu_s_per_1k_tokens"], 2), f(r["cost_per_1k_tokens"], 4),
            f(r["up_bytes_per_token"], 0),
        )  # fmt: skip
    out.print(table, width=max(out.width, 160))


def _divergence_maps(names: list[str]) -> dict:
    """divergence -> its concept map over the default edge model's vocabulary (None for token).

    Raises:
        ValueError: an unknown divergence (concept_map_for's ShapeError).
    """
    from handoff.shared.concepts import concept_map_for
    from handoff.shared.model_info import load_model_info
    from handoff.shared.models import resolve
    from handoff.shared.settings import DEFAULT_EDGE_MODEL, get_settings

    if names == ["token"]:  # no concept map: the edge model's vocabulary is not needed
        return {"token": None}
    vocabulary = load_model_info(resolve(DEFAULT_EDGE_MODEL, "edge", get_settings()))[1]
    return {n: concept_map_for(n, vocabulary) for n in names}
