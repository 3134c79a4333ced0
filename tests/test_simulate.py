"""The latency/cost simulator on hand-made traces, against timelines and costs worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from handoff.edge.policy import PolicyConfig
from handoff.edge.simulation.cloud_latency import CloudLatencyModel
from handoff.edge.simulation.replay import replay_policy
from handoff.edge.simulation.run import edge_model_from_traces, measure, recorded_configs, replayed_configs
from handoff.edge.simulation.simulate import CostModel, EdgeModel, NetworkModel, simulate
from handoff.edge.simulation.traces import CloudTurn, Generation, Window, events, read_traces, window_bytes

# Flat cloud latencies: open 0.5 s, any check 0.3 s, handoff first token 0.2 s, then 0.1 s per token.
PROFILE = {
    "rtt_s": 0.0,
    "open": [{"prompt_tokens": 16, "seconds": 0.5}],
    "check": [{"sessions": 1, "tokens": 1, "seconds": 0.3}],
    "decode": [{"sessions": 1, "seconds_per_token": 0.1, "first_token_s": 0.2}],
}
CLOUD = CloudLatencyModel.from_bench(PROFILE)
EDGE = EdgeModel(token_s=0.1)
FREE = CostModel(gpu_per_hour=3.6, per_gb=0.0)  # $0.001 per GPU-second, data free


def rec(position, source, window=None, token=5, q_top1=None, kl=0.0):
    return {
        "position": position, "token_id": token, "source": source, "checked": source != "unchecked",
        "kl": kl, "q_topk_ids": [token if q_top1 is None else q_top1, 7], "q_topk_logprobs": [-0.1, -2.5],
        "q_logprob": -0.1, "p_logprob": -0.2, "p_topk_ids": [token, 9], "p_topk_logprobs": [-0.2, -1.9],
        "t_generated": None, "t_uploaded": window, "replaced_token_id": None,
    }  # fmt: skip


def generation(mode, records, *, n=4, m=2, lookahead=0, prompt=16, max_tokens=64):
    policy = {
        "check_interval": n,
        "handback_tokens": m,
        "lookahead_windows": lookahead,
        "top_k": 2,
        "threshold": 0.2,
    }
    meta = {"record": "generation", "prompt_ids": list(range(prompt)), "policy": policy, "max_tokens": max_tokens,
            "sampling": {"temperature": 0.0}}  # fmt: skip
    summary = {"mode": mode, "bytes_sent": 0, "bytes_received": 0, "open_bytes": [100, 50]}
    return Generation(meta, records, summary, "hand-made")


def net(rtt):
    return NetworkModel(rtt_s=rtt)


def test_edge_only_commits_each_window_as_it_is_drafted():
    gen = generation("edge", [rec(16 + i, "edge") | {"checked": False} for i in range(10)])
    assert [type(e) for e in events(gen)] == [Window] * 3
    t = simulate(gen, net(0.1), EDGE, CLOUD, FREE)
    # 0.1 s per token; windows of 4, 4, 2 committed at their last draft; no cloud, no bytes.
    assert t.commits == pytest.approx([0.4] * 4 + [0.8] * 4 + [1.0] * 2)
    assert t.seconds == pytest.approx(1.0) and t.first_token_s == pytest.approx(0.4)
    assert t.gpu_seconds == 0 and t.bytes_up == t.bytes_down == 0


def test_cloud_only_by_hand():
    gen = generation("cloud", [rec(16 + i, "cloud") for i in range(3)])
    edge = EdgeModel(token_s=0.1, append_s=0.05)
    t = simulate(gen, net(0.1), edge, CLOUD, FREE)
    # open: sent 0, arrives 0.05, prefill 0.5 -> 0.55, reply 0.60. Handoff arrives 0.65; tokens made at
    # 0.85, 0.95, 1.05, reach the edge 0.05 later, each scored in 0.05 s: commits 0.95, 1.05, 1.15.
    # Close: 1.15 -> 1.25.
    assert t.commits == pytest.approx([0.95, 1.05, 1.15])
    assert t.seconds == pytest.approx(1.25)
    assert t.handoffs == 1 and t.check_points == 0
    assert t.gpu_seconds == pytest.approx(0.5 + 3 * 0.1)  # prefill + three decodes
    row = measure(recorded_configs([gen])[0], net(0.1), edge, CLOUD, FREE)
    assert row["cost_per_1k_tokens"] == pytest.approx(0.8 * 0.001 / 3 * 1000)
    assert row["ttft_mean_s"] == pytest.approx(0.95) and row["tokens_per_s"] == pytest.approx(3 / 1.25)
    assert row["itl_p50_s"] == pytest.approx(0.1) and row["cloud_fraction"] == 1.0


def hybrid_records():
    # Window 1 (N=4) cut after 2 kept tokens; the cloud corrects and adds one (M=2); window 2 kept whole.
    return [
        rec(16, "edge", 1), rec(17, "edge", 1), rec(18, "corrected"), rec(19, "cloud"),
        *[rec(20 + i, "edge", 2) for i in range(4)],
    ]  # fmt: skip


def test_hybrid_structure_and_timeline_by_hand():
    gen = generation("hybrid", hybrid_records())
    evs = events(gen)
    assert evs == [
        Window(16, 4, 2, True, True, tuple(gen.records[:2])),
        CloudTurn(18, 2, True, tuple(gen.records[2:4])),
        Window(20, 4, 4, False, True, tuple(gen.records[4:])),
    ]
    t = simulate(gen, net(0.2), EDGE, CLOUD, FREE)
    # open 0 -> 0.1 -> 0.6 -> 0.7; draft 4 -> 1.1; check 1.2 -> 1.5 -> 1.6: commit 2 at 1.6.
    # rollback 1.6 -> 1.7 -> 1.8; handoff arrives 1.9, tokens made 2.1, 2.2, reach 2.2, 2.3, scored
    # in 0.1 s: 2.3, 2.4; done reaches 2.3. Draft 4 -> 2.8; check 2.9 -> 3.2 -> 3.3: commit 4. Close -> 3.5.
    assert t.commits == pytest.approx([1.6, 1.6, 2.3, 2.4, 3.3, 3.3, 3.3, 3.3])
    assert t.seconds == pytest.approx(3.5) and t.first_token_s == pytest.approx(1.6)
    assert (t.check_points, t.handoffs) == (2, 1)
    assert t.gpu_seconds == pytest.approx(0.5 + 2 * 0.3 + 2 * 0.1)
    # Bytes: the open as recorded, two windows rebuilt from their records (the cut one padded to
    # the 4 tokens it uploaded), and the control messages.
    w1 = window_bytes([gen.records[0], gen.records[1], gen.records[1], gen.records[1]], 2)
    w2 = window_bytes(gen.records[4:], 2)
    assert t.bytes_up > 100 + w1.up + w2.up and t.bytes_down > 50 + w1.down + w2.down


def test_lookahead_drafts_ahead_and_a_dropped_check_delays_the_rollback():
    gen = generation("hybrid", hybrid_records(), lookahead=1)
    t = simulate(gen, net(0.2), EDGE, CLOUD, FREE)
    # Window 1 uploaded at 1.1 (answer 1.6); a speculative window is drafted meanwhile and uploaded at
    # 1.5 (the cloud is busy with it 1.6-1.9). Commit 2 at 1.6; the rollback reaches the cloud at 1.7
    # but waits until 1.9: reply 2.0. Handoff arrives 2.1: tokens made 2.3, 2.4, commits 2.5, 2.6.
    # Window 2 drafted 2.6 -> 3.0, check 3.1 -> 3.4 -> 3.5; close -> 3.7.
    assert t.commits == pytest.approx([1.6, 1.6, 2.5, 2.6, 3.5, 3.5, 3.5, 3.5])
    assert t.seconds == pytest.approx(3.7) and t.check_points == 3
    assert t.gpu_seconds == pytest.approx(0.5 + 3 * 0.3 + 2 * 0.1)


def test_bandwidth_serialises_messages():
    gen = generation("cloud", [rec(16 + i, "cloud") for i in range(2)])
    slow = NetworkModel(rtt_s=0.0, downlink_bytes_per_s=1000.0)
    fast = simulate(gen, net(0.0), EdgeModel(0.1, 0.001), CLOUD, FREE)
    t = simulate(gen, slow, EdgeModel(0.1, 0.001), CLOUD, FREE)
    # Each CloudToken takes size/1000 s on the downlink; the reply to the open (50 B) 0.05 s.
    assert t.seconds > fast.seconds + 0.05
    assert t.commits[1] - t.commits[0] >= 0.1 - 1e-9


def test_jitter_is_seeded_and_centred():
    gen = generation("cloud", [rec(16 + i, "cloud") for i in range(20)])
    a = simulate(gen, NetworkModel(rtt_s=0.1, rtt_sigma=0.5, seed=1), EDGE, CLOUD, FREE)
    b = simulate(gen, NetworkModel(rtt_s=0.1, rtt_sigma=0.5, seed=1), EDGE, CLOUD, FREE)
    c = simulate(gen, NetworkModel(rtt_s=0.1, rtt_sigma=0.5, seed=2), EDGE, CLOUD, FREE)
    assert a.commits == b.commits != c.commits


def test_gpu_cost_divides_by_batched_sessions():
    profile = {**PROFILE, "check": [{"sessions": 1, "tokens": 1, "seconds": 0.3}, {"sessions": 4, "tokens": 1,
               "seconds": 0.6}], "decode": [{"sessions": 1, "seconds_per_token": 0.1, "first_token_s": 0.2},
               {"sessions": 4, "seconds_per_token": 0.2, "first_token_s": 0.3}]}  # fmt: skip
    cloud = CloudLatencyModel.from_bench(profile)
    gen = generation("hybrid", hybrid_records())
    one = simulate(gen, net(0.0), EDGE, cloud, CostModel(sessions=1))
    four = simulate(gen, net(0.0), EDGE, cloud, CostModel(sessions=4))
    assert one.gpu_seconds == pytest.approx(0.5 + 2 * 0.3 + 2 * 0.1)
    assert four.gpu_seconds == pytest.approx((0.5 + 2 * 0.6 + 2 * 0.2) / 4)
    assert four.seconds > one.seconds  # batched passes are slower for each session


def full_trace(kls, mismatch=()):
    recs = [rec(16 + i, "cloud", kl=k, q_top1=99 if i in mismatch else None) for i, k in enumerate(kls)]
    return generation("cloud", recs)


def test_replay_reproduces_the_policys_decisions():
    gen = full_trace([0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    out, info = replay_policy(gen, PolicyConfig(threshold=0.2, check_interval=4, handback_tokens=2))
    # Window [0..3]: position 1 is over: keep 1, the cloud corrects 1 and writes 2; window [3..6] and
    # [7..9] are kept.
    assert [r["source"] for r in out.records] == ["edge", "corrected", "cloud"] + ["edge"] * 7
    assert info.exact and info.departures == 0
    assert [type(e) for e in events(out)] == [Window, CloudTurn, Window, Window]
    kept, _ = replay_policy(gen, PolicyConfig(threshold=1.0, check_interval=4))
    assert all(r["source"] == "edge" for r in kept.records)
    # A kept position where Q's greedy token is not P's: the real text would differ there.
    gen2 = full_trace([0.0] * 6, mismatch=(4,))
    _, info2 = replay_policy(gen2, PolicyConfig(threshold=0.2, check_interval=4))
    assert not info2.exact and info2.departures == 1 and info2.first_departure == 4


def test_replayed_seed_tokens_run_their_course_as_in_the_live_controller():
    gen = full_trace([0.0] * 8)
    # Every position agrees; with agree_tokens 1 a handoff would end after one token, but the seed
    # turn (like the live controller's, which has no early hand-back there) writes all 3.
    policy = PolicyConfig(kind="seed", seed_tokens=3, agree_tokens=1, threshold=0.2, check_interval=4)
    out, _ = replay_policy(gen, policy)
    assert [r["source"] for r in out.records] == ["cloud"] * 3 + ["edge"] * 5


def test_replayed_configs_say_which_are_exact():
    gens = [full_trace([0.0, 0.5, 0.0, 0.0, 0.0, 0.0]), full_trace([0.0] * 6, mismatch=(2,))]
    configs = replayed_configs(gens, [0.2, 1.0], [4], PolicyConfig())
    assert [c.name for c in configs] == ["replay-tau0.2-n4", "replay-tau1-n4"]
    assert all(c.fidelity.startswith("approximate (") for c in configs)
    assert configs[0].exact_fraction == 0.5


def test_edge_speed_from_recorded_drafting_times():
    recs = [rec(16 + i, "edge", 1) | {"t_generated": 0.03 * i} for i in range(4)]
    model = edge_model_from_traces([generation("hybrid", recs)])
    assert model.token_s == pytest.approx(0.03) and model.append_s is None and model.upload_s == 0
    with pytest.raises(ValueError, match="edge-tok-s"):
        edge_model_from_traces([generation("cloud", [rec(16, "cloud")])])


def test_read_traces_round_trip_and_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    gen = generation("hybrid", hybrid_records())
    lines = [gen.meta, *({"record": "token"} | r for r in gen.records), {"record": "summary"} | gen.summary]
    path.write_text("\n".join(json.dumps(x) for x in lines * 2) + "\n")
    back = read_traces(path)
    assert len(back) == 2 and back[0].records[2]["source"] == "corrected" and back[1].mode == "hybrid"
    path.write_text("\n".join(json.dumps(x) for x in lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="without its summary"):
        read_traces(path)
    path.write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="not a trace record"):
        read_traces(path)


def test_models_reject_nonsense():
    with pytest.raises(ValueError):
        NetworkModel(rtt_s=-1)
    with pytest.raises(ValueError):
        NetworkModel(uplink_bytes_per_s=0)
    with pytest.raises(ValueError):
        EdgeModel(token_s=0)
    with pytest.raises(ValueError):
        CostModel(sessions=0)
    assert np.isfinite(CLOUD.check_s(100))


# -- on real recorded generations (tiny models) ----------------------------------------------------


def test_rebuilt_messages_match_the_bytes_a_real_run_sent(tiny_gguf_a, tiny_gguf_b):
    """The simulator sizes every message from the trace: the totals match what the real session sent."""
    from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
    from handoff.edge.controller import HybridGenerator
    from handoff.edge.runner import EdgeRunner

    async def go():
        runner = EdgeRunner(tiny_gguf_b, k=20, n_ctx=512, n_threads=1)
        try:
            async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
                policy = PolicyConfig(check_interval=4, handback_tokens=3, lookahead_windows=0, threshold=0.5)
                out = []
                for mode in ("cloud", "hybrid"):
                    gen = HybridGenerator(runner, client, vocabulary_of(tiny_gguf_b), policy, mode=mode)
                    prompt = runner.model.tokenize("Sort a list of numbers in Python.")
                    r = await gen.generate(prompt, 24)
                    meta = {"prompt_ids": prompt, "policy": {"check_interval": 4, "handback_tokens": 3,
                            "lookahead_windows": 0, "top_k": 20}, "max_tokens": 24}  # fmt: skip
                    out.append(Generation(meta, r.trace(), r.summary(), mode))
                return out
        finally:
            runner.close()

    for gen in run(go()):
        assert gen.summary["open_bytes"] and gen.summary["handoffs"] >= 1
        t = simulate(gen, net(0.0), EDGE, CLOUD, FREE)
        # Request ids and a few scalar fields are sized with typical values: within 3 %.
        assert t.bytes_up == pytest.approx(gen.summary["bytes_sent"], rel=0.03), gen.mode
        assert t.bytes_down == pytest.approx(gen.summary["bytes_received"], rel=0.03), gen.mode
        assert t.check_points == gen.summary["check_points"] and t.handoffs == gen.summary["handoffs"]


def test_simulate_command_on_recorded_traces(tiny_gguf_a, tiny_gguf_a_near, tmp_path, run_handoff):
    """`handoff generate --trace` then `handoff simulate`: exact replays, offline replays, plots, JSON."""
    models = ["--edge", str(tiny_gguf_a_near), "--cloud-model", str(tiny_gguf_a)]

    def handoff(*a):
        return run_handoff(*a, env={"HANDOFF_THREADS": "1"})

    traces = []
    for flag in ("--edge-only", "--cloud-only", "--threshold=0.01"):
        path = tmp_path / f"{flag.strip('-').split('=')[0]}.jsonl"
        proc = handoff(
            "generate", *models, "--max-tokens", "16", "--check-interval", "4", "--trace", str(path), flag
        )
        assert proc.returncode == 0, proc.stderr
        traces.append(str(path))
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"profile": PROFILE}))
    out = tmp_path / "sim"
    proc = handoff("simulate", *traces, "--cloud-profile", str(profile), "--out", str(out), "--rtt-ms", "0,50",
                   "--replay-thresholds", "0.05,5", "--replay-intervals", "4", "--edge-tok-s", "10")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "simulate.json").read_text())
    rows = {(r["config"], r["rtt_ms"]): r for r in data["rows"]}
    assert {c for c, _ in rows} == {
        "edge",
        "cloud",
        "hybrid-tau0.01-n4",
        "replay-tau0.05-n4",
        "replay-tau5-n4",
    }
    assert rows[("edge", 0.0)]["tokens_per_s"] == pytest.approx(10.0, rel=0.2)  # 0.1 s per token, no cloud
    assert rows[("edge", 0.0)]["gpu_s_per_1k_tokens"] == 0
    for c in ("cloud", "hybrid-tau0.01-n4"):
        assert rows[(c, 50.0)]["wall_s"] > rows[(c, 0.0)]["wall_s"]  # round trips cost time
        assert rows[(c, 0.0)]["fidelity"] == "exact replay"
    assert rows[("replay-tau5-n4", 0.0)]["cloud_fraction"] == 0.0  # never over 5 nats on these models
    for name in ("simulate.md", "latency_vs_rtt.png", "cost_vs_quality.png"):
        assert (out / name).stat().st_size > 0
    bad = handoff("simulate", traces[0], "--cloud-profile", traces[0], "--out", str(out))
    assert bad.returncode == 2 and "error" in bad.stderr


def test_exact_policy_rounds_by_hand():
    """Exact mode: each draft is one VerifyDraft round trip; the cloud's work is a forward over gamma + 1."""
    recs = [
        rec(16, "edge", 1), rec(17, "edge", 1), rec(18, "corrected") | {"draft_len": 3},  # 2 of 3 accepted
        rec(19, "edge", 2), rec(20, "edge", 2), rec(21, "cloud") | {"draft_len": 2},  # all accepted: bonus
    ]  # fmt: skip
    gen = generation("hybrid", recs)
    gen.meta["policy"]["kind"] = "exact"
    t = simulate(gen, net(0.2), EDGE, CLOUD, FREE)
    # open -> 0.7; draft 3 -> 1.0; verify 1.1 -> 1.4 -> 1.5: commit 2, then the correction at 1.6 (appended).
    # Draft 2 -> 1.8; verify 1.9 -> 2.2 -> 2.3: commit 2, the bonus at 2.4. Close -> 2.6.
    assert t.commits == pytest.approx([1.5, 1.5, 1.6, 2.3, 2.3, 2.4])
    assert t.seconds == pytest.approx(2.6) and t.check_points == 2 and t.handoffs == 0
    assert t.gpu_seconds == pytest.approx(0.5 + 2 * 0.3)


def test_skipped_uploads_are_sized_without_the_view():
    full = generation("hybrid", [rec(16 + i, "edge", 1) for i in range(4)])
    skipped = generation("hybrid", [rec(16 + i, "edge", 1) | {"kl": None} for i in range(4)])
    a = simulate(full, net(0.0), EDGE, CLOUD, FREE)
    b = simulate(skipped, net(0.0), EDGE, CLOUD, FREE)
    assert b.bytes_up < a.bytes_up - 4 * 10 and b.bytes_down < a.bytes_down  # ids only; no P-at-Q values
