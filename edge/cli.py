"""The edge's commands: `handoff generate`, `chat` and `serve-edge`.

Every EdgeSettings field is an option of each (shared/cli_options.py generates them), so the policy,
the cloud link and the loopback network injection are set the same way everywhere; serve-edge adds
ServeSettings' fields for its HTTP side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from handoff.edge.settings import EdgeSettings, ServeSettings
from handoff.shared.cli import DEFAULT_PROMPT, err, human_bytes, out
from handoff.shared.cli_options import settings_options
from handoff.shared.settings import get_settings

EDGE_PANEL = "Edge settings (flag > HANDOFF_EDGE_<NAME> > default)"
SERVE_PANEL = "HTTP settings (flag > HANDOFF_SERVE_<NAME> > default)"


def register(app: typer.Typer) -> None:
    """Add `generate`, `chat` and `serve-edge` to the root command."""
    app.command("generate")(generate)
    app.command("chat")(chat)
    app.command("serve-edge")(serve_edge)


def edge_options(func):
    """Every EdgeSettings field as an option; the command receives them as `edge_settings`."""
    return settings_options(EdgeSettings, into="edge_settings", panel=EDGE_PANEL)(func)


def checked(edge_settings: EdgeSettings) -> EdgeSettings:
    """The settings after the checks across fields (PolicyConfig, LinkConfig), before a model loads.

    Raises:
        ShapeError: e.g. draft_tokens > draft_tokens_max (one clear line, exit 2).
    """
    edge_settings.policy_config()
    edge_settings.link_config()
    return edge_settings


# Options of the commands that run the edge besides EdgeSettings': the models (HandoffSettings'
# edge_model and cloud_model, env HANDOFF_EDGE_MODEL / HANDOFF_CLOUD_MODEL) and the sampling.
EdgeModelOpt = Annotated[
    str | None, typer.Option("--edge", help="Q: registry name or GGUF path (default: settings).")
]
CloudModelOpt = Annotated[
    str | None, typer.Option("--cloud-model", help="P for the embedded verifier (default: settings).")
]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")]
SeedOpt = Annotated[int | None, typer.Option(min=0, help="Sampling seed.")]


def sampling_settings(temperature: float, top_p: float, seed: int | None):
    """SamplingSettings of the sampling options (top-p 0 means off, as 1 does)."""
    from handoff.shared.sampling import SamplingSettings

    return SamplingSettings(temperature=temperature, top_p=top_p if top_p > 0 else 1.0, seed=seed)


def stats_line(result, cloud_info: dict[str, str]) -> str:
    """One line after an answer: tokens by source, check points, handoffs, KL, bytes, speed."""
    counts = result.counts()
    mean_kl = "n/a" if result.mean_kl() is None else f"{result.mean_kl():.3f}"
    unchecked = (
        f", {counts['unchecked']} unchecked" if counts["unchecked"] and result.mode == "hybrid" else ""
    )
    rate = len(result.records) / result.seconds if result.seconds > 0 else 0.0
    acc = result.acceptance()
    skipped = f"; {result.skipped_uploads} uploads without Q's view" if result.skipped_uploads else ""
    exact = skipped + (
        f"; {result.drafts} drafts, acceptance {acc['acceptance_rate']:.2f}, "
        f"{acc['mean_accepted_length']:.1f} accepted per draft"
        if result.drafts
        else ""
    )
    ens = f", {counts['ensembled']} ensembled" if counts["ensembled"] else ""
    return (
        f"{len(result.records)} tokens ({result.mode}): {counts['edge']} edge, {counts['cloud']} cloud, "
        f"{counts['corrected']} corrected{ens}{unchecked}; {result.check_points} check points, "
        f"{result.handoffs} handoffs; mean KL {mean_kl}; {human_bytes(result.bytes_sent)} up, "
        f"{human_bytes(result.bytes_received)} down; {result.seconds:.1f} s, {rate:.1f} tok/s{exact}"
    )


SOURCE_STYLES = {
    "edge": "default",
    "cloud": "cyan",
    "corrected": "magenta",
    "ensembled": "green",
    "unchecked": "yellow",
}


def _style(record) -> str:
    return SOURCE_STYLES["unchecked" if record.source == "edge" and not record.checked else record.source]


# ---------------------------------------------------------------------------------------------
# handoff generate


@edge_options
def generate(
    prompt: Annotated[
        str, typer.Option(help="User message, rendered with the chat template.")
    ] = DEFAULT_PROMPT,
    max_tokens: Annotated[int, typer.Option(min=1, max=8192, help="Tokens to generate at most.")] = 128,
    edge: EdgeModelOpt = None,
    cloud_model: CloudModelOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    trace: Annotated[Path | None, typer.Option(help="Write a JSONL trace: one record per token.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    *,
    edge_settings: EdgeSettings,
) -> None:
    """Hybrid generation: Q drafts on the edge, P checks at check points and takes over where they diverge.

    Tokens are coloured by source: edge (plain), cloud (cyan), corrected by the cloud (magenta),
    ensembled by the safe policy (green), unchecked because the cloud was unreachable (yellow). The answer ends at the model's end of turn
    or after --max-tokens.
    """
    import asyncio
    from dataclasses import asdict

    from handoff.edge.assistant import Assistant

    settings = get_settings()
    checked(edge_settings)
    sampling = sampling_settings(temperature, top_p, seed)

    async def run():
        async with Assistant(settings, edge_settings, edge_model=edge, cloud_model=cloud_model) as assistant:
            ids = assistant.chat_prompt_ids([{"role": "user", "content": prompt}])
            result = await assistant.generate(ids, max_tokens, sampling=sampling)
            assert assistant.runner is not None
            return (result, assistant.cloud_info, assistant.model_name, assistant.runner.stop_token_ids,
                    assistant.policy)  # fmt: skip

    result, cloud_info, edge_name, stops, policy = asyncio.run(run())
    if trace is not None:
        meta = {
            "edge_model": edge_name,
            "cloud": cloud_info,
            "policy": asdict(policy),
            "sampling": asdict(sampling),
            "max_tokens": max_tokens,
            "prompt": prompt,
        }
        with open(trace, "w") as f:
            result.write_trace(f, meta)
    if as_json:
        out.print_json(json.dumps({"text": result.text} | result.summary() | {"cloud": cloud_info}))
        return
    for record in result.records:
        if record.raw is not None or record.token_id not in stops:  # the end of turn is not text
            out.print(record.text, style=_style(record), end="", highlight=False, markup=False)
    out.print()
    err.print(f"[dim]{stats_line(result, cloud_info)}[/dim]", soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# handoff chat


@edge_options
def chat(
    max_tokens: Annotated[int, typer.Option(min=1, max=8192, help="Tokens per answer at most.")] = 512,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    edge: EdgeModelOpt = None,
    cloud_model: CloudModelOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    *,
    edge_settings: EdgeSettings,
) -> None:
    """Interactive chat in the terminal: answers stream as they are committed, coloured by source.

    Edge tokens are plain, cloud tokens cyan, corrected ones magenta, ensembled ones green, unchecked
    ones yellow; a stats line follows each answer. Commands: /reset forgets the conversation, /exit (or Ctrl-D) quits.
    """
    import asyncio
    import codecs

    from handoff.edge.assistant import Assistant

    settings = get_settings()
    checked(edge_settings)
    sampling = sampling_settings(temperature, top_p, seed)
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    async def run() -> None:
        async with Assistant(settings, edge_settings, edge_model=edge, cloud_model=cloud_model) as assistant:
            where = (
                assistant.cloud_info.get("model", "no cloud") if edge_settings.mode != "edge" else "no cloud"
            )
            err.print(f"[dim]edge {assistant.model_name} · cloud {where} · /reset, /exit[/dim]")
            messages = list(start)
            while True:
                try:
                    line = await asyncio.to_thread(out.input, "[bold green]you>[/bold green] ")
                except EOFError:
                    out.print()
                    return
                text = line.strip()
                if text in ("/exit", "/quit"):
                    return
                if text == "/reset":
                    messages = list(start)
                    err.print("[dim]conversation forgotten[/dim]")
                    continue
                if not text:
                    continue
                messages.append({"role": "user", "content": text})
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                assert assistant.runner is not None
                detokenize = assistant.runner.detokenize
                stops = assistant.runner.stop_token_ids

                def show(record, decoder=decoder, detokenize=detokenize, stops=stops) -> None:
                    if record.raw is None and record.token_id in stops:  # raw: P's token, P's id
                        return
                    piece = decoder.decode(
                        record.raw if record.raw is not None else detokenize([record.token_id])
                    )
                    out.print(piece, style=_style(record), end="", highlight=False, markup=False)

                result = await assistant.generate(
                    assistant.chat_prompt_ids(messages), max_tokens, sampling=sampling, on_token=show
                )
                out.print(decoder.decode(b"", final=True))
                answer = result.answer_text(stops)
                messages.append({"role": "assistant", "content": answer})
                err.print(f"[dim]{stats_line(result, assistant.cloud_info)}[/dim]", soft_wrap=True)

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# handoff serve-edge


@settings_options(ServeSettings, into="serve_settings", panel=SERVE_PANEL)
@edge_options
def serve_edge(
    edge: EdgeModelOpt = None,
    cloud_model: CloudModelOpt = None,
    *,
    serve_settings: ServeSettings,
    edge_settings: EdgeSettings,
) -> None:
    """Serve an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions) over hybrid generation.

    Point any OpenAI client at http://HOST:PORT/v1, or a browser at http://HOST:PORT/ for a chat page
    that colours each token by its source. One model instance answers requests in arrival order;
    sampling comes with each request.
    """
    import asyncio

    from handoff.edge.openai_server import serve

    settings = get_settings()
    checked(edge_settings)

    def ready(server) -> None:
        api = server.api
        cloud_desc = (
            "none (edge only)" if edge_settings.mode == "edge" else api.assistant.cloud_info.get("model", "?")
        )
        out.print(
            f"handoff serve-edge: model {api.model_id!r} at {server.base_url} "
            f"(edge {api.assistant.model_name}, cloud {cloud_desc}, mode {edge_settings.mode}, "
            f"policy {edge_settings.policy}, max_queue {serve_settings.max_queue}"
            f"{', API key required' if serve_settings.api_key else ''})",
            highlight=False,
            soft_wrap=True,
        )
        out.print(f"handoff serve-edge: chat page at {server.base_url.removesuffix('/v1')}/", highlight=False)

    asyncio.run(
        serve(
            settings, edge_settings, serve_settings, edge_model=edge, cloud_model=cloud_model, on_ready=ready
        )
    )
