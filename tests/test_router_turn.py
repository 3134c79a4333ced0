"""The router with a longer turn at a gated correction (PolicyConfig.router_turn, or the router file's
turn): P writes on for up to M tokens, a handoff, instead of the one correcting token."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from handoff.edge.cloud_harness import generate_with_server
from handoff.edge.evaluation.runner import variant_spec
from handoff.edge.policy import PolicyConfig, RouterModel
from handoff.edge.policy.router import RouterMismatch, RouterPolicy
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
    # A file calibrated for a turn of 4 runs it without the flag, as the flag does.
    file4 = tmp_path / "all-turn4.json"
    replace(RouterModel.from_json(json.loads(path.read_text())), turn=4).save(file4)
    from_file = generate_with_server(
        tiny_gguf_a, tiny_gguf_b, PolicyConfig(kind="router", router=str(file4)), 60
    )
    counts = ("override_tokens", "other_cloud_tokens", "checked_positions", "round_trips")
    assert from_file.tokens == runs[4].tokens
    assert [from_file.accounting()[c] for c in counts] == [runs[4].accounting()[c] for c in counts]
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
    assert variant_spec("router", replace(base, router_turn=None)).name == "router-r-ahead1-defer"


def test_the_router_file_records_its_turn_and_the_flag_replaces_it(tmp_path: Path) -> None:
    model = check_all_router("00" * 32, 10, one_feature_gate("log_offset", -1e6))
    assert model.turn == 1 and "turn" not in model.to_json()  # files before turns read as 1
    path = tmp_path / "r.json"
    replace(model, turn=4).save(path)
    assert RouterModel.from_json(json.loads(path.read_text())).turn == 4
    assert RouterPolicy(PolicyConfig(kind="router", router=str(path))).turn_tokens() == 4
    assert RouterPolicy(PolicyConfig(kind="router", router=str(path), router_turn=1)).turn_tokens() == 1
    for bad in (0, "4", True, 2.5):
        with pytest.raises(ShapeError, match="turn"):
            replace(model, turn=bad)
        data = replace(model, turn=4).to_json() | {"turn": bad}
        with pytest.raises(RouterMismatch, match="turn"):
            RouterModel.from_json(data)
