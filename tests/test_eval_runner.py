"""`handoff eval` on the tiny models: runs through the generation path, oracle from traces, resuming, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
from handoff.edge.controller import HybridGenerator
from handoff.edge.evaluation.runner import Evaluation, RunSpec, prompt_key, read_rows, run_specs
from handoff.edge.evaluation.sandbox import SandboxLimits
from handoff.edge.evaluation.tasks import Task, generate_suite
from handoff.edge.policy import PolicyConfig
from handoff.edge.runner import EdgeRunner

FAST = SandboxLimits(timeout_s=3.0, cpu_s=3, memory_mb=256)
MAX_TOKENS = 14


def tasks() -> list[Task]:
    return [
        *generate_suite("arithmetic", 2, difficulty=1),
        *generate_suite("python", 1, difficulty=1),
        Task("ext/1", "ext", "Say hello.", "exact", answer="hello"),
    ]


def specs() -> list[RunSpec]:
    # tau 0: every window is cut at its first position (tiny A and B never agree exactly): P writes all.
    # tau 1e9: P never overrules Q: the edge's own text, checked.
    return run_specs([0.0, 1e9], [4], PolicyConfig(check_interval=4, handback_tokens=4))


async def evaluate(cloud_path, edge_path, out_dir, plan_specs, *, fail_after: int | None = None):
    """An Evaluation over a real gRPC server on a free port; fail_after: raise KeyboardInterrupt then."""
    vocab = vocabulary_of(edge_path)
    runner = EdgeRunner(edge_path, k=20, n_ctx=512, n_threads=1)
    try:
        async with running_server(llama_backend_factory(cloud_path)) as (_, client):
            gen = HybridGenerator(runner, client, vocab, PolicyConfig())

            def prompt_ids(message: str) -> list[int]:
                return runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": message}]))

            ev = Evaluation(gen, prompt_ids, tasks(), plan_specs, out_dir, max_tokens=MAX_TOKENS,
                            limits=FAST, fixed={"edge": edge_path.name}, progress=False)  # fmt: skip
            if fail_after is not None:
                calls = {"n": 0}
                one = ev.one

                async def failing(spec, task):
                    calls["n"] += 1
                    if calls["n"] > fail_after:
                        raise KeyboardInterrupt
                    return await one(spec, task)

                ev.one = failing  # type: ignore[method-assign]
            return await ev.run()
    finally:
        runner.close()


@pytest.fixture(scope="module")
def first_run(tiny_gguf_a, tiny_gguf_b, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return out, run(evaluate(tiny_gguf_a, tiny_gguf_b, out, specs()))


def by_run(rows):
    table: dict[str, dict[str, dict]] = {}
    for r in rows:
        table.setdefault(r["run"], {})[r["task_id"]] = r
    return table


def test_every_run_goes_through_its_mode(first_run):
    _, rows = first_run
    t = by_run(rows)
    assert set(t) == {"small", "large", "hybrid-tau0-n4", "hybrid-tau1e+09-n4"}
    assert all(len(v) == 4 for v in t.values())
    for task_id in t["small"]:
        small, large = t["small"][task_id], t["large"][task_id]
        never, always = t["hybrid-tau1e+09-n4"][task_id], t["hybrid-tau0-n4"][task_id]
        assert small["tokens"] > 0 and small["cloud_tokens"] == 0 and small["bytes_sent"] == 0
        assert large["cloud_tokens"] == large["tokens"] > 0 and large["check_points"] == 0
        # A cloud that never overrules: Q's own text, every window checked.
        assert never["output"] == small["output"] and never["cloud_tokens"] == never["corrected_tokens"] == 0
        assert never["check_points"] >= 1 and never["bytes_sent"] > 0
        # A cloud that overrules every position: P's own text (greedy), all of it from the cloud.
        assert always["output"] == large["output"]
        assert always["cloud_tokens"] + always["corrected_tokens"] == always["tokens"]
        assert always["handoffs"] >= 1
        for r in (small, large, never, always):
            assert isinstance(r["correct"], bool) and r["seconds"] > 0
            assert r["suite"] in ("arithmetic", "python", "ext")
    python = [r for r in rows if r["suite"] == "python"]
    statuses = ("passed", "failed", "syntax_error", "timeout", "crashed", "error")
    assert python and all(r["answer"] in statuses for r in python)


def test_oracle_counts_come_from_the_large_runs_traces(first_run):
    out, rows = first_run
    large = by_run(rows)["large"]
    lines = [json.loads(line) for line in (out / "traces" / "large.jsonl").read_text().splitlines()]
    headers = [i for i, rec in enumerate(lines) if rec["record"] == "generation"]
    assert len(headers) == 4
    for start, end in zip(headers, [*headers[1:], len(lines)], strict=True):
        task_id = lines[start]["task_id"]
        tokens = [rec for rec in lines[start:end] if rec["record"] == "token"]
        differ = sum(rec["q_topk_ids"][0] != rec["token_id"] for rec in tokens)
        assert large[task_id]["oracle_positions"] == differ
        assert len(tokens) == large[task_id]["tokens"]
        assert large[task_id]["prompt_key"] == prompt_key(
            lines[start]["prompt_ids"]
        )  # as a backfill reads it
    assert all(r["oracle_positions"] is None for r in rows if r["mode"] != "large")
    assert {p.name for p in (out / "traces").iterdir()} == {f"{n}.jsonl" for n in by_run(rows)}


def test_resuming_redoes_nothing_and_only_what_is_new(first_run, tiny_gguf_a, tiny_gguf_b, tmp_path):
    out, rows = first_run
    # Same plan: nothing runs (the failing wrapper would raise on the first generation).
    again = run(evaluate(tiny_gguf_a, tiny_gguf_b, out, specs(), fail_after=0))
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in rows)
    # A new threshold: only its 4 generations run.
    bigger = [*specs(), RunSpec("hybrid-tau0.5-n4", "hybrid", replace(specs()[-1].policy, threshold=0.5))]
    before = len(read_rows(out / "results.jsonl"))
    more = run(evaluate(tiny_gguf_a, tiny_gguf_b, out, bigger, fail_after=4))
    assert len(more) == 20 and len(read_rows(out / "results.jsonl")) == before + 4


def test_p_alone_is_not_redone_for_another_edge_policy_and_old_keys_still_resume(
    first_run, tiny_gguf_a, tiny_gguf_b, tmp_path
):
    from handoff.edge.evaluation.runner import row_key

    out, rows = first_run
    # Results written before this change keyed P alone's rows with the edge policy: rewrite them so.
    base = specs()[0].policy
    large = RunSpec("large", "large", base)
    fixed = Evaluation(None, None, tasks(), specs(), out, max_tokens=MAX_TOKENS, limits=FAST,  # type: ignore[arg-type]
                       fixed={"edge": tiny_gguf_b.name}, progress=False).fixed  # fmt: skip
    lines = []
    for r in read_rows(out / "results.jsonl"):
        if r["run"] == "large":
            task = next(t for t in tasks() if t.task_id == r["task_id"])
            assert r["key"] == row_key(large, task, fixed)
            r = r | {"key": row_key(large, task, fixed, legacy=True)}
            assert r["key"] != row_key(large, task, fixed)
        lines.append(json.dumps(r))
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    # The legacy-keyed rows resume under the policy they were written with (nothing runs).
    legacy = run(evaluate(tiny_gguf_a, tiny_gguf_b, tmp_path, specs()[:2], fail_after=0))
    assert sorted(r["output"] for r in legacy) == sorted(
        r["output"] for r in rows if r["mode"] in ("small", "large")
    )
    # Another edge policy (drafting ahead, another threshold): P alone and Q alone run nothing.
    other = replace(base, lookahead_windows=3, threshold=0.7)
    plan = [RunSpec("small", "small", other), RunSpec("large", "large", other)]
    again = run(evaluate(tiny_gguf_a, tiny_gguf_b, out, plan, fail_after=0))
    assert len(again) == 8 and {r["run"] for r in again} == {"small", "large"}


def test_an_interrupted_run_resumes_where_it_stopped(tiny_gguf_a, tiny_gguf_b, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(evaluate(tiny_gguf_a, tiny_gguf_b, tmp_path, specs(), fail_after=3))
    results = tmp_path / "results.jsonl"
    assert len(read_rows(results)) == 3
    with results.open("a") as f:
        f.write('{"run": "small", "cut short')  # a crash in the middle of a write
    rows = run(evaluate(tiny_gguf_a, tiny_gguf_b, tmp_path, specs(), fail_after=13))
    assert len(rows) == 16 and len({r["key"] for r in rows}) == 16


def test_eval_command_end_to_end(tiny_gguf_a, tiny_gguf_a_near, tmp_path, run_handoff):
    """`handoff eval` in its own process: an embedded verifier, the report, plots, resume, --report-only."""
    out = tmp_path / "eval"
    args = ["eval", "--edge", str(tiny_gguf_a_near), "--cloud-model", str(tiny_gguf_a), "--out", str(out),
            "--suites", "arithmetic,sorting", "--tasks", "2", "--thresholds", "0.01,5", "--intervals", "4",
            "--max-tokens", "10", "--no-progress"]  # fmt: skip

    def handoff(*a):
        return run_handoff(*a, env={"HANDOFF_THREADS": "1"})

    proc = handoff(*args)
    assert proc.returncode == 0, proc.stderr
    assert "handoff eval" in proc.stdout and "hybrid-tau0.01-n4" in proc.stdout
    for name in ("report.md", "summary.json", "rpi_vs_threshold.png", "frontier.png", "results.jsonl"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["tasks"] == 4 and summary["meta"]["runs"] == [
        "small", "large", "hybrid-tau0.01-n4", "hybrid-tau5-n4"
    ]  # fmt: skip
    assert set(summary["suites"]) == {"all", "arithmetic", "sorting"}
    report = (out / "report.md").read_text()
    assert "## arithmetic" in report and "oracle" in report and "--thresholds 0.01,5" in report
    n_rows = len(read_rows(out / "results.jsonl"))
    assert n_rows == 16
    # Again: resumed, nothing redone; the report rebuilt from the results alone.
    assert handoff(*args).returncode == 0
    assert len(read_rows(out / "results.jsonl")) == n_rows
    proc = handoff("eval", "--out", str(out), "--report-only")
    assert proc.returncode == 0, proc.stderr
    assert "16 rows" in proc.stdout
    # A clear error for a bad suite, before any model loads.
    bad = handoff("eval", "--suites", "poetry", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "poetry" in bad.stderr


@pytest.mark.real_models
@pytest.mark.slow
def test_eval_on_the_default_pair(tmp_path, run_handoff):
    """The default pair on two easy sorting tasks: P sorts them, the report pairs the three runs."""
    from handoff.shared.models import ensure_model
    from handoff.shared.settings import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL

    ensure_model(DEFAULT_EDGE_MODEL), ensure_model(DEFAULT_CLOUD_MODEL)
    out = tmp_path / "eval"
    proc = run_handoff("eval", "--out", out, "--suites", "sorting", "--tasks", "2", "--difficulty", "1",
                       "--thresholds", "0.3", "--max-tokens", "40", "--no-progress", timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = by_run(read_rows(out / "results.jsonl"))
    assert set(rows) == {"small", "large", "hybrid-tau0.3-n8"} and all(len(v) == 2 for v in rows.values())
    large = list(rows["large"].values())
    assert all(r["correct"] for r in large), [r["output"] for r in large]  # P sorts five numbers or words
    assert all(r["oracle_positions"] is not None for r in large)
    hybrid = list(rows["hybrid-tau0.3-n8"].values())
    assert all(r["check_points"] >= 1 and r["bytes_sent"] > 0 for r in hybrid)
    summary = json.loads((out / "summary.json").read_text())
    sorting = summary["by_suite"]["sorting"]
    assert (
        sorting["runs"]["large"]["cloud_fraction"] == 1.0
        and sorting["runs"]["small"]["cloud_fraction"] == 0.0
    )
    assert sorting["large_accuracy"] == 1.0


def test_eval_runs_every_policy(tiny_gguf_a, tiny_gguf_a_near, tmp_path, run_handoff):
    """`--policies`: exact, skip, budget and entropy runs beside the KL sweep, in the rows and the report."""
    # The skip run's gate: Q's top-1 probability is always above 1e-6 (V = 1022), so it uploads ids only.
    env = {"HANDOFF_THREADS": "1", "HANDOFF_EDGE_SKIP_TOP1_MIN": "1e-6"}
    out = tmp_path / "eval"
    proc = run_handoff(
        "eval", "--edge", tiny_gguf_a_near, "--cloud-model", tiny_gguf_a, "--out", out, "--suites", "arithmetic",
        "--tasks", "3", "--thresholds", "0.05", "--intervals", "4", "--max-tokens", "12", "--no-progress",
        "--policies", "exact,skip:0.05,budget:0.3,entropy:3", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = by_run(read_rows(out / "results.jsonl"))
    assert set(rows) == {
        "small",
        "large",
        "hybrid-tau0.05-n4",
        "exact",
        "skip-tau0.05",
        "budget0.3",
        "entropy-tau3",
    }
    assert {r["policy"] for v in rows.values() for r in v.values() if r["mode"] == "hybrid"} == {
        "kl", "exact", "skip", "budget", "entropy"
    }  # fmt: skip
    assert all(r["drafts"] >= 1 for r in rows["exact"].values())
    # Greedy exact mode writes P's text: the same answers as the large run.
    assert all(rows["exact"][t]["output"] == rows["large"][t]["output"] for t in rows["large"])
    # Every token the skip run uploaded went without Q's view (no view, no divergence: none was handed
    # back, so the uploads are the committed tokens); the KL sweep uploaded every view.
    skip = rows["skip-tau0.05"].values()
    assert all(r["handoffs"] == 0 and r["skipped_uploads"] == r["tokens"] > 0 for r in skip)
    assert all(r["skipped_uploads"] == 0 for r in rows["hybrid-tau0.05-n4"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert {r["run"]: r.get("policy") for r in summary["runs"]}["budget0.3"] == "budget"
    assert (out / "frontier.png").stat().st_size > 0
    bad = run_handoff("eval", "--policies", "magic", "--out", tmp_path / "b", timeout=120, env=env)
    assert bad.returncode == 2 and "magic" in bad.stderr


def test_the_answer_text_leaves_out_the_end_of_turn_of_either_vocabulary():
    from handoff.edge.records import GenerationResult, TokenRecord

    stop = 2  # Q's <|im_end|>; with another tokenizer on the edge, P's id 2 is the text "#"
    same = GenerationResult([], records=[TokenRecord(0, 5, "edge", text="x = 1"),
                                         TokenRecord(1, stop, "cloud", text="<|im_end|>")])  # fmt: skip
    assert same.answer_text([stop]) == "x = 1"
    cross = GenerationResult([], records=[TokenRecord(0, 2, "cloud", text="#", raw=b"#"),
                                          TokenRecord(1, 7, "edge", text=" ok"),
                                          TokenRecord(2, stop, "edge", text="<|im_end|>")])  # fmt: skip
    assert cross.answer_text([stop]) == "# ok"
    assert [r["token_id"] for r in cross.trace()] == [2, 7, 2] and "raw" not in cross.trace()[0]
