"""The wire contract: committed code matches the .proto, and every message the protocol needs exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from handoff.shared.errors import ShapeError
from handoff.shared.wire import PROTOCOL_VERSION, pb, pb_grpc, topk_from_proto, topk_to_proto

ROOT = Path(__file__).resolve().parent.parent


def test_committed_code_matches_the_proto():
    proc = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_drift_is_detected(tmp_path):
    """The check really compares: a changed .proto makes it fail."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    shutil.copytree(
        ROOT / "shared" / "wire", copy / "shared" / "wire", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(ROOT / "scripts", copy / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    proto = copy / "proto" / "handoff" / "v1" / "handoff.proto"
    proto.write_text(proto.read_text().replace("message Close {}", "message Close { uint32 reason = 1; }"))
    proc = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"], cwd=copy, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "handoff_pb2.py" in proc.stdout


def test_package_and_service():
    assert PROTOCOL_VERSION == "handoff.v1"
    assert pb.DESCRIPTOR.package == "handoff.v1"
    service = pb.DESCRIPTOR.services_by_name["Verifier"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"GetInfo": (False, False), "Session": (True, True)}
    assert hasattr(pb_grpc, "VerifierStub") and hasattr(pb_grpc, "add_VerifierServicer_to_server")


def test_every_session_step_has_a_message():
    edge = {f.name for f in pb.EdgeMessage.DESCRIPTOR.oneofs_by_name["body"].fields}
    cloud = {f.name for f in pb.CloudMessage.DESCRIPTOR.oneofs_by_name["body"].fields}
    assert edge == {
        "open",
        "append",
        "append_text",
        "check",
        "handoff",
        "stop",
        "rollback",
        "verify",
        "close",
    }
    assert cloud == {
        "opened",
        "appended",
        "check",
        "token",
        "handoff_done",
        "rolled_back",
        "verified",
        "closed",
    }
    kinds = set(pb.PolicyKind.keys())
    assert {"POLICY_KIND_SEED", "POLICY_KIND_ROLLBACK", "POLICY_KIND_EXACT", "POLICY_KIND_SKIP"} <= kinds


def test_a_session_round_trips():
    msgs = [
        pb.EdgeMessage(
            request_id=1,
            open=pb.OpenSession(
                prompt_token_ids=[151644, 872, 198],
                top_k=20,
                protocol_version=PROTOCOL_VERSION,
                sampling=pb.SamplingParams(temperature=0.7, top_p=0.9, seed=0, has_seed=True),
                policy=pb.Policy(
                    kind=pb.POLICY_KIND_ROLLBACK, check_interval=8, threshold=0.5, aggregation="max"
                ),
            ),
        ),
        pb.EdgeMessage(
            request_id=2,
            append=pb.AppendTokens(
                tokens=[
                    pb.EdgeToken(
                        position=3,
                        token_id=40,
                        topk=topk_to_proto(np.array([40, 41]), np.array([-0.1, -2.4])),
                        has_distribution=True,
                    ),
                    pb.EdgeToken(position=4, token_id=7, has_distribution=False),  # skip policy: ids only
                ]
            ),
        ),
        pb.EdgeMessage(request_id=3, check=pb.CheckPoint(from_position=3, through_position=4)),
        pb.EdgeMessage(request_id=4, rollback=pb.Rollback(length=4)),
        pb.EdgeMessage(request_id=5, handoff=pb.Handoff(max_tokens=16)),
        pb.EdgeMessage(request_id=6, close=pb.Close()),
    ]
    for m in msgs:
        assert pb.EdgeMessage.FromString(m.SerializeToString()) == m
    answer = pb.CloudMessage(
        request_id=3,
        check=pb.CheckPointResult(
            scores=[
                pb.PositionScore(
                    position=3,
                    topk=topk_to_proto(np.array([40, 9]), np.array([-0.3, -1.5])),
                    logprobs_at_edge_topk=[-0.3, -4.0],
                    token_logprob=-0.3,
                ),
            ]
        ),
    )
    assert pb.CloudMessage.FromString(answer.SerializeToString()) == answer


def test_topk_conversion_checks_its_input():
    ids, lp = topk_from_proto(topk_to_proto(np.array([5, 2, 9]), np.array([-0.5, -1.0, -3.0])), vocab_size=10)
    assert ids.tolist() == [5, 2, 9] and np.allclose(lp, [-0.5, -1.0, -3.0])
    with pytest.raises(ShapeError, match="2 ids but 1 log-probabilities"):
        topk_from_proto(pb.TopK(ids=[1, 2], logprobs=[-1.0]))
    with pytest.raises(ShapeError, match=r"outside \[0, 10\): \[12\]"):
        topk_from_proto(pb.TopK(ids=[1, 12], logprobs=[-1.0, -2.0]), vocab_size=10)
    with pytest.raises(ShapeError, match="must be <= 0"):
        topk_from_proto(pb.TopK(ids=[1], logprobs=[0.5]))
    with pytest.raises(ShapeError, match="expected ids"):
        topk_to_proto(np.array([[1, 2]]), np.array([[-1.0, -2.0]]))


def test_uplink_size_of_one_token_with_top20():
    """About 170 bytes per streamed token at k=20 (ids as varints, float32 log-probabilities)."""
    ids = np.arange(150_000, 150_020)
    tok = pb.EdgeToken(
        position=1000,
        token_id=150_000,
        topk=topk_to_proto(ids, -np.linspace(0.01, 9, 20)),
        has_distribution=True,
    )
    size = len(tok.SerializeToString())
    assert 20 * 4 < size < 20 * (4 + 3) + 32
