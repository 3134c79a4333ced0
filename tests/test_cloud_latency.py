"""CloudLatencyModel: interpolation of a hand-made profile, validation, and a real `--profile` run.

The expected values below are computed by hand from PROFILE: straight lines between points in
tokens, in log(sessions) between levels, minus rtt_s (1 ms) for request/reply latencies.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from handoff.edge.simulation.cloud_latency import CloudLatencyModel

ROOT = Path(__file__).resolve().parent.parent

PROFILE: dict[str, Any] = {
    "model": "hand-made",
    "backend": "llama.cpp",
    "device": "cpu",
    "dtype": "Q4_K_M",
    "threads": 2,
    "profile": {
        "rtt_s": 0.001,
        "open": [  # slopes: 1 ms/token up to 200, then 0.5 ms/token
            {"prompt_tokens": 200, "seconds": 0.201},
            {"prompt_tokens": 100, "seconds": 0.101},
            {"prompt_tokens": 400, "seconds": 0.301},
        ],
        "check": [
            # 1 session: 2.5 ms/token from 1 to 5 tokens, then 5 ms/token.
            {"sessions": 1, "tokens": 1, "seconds": 0.011},
            {"sessions": 1, "tokens": 5, "seconds": 0.021},
            {"sessions": 1, "tokens": 13, "seconds": 0.061},
            # 4 sessions: twice the slopes.
            {"sessions": 4, "tokens": 1, "seconds": 0.021},
            {"sessions": 4, "tokens": 5, "seconds": 0.041},
            {"sessions": 4, "tokens": 13, "seconds": 0.121},
            {"sessions": 16, "tokens": 1, "seconds": 0.041},
            {"sessions": 16, "tokens": 5, "seconds": 0.081},
            {"sessions": 16, "tokens": 13, "seconds": 0.241},
        ],
        "decode": [  # measured from 2 sessions: 1 session is clamped to 2's values
            {"sessions": 2, "seconds_per_token": 0.01, "first_token_s": 0.021},
            {"sessions": 8, "seconds_per_token": 0.02, "first_token_s": 0.041},
            {"sessions": 32, "seconds_per_token": 0.05, "first_token_s": 0.081},
        ],
    },
}


@pytest.fixture
def model() -> CloudLatencyModel:
    return CloudLatencyModel.from_bench(PROFILE)


def test_open_interpolates_and_extrapolates_in_prompt_tokens(model: CloudLatencyModel) -> None:
    assert model.open_s(100) == pytest.approx(0.100)  # at a point: 0.101 - rtt
    assert model.open_s(150) == pytest.approx(0.150)
    assert model.open_s(300) == pytest.approx(0.250)
    assert model.open_s(600) == pytest.approx(0.400)  # beyond: 0.301 + 200 x 0.5 ms - rtt
    assert model.open_s(10) == pytest.approx(0.010)  # below: 0.101 - 90 x 1 ms - rtt


def test_check_interpolates_in_tokens_and_log_sessions(model: CloudLatencyModel) -> None:
    assert model.check_s(1) == pytest.approx(0.010)
    assert model.check_s(3) == pytest.approx(0.015)
    assert model.check_s(9, sessions=1) == pytest.approx(0.040)
    assert model.check_s(21) == pytest.approx(0.100)  # 0.061 + 8 x 5 ms - rtt
    assert model.check_s(13, sessions=4) == pytest.approx(0.120)
    # 2 sessions lie halfway between 1 and 4 in log(sessions).
    assert model.check_s(1, sessions=2) == pytest.approx((0.011 + 0.021) / 2 - 0.001)
    assert model.check_s(3, sessions=2) == pytest.approx((0.016 + 0.031) / 2 - 0.001)
    assert model.check_s(5, sessions=8) == pytest.approx((0.041 + 0.081) / 2 - 0.001)


def test_sessions_are_clamped_to_the_measured_range(model: CloudLatencyModel) -> None:
    assert model.sessions_range == (1.0, 32.0)
    assert model.check_s(5, sessions=64) == pytest.approx(model.check_s(5, sessions=16)) == 0.080
    assert model.decode_s(1) == pytest.approx(0.01)  # below the 2-session level
    assert model.decode_s(100) == pytest.approx(0.05)
    assert model.handoff_first_token_s(1) == pytest.approx(0.020)
    assert model.handoff_first_token_s(1000) == pytest.approx(0.080)


def test_decode_is_not_reduced_by_the_round_trip(model: CloudLatencyModel) -> None:
    assert model.decode_s(2) == pytest.approx(0.01)  # inter-arrival times: nothing to subtract
    assert model.decode_s(4) == pytest.approx(0.015)
    assert model.decode_s(16) == pytest.approx(0.035)
    assert model.handoff_first_token_s(4) == pytest.approx(0.030)  # a round trip: 0.031 - rtt


def test_device_seconds_are_shared_by_the_batch(model: CloudLatencyModel) -> None:
    assert model.gpu_seconds_per_check(3, 2) == pytest.approx(model.check_s(3, 2) / 2)
    assert model.gpu_seconds_per_check(5, 16) == pytest.approx(0.080 / 16)
    assert model.gpu_seconds_per_token(8) == pytest.approx(0.02 / 8)
    assert model.gpu_seconds_per_token() == pytest.approx(0.01)


def test_values_never_go_below_zero() -> None:
    profile = copy.deepcopy(PROFILE["profile"])
    profile["rtt_s"] = 0.05  # larger than the 1-session check point's 11 ms
    profile["open"] = [{"prompt_tokens": 100, "seconds": 0.3}, {"prompt_tokens": 200, "seconds": 0.1}]
    model = CloudLatencyModel.from_bench(profile)
    assert model.check_s(1) == 0.0
    assert model.check_s(13) == pytest.approx(0.011)
    assert model.open_s(150) == pytest.approx(0.15)
    assert model.open_s(400) == 0.0  # the falling line crosses zero at 250 tokens


def test_a_single_point_is_constant_and_metadata_is_kept() -> None:
    model = CloudLatencyModel.from_bench(
        {
            "rtt_s": 0,
            "open": [{"prompt_tokens": 64, "seconds": 0.5}],
            "check": [{"sessions": 1, "tokens": 4, "seconds": 0.02}],
            "decode": [{"sessions": 1, "seconds_per_token": 0.03, "first_token_s": 0.04}],
        }
    )
    assert model.open_s(1) == model.open_s(10_000) == 0.5
    assert model.check_s(1, 8) == model.check_s(64) == 0.02
    assert model.model is None
    full = CloudLatencyModel.from_bench(PROFILE)
    assert (full.model, full.backend, full.device, full.dtype, full.threads) == (
        "hand-made", "llama.cpp", "cpu", "Q4_K_M", 2,
    )  # fmt: skip


def test_from_a_json_file(tmp_path: Path, model: CloudLatencyModel) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(PROFILE))
    assert CloudLatencyModel.from_bench(path) == model
    assert CloudLatencyModel.from_bench(str(path)) == model


def _broken(edit) -> dict[str, Any]:
    data = copy.deepcopy(PROFILE)
    edit(data["profile"])
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.pop("check"), 'no "check" section'),
        (lambda p: p.pop("rtt_s"), 'no "rtt_s" section'),
        (lambda p: p.pop("open"), 'no "open" section'),
        (lambda p: p.pop("decode"), 'no "decode" section'),
        (lambda p: p.update(open=[]), "non-empty list"),
        (lambda p: p.update(check=[1, 2]), "JSON objects"),
        (lambda p: p["open"][0].update(seconds=0), "open seconds must be positive"),
        (lambda p: p["open"][0].update(seconds=-0.1), "open seconds must be positive"),
        (lambda p: p["check"][0].update(tokens=0), "check tokens must be positive"),
        (lambda p: p["check"][0].update(seconds=math.nan), "finite"),
        (lambda p: p["check"][0].pop("seconds"), "check seconds must be a finite number"),
        (lambda p: p["decode"][0].update(sessions=-1), "decode sessions must be positive"),
        (lambda p: p["decode"][1].update(seconds_per_token="fast"), "finite number"),
        (lambda p: p.update(rtt_s=-0.001), "rtt_s must be >= 0"),
        (lambda p: p["check"][1].update(tokens=1), "measured twice"),
    ],
)
def test_bad_profiles_are_rejected(edit, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CloudLatencyModel.from_bench(_broken(edit))


def test_bad_queries_are_rejected(model: CloudLatencyModel) -> None:
    with pytest.raises(ValueError, match="tokens must be a positive number"):
        model.check_s(0)
    with pytest.raises(ValueError, match="sessions must be a positive number"):
        model.decode_s(0)
    with pytest.raises(ValueError, match="prompt_tokens"):
        model.open_s(-5)
    with pytest.raises(ValueError, match="JSON object"):
        CloudLatencyModel.from_bench({"profile": [1, 2]})


@pytest.mark.slow
@pytest.mark.e2e  # the benchmark script in a real process
def test_bench_cloud_profile_on_the_tiny_model_loads_into_the_model(
    edge_gguf_path: Path, tmp_path: Path
) -> None:
    """A short real `--profile` run (~10 s): structure and positive values, no timing compared."""
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_cloud.py"), "--model", "tiny", "--threads", "1",
         "--profile", "--profile-tokens", "1,4", "--profile-sessions", "1,2", "--profile-prompts", "16,64",
         "--profile-handoff", "4", "--prompt", "32", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert {"model", "backend", "device", "dtype", "threads", "profile"} <= result.keys()
    assert result["backend"] == "llama.cpp" and result["threads"] == 1
    profile = result["profile"]
    assert profile["rtt_s"] > 0
    assert [r["prompt_tokens"] for r in profile["open"]] == [16, 64]
    assert [(r["sessions"], r["tokens"]) for r in profile["check"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    assert [r["sessions"] for r in profile["decode"]] == [1, 2]
    assert "check s" in proc.stdout and "s/token" in proc.stdout

    model = CloudLatencyModel.from_bench(out)
    values = [model.open_s(16), model.open_s(64), model.open_s(200), model.decode_s(), model.decode_s(2)]
    for sessions in (1, 2):
        values += [model.check_s(1, sessions), model.check_s(4, sessions), model.check_s(2, sessions)]
        values += [model.handoff_first_token_s(sessions), model.gpu_seconds_per_check(4, sessions)]
        values += [model.gpu_seconds_per_token(sessions)]
    assert all(math.isfinite(v) and v > 0 for v in values), values
