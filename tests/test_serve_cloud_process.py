"""`handoff serve-cloud` as an operator runs it: a separate process, a real port, SIGTERM to drain."""

from __future__ import annotations

import signal

import pytest

from handoff.edge.cloud_harness import run, score_all, start_server, vocabulary_of
from handoff.edge.verifier_client import GrpcTransport, VerifierClient

PROMPT = [1001, 872, 198, 9, 10, 11, 1002, 198, 1001, 77, 198]


@pytest.mark.e2e  # a real serve-cloud process (started by the harness, not run_handoff)
def test_serve_cloud_process_serves_and_drains_on_sigterm(tiny_gguf_a):
    vocab = vocabulary_of(tiny_gguf_a)
    proc, port = start_server(tiny_gguf_a, env={"HANDOFF_CLOUD_AUTH_TOKEN": "t0k"})
    try:

        async def scenario():
            client = VerifierClient(GrpcTransport(f"127.0.0.1:{port}", auth_token="t0k"))
            info = await client.info()
            s = await client.open_session(PROMPT, vocab, top_k=8)
            scores = await score_all(s, len(PROMPT), list(range(400, 412)), [4, 8])
            await s.close()
            await client.close()
            return info, scores

        info, scores = run(scenario())
        assert (
            info.backend == "llama.cpp" and info.limits.max_sessions == 4 and info.limits.max_context == 512
        )
        assert len(scores) == 12
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        logs = proc.stderr.read()
        assert '"message": "stopped"' in logs  # structured JSON logs, drained cleanly
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_cloud_bad_model_is_one_clear_line(tmp_path, run_handoff):
    proc = run_handoff("serve-cloud", "--model", tmp_path / "nope.gguf", "--port", "0", timeout=120)
    assert proc.returncode == 2
    assert "no model" in proc.stderr and "Traceback" not in proc.stderr
