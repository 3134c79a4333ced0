"""Options generated from the settings classes: every field is a flag, flag > environment > default.

The commands run in-process up to the point where they would load a model: Assistant, evaluate and
serve are replaced by stand-ins that capture the settings they were given and stop the command.
"""

from __future__ import annotations

import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import typer

from handoff.cli import app, main
from handoff.cloud.settings import CloudSettings
from handoff.edge.policy import policy_kinds
from handoff.edge.settings import EdgeSettings, ServeSettings
from handoff.shared.cli_options import settings_flags
from handoff.shared.logs import NATIVE_LOGGER

EDGE_COMMANDS = ("generate", "chat", "serve-edge", "eval")

# Flags users had before the options were generated: each must keep working.
LEGACY_EDGE_FLAGS = (
    "--cloud", "--edge-only", "--cloud-only", "--policy", "--threshold", "--check-interval",
    "--handback-tokens", "--agree-tokens", "--seed-tokens", "--aggregation", "--top-k", "--lookahead",
    "--trigger", "--skip", "--budget", "--draft-tokens", "--check-timeout", "--inject-rtt-ms", "--n-ctx",
)  # fmt: skip
LEGACY_SERVE_FLAGS = (
    "--host", "--port", "--api-key", "--max-queue", "--model-alias", "--default-max-tokens", "--cors-origin",
)  # fmt: skip
LEGACY_CLOUD_FLAGS = (
    "--model", "--backend", "--device", "--dtype", "--host", "--port", "--threads", "--max-sessions",
    "--max-context", "--tls-cert", "--tls-key", "--metrics-port",
)  # fmt: skip


class Captured(Exception):
    """Raised by the stand-ins with what the command passed them."""

    def __init__(self, **seen: Any) -> None:
        super().__init__("captured")
        self.seen = seen


@pytest.fixture
def stand_ins(monkeypatch):
    """No model loads: the edge's Assistant, eval's evaluate and the servers capture and stop."""
    import handoff.cloud.grpc_server
    import handoff.edge.assistant
    import handoff.edge.evaluation.main
    import handoff.edge.openai_server

    class FakeAssistant:
        def __init__(self, settings, edge_settings, **kw):
            raise Captured(edge_settings=edge_settings, **kw)

    def fake_evaluate(plan, settings, edge_settings, out_dir, **kw):
        raise Captured(plan=plan, edge_settings=edge_settings, **kw)

    def fake_serve_edge(settings, edge_settings, serve_settings, **kw):
        raise Captured(edge_settings=edge_settings, serve_settings=serve_settings)

    def fake_serve_cloud(settings, load, **kw):
        raise Captured(cloud_settings=settings)

    monkeypatch.setattr(handoff.edge.assistant, "Assistant", FakeAssistant)
    monkeypatch.setattr(handoff.edge.evaluation.main, "evaluate", fake_evaluate)
    monkeypatch.setattr(handoff.edge.openai_server, "serve", fake_serve_edge)
    monkeypatch.setattr(handoff.cloud.grpc_server, "serve", fake_serve_cloud)
    for name in os.environ:  # a developer's own settings must not leak into the defaults
        if name.startswith(("HANDOFF_EDGE_", "HANDOFF_SERVE_", "HANDOFF_CLOUD_")) and name not in (
            "HANDOFF_EDGE_MODEL",
            "HANDOFF_CLOUD_MODEL",
        ):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures logging for the process: put the test runner's back afterwards."""
    root, native = logging.getLogger(), logging.getLogger(NATIVE_LOGGER)
    handlers, level, native_level = root.handlers[:], root.level, native.level
    yield
    root.handlers[:], root.level = handlers, level
    native.setLevel(native_level)


def run(*args: str) -> dict[str, Any]:
    """What the command handed to the stand-in; fails if it exited instead."""
    with pytest.raises(Captured) as info:
        rc = main(list(args))
        pytest.fail(f"handoff {' '.join(args)} exited with {rc} before loading a model")
    return info.value.seen


def edge_run(command: str, *flags: str, tmp_path: Path | None = None) -> dict[str, Any]:
    extra = ("--out", str(tmp_path / "eval"), "--suites", "sorting") if command == "eval" else ()
    return run(command, *extra, *flags)


def option_names(command: str) -> set[str]:
    group = typer.main.get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    return {name for p in params for name in (*p.opts, *p.secondary_opts)}


def other_value(info, default: Any, tmp_path: Path, name: str = "") -> Any:
    """A valid value of a field that differs from its default (bounds respected)."""
    if name == "policy":  # a registered kind (checked against the registry, not a Literal)
        return next(k for k in policy_kinds() if k != default)
    annotation = info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        return next(c for c in typing.get_args(annotation) if c != default)
    if annotation is bool:
        return not default
    if annotation is Path:
        return tmp_path / "file.pem"
    if annotation is str:
        return "127.0.0.1:1"
    if annotation is int:
        return (default or 0) + 1
    value = round((default or 0.0) + 0.1, 6)
    high = min((m.le if hasattr(m, "le") else m.lt for m in info.metadata if hasattr(m, "le") or hasattr(m, "lt")),
               default=None)  # fmt: skip
    return default / 2 if high is not None and value >= high else value


def as_flag(field: str, value: Any) -> list[str]:
    flag = "--" + field.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else f"--no-{flag[2:]}"]
    return [flag, str(value)]


# ---------------------------------------------------------------------------------------------
# every field is a flag


@pytest.mark.parametrize("command", EDGE_COMMANDS)
def test_every_edge_setting_is_a_flag_of_every_edge_command(command):
    names = option_names(command)
    for field in EdgeSettings.model_fields:
        assert "--" + field.replace("_", "-") in names, (command, field)
    for field, flags in settings_flags(EdgeSettings).items():
        assert set(flags) <= names, (command, field, flags)
    assert set(LEGACY_EDGE_FLAGS) <= names, set(LEGACY_EDGE_FLAGS) - names


def test_serve_settings_and_cloud_settings_are_flags():
    serve, cloud = option_names("serve-edge"), option_names("serve-cloud")
    for field in ServeSettings.model_fields:
        assert "--" + field.replace("_", "-") in serve, field
    for field in CloudSettings.model_fields:
        assert "--" + field.replace("_", "-") in cloud, field
    assert set(LEGACY_SERVE_FLAGS) <= serve and set(LEGACY_CLOUD_FLAGS) <= cloud


def test_no_command_has_a_flag_twice():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        if not hasattr(command, "params"):
            continue
        opts = [o for p in command.params for o in (*p.opts, *p.secondary_opts)]
        assert len(opts) == len(set(opts)), (name, sorted(o for o in opts if opts.count(o) > 1))


@pytest.mark.parametrize("command", EDGE_COMMANDS)
def test_help_lists_every_edge_flag(command, run_handoff):
    proc = run_handoff(command, "--help", env={"COLUMNS": "400"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for field in EdgeSettings.model_fields:
        assert "--" + field.replace("_", "-") in proc.stdout, (command, field)
    assert "HANDOFF_EDGE_" in proc.stdout  # the panel says where else the settings come from


# ---------------------------------------------------------------------------------------------
# each flag has its effect; precedence flag > environment > default


@pytest.mark.parametrize("command", EDGE_COMMANDS)
def test_every_edge_flag_reaches_the_settings(command, stand_ins, tmp_path):
    fields = {
        name: other_value(info, info.get_default(call_default_factory=True), tmp_path, name)
        for name, info in EdgeSettings.model_fields.items()
        if not (command == "eval" and name == "mode")  # eval chooses the mode per run
    }
    flags = [arg for name, value in fields.items() for arg in as_flag(name, value)]
    got = edge_run(command, *flags, tmp_path=tmp_path)["edge_settings"]
    for name, value in fields.items():
        assert getattr(got, name) == value, (command, name)


@pytest.mark.parametrize("command", EDGE_COMMANDS)
def test_environment_applies_without_a_flag_and_a_flag_wins(command, stand_ins, monkeypatch, tmp_path):
    monkeypatch.setenv("HANDOFF_EDGE_CHECK_INTERVAL", "5")
    monkeypatch.setenv("HANDOFF_EDGE_THRESHOLD", "0.7")
    monkeypatch.setenv("HANDOFF_EDGE_LOOKAHEAD_WINDOWS", "3")
    # --threshold 0.2 is the default: given, it still beats the environment.
    got = edge_run(command, "--threshold", "0.2", "--lookahead", "0", tmp_path=tmp_path)["edge_settings"]
    assert got.check_interval == 5  # environment, no flag
    assert got.threshold == 0.2 and got.lookahead_windows == 0  # flags over the environment
    assert got.handback_tokens == EdgeSettings.model_fields["handback_tokens"].default  # neither


@pytest.mark.parametrize("command", EDGE_COMMANDS)
def test_legacy_flag_names_still_work(command, stand_ins, tmp_path):
    got = edge_run(command, "--lookahead", "2", "--check-timeout", "3.5", tmp_path=tmp_path)["edge_settings"]
    assert got.lookahead_windows == 2 and got.check_timeout_s == 3.5


@pytest.mark.parametrize("command", ("generate", "chat", "serve-edge"))
def test_mode_switches(command, stand_ins):
    assert run(command, "--edge-only")["edge_settings"].mode == "edge"
    assert run(command, "--cloud-only")["edge_settings"].mode == "cloud"
    assert run(command, "--mode", "cloud")["edge_settings"].mode == "cloud"
    assert run(command)["edge_settings"].mode == "hybrid"


def test_serve_edge_http_flags_and_environment(stand_ins, monkeypatch):
    monkeypatch.setenv("HANDOFF_SERVE_MAX_QUEUE", "3")
    monkeypatch.setenv("HANDOFF_SERVE_PORT", "9000")
    seen = run("serve-edge", "--cors-origin", "http://a", "--cors-origin", "http://b", "--port", "0")
    serve = seen["serve_settings"]
    assert serve.cors_origins == ["http://a", "http://b"] and serve.port == 0 and serve.max_queue == 3


def test_serve_cloud_flags_and_environment(stand_ins, monkeypatch):
    monkeypatch.setenv("HANDOFF_CLOUD_MAX_SESSIONS", "7")
    monkeypatch.setenv("HANDOFF_CLOUD_PORT", "9001")
    got = run("serve-cloud", "--port", "0", "--no-kv-unified", "--batch-wait-s", "0.01")["cloud_settings"]
    assert got.max_sessions == 7 and got.port == 0 and got.kv_unified is False and got.batch_wait_s == 0.01


def test_eval_flags_set_the_base_policy_and_sweeps_set_tau_and_n(stand_ins, tmp_path):
    seen = edge_run(
        "eval", "--threshold", "0.05", "--policy", "seed", "--thresholds", "0.4,0.9", tmp_path=tmp_path
    )
    assert seen["edge_settings"].threshold == 0.05 and seen["edge_settings"].policy == "seed"
    assert seen["plan"].thresholds == (0.4, 0.9)


# ---------------------------------------------------------------------------------------------
# clear errors


def usage(capsys, *args: str) -> str:
    rc = main(list(args))
    captured = capsys.readouterr()
    assert rc == 2, (args, captured.err)
    assert "Traceback" not in captured.err + captured.out
    return " ".join(captured.err.split())  # rich wraps long lines


@pytest.mark.parametrize("command", EDGE_COMMANDS)
def test_a_bad_flag_value_names_the_flag(command, stand_ins, capsys, tmp_path):
    extra = ("--out", str(tmp_path / "eval")) if command == "eval" else ()
    text = usage(capsys, command, *extra, "--check-interval", "0")
    assert "'--check-interval'" in text and "greater than or equal to 1" in text
    text = usage(capsys, command, *extra, "--lookahead", "-1")
    assert "'--lookahead-windows' / '--lookahead'" in text
    text = usage(capsys, command, *extra, "--threshold", "abc")
    assert "'--threshold'" in text
    text = usage(capsys, command, *extra, "--policy", "magic")
    assert "'--policy'" in text


@pytest.mark.parametrize("command", EDGE_COMMANDS)
def test_a_bad_environment_value_names_the_variable(command, stand_ins, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HANDOFF_EDGE_TOP_K", "0")
    extra = ("--out", str(tmp_path / "eval")) if command == "eval" else ()
    text = usage(capsys, command, *extra)
    assert "HANDOFF_EDGE_TOP_K" in text and "greater than or equal to 1" in text


def test_settings_checked_across_fields_before_a_model_loads(stand_ins, capsys):
    text = usage(capsys, "generate", "--draft-tokens", "20")
    assert "draft_tokens" in text


def test_conflicting_mode_flags(stand_ins, capsys):
    assert "--edge-only and --cloud-only exclude each other" in usage(
        capsys, "generate", "--edge-only", "--cloud-only"
    )
    assert "exclude each other" in usage(capsys, "generate", "--mode", "hybrid", "--edge-only")


def test_eval_refuses_a_mode_other_than_hybrid(stand_ins, capsys, tmp_path):
    for flag in ("--edge-only", "--cloud-only"):
        text = usage(capsys, "eval", "--out", str(tmp_path), "--suites", "sorting", flag)
        assert "eval runs small-only, large-only and hybrid itself" in text


def test_serve_edge_bad_value_names_flag_and_setting(stand_ins, capsys):
    text = usage(capsys, "serve-edge", "--max-queue", "-1")
    assert "'--max-queue'" in text and "max_queue" in text


# ---------------------------------------------------------------------------------------------
# eval --suites none


def test_eval_suites_none_runs_only_the_jsonl_suites(stand_ins, tmp_path):
    suite = tmp_path / "mine.jsonl"
    suite.write_text('{"id": "t1", "prompt": "2+2?", "answer": "4"}\n')
    plan = run("eval", "--out", str(tmp_path / "out"), "--suites", "none", "--jsonl", str(suite))["plan"]
    assert plan.suites == () and plan.jsonl == (suite,)


def test_eval_suites_none_without_jsonl_is_a_usage_error(stand_ins, capsys, tmp_path):
    assert "no tasks" in usage(capsys, "eval", "--out", str(tmp_path), "--suites", "none")
    assert "unknown suite(s) nope" in usage(capsys, "eval", "--out", str(tmp_path), "--suites", "nope")
