"""`handoff router train` and `handoff router evaluate`: the learned edge router from full traces."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from handoff.edge.cli import EdgeModelOpt
from handoff.shared.cli import out
from handoff.shared.cli_options import csv_values
from handoff.shared.errors import HandoffError

__all__ = ["register"]

router_app = typer.Typer(
    help="The learned edge router: train it on full traces, evaluate it offline.", no_args_is_help=True
)

TracesArg = Annotated[
    list[Path],
    typer.Argument(exists=True, dir_okay=False, help="Trace files of cloud-only runs (.jsonl[.gz])."),
]
FRACTIONS = "0.05,0.1,0.15,0.2,0.3"

# `router override` and `router budget`: the gate learns from labels, so they are required there.
GateLabelsOpt = Annotated[
    list[Path],
    typer.Option(exists=True, dir_okay=False, help="Continuation labels of TRACES (`handoff router label`)."),
]
GateExtractBatchOpt = Annotated[
    int, typer.Option(min=1, help="Positions per decode when extracting Q's hidden states.")
]

# (task id -> task, (task, answer text) -> passes): the evaluation's, which `router label` needs. The
# root command line hands them over (use_tasks): routing and evaluation are leaves that do not import
# each other.
_TASKS: tuple[Callable[[str], Any], Callable[[Any, str], bool]] | None = None


def register(app: typer.Typer) -> None:
    """Add `router` to the root command."""
    app.add_typer(router_app, name="router")


def use_tasks(task_of: Callable[[str], Any], passes: Callable[[Any, str], bool]) -> None:
    """The tasks and checker `router label` judges continuations with (edge/evaluation)."""
    global _TASKS
    _TASKS = (task_of, passes)


LabelsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--labels",
        exists=True,
        dir_okay=False,
        help="Continuation labels (`handoff router label`): learn/score answer-changing disagreements; "
        "generations without labels are left out (P-wrong ones, labelled with --generations wrong, "
        "have no position to override: their rescuing disagreements only count as answers).",
    ),
]


def _load(
    paths: list[Path], edge: str | None, hidden: bool, batch: int = 1, labels: list[Path] | None = None
):
    """(RouterData, vocabulary) of trace files, hidden states recomputed with Q when asked, continuation
    labels attached when given."""
    from handoff.edge.policy.features import token_classes
    from handoff.edge.routing.data import read_generations, to_data
    from handoff.edge.routing.extract import hidden_states
    from handoff.shared.model_info import load_model_info
    from handoff.shared.models import resolve
    from handoff.shared.settings import get_settings

    settings = get_settings()
    ref = resolve(edge or settings.edge_model, "edge", settings)
    vocabulary = load_model_info(ref, settings)[1]
    generations = read_generations(paths)
    if not generations:
        raise HandoffError(f"no cloud-only generations in {', '.join(map(str, paths))}")
    if labels:
        from handoff.edge.routing.data import read_labels, with_labels

        generations = with_labels(generations, read_labels(labels))
        if not generations:
            raise HandoffError(
                f"none of the generations in {', '.join(map(str, paths))} has labels in {labels}"
            )
    states = hidden_states(ref.path, generations, threads=settings.threads, batch=batch) if hidden else None
    return to_data(generations, token_classes(vocabulary.tokens), states), vocabulary


def _vocabulary_maps(vocabulary):
    """([V] token classes, [V] surface-form ids) of a vocabulary: what the override gate reads."""
    from handoff.edge.policy.features import token_classes
    from handoff.shared.concepts import surface_concepts

    return token_classes(vocabulary.tokens), surface_concepts(vocabulary).concept_of


@router_app.command("train")
def train(
    traces: TracesArg,
    val: Annotated[
        list[Path] | None,
        typer.Option(
            "--val",
            exists=True,
            dir_okay=False,
            help="Validation traces (the threshold); default: every --val-every-th training prompt.",
        ),
    ] = None,
    val_every: Annotated[int, typer.Option(min=2, help="Without --val: hold out every N-th prompt.")] = 4,
    out_path: Annotated[Path, typer.Option("--out", help="The router file to write.")] = Path("router.json"),
    model: Annotated[str, typer.Option(help="logistic or mlp.")] = "logistic",
    hidden_dims: Annotated[
        int, typer.Option(min=0, help="Principal directions of Q's hidden state (0: none).")
    ] = 16,
    target_checked: Annotated[
        float, typer.Option(min=0.001, max=0.999, help="Fraction of validation positions to check.")
    ] = 0.15,
    l2: Annotated[float, typer.Option(min=0.0, help="L2 penalty.")] = 1e-2,
    only: Annotated[
        str, typer.Option(help="Only these features, comma-separated (e.g. q_entropy: a one-signal gate).")
    ] = "",
    extract_batch: Annotated[
        int, typer.Option(min=1, help="Positions per decode when recomputing Q's hidden states (1: exact).")
    ] = 1,
    labels: LabelsOpt = None,
    edge: EdgeModelOpt = None,
) -> None:
    """Fit a router on TRACES (cloud-only runs) and choose its threshold on --val."""
    import numpy as np

    from handoff.edge.routing.data import split_by_prompt
    from handoff.edge.routing.metrics import at_threshold, auc
    from handoff.edge.routing.train import TrainConfig, train_router

    config = TrainConfig(
        model=model, hidden_dims=hidden_dims, l2=l2, target_checked=target_checked,
        only=tuple(f.strip() for f in only.split(",") if f.strip()),
    )  # fmt: skip  # type: ignore[arg-type]
    train_data, vocabulary = _load(traces, edge, hidden_dims > 0, extract_batch, labels)
    if val:
        val_data, _ = _load(val, edge, hidden_dims > 0, extract_batch, labels)
    else:  # hold out whole prompts
        train_data, val_data = split_by_prompt(train_data, val_every)
    # A validation generation whose prompt is also a training one would flatter the threshold.
    seen = {g.prompt_ids for g in train_data.generations}
    val_data = val_data.subset(np.asarray([g.prompt_ids not in seen for g in val_data.generations]))
    fp = vocabulary.fingerprint
    router = train_router(
        train_data, val_data, config, vocab_digest=fp.digest.hex(), vocab_size=fp.vocab_size,
        meta={"edge_vocabulary": vocabulary.name, "train_traces": [str(p) for p in traces],
              "val_traces": [str(p) for p in val or []], "val_every": None if val else val_every, "train_positions": len(train_data.labels),
              "train_generations": len(train_data.generations), "val_generations": len(val_data.generations),
              "train_disagreement_rate": float(train_data.disagreements.mean()),
              "labels": [str(p) for p in labels] if labels else "argmax",
              "train_label_rate": float(train_data.labels.mean())},
    )  # fmt: skip
    scores = router.probabilities(router.rows(val_data.scalars, val_data.hidden))
    stats = at_threshold(scores, val_data.labels, val_data.group, router.threshold, val_data.disagreements)
    router = replace(router, meta=router.meta | {"validation": stats | {"auc": auc(scores, val_data.labels)}})
    router.save(out_path)
    out.print(f"router: {out_path} ({len(router.layers)} layer(s), {router.n_features} features)")
    out.print(json.dumps(router.meta["validation"], indent=1))


@router_app.command("evaluate")
def evaluate(
    router_path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The router file.")],
    traces: TracesArg,
    fractions: Annotated[
        str, typer.Option(help="Checked fractions of the frontier, comma-separated.")
    ] = FRACTIONS,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    loso_train: Annotated[
        list[Path] | None,
        typer.Option(
            exists=True, dir_okay=False, help="Leave one suite out: the training traces (repeatable)."
        ),
    ] = None,
    loso_val: Annotated[
        list[Path] | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Leave one suite out: the validation traces (default: held-out prompts of --loso-train).",
        ),
    ] = None,
    labels: LabelsOpt = None,
    extract_batch: Annotated[
        int,
        typer.Option(
            min=1, help="Positions per decode when extracting Q's hidden states (1: exactly as generating)."
        ),
    ] = 1,
    edge: EdgeModelOpt = None,
) -> None:
    """Offline: how the router and the single-feature gates pick disagreements on TRACES (held out).

    With --loso-train (and --loso-val), also retrain the router (its file's settings) once per suite
    without that suite and test it on that suite's TRACES.
    """
    from handoff.edge.policy.router import load_router
    from handoff.edge.routing.report import evaluate_router, leave_one_suite_out, with_config

    router = load_router(router_path)
    data, vocabulary = _load(traces, edge, router.hidden_dims > 0, extract_batch, labels)
    router.check_vocabulary(vocabulary)
    result = evaluate_router(router, data, csv_values(fractions, float, "--fractions"))
    result["router_file"] = str(router_path)
    result["traces"] = [str(p) for p in traces]
    loso_data = None  # the training traces, loaded once for the router's and the gate's retraining
    if loso_train:
        hidden = router.hidden_dims > 0
        loso_data = _load(loso_train, edge, hidden, extract_batch, labels)[0]
        result["loso"] = leave_one_suite_out(
            loso_data,
            _load(loso_val, edge, hidden, extract_batch, labels)[0] if loso_val else None, data,
            with_config(router), vocab_digest=router.vocab_digest, vocab_size=router.vocab_size,
            val_every=int(router.meta.get("val_every") or 4),
        )  # fmt: skip
    if router.override is not None:
        from handoff.edge.routing.report import evaluate_override

        classes, surface = _vocabulary_maps(vocabulary)
        result["override"] = evaluate_override(
            router, data, classes, surface, csv_values(fractions, float, "--fractions")
        )
        if loso_data is not None and labels:
            from handoff.edge.routing.report import gate_projection, override_leave_one_suite_out

            dims = router.override.hidden_dims
            result["override"]["loso"] = override_leave_one_suite_out(
                router.override, loso_data, data, classes, surface,
                val_every=int(router.override.meta.get("val_every") or 4),
                project=gate_projection(router, dims),
            )  # fmt: skip
    print_evaluation(result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def print_evaluation(result: dict[str, Any]) -> None:
    """The figures as tables (stdout)."""
    r = result["router"]
    out.print(
        f"{result['generations']} generations, {result['positions']} positions, "
        f"{result['disagreement_rate']:.3f} disagreements, {result['label_rate']:.3f} labelled "
        f"({result['labels']}); router at its threshold {r['threshold']:.3f}: checked {r['checked']:.3f}, "
        f"recall {r['recall']:.3f}, overrides {r['overrides']:.3f}, reproduced {r['reproduced']:.3f}"
    )
    table = Table(title="gates: recall / reproduced generations at a checked fraction")
    table.add_column("gate")
    table.add_column("AUC")
    fracs = [c["target"] for c in next(iter(result["gates"].values()))["curve"]]
    for f in fracs:
        table.add_column(f"{f:.0%} checked")
    for name, g in result["gates"].items():
        cells = [f"{c['recall']:.3f} / {c['reproduced']:.3f}" for c in g["curve"]]
        table.add_row(name, "n/a" if g["auc"] is None else f"{g['auc']:.3f}", *cells)
    out.print(table)
    for title, rows in (
        ("by suite", result.get("by_suite", {})),
        ("leave one suite out", result.get("loso", {})),
    ):
        if not rows:
            continue
        t = Table(title=f"router, {title}")
        for col in ("suite", "AUC", "checked", "recall", "reproduced"):
            t.add_column(col)
        for suite, m in rows.items():
            t.add_row(
                suite,
                *(
                    ("n/a" if m[k] is None else f"{m[k]:.3f}")
                    for k in ("auc", "checked", "recall", "reproduced")
                ),
            )
        out.print(t)
    if "override" in result:
        o = result["override"]
        out.print(
            f"override gate (threshold {o['threshold']:.3f}) on {o['disagreements']} disagreements: AUC "
            f"{'n/a' if o['auc'] is None else format(o['auc'], '.3f')}, takes {o['taken']:.3f} of them"
        )
        t = Table(title="router + override gate: checked / overrides / recall / reproduced")
        for col in ("gate", "checked", "overrides", "recall", "reproduced"):
            t.add_column(col)
        for name, m in [("every position", o["every_position"]), ("router", o["router"])] + [
            (f"{c['target']:.0%} checked", c) for c in o["curve"]
        ]:
            t.add_row(
                name,
                *(
                    ("n/a" if m[k] is None else f"{m[k]:.3f}")
                    for k in ("checked", "overrides", "recall", "reproduced")
                ),
            )
        out.print(t)
        if o.get("loso"):
            t = Table(title="override gate, leave one suite out")
            for col in ("suite", "disagreements", "AUC", "taken", "recall"):
                t.add_column(col)
            for suite, m in o["loso"].items():
                t.add_row(
                    suite, str(m["disagreements"]),
                    *(("n/a" if m[k] is None else f"{m[k]:.3f}") for k in ("auc", "taken", "recall")),
                )  # fmt: skip
            out.print(t)


@router_app.command("override")
def override(
    router_path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The router file.")],
    traces: TracesArg,
    labels: GateLabelsOpt,
    out_path: Annotated[Path, typer.Option("--out", help="The router file to write, with the gate.")] = Path(
        "router-override.json"
    ),
    target_recall: Annotated[
        float,
        typer.Option(
            min=0.01, max=1.0, help="Share of validation's answer-changing disagreements to override."
        ),
    ] = 0.9,
    val_every: Annotated[int, typer.Option(min=2, help="Hold out every N-th prompt for the threshold.")] = 4,
    l2: Annotated[float, typer.Option(min=0.0, help="L2 penalty.")] = 1e-2,
    hidden_dims: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also read the first N of the router's projected hidden-state features (a router "
            "trained with --hidden-dims >= N); 0: the override features only.",
        ),
    ] = 0,
    extract_batch: GateExtractBatchOpt = 256,
    p_wrong: Annotated[
        str,
        typer.Option(
            "--p-wrong",
            help="Labelled generations P answered wrong (router label --generations wrong): learn all "
            "their disagreements as ones to decline (all), only the rescuing ones (rescuing), or none "
            "(none: they only take part in choosing the held-out prompts).",
        ),
    ] = "all",
    edge: EdgeModelOpt = None,
) -> None:
    """Add an override gate to a router: which of P's disagreements to correct, learned from TRACES'
    continuation labels (divergent vs neutral; on P-wrong generations every disagreement is one to
    decline); its threshold keeps --target-recall of the held-out prompts' divergent disagreements."""
    from handoff.edge.policy.router import load_router
    from handoff.edge.routing.data import gate_rows, p_wrong_rows, split_by_prompt, wrong_rows
    from handoff.edge.routing.metrics import auc
    from handoff.edge.routing.report import gate_projection
    from handoff.edge.routing.train import train_override

    if p_wrong not in ("all", "rescuing", "none"):
        raise typer.BadParameter("expected all, rescuing or none", param_hint="--p-wrong")
    router = load_router(router_path)
    try:
        project = gate_projection(router, hidden_dims)
    except ValueError as e:
        raise HandoffError(f"--hidden-dims {hidden_dims}: {e}") from None
    data, vocabulary = _load(traces, edge, hidden_dims > 0, batch=extract_batch, labels=labels)
    router.check_vocabulary(vocabulary)
    classes, surface = _vocabulary_maps(vocabulary)
    train_data, val_data = split_by_prompt(data, val_every)
    rows, y, _ = gate_rows(train_data, classes, surface, project)
    wrong, rescuing = wrong_rows(train_data)
    keep = p_wrong_rows(wrong, rescuing, p_wrong)
    rows, y = rows[keep], y[keep]
    val_rows, val_y, _ = gate_rows(val_data, classes, surface, project)
    meta = {
        "train_traces": [str(p) for p in traces], "labels": [str(p) for p in labels], "val_every": val_every,
        "l2": l2, "train_disagreements": len(y), "train_divergent": int(y.sum()),
        **({"p_wrong": p_wrong, "train_p_wrong_disagreements": int(wrong.sum()),
            "train_rescuing": int(rescuing.sum())} if wrong.any() else {}),
        "val_disagreements": len(val_y), "val_divergent": int(val_y.sum()),
        **({"extract_batch": extract_batch} if hidden_dims else {}),
    }  # fmt: skip
    gate = train_override(rows, y, val_rows, val_y, target_recall, l2=l2, hidden_dims=hidden_dims, meta=meta)
    taken = gate.overrides(val_rows)
    validation = {
        "auc": auc(gate.probabilities(val_rows), val_y),
        "recall": float(taken[val_y].mean()),
        "taken": float(taken.mean()),
    }
    gate = replace(gate, meta=gate.meta | {"validation": validation})
    replace(router, override=gate).save(out_path)
    out.print(f"router with an override gate: {out_path}")
    out.print(json.dumps(gate.meta, indent=1))


@router_app.command("budget")
def budget(
    router_path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A router file with an override gate.")
    ],
    traces: TracesArg,
    labels: GateLabelsOpt,
    max_overrides: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Budget: the share of positions P may override.")
    ],
    max_checked: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Budget: the share of positions P may check.")
    ] = 1.0,
    max_cloud: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Budget: the share of positions P may write (overrides + turn tokens)."
        ),
    ] = 1.0,
    fractions: Annotated[str, typer.Option(help="Checked fractions to try, comma-separated.")] = (
        "0.05,0.075,0.1,0.125,0.15,0.2,0.25,0.3,0.4"
    ),
    recalls: Annotated[
        str, typer.Option(help="Override-gate recalls to try (as --target-recall), comma-separated.")
    ] = "0.4,0.5,0.6,0.7,0.8,0.85,0.9,0.95,1.0",
    escalate: Annotated[
        str,
        typer.Option(
            help="Per-response budgets to try, comma-separated K:RECALL (after K corrections in a "
            "generation the gate keeps only RECALL's threshold), e.g. 2:0.3,4:0.3; empty: none."
        ),
    ] = "",
    turn: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Cloud tokens per correction (--router-turn) the points are walked with; "
            "default: the router file's turn. Written into --out's file.",
        ),
    ] = None,
    val_every: Annotated[
        int, typer.Option(min=2, help="Validation: every N-th prompt (as router train/override).")
    ] = 4,
    extract_batch: GateExtractBatchOpt = 256,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Write the router with the chosen point's thresholds.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every point here.")] = None,
    edge: EdgeModelOpt = None,
) -> None:
    """The router's operating point for a budget: the router and override-gate thresholds that keep
    P's answer in the most held-out generations (TRACES' validation prompts, continuation labels) with
    at most --max-overrides override tokens and --max-checked checked positions.

    The router threshold written is the offline one; a real run checks a different share
    (scripts/router_calibrate.py --target FRACTION recalibrates it on a validation run)."""
    from handoff.edge.policy.router import load_router
    from handoff.edge.routing.budget import best_within, operating_points
    from handoff.edge.routing.data import split_by_prompt

    router = load_router(router_path)
    if router.override is None:
        raise HandoffError(f"{router_path}: no override gate (handoff router override)")
    escalations = [_escalation(x) for x in csv_values(escalate, str, "--escalate")] if escalate else []
    hidden = router.hidden_dims > 0
    data, vocabulary = _load(traces, edge, hidden, batch=extract_batch, labels=labels)
    router.check_vocabulary(vocabulary)
    val = split_by_prompt(data, val_every)[1]
    classes, surface = _vocabulary_maps(vocabulary)
    turn = router.turn if turn is None else turn
    points = operating_points(
        router, val, classes, surface, csv_values(fractions, float, "--fractions"),
        csv_values(recalls, float, "--recalls"), escalations, turn,
    )  # fmt: skip
    best = best_within(points, max_overrides, max_checked, max_cloud)
    rescue = points[0]["rescued"] is not None  # P-wrong generations labelled: answers = kept + rescued

    def cell(p: dict[str, Any]) -> str:
        return f"{p['overrides']:.2%} / {p['reproduced']:.3f}" + (f" / {p['answers']:.3f}" if rescue else "")

    what = "overrides / kept (P right) / answered (all)" if rescue else "overrides / kept"
    walked = "" if turn == 1 else f", turns of {turn} tokens"
    t = Table(title=f"{len(val.generations)} validation generations{walked}: {what}")
    t.add_column("gate recall")
    fracs = sorted({p["fraction"] for p in points})
    for f in fracs:
        t.add_column(f"{f:.1%} checked")
    for key in sorted({_gate_key(p) for p in points}, key=lambda x: (x[0], x[1] is not None, x[1:])):
        row = {p["fraction"]: p for p in points if _gate_key(p) == key}
        r, k, ra = key
        t.add_row(f"{r:g}" + ("" if k is None else f", {ra:g} after {k}"), *(cell(row[f]) for f in fracs))
    out.print(t)
    if json_out is not None:
        json_out.write_text(json.dumps({"points": points, "best": best}, indent=1) + "\n", encoding="utf-8")
    if best is None:
        raise HandoffError(
            f"no point within {max_overrides:.2%} overrides, {max_checked:.2%} checked and {max_cloud:.2%} cloud tokens"
        )
    after = (
        "" if best["escalate_after"] is None else f", {best['recall_after']:g} after {best['escalate_after']}"
    )
    out.print(
        f"best within {max_overrides:.2%} overrides, {max_checked:.2%} checked, {max_cloud:.2%} cloud tokens: "
        f"{best['fraction']:.1%} checked, "
        f"gate recall {best['recall_target']:g}{after} (takes {best['taken']:.3f}): overrides {best['overrides']:.2%}, "
        f"kept {best['reproduced']:.3f}, divergent recall {best['recall']:.3f}"
        + (f", other cloud tokens {best['other']:.2%} (turn {best['turn']})" if best["turn"] > 1 else "")
        + (f", rescued {best['rescued']:.3f}, answered {best['answers']:.3f}" if rescue else "")
    )
    if out_path is not None:
        point = {"max_overrides": max_overrides, "max_checked": max_checked, "max_cloud": max_cloud, "val_every": val_every,
                 "traces": [str(p) for p in traces], **best}  # fmt: skip
        gate = replace(
            router.override, threshold=best["gate_threshold"], escalate_after=best["escalate_after"],
            threshold_after=best["threshold_after"],
        )  # fmt: skip
        replace(
            router, threshold=best["router_threshold"], override=gate, turn=best["turn"],
            meta=router.meta | {"operating_point": point},
        ).save(out_path)  # fmt: skip
        out.print(f"wrote {out_path}")


def _gate_key(p: dict[str, Any]) -> tuple[float, int | None, float | None]:
    return p["recall_target"], p["escalate_after"], p["recall_after"]


def _escalation(text: str) -> tuple[int, float]:
    """K:RECALL -> (K, recall), for --escalate."""
    k, sep, r = text.partition(":")
    try:
        if not sep:
            raise ValueError
        pair = int(k), float(r)
    except ValueError:
        raise HandoffError(f"--escalate: expected K:RECALL, such as 2:0.3, got {text!r}") from None
    if pair[0] < 0 or not 0.0 < pair[1] <= 1.0:
        raise HandoffError(f"--escalate: expected K >= 0 and RECALL in (0, 1], got {text!r}")
    return pair


@router_app.command("label")
def label(
    traces: TracesArg,
    out_path: Annotated[Path, typer.Option("--out", help="The label file to write (JSONL).")] = Path(
        "labels.jsonl"
    ),
    concurrency: Annotated[int, typer.Option(min=1, help="Generations continued side by side.")] = 4,
    cloud: Annotated[
        str | None, typer.Option(help="P: registry name or GGUF path (default: the cloud model).")
    ] = None,
    generations_kind: Annotated[
        str,
        typer.Option(
            "--generations",
            help="Which generations: right (P answered right: divergent/neutral), wrong (P answered "
            "wrong: rescuing/not, for the override gate) or all.",
        ),
    ] = "right",
) -> None:
    """Continuation labels (R2R's divergent/neutral): at each disagreement of TRACES' cloud-only
    generations that P answered right, P continues from Q's token; divergent if the answer then fails.
    With --generations wrong (or all), generations P answered wrong too: rescuing if the answer then
    passes.

    P runs here on the cloud backend the cloud settings choose (HANDOFF_CLOUD_* variables; deterministic
    mode by default). Generated tasks only: the checker is found from the task id.
    """
    from tqdm import tqdm

    from handoff.cloud.loader import load_backend
    from handoff.cloud.settings import CloudSettings
    from handoff.edge.routing.continuations import continuation_labels
    from handoff.edge.routing.data import read_generations, write_labels
    from handoff.shared.llama_cpp_model import gguf_tokenizer

    if generations_kind not in ("right", "wrong", "all"):
        raise typer.BadParameter("expected right, wrong or all", param_hint="--generations")
    if _TASKS is None:
        raise HandoffError("router label needs the evaluation's tasks (handoff.cli hands them over)")
    task_of, passes = _TASKS

    def task_or_error(task_id: str) -> Any:
        try:
            return task_of(task_id)
        except ValueError as e:
            raise HandoffError(f"router label judges generated tasks only: {e}") from None

    generations = read_generations(traces)
    if not generations:
        raise HandoffError(f"no cloud-only generations in {', '.join(map(str, traces))}")
    budgets = {g.max_tokens for g in generations}
    if len(budgets) != 1 or None in budgets:
        raise HandoffError(
            f"the traces' runs need one token budget (max_tokens), found {sorted(map(str, budgets))}"
        )
    settings = CloudSettings(**({"model": cloud} if cloud else {}))
    # Sessions are allocated up front in deterministic mode: only as many, and as long, as needed.
    context = max(len(g.prompt_ids) for g in generations) + max(budgets) + 16
    settings = settings.model_copy(
        update={"max_sessions": concurrency, "max_context": min(settings.max_context, context)}
    )
    backend = load_backend(settings)
    try:
        if backend.model_ref is None or backend.model_ref.kind != "gguf":
            raise HandoffError("router label needs P as a GGUF file (its tokenizer writes the answers)")
        tok = gguf_tokenizer(backend.model_ref.path)
        with tqdm(total=len(generations), desc="generations", unit="gen") as bar:
            labels, stats = continuation_labels(
                backend, generations, stop_ids=tok.stop_token_ids, detokenize=tok.detokenize,
                max_tokens=int(budgets.pop()), task_of=task_or_error, passes=passes,
                concurrency=concurrency, progress=bar.update, which=generations_kind,
            )  # fmt: skip
    finally:
        backend.close()
    meta = {
        "traces": [str(p) for p in traces],
        "cloud_model": settings.model,
        "deterministic": settings.deterministic,
        "generations": generations_kind,
        "stats": vars(stats),
    }
    write_labels(out_path, labels, meta)
    out.print(f"labels: {out_path}")
    out.print(json.dumps(vars(stats), indent=1))
