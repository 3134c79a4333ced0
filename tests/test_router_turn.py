"""The router with a longer turn at a gated correction (PolicyConfig.router_turn): P writes on for up
to M tokens, a handoff, instead of the one correcting token."""

from __future__ import annotations

from pathlib import Path

import pytest

from handoff.edge.cloud_harness import generate_with_server
from handoff.edge.evaluation.runner import variant_spec
from handoff.edge.policy import PolicyConfig
from handoff.shared.errors import ShapeError
from tests.test_override_gate import check_all_router, one_feature_gate


def test_a_longer_turn_writes_ps_greedy_text_with_fewer_overrides(
    tmp_path: Path, tiny_gguf_a, tiny_gguf_b
) -> None:
    from handoff.edge.cloud_harness import vocabulary_of

    fp = vocabulary_of(tiny_gguf_b).fingerprint
    path = tmp_path / "all.json"
    check_all_router(fp.digest.hex(), fp.vocab_size, one_feature_gate("log_offset", -1e6)).save(path)
    runs = {
        m: generate_with_server(
            tiny_gguf_a, tiny_gguf_b, PolicyConfig(kind="router", router=str(path), router_turn=m), 60
        )
        for m in (1, 4)
    }
    cloud = generate_with_server(tiny_gguf_a, tiny_gguf_b, PolicyConfig(), 60, mode="cloud")
    one, four = runs[1], runs[4]
    # Every disagreement taken: P's greedy text either way (greedy P writes its argmax in a turn too).
    assert one.tokens == cloud.tokens and four.tokens == cloud.tokens
    assert one.counts()["cloud"] == 0 and one.handoffs == 0  # corrections placed in place
    acc = four.accounting()
    assert four.handoffs > 0 and acc["other_cloud_tokens"] > 0
    assert acc["override_tokens"] == four.handoffs  # one override per turn, the rest P's own
    assert acc["override_tokens"] < one.accounting()["override_tokens"]


def test_router_turn_is_checked_and_named() -> None:
    with pytest.raises(ShapeError, match="router_turn"):
        PolicyConfig(router_turn=0)
    base = PolicyConfig(router="docs/router/r.json", lookahead_windows=1, defer_checks=True, router_turn=4)
    assert variant_spec("router", base).name == "router-r-ahead1-defer-turn4"
