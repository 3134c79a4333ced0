"""The cloud's latency by request size, interpolated from a measured profile (`bench_cloud.py --profile`).

`scripts/bench_cloud.py --profile --json PATH` times, through the real service over gRPC on loopback,
opening a session (the prefill) by prompt length, one check point by the number of new tokens and
the number of sessions checking at once, and handoff generation by the number of sessions. This
module turns that table into functions a latency/cost simulator can call at any size:

* in tokens (prompt or new tokens): piecewise-linear between measured points, and beyond them the
  straight line through the two nearest points (a forward pass's cost is close to affine in its
  tokens), never below 0;
* in sessions: piecewise-linear in log(sessions) between measured levels (they are spaced
  geometrically, 1, 4, 16, ...), clamped to the measured range: batching beyond what was measured
  is not guessed.

The benchmark's client and server share one machine, so every request/reply latency it reports
includes one loopback round trip (protobuf, HTTP/2, the event loop). The profile's `rtt_s` is that
round trip measured alone (an empty append on an open session: the check point's own path, no
model work); open, check and first-token latencies here have it subtracted (floor 0), leaving the
cloud's own compute and serialization. A simulator adds its own network round trip on top. The
seconds per generated token are not reduced: they are inter-arrival times of a stream, with no
round trip in them.

A profile may also be estimated rather than measured (scripts/gpu_profile.py: a GPU's latencies
derived from its memory bandwidth and FLOPs and the model's size): it says so with
`"estimated": true`, and every table made with it must say so too (`estimated`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# (x, y) points sorted by x, x distinct.
Curve = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class CloudLatencyModel:
    """Cloud-side latencies by size, interpolated from a `bench_cloud.py --profile` run.

    Build it with `from_bench`. All results are in seconds.

    Attributes:
        rtt_s: the loopback round trip measured with the profile, subtracted from client latencies.
        open_curve: (prompt tokens, client seconds to open a session).
        check_curves: (sessions, curve of (new tokens, client seconds of one check point)), by sessions.
        decode_curve: (sessions, seconds per generated token).
        first_token_curve: (sessions, client seconds from a handoff request to its first token).
        model, backend, device, dtype, threads: what was measured, as the benchmark recorded it.
        estimated: the profile was derived from hardware figures, not measured.
    """

    rtt_s: float
    open_curve: Curve
    check_curves: tuple[tuple[float, Curve], ...]
    decode_curve: Curve
    first_token_curve: Curve
    model: str | None = None
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    estimated: bool = False

    @classmethod
    def from_bench(cls, source: str | Path | Mapping[str, Any]) -> CloudLatencyModel:
        """Build the model from `bench_cloud.py --profile` output.

        Args:
            source: the JSON file's path, its parsed content, or just its "profile" object.

        Returns:
            The model.

        Raises:
            ValueError: a section is missing or empty, a value is not a finite positive number
                (rtt_s may be 0), or a size is measured twice.
        """
        if isinstance(source, str | Path):
            data = json.loads(Path(source).read_text())
        else:
            data = source
        if not isinstance(data, Mapping):
            raise ValueError(f"a latency profile must be a JSON object, got {type(data).__name__}")
        profile = data.get("profile", data)
        if not isinstance(profile, Mapping):
            raise ValueError('"profile" must be a JSON object')
        for section in ("rtt_s", "open", "check", "decode"):
            if section not in profile:
                raise ValueError(f'the latency profile has no "{section}" section (bench_cloud.py --profile)')

        rtt = _number(profile["rtt_s"], "rtt_s", allow_zero=True)
        opens = _rows(profile["open"], "open")
        open_curve = _curve(
            [(_size(r, "prompt_tokens", "open"), _number(r.get("seconds"), "open seconds")) for r in opens],
            "open prompt_tokens",
        )

        by_sessions: dict[float, list[tuple[float, float]]] = {}
        for r in _rows(profile["check"], "check"):
            s = _size(r, "sessions", "check")
            by_sessions.setdefault(s, []).append(
                (_size(r, "tokens", "check"), _number(r.get("seconds"), "check seconds"))
            )
        check_curves = tuple(
            (s, _curve(points, f"check tokens at {s:g} sessions"))
            for s, points in sorted(by_sessions.items())
        )

        decodes = _rows(profile["decode"], "decode")
        decode_curve = _curve(
            [
                (
                    _size(r, "sessions", "decode"),
                    _number(r.get("seconds_per_token"), "decode seconds_per_token"),
                )
                for r in decodes
            ],
            "decode sessions",
        )
        first_token_curve = _curve(
            [
                (_size(r, "sessions", "decode"), _number(r.get("first_token_s"), "decode first_token_s"))
                for r in decodes
            ],
            "decode sessions",
        )
        threads = data.get("threads")
        model = cls(
            rtt_s=rtt,
            open_curve=open_curve,
            check_curves=check_curves,
            decode_curve=decode_curve,
            first_token_curve=first_token_curve,
            model=data.get("model"),
            backend=data.get("backend"),
            device=data.get("device"),
            dtype=data.get("dtype"),
            threads=int(threads) if isinstance(threads, int | float) else None,
            estimated=bool(data.get("estimated") or profile.get("estimated")),
        )
        logger.debug(
            "cloud latency profile of %s: %d open, %d check, %d decode points",
            model.model,
            len(open_curve),
            sum(len(c) for _, c in check_curves),
            len(decode_curve),
        )
        return model

    @property
    def sessions_range(self) -> tuple[float, float]:
        """The smallest and largest concurrency measured (check and decode); outside it values are clamped.

        Returns:
            (lowest, highest) sessions.
        """
        levels = [s for s, _ in self.check_curves] + [s for s, _ in self.decode_curve]
        return min(levels), max(levels)

    # -- latencies -----------------------------------------------------------------------------

    def open_s(self, prompt_tokens: int) -> float:
        """Cloud seconds to open a session: the prefill of its prompt.

        Args:
            prompt_tokens: the prompt's length in tokens.

        Returns:
            Seconds, loopback round trip removed.
        """
        return _less_rtt(
            _along_tokens(self.open_curve, _positive(prompt_tokens, "prompt_tokens")), self.rtt_s
        )

    def check_s(self, tokens: int, sessions: int = 1) -> float:
        """Cloud seconds of one check point over `tokens` new tokens while `sessions` check at once.

        Args:
            tokens: new tokens appended and checked by this check point.
            sessions: sessions whose check points the cloud batches into the same passes.

        Returns:
            Seconds from the request to its result, loopback round trip removed.
        """
        x = _positive(tokens, "tokens")
        by_sessions = tuple((s, _along_tokens(curve, x)) for s, curve in self.check_curves)
        return _less_rtt(_along_sessions(by_sessions, _positive(sessions, "sessions")), self.rtt_s)

    def decode_s(self, sessions: int = 1) -> float:
        """Seconds per token the cloud generates in a handoff while `sessions` generate at once.

        Args:
            sessions: sessions generating concurrently (batched).

        Returns:
            Seconds per generated token after the first (no round trip to remove).
        """
        return _along_sessions(self.decode_curve, _positive(sessions, "sessions"))

    def handoff_first_token_s(self, sessions: int = 1) -> float:
        """Cloud seconds from a handoff request to its first generated token.

        Args:
            sessions: sessions generating concurrently (batched).

        Returns:
            Seconds, loopback round trip removed.
        """
        return _less_rtt(_along_sessions(self.first_token_curve, _positive(sessions, "sessions")), self.rtt_s)

    # -- device cost ---------------------------------------------------------------------------

    def gpu_seconds_per_check(self, tokens: int, sessions: int = 1) -> float:
        """Device seconds one session's check point costs when `sessions` share the passes.

        Args:
            tokens: new tokens checked by each session.
            sessions: sessions batched together.

        Returns:
            check_s(tokens, sessions) / sessions. Beyond the largest measured concurrency check_s is
            clamped, so this keeps falling as 1/sessions: optimistic; stay within `sessions_range`.
        """
        return self.check_s(tokens, sessions) / _positive(sessions, "sessions")

    def gpu_seconds_per_token(self, sessions: int = 1) -> float:
        """Device seconds one session's generated token costs when `sessions` generate at once.

        Args:
            sessions: sessions batched together.

        Returns:
            decode_s(sessions) / sessions (optimistic beyond `sessions_range`, as for checks).
        """
        return self.decode_s(sessions) / _positive(sessions, "sessions")


# ---------------------------------------------------------------------------------------------
# Interpolation


def _line(p: tuple[float, float], q: tuple[float, float], x: float) -> float:
    (x0, y0), (x1, y1) = p, q
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _along_tokens(curve: Curve, x: float) -> float:
    """Piecewise-linear in x; linear through the two nearest points outside the range; floor 0."""
    if len(curve) == 1:
        return curve[0][1]  # one point gives no slope: the measured value everywhere
    if x <= curve[0][0]:
        return max(0.0, _line(curve[0], curve[1], x))
    if x >= curve[-1][0]:
        return max(0.0, _line(curve[-2], curve[-1], x))
    for p, q in itertools.pairwise(curve):
        if x <= q[0]:
            return _line(p, q, x)
    raise AssertionError("unreachable")  # pragma: no cover


def _along_sessions(curve: Curve, sessions: float) -> float:
    """Piecewise-linear in log(sessions), clamped to the measured levels."""
    if sessions <= curve[0][0]:
        return curve[0][1]
    if sessions >= curve[-1][0]:
        return curve[-1][1]
    logged = tuple((math.log(s), y) for s, y in curve)
    return _along_tokens(logged, math.log(sessions))  # inside the range: plain interpolation


def _less_rtt(seconds: float, rtt_s: float) -> float:
    return max(0.0, seconds - rtt_s)


# ---------------------------------------------------------------------------------------------
# Validation


def _rows(value: Any, section: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f'the latency profile\'s "{section}" section must be a non-empty list')
    for row in value:
        if not isinstance(row, Mapping):
            raise ValueError(f'"{section}" rows must be JSON objects, got {row!r}')
    return list(value)


def _number(value: Any, what: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")
    return float(value)


def _size(row: Mapping[str, Any], key: str, section: str) -> float:
    return _number(row.get(key), f"{section} {key}")


def _curve(points: list[tuple[float, float]], what: str) -> Curve:
    points = sorted(points)
    for (a, _), (b, _) in itertools.pairwise(points):
        if a == b:
            raise ValueError(f"{what} {a:g} is measured twice")
    return tuple(points)


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or math.isinf(value):
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return float(value)
