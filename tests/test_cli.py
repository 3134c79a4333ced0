"""The `handoff` command as a user runs it: a real process, clear errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def handoff(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "handoff", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_the_subcommands():
    proc = handoff("--help")
    assert proc.returncode == 0
    assert "models" in proc.stdout and "divergence" in proc.stdout


def test_models_list_json(tmp_path):
    proc = handoff("models", "list", "--json", env={"HANDOFF_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["qwen2.5-coder-0.5b-instruct-q4_k_m"]["role"] == "edge"
    assert rows["qwen2.5-coder-1.5b-instruct-q4_k_m"]["fetched"] is False  # empty cache


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("models", "info", "/no/such/model.gguf"), "no model '/no/such/model.gguf'"),
        (("models", "fetch", "no-such-model"), "unknown model 'no-such-model'; known models:"),
        (("models", "verify"), "no model is fetched yet"),
        (("divergence", "--edge", "/no/such.gguf"), "no model '/no/such.gguf'"),
    ],
)
def test_user_mistakes_are_one_clear_line(tmp_path, args, message):
    proc = handoff(*args, env={"HANDOFF_CACHE_DIR": str(tmp_path), "COLUMNS": "300"})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_corrupt_gguf_is_reported_without_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)  # right magic, garbage header
    proc = handoff("models", "info", str(bad), env={"HANDOFF_CACHE_DIR": str(tmp_path), "COLUMNS": "300"})
    assert proc.returncode == 2
    assert "is not a readable GGUF file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_option_value_is_a_usage_error(tmp_path):
    proc = handoff("divergence", "--max-tokens", "0", env={"HANDOFF_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "max-tokens" in proc.stderr
