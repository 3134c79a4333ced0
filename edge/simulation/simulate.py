"""Replay a generation's structure under a network, device and cost model: when each token is committed.

The replay follows the controller's loop (edge/controller.py) step by step:
- the edge prefills the prompt, then (hybrid and cloud modes) opens the session: one round trip plus
  the cloud's prefill;
- the edge drafts windows token by token; a full window is uploaded (AppendTokens + CheckPoint)
  and drafting goes on while at most `lookahead` windows await their answers; answers are settled
  in order at the edge's next step boundary, and a window's kept tokens are committed then;
- after a cut, drafts beyond it are dropped, a Rollback makes a round trip, and the cloud
  generates the handoff's tokens, streamed one message each; the edge scores each as it arrives
  (`append_s`) and commits it;
- the cloud is one server per session: a check, a rollback or a handoff waits until the previous
  request is done (a check of a window that turns out to be dropped still costs its time);
- a message of B bytes takes rtt/2 plus B / bandwidth, and messages one way are sent one after the
  other; the session's Close makes a last round trip.
- gated policies (a trace's tokens unchecked by design): such a token is committed as soon as it is
  drafted (behind any check point still in flight: commits are in order), and its upload
  (AppendTokens, ids only) costs bytes but no wait; a gated check point waits for its round trip
  and the cloud's check. The service feeds appended tokens to P at its next forward pass, so a
  check point's (or handoff's) cloud work covers the unchecked tokens uploaded since the last one.
  Under greedy decoding a correction is made in place (a corrected record without t_received): no
  round trip and no cloud pass of its own; its token is committed when the check point's answer is
  settled (`EdgeModel.correct`), its Rollback and bare token id go up unawaited, and P feeds the token
  with its next forward pass. A correction with t_received is a rollback and a one-token handoff.
Cloud latencies come from a profile (CloudLatencyModel): measured (scripts/bench_cloud.py --profile)
or estimated from hardware figures (scripts/gpu_profile.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from handoff.edge.simulation.cloud_latency import CloudLatencyModel
from handoff.edge.simulation.traces import (
    CloudTurn,
    Generation,
    Window,
    append_bytes,
    cloud_token_bytes,
    control_bytes,
    events,
    in_place_bytes,
    open_bytes,
    padded,
    verify_bytes,
    window_bytes,
)


@dataclass(frozen=True)
class NetworkModel:
    """The link between the edge and the cloud.

    rtt_s is the median round trip; rtt_sigma > 0 draws each message's one-way delay from a
    log-normal around rtt_s / 2 (sigma of the log), seeded.
    """

    rtt_s: float = 0.0
    rtt_sigma: float = 0.0
    uplink_bytes_per_s: float | None = None
    downlink_bytes_per_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rtt_s < 0 or self.rtt_sigma < 0:
            raise ValueError("rtt_s and rtt_sigma must be >= 0")
        for bw in (self.uplink_bytes_per_s, self.downlink_bytes_per_s):
            if bw is not None and bw <= 0:
                raise ValueError("bandwidths must be > 0")


@dataclass(frozen=True)
class EdgeModel:
    """The device: seconds per drafted token (a decode plus its top-k view), per scored cloud token,
    and per prompt token of prefill."""

    token_s: float
    append_s: float | None = None  # default: token_s (one decode each)
    prefill_s_per_token: float = 0.0
    upload_s: float = 0.0  # per checked window: building and sending its messages
    settle_s: float = 0.0  # per checked window: from its answer to its tokens committed (KL, records)
    # Per gated correction in place: from its check point's answer to its commit (default: settle_s).
    correct_s: float | None = None

    def __post_init__(self) -> None:
        if self.upload_s < 0 or self.settle_s < 0 or (self.correct_s is not None and self.correct_s < 0):
            raise ValueError("edge times must be >= 0")
        if (
            self.token_s <= 0
            or (self.append_s is not None and self.append_s <= 0)
            or self.prefill_s_per_token < 0
        ):
            raise ValueError("edge times must be positive")

    @property
    def append(self) -> float:
        return self.token_s if self.append_s is None else self.append_s

    @property
    def correct(self) -> float:
        return self.settle_s if self.correct_s is None else self.correct_s


@dataclass(frozen=True)
class CostModel:
    """Prices: a GPU hour, shared by `sessions` concurrent sessions batched together, and data moved."""

    gpu_per_hour: float = 3.0
    per_gb: float = 0.09
    sessions: int = 1

    def __post_init__(self) -> None:
        if self.gpu_per_hour < 0 or self.per_gb < 0 or self.sessions < 1:
            raise ValueError("prices must be >= 0 and sessions >= 1")


@dataclass
class Timeline:
    """One simulated generation."""

    commits: list[float] = field(default_factory=list)  # seconds from the start, per token
    seconds: float = 0.0  # wall time, Close included
    gpu_seconds: float = 0.0  # device time this session is charged (batched: divided by sessions)
    bytes_up: int = 0
    bytes_down: int = 0
    check_points: int = 0
    handoffs: int = 0
    opens: int = 0
    rollbacks: int = 0
    checked_positions: int = 0  # edge positions the cloud scored (dropped drafts included)

    @property
    def first_token_s(self) -> float | None:
        return self.commits[0] if self.commits else None

    @property
    def round_trips(self) -> int:
        """Requests that waited for the cloud (as GenerationResult.accounting counts them; Close not)."""
        return self.opens + self.check_points + self.handoffs + self.rollbacks


class _Link:
    """Message delivery times one way: rtt/2 (+ jitter) plus serialised transmission."""

    def __init__(self, net: NetworkModel, bandwidth: float | None, rng: np.random.Generator) -> None:
        self.net, self.bandwidth, self.rng = net, bandwidth, rng
        self.free = 0.0  # when the link finishes transmitting what was sent before

    def one_way(self) -> float:
        half = self.net.rtt_s / 2
        if self.net.rtt_sigma > 0 and half > 0:
            return float(half * self.rng.lognormal(0.0, self.net.rtt_sigma))
        return half

    def send(self, t: float, nbytes: int) -> float:
        """Arrival time of a message of nbytes handed to the link at time t."""
        if self.bandwidth is None:
            return t + self.one_way()
        start = max(t, self.free)
        self.free = start + nbytes / self.bandwidth
        return self.free + self.one_way()


class _Sim:
    def __init__(self, gen: Generation, net: NetworkModel, edge: EdgeModel, cloud: CloudLatencyModel,
                 cost: CostModel, lookahead: int) -> None:  # fmt: skip
        rng = np.random.default_rng(net.seed)
        self.gen, self.edge, self.cloud, self.cost = gen, edge, cloud, cost
        self.up = _Link(net, net.uplink_bytes_per_s, rng)
        self.down = _Link(net, net.downlink_bytes_per_s, rng)
        self.lookahead = lookahead
        # defer_checks (edge/gated.py): a flagged draft behind an unanswered check is sent when that
        # check is settled, and the edge waits with it.
        self.defer = bool(gen.gated and gen.policy.get("defer_checks"))
        self.s = cost.sessions
        self.k = int(gen.policy.get("top_k") or 20)
        self.n_check = int(gen.policy.get("check_interval") or 8)
        self.cloud_free = 0.0
        self.dropped_uploads = False
        self.unfed = 0  # tokens uploaded unchecked by design that P has not fed yet
        self.out = Timeline()

    # -- the cloud --------------------------------------------------------------------------------

    def request(self, t: float, up: int, down: int, work: float, gpu: float) -> float:
        """A request sent at t doing `work` seconds on the cloud; when its reply reaches the edge."""
        arrive = self.up.send(t, up)
        start = max(arrive, self.cloud_free)
        self.cloud_free = start + work
        self.out.gpu_seconds += gpu
        self.out.bytes_up += up
        self.out.bytes_down += down
        return self.down.send(self.cloud_free, down)

    def upload_only(self, t: float, w: Window) -> None:
        """Tokens unchecked by design: sent at t, acknowledged, waited for by nobody; P feeds them later."""
        b = append_bytes(list(w.records) or [{"position": w.first, "token_id": 0}] * w.drafted)
        self.down.send(self.up.send(t, b.up), b.down)
        self.out.bytes_up += b.up
        self.out.bytes_down += b.down
        self.unfed += w.drafted

    def correct_in_place(self, t: float, r: dict) -> None:
        """A token placed in place (record r), sent at t: its Rollback and token cross the link unawaited;
        P feeds it later."""
        b = in_place_bytes(r)
        self.down.send(self.up.send(t, b.up), b.down)
        self.out.bytes_up += b.up
        self.out.bytes_down += b.down
        self.unfed += 1

    def feed(self, tokens: int) -> tuple[float, float]:
        """(work, device seconds) of a forward over `tokens` new tokens plus those still unfed."""
        n, self.unfed = tokens + self.unfed, 0
        if n == 0:
            return 0.0, 0.0
        return self.cloud.check_s(n, self.s), self.cloud.gpu_seconds_per_check(n, self.s)

    # -- the phases -------------------------------------------------------------------------------

    def run(self) -> Timeline:
        gen, out = self.gen, self.out
        t = self.edge.prefill_s_per_token * gen.prompt_len
        evs = events(gen)
        if gen.mode != "edge":
            open_up, open_down = open_bytes(gen)
            work = self.cloud.open_s(gen.prompt_len)
            t = self.request(t, open_up, open_down, work, work / self.s)
            self.out.opens += 1
        if gen.mode == "hybrid" and gen.policy.get("kind") == "exact":
            t = self._exact(t)
            evs = []  # the draft rounds replace windows and handoffs
        i = 0
        while i < len(evs):
            ev = evs[i]
            if isinstance(ev, Window):
                j = i  # the windows up to and including the first cut: one edge phase
                while j < len(evs) and isinstance(evs[j], Window):
                    j += 1
                    if evs[j - 1].cut or self._redrafts(evs[j - 1]):  # type: ignore[arg-type]
                        break
                t = self._edge_phase([e for e in evs[i:j] if isinstance(e, Window)], t)
                i = j
            else:
                t = self._cloud_turn(ev, t, after_cut=i > 0 and isinstance(evs[i - 1], Window))
                i += 1
        if gen.gated:
            self._dropped_checks()
        if gen.mode != "edge":
            c = control_bytes(gen.prompt_len + len(gen.records))
            t = self.request(t, c["close_up"], c["close_down"], 0.0, 0.0)
        out.seconds = max([t, *out.commits])
        return out

    def _dropped_checks(self) -> None:
        """Check points a gated run sent for drafts a correction then dropped (drafting ahead): not in
        the token records, but in the summary's count. Charged as one-position checks: bytes and
        device time (they occupy the cloud while the edge goes on, so no edge wait is added)."""
        dropped = int(self.gen.summary.get("check_points") or 0) - self.out.check_points
        if dropped <= 0:
            return
        like = next((r for r in reversed(self.gen.records) if r.get("checked")), None)
        b = window_bytes([like or {"position": 0, "token_id": 0}], self.k, greedy=self.gen.greedy)
        self.out.check_points += dropped
        self.out.checked_positions += dropped
        self.out.bytes_up += dropped * b.up
        self.out.bytes_down += dropped * b.down
        self.out.gpu_seconds += dropped * self.cloud.gpu_seconds_per_check(1, self.s)

    def _exact(self, t: float) -> float:
        """The exact policy: draft rounds, each one VerifyDraft round trip (a forward over gamma + 1)."""
        recs, i = self.gen.records, 0
        while i < len(recs):
            j = i
            while (
                j < len(recs)
                and recs[j]["source"] == "edge"
                and recs[j].get("t_uploaded") == recs[i].get("t_uploaded")
            ):
                j += 1
            accepted = recs[i:j]
            nxt = recs[j] if j < len(recs) and recs[j]["source"] in ("cloud", "corrected") else None
            drafted = (nxt or {}).get("draft_len") or len(accepted) + (
                nxt is not None and nxt["source"] == "corrected"
            )
            drafted = max(drafted, len(accepted), 1)
            t += drafted * self.edge.token_s + self.edge.upload_s
            up, down = verify_bytes(accepted, drafted, self.k, nxt)
            work = self.cloud.check_s(drafted + 1, self.s)
            t = self.request(t, up, down, work, self.cloud.gpu_seconds_per_check(drafted + 1, self.s))
            self.out.check_points += 1
            self.out.checked_positions += drafted
            t += self.edge.settle_s
            self.out.commits.extend([t] * len(accepted))
            if nxt is not None:
                t += self.edge.append
                self.out.commits.append(t)
            if not accepted and nxt is None:  # a record this loop does not know: count it and move on
                self.out.commits.append(t)
                j += 1
            i = j + (nxt is not None)
        return t

    def _redrafts(self, w: Window) -> bool:
        """A gated correction in place with drafting ahead: what was drafted behind it is dropped and
        drafted again after it, so it ends an edge phase as a cut does."""
        return w.in_place and self.gen.gated and self.lookahead > 0

    def _edge_phase(self, windows: list[Window], t: float) -> float:
        """Draft, upload and settle windows until the last (which may be cut); returns the edge's time.

        A token unchecked by design is queued alone as it is drafted (committed at once unless a
        check point ahead of it is still unanswered); only check-point windows count against the
        lookahead. Behind a gated correction the edge drafts on (its time only: the drafts are dropped).
        """
        hybrid = self.gen.mode == "hybrid"
        pending: deque[tuple[Window, float]] = deque()  # uploaded windows and their answers' arrival
        to_draft = list(windows)
        cut_follows = windows[-1].cut or self._redrafts(windows[-1])
        drafting: Window | None = None
        drafted = 0
        while True:
            while pending and pending[0][1] <= t:
                w, _ = pending.popleft()
                if hybrid and w.checked:
                    t += self.edge.correct if w.in_place else self.edge.settle_s
                self.out.commits.extend([t] * w.kept)
                if hybrid and w.in_place:
                    self.correct_in_place(t, w.records[0])
                    if self._redrafts(w):
                        return t
                if w.placed is not None:  # the edge places its own token at the cut: no cloud turn
                    t += self.edge.correct
                    self.out.commits.append(t)
                    self.correct_in_place(t, w.placed)
                    self.dropped_uploads = False  # the in-place Rollback dropped them
                    return t
                if w.cut:
                    # Drafts uploaded past the kept tokens must be rolled back on the cloud.
                    self.dropped_uploads = w.kept < w.drafted or bool(pending)
                    return t
            if pending and pending[0][1] == math.inf:  # a deferred check: every check before it kept
                t = self._send_check(pending.popleft()[0], t, pending, front=True)
            waiting = sum(not w.by_design for w, _ in pending)
            deferred = bool(pending) and pending[-1][1] == math.inf
            may_draft = (
                waiting <= self.lookahead
                and not deferred
                and (to_draft or drafting is not None or cut_follows)
            )
            if may_draft:
                if drafting is None:
                    if not to_draft and self.gen.gated:
                        # Beyond the recorded tokens, behind a gated correction: drafted and dropped
                        # at the next answer (uploads unawaited, never checked): the edge's time only.
                        t += self.edge.token_s
                        continue
                    # Beyond the recorded windows: a speculative draft the cut will throw away.
                    drafting = to_draft.pop(0) if to_draft else Window(0, self.n_check, 0, False, True)
                    drafted = 0
                t += self.edge.token_s
                drafted += 1
                if hybrid and drafting.by_design:
                    pending.append((_ONE_UNCHECKED, t))  # no wait of its own
                    if drafted >= drafting.drafted:
                        self.upload_only(t, drafting)
                        drafting = None
                    continue
                if drafted >= drafting.drafted:
                    w, drafting = drafting, None
                    if not hybrid or not w.checked:
                        pending.append((w, t))  # committed without a check
                    elif self.defer and any(p.checked for p, _ in pending):
                        pending.append((w, math.inf))  # sent when the checks ahead of it are settled
                    else:
                        t = self._send_check(w, t, pending)
                continue
            if not pending:
                return t
            t = max(t, pending[0][1])

    def _send_check(self, w: Window, t: float, pending: deque, *, front: bool = False) -> float:
        """Upload a window with its check point at t (after the edge's upload time); its answer's arrival
        is queued in pending (at the front: a deferred check, now first in line). Returns the edge's time."""
        t += self.edge.upload_s
        b = window_bytes(padded(w), self.k, greedy=self.gen.greedy)
        work, gpu = self.feed(w.drafted)
        arrival = self.request(t, b.up, b.down, work, gpu)
        if front:
            pending.appendleft((w, arrival))
        else:
            pending.append((w, arrival))
        self.out.check_points += 1
        self.out.checked_positions += w.drafted
        return t

    def _cloud_turn(self, turn: CloudTurn, t: float, *, after_cut: bool) -> float:
        c = control_bytes(turn.first)
        if after_cut and self.dropped_uploads:
            t = self.request(t, c["rollback_up"], c["rollback_down"], 0.0, 0.0)
            self.out.rollbacks += 1
        self.out.handoffs += 1
        arrive = self.up.send(t, c["handoff_up"])
        self.out.bytes_up += c["handoff_up"]
        start = max(arrive, self.cloud_free)
        work, gpu = self.feed(0)  # tokens uploaded unchecked before the handoff: fed first
        self.out.gpu_seconds += gpu
        produced = start + work + self.cloud.handoff_first_token_s(self.s)
        last_commit = t
        for n, r in enumerate(turn.records or ({"position": turn.first, "token_id": 0},) * turn.tokens):
            if n:
                produced += self.cloud.decode_s(self.s)
            size = cloud_token_bytes(r)
            self.out.bytes_down += size
            reach = self.down.send(produced, size)
            last_commit = max(reach, last_commit) + self.edge.append
            self.out.commits.append(last_commit)
        self.out.gpu_seconds += self.cloud.gpu_seconds_per_token(self.s) * turn.tokens
        self.cloud_free = produced
        self.out.bytes_down += c["handoff_down"]
        done = self.down.send(produced, c["handoff_down"])
        return max(last_commit, done)


# One token unchecked by design, queued to be committed in order (simulate's bookkeeping only).
_ONE_UNCHECKED = Window(0, 1, 1, False, False, by_design=True)


def simulate(
    gen: Generation,
    net: NetworkModel,
    edge: EdgeModel,
    cloud: CloudLatencyModel,
    cost: CostModel | None = None,
    *,
    lookahead: int | None = None,
) -> Timeline:
    """The timeline of one recorded generation (its structure) under the given models.

    Args:
        gen: a recorded generation (mode edge, cloud or hybrid).
        lookahead: windows drafted ahead of an unanswered check point (default: the trace's policy;
            a gated driver, edge/gated.py, drafts on behind as many unanswered check points).
    """
    if lookahead is None:
        lookahead = int(gen.policy.get("lookahead_windows", 1))
    return _Sim(gen, net, edge, cloud, cost or CostModel(), lookahead).run()
