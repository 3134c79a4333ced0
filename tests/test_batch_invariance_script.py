"""scripts/batch_invariance.py: its mechanics and output on the tiny model, and its verdict logic.

With deterministic mode on, a session's answers must not depend on what else the server runs: the
script must report the tiny model's sessions identical alone and together, and exit 0.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from handoff.edge.cloud_harness import llama_backend_factory, run, running_server

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "batch_invariance.py"
SUMMARY_KEYS = {
    "sessions", "sessions_differing", "max_top1_diff", "top1_changes", "sessions_with_top1_changes",
    "views_differing", "tokens_differing", "repeat_identical", "repeat_max_top1_diff", "max_batch_together",
    "alone_s", "together_s", "identical",
}  # fmt: skip
ROW_KEYS = {
    "session", "prompt_tokens", "max_top1_diff", "top1_changes", "views_equal", "tokens_equal",
    "batch_alone", "batch_other", "tokens_alone", "tokens_other", "identical",
}  # fmt: skip


@pytest.fixture(scope="module")
def script():
    """The script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("batch_invariance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.mark.e2e  # the script in a real process
def test_both_modes_on_the_tiny_model(tiny_gguf_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "invariance.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_gguf_a), "--sessions", "3", "--threads", "1",
         "--deterministic", "both", "--prompts", "both", "--json-out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(s["deterministic_requested"], s["backend"]) for s in result["servers"]] == [
        (True, "llama.cpp"),
        (False, "llama.cpp"),
    ]
    runs = {(r["deterministic"], r["prompts"]): r for r in result["runs"]}
    assert set(runs) == {("on", "natural"), ("on", "random"), ("off", "natural"), ("off", "random")}
    for run_ in runs.values():
        assert set(run_["summary"]) == SUMMARY_KEYS
        assert len(run_["rows"]) == 3 and all(set(row) == ROW_KEYS for row in run_["rows"])
        assert run_["summary"]["max_batch_together"] > 1  # the sessions really shared forward passes
        assert all(row["batch_alone"] == 1 for row in run_["rows"])
        assert all(len(row["tokens_alone"]) == 4 for row in run_["rows"])  # handoffs of 4 tokens
        assert run_["repeat"]["session"] == 0
    # Deterministic mode: bit-identical alone, together and alone again.
    for prompts in ("natural", "random"):
        summary = runs[("on", prompts)]["summary"]
        assert summary["identical"] and summary["max_top1_diff"] == 0.0, runs[("on", prompts)]
    assert result["verdict"].startswith("OK — deterministic on: identical in all 6 sessions")
    assert result["failed"] is False
    # The printed report: a table per run and the verdict line.
    assert proc.stdout.count("generated alone → together") == 4
    assert proc.stdout.count("repeat (session 0 alone again)") == 4
    assert proc.stdout.rstrip().splitlines()[-1] == f"verdict: {result['verdict']}"


def test_against_a_running_server(script, tiny_gguf_a: Path, tmp_path: Path, capsys) -> None:
    """--cloud: the same measurement over a server started elsewhere (here: the harness's)."""
    out = tmp_path / "remote.json"

    async def scenario() -> int:
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, _):
            return await script.main(
                ["--cloud", f"127.0.0.1:{server.port}", "--tokenizer", str(tiny_gguf_a), "--sessions", "2",
                 "--prompts", "natural", "--template", "raw", "--json-out", str(out)]
            )  # fmt: skip

    status = run(scenario())
    result = json.loads(out.read_text())
    assert status == 0, capsys.readouterr().out
    assert result["servers"][0]["cloud"].startswith("127.0.0.1:")
    ((key, summary),) = [((r["deterministic"], r["prompts"]), r["summary"]) for r in result["runs"]]
    assert key == ("on", "natural") and summary["sessions"] == 2 and summary["identical"]
    assert "deterministic on (as the server reports)" in capsys.readouterr().out


def _summary(differing: int, repeat: bool = True) -> dict:
    return {
        "sessions": 4, "sessions_differing": differing, "max_top1_diff": 0.1 * differing,
        "sessions_with_top1_changes": differing, "tokens_differing": 0, "repeat_identical": repeat,
    }  # fmt: skip


def test_verdict_fails_only_where_deterministic_mode_differs(script) -> None:
    ok, failed = script.verdict([{"deterministic": "on", "summary": _summary(0)}])
    assert not failed and ok == "OK — deterministic on: identical in all 4 sessions and the repeats"
    line, failed = script.verdict(
        [{"deterministic": "on", "summary": _summary(0)}, {"deterministic": "off", "summary": _summary(3)}]
    )
    assert not failed and "deterministic off: 3/4 sessions differ (max |Δ top-1| 0.3 nats" in line
    line, failed = script.verdict([{"deterministic": "on", "summary": _summary(1)}])
    assert failed and line.startswith("FAIL — deterministic on: 1/4 sessions differ")
    line, failed = script.verdict([{"deterministic": "on", "summary": _summary(0, repeat=False)}])
    assert failed and "even a session alone twice differs" in line


def test_compare_counts_differences(script) -> None:
    def outcome(top1: float, top1_id: int, tokens: list[int]):
        return script.Outcome(
            check_ids=[[5, 6], [top1_id, 7]], check_logprobs=[[-0.5, -1.0], [top1, -2.0]],
            token_logprobs=[-0.5, -3.0], generated=tokens, generated_ids=[[1]] * len(tokens),
            generated_logprobs=[[-0.1]] * len(tokens), batch_size=1, done="REASON_MAX_TOKENS",
        )  # fmt: skip

    prompt = script.Prompt(ids=[1, 2, 3], append=[4, 5])
    same = script.compare(0, prompt, outcome(-0.25, 8, [1, 2]), outcome(-0.25, 8, [1, 2]))
    assert same.identical and same.max_top1_diff == 0 and same.top1_changes == 0
    other = script.compare(1, prompt, outcome(-0.25, 8, [1, 2]), outcome(-0.5, 9, [1, 3]))
    assert not other.views_equal and not other.tokens_equal and not other.identical
    assert other.max_top1_diff == 0.25 and other.top1_changes == 1 and other.prompt_tokens == 3


def test_options(script) -> None:
    assert script.parse_args([]).deterministic == "both"
    assert script.parse_args(["--cloud", "127.0.0.1:1"]).deterministic == "on"
    assert script.parse_args(["--sessions", "64,16,16"]).sessions == [16, 64]
    with pytest.raises(SystemExit):
        script.parse_args(["--cloud", "127.0.0.1:1", "--deterministic", "both"])
    with pytest.raises(SystemExit):
        script.parse_args(["--sessions", "0"])
