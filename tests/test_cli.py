"""The `handoff` command as a user runs it: a real process, clear errors, no tracebacks."""

from __future__ import annotations

import json
import logging

import pytest


def test_help_lists_the_subcommands(run_handoff):
    proc = run_handoff("--help")
    assert proc.returncode == 0
    assert "models" in proc.stdout and "divergence" in proc.stdout


def test_models_list_json(tmp_path, run_handoff):
    proc = run_handoff("models", "list", "--json", env={"HANDOFF_CACHE_DIR": str(tmp_path)})
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
def test_user_mistakes_are_one_clear_line(tmp_path, args, message, run_handoff):
    proc = run_handoff(*args, env={"HANDOFF_CACHE_DIR": str(tmp_path), "COLUMNS": "300"})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_corrupt_gguf_is_reported_without_traceback(tmp_path, run_handoff):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)  # right magic, garbage header
    proc = run_handoff("models", "info", str(bad), env={"HANDOFF_CACHE_DIR": str(tmp_path), "COLUMNS": "300"})
    assert proc.returncode == 2
    assert "is not a readable GGUF file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_option_value_is_a_usage_error(tmp_path, run_handoff):
    proc = run_handoff("divergence", "--max-tokens", "0", env={"HANDOFF_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "max-tokens" in proc.stderr


def test_bad_global_option_is_a_usage_error(tmp_path, run_handoff):
    proc = run_handoff("--log-level", "loud", "models", "list", env={"HANDOFF_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 2
    assert "'--log-level'" in proc.stderr and "unknown log level" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_llama_cpp_log_is_hidden_unless_verbose(tiny_gguf_a, tiny_gguf_a_near, run_handoff):
    """llama.cpp's loader notes and warnings (e.g. the context longer than trained) stay off the terminal."""
    args = (
        "generate",
        "--edge",
        str(tiny_gguf_a_near),
        "--cloud-model",
        str(tiny_gguf_a),
        "--max-tokens",
        "4",
    )
    env = {"HANDOFF_THREADS": "1", "COLUMNS": "300"}
    quiet = run_handoff(*args, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "llama_" not in quiet.stderr and "n_ctx_train" not in quiet.stderr, quiet.stderr
    loud = run_handoff("--verbose", *args, env=env)
    assert loud.returncode == 0, loud.stderr
    assert "llama.cpp: llama_model_loader" in loud.stderr and "n_ctx_train" in loud.stderr


def test_native_log_lines_become_records_at_their_level(caplog):
    from handoff.shared import llama_cpp_model
    from handoff.shared.logs import NATIVE_LOGGER, show_native_logs

    native = logging.getLogger(NATIVE_LOGGER)
    before = native.level
    try:
        show_native_logs(True)
        with caplog.at_level(logging.DEBUG, logger=NATIVE_LOGGER):
            llama_cpp_model._on_native_log(3, b"load: control-looking token ")  # ggml WARN
            llama_cpp_model._on_native_log(5, b"was not control-type\n")  # CONT: the same line
            llama_cpp_model._on_native_log(2, b"an info line\nanother\n")
        records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == NATIVE_LOGGER]
        assert records == [
            (logging.WARNING, "load: control-looking token was not control-type"),
            (logging.INFO, "an info line"),
            (logging.INFO, "another"),
        ]
        caplog.clear()
        show_native_logs(False)  # the command line's default
        llama_cpp_model._on_native_log(4, b"an error line\n")
        assert not [r for r in caplog.records if r.name == NATIVE_LOGGER]
    finally:
        native.setLevel(before)
