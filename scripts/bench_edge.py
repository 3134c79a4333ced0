#!/usr/bin/env python3
"""Edge overhead: hybrid generation with an always-agreeing cloud vs plain llama.cpp, same tokens.

In one process, on one model, alternating (plain, hybrid) `--repeats` times:
  plain:  llama-cpp-python's own greedy generation (`Llama.generate`, temp 0) on a fresh `Llama`
          with the edge runner's n_ctx, n_threads and n_batch (no logits_all);
  hybrid: `HybridGenerator(EdgeRunner, VerifierClient(GrpcTransport), ...).generate`, greedy, against
          a verifier in another process on loopback that always agrees (every check point's P view is
          the edge's own top-k, so the top-k KL is 0 and no handoff happens): everything the edge pays
          is timed (views, protobuf, gRPC, check point round trips), nothing the cloud would.
Both timings exclude the prompt prefill (measured and printed apart) and count the same work: N
tokens picked and N tokens evaluated. Then, on the same model, one token's llama.cpp decode is timed
next to the per-token view the edge adds (read the logits, float64 log-softmax + entropy, top-k).
Target (docs/architecture.md): hybrid >= 0.95 of plain throughput.

With `--hidden both`, first (before any controller thread exists, see in_fresh_thread) `--repeats`
rounds of three runs in rotating order: plain, `EdgeRunner.step` alone with `hidden` off, and with
`hidden` on (Q's last hidden state per step, the learned router's feature); then
`EdgeRunner.score_sequence` over the hidden-on run's tokens, compared with its steps.

    python scripts/bench_edge.py                                   # the default edge model, 128 tokens
    python scripts/bench_edge.py --model tiny --json-out /tmp/bench_edge.json
    python scripts/bench_edge.py --hidden both --json-out docs/bench_edge_hidden_0.5b.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

# Only light imports at the top: the verifier process re-imports this file (multiprocessing spawn).
import grpc

from handoff.shared.errors import VerifierError
from handoff.shared.wire import PROTOCOL_VERSION, pb, pb_grpc

# ---------------------------------------------------------------------------------------------
# The always-agreeing verifier (runs in its own process)


class _Session:
    """What the agreeing verifier keeps of one session: its length and the unchecked edge tokens."""

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.length = prompt_len
        self.next_unchecked = prompt_len
        self.edge: dict[int, pb.EdgeToken] = {}  # position -> the edge's token with its top-k view
        self.scored = 0


class AgreeingVerifier(pb_grpc.VerifierServicer):
    """A handoff.v1 verifier whose P is the edge's own Q: each check point returns the edge's views."""

    def __init__(self, info: pb.ServiceInfo) -> None:
        """Serve `info` (the edge model's identity, vocabulary fingerprint and limits).

        Args:
            info: what GetInfo returns and SessionOpened carries.
        """
        self.info = info
        self._sessions = 0

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServiceInfo:
        if request.HasField("token_hashes"):
            # Only asked for when the fingerprints differ, which cannot happen with the edge's own.
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "the benchmark verifier serves no token hashes"
            )
        return self.info

    async def Session(
        self, request_iterator: AsyncIterator[pb.EdgeMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CloudMessage]:
        session: _Session | None = None
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("body")
                rid = msg.request_id
                if session is None and kind != "open":
                    raise VerifierError(
                        "FAILED_PRECONDITION", f"the first message must be `open`, got `{kind}`"
                    )
                # The replies mirror cloud/service.py: open, append, check, rollback and close are
                # answered, stop is not.
                if kind == "open":
                    if session is not None:
                        raise VerifierError("FAILED_PRECONDITION", "the session is already open")
                    session = self._open(msg.open)
                    yield pb.CloudMessage(
                        request_id=rid,
                        opened=pb.SessionOpened(
                            session_id=f"agree-{self._sessions}", length=session.length, info=self.info
                        ),
                    )
                elif kind == "append":
                    self._append(session, msg.append)
                    yield pb.CloudMessage(request_id=rid, appended=pb.Appended(length=session.length))
                elif kind == "check":
                    yield pb.CloudMessage(request_id=rid, check=self._check(session, msg.check))
                elif kind == "rollback":
                    self._rollback(session, msg.rollback.length)
                    yield pb.CloudMessage(request_id=rid, rolled_back=pb.RolledBack(length=session.length))
                elif kind == "stop":
                    pass
                elif kind == "close":
                    yield pb.CloudMessage(
                        request_id=rid, closed=pb.Closed(tokens_scored=session.scored, tokens_generated=0)
                    )
                    return
                else:  # handoff, verify: an always-agreeing cloud is never asked to generate
                    raise VerifierError("UNIMPLEMENTED", f"the benchmark verifier does not serve `{kind}`")
        except VerifierError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))

    def _open(self, req: pb.OpenSession) -> _Session:
        if req.protocol_version and req.protocol_version != PROTOCOL_VERSION:
            raise VerifierError(
                "FAILED_PRECONDITION", f"protocol {req.protocol_version!r} is not served here"
            )
        if req.vocab.digest != self.info.vocab.digest:
            raise VerifierError("FAILED_PRECONDITION", "vocabulary mismatch: not the edge model's vocabulary")
        if not req.prompt_token_ids:
            raise VerifierError("INVALID_ARGUMENT", "open: the prompt is empty")
        if not 1 <= (req.top_k or 20) <= self.info.limits.max_top_k:
            raise VerifierError(
                "INVALID_ARGUMENT", f"top_k={req.top_k} is outside [1, {self.info.limits.max_top_k}]"
            )
        self._sessions += 1
        return _Session(len(req.prompt_token_ids))

    def _append(self, s: _Session, req: pb.AppendTokens) -> None:
        if len(req.tokens) > self.info.limits.max_tokens_per_append:
            raise VerifierError("INVALID_ARGUMENT", f"append of {len(req.tokens)} tokens exceeds the limit")
        for j, t in enumerate(req.tokens):
            if t.position != s.length + j:
                raise VerifierError(
                    "INVALID_ARGUMENT",
                    f"append: token {j} is at position {t.position}, expected {s.length + j}",
                )
            s.edge[t.position] = t
        s.length += len(req.tokens)

    def _check(self, s: _Session, req: pb.CheckPoint) -> pb.CheckPointResult:
        first, last = req.from_position, req.through_position
        if first != s.next_unchecked or not first <= last < s.length:
            raise VerifierError(
                "INVALID_ARGUMENT",
                f"check point [{first}, {last}]: next unchecked {s.next_unchecked}, length {s.length}",
            )
        scores = []
        for p in range(first, last + 1):
            t = s.edge.pop(p)
            ids, logprobs = list(t.topk.ids), list(t.topk.logprobs)
            # The token's log-prob under "P" is Q's: from the top-k where it is there (always, greedy).
            token_lp = logprobs[ids.index(t.token_id)] if t.token_id in ids else t.sampled_logprob
            scores.append(
                pb.PositionScore(
                    position=p, topk=t.topk, logprobs_at_edge_topk=logprobs, token_logprob=token_lp
                )
            )
        s.next_unchecked = last + 1
        s.scored += len(scores)
        return pb.CheckPointResult(scores=scores, forward_ms=0.0, batch_size=1)

    def _rollback(self, s: _Session, length: int) -> None:
        if not s.prompt_len <= length <= s.length:
            raise VerifierError(
                "INVALID_ARGUMENT", f"rollback to {length}: must be within [{s.prompt_len}, {s.length}]"
            )
        for p in [p for p in s.edge if p >= length]:
            del s.edge[p]
        s.length = length
        s.next_unchecked = min(s.next_unchecked, length)


def serve_agreeing_verifier(info_bytes: bytes, conn) -> None:
    """Process entry: serve AgreeingVerifier on 127.0.0.1, send the port on `conn`, stop when told.

    Args:
        info_bytes: a serialized pb.ServiceInfo.
        conn: the child's end of a multiprocessing Pipe; anything received (or the parent closing it)
            stops the server.
    """
    from handoff.cloud.grpc_server import server_options
    from handoff.cloud.settings import CloudSettings

    async def main() -> None:
        info = pb.ServiceInfo.FromString(info_bytes)
        # The real server's options: message size limits, keepalive.
        settings = CloudSettings(max_message_bytes=info.limits.max_message_bytes)
        server = grpc.aio.server(options=server_options(settings))
        pb_grpc.add_VerifierServicer_to_server(AgreeingVerifier(info), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        try:
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        except EOFError:  # the parent went away
            pass
        await server.stop(0.5)

    asyncio.run(main())


class VerifierProcess:
    """The agreeing verifier in a spawned process, so that the edge process pays only its own costs."""

    def __init__(self, info: pb.ServiceInfo) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=serve_agreeing_verifier, args=(info.SerializeToString(), child), daemon=True
        )
        self._proc.start()
        child.close()
        try:
            if not self._conn.poll(60):
                raise RuntimeError("the agreeing verifier did not report its port within 60 s")
            self.port: int = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(
                f"the agreeing verifier process exited (code {self._proc.exitcode}) before reporting its port"
            ) from None
        except BaseException:
            self._proc.terminate()
            raise
        self.pid: int | None = self._proc.pid

    def stop(self) -> None:
        """Ask the server to stop; end the process (ours) if it does not within 10 s."""
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


def service_info(model_info, vocabulary) -> pb.ServiceInfo:
    """What the agreeing verifier announces: the edge model itself, with the real server's limits.

    Args:
        model_info: shared.model_info.ModelInfo of the edge model.
        vocabulary: its shared.vocab.Vocabulary.

    Returns:
        The ServiceInfo, built as cloud/service.py builds it.
    """
    from handoff.cloud.service import limits_proto
    from handoff.cloud.settings import CloudSettings
    from handoff.shared.wire import fingerprint_to_proto

    s = CloudSettings()
    limits = limits_proto(s, min(s.max_context, model_info.context_length or s.max_context))
    return pb.ServiceInfo(
        protocol_version=PROTOCOL_VERSION,
        model_id=model_info.path,
        model_name=model_info.name,
        architecture=model_info.architecture,
        parameter_count=model_info.parameter_count,
        quantization=model_info.quantization,
        context_length=model_info.context_length,
        vocab_size=model_info.vocab_size,
        vocab=fingerprint_to_proto(vocabulary.fingerprint),
        limits=limits,
        backend="always-agree (bench_edge)",
        device="cpu",
        dtype="",
        policies=[pb.POLICY_KIND_SEED, pb.POLICY_KIND_ROLLBACK],
    )


# ---------------------------------------------------------------------------------------------
# The runs


class RunnerProbe:
    """Times the runner's prefill (start) and steps during a hybrid run, without touching edge/ code.

    Wraps the runner's bound methods with instance attributes (a perf_counter pair per call, ~1 µs).
    """

    def __init__(self, runner) -> None:
        """Install the wrappers on `runner` (an EdgeRunner).

        Args:
            runner: the runner whose start() and step() are timed from now on.
        """
        self.prefill_s: float | None = None
        self.step_s = 0.0
        self.steps = 0
        start, step = runner.start, runner.step

        def timed_start(*args, **kwargs):
            t0 = time.perf_counter()
            start(*args, **kwargs)
            self.prefill_s = (self.prefill_s or 0.0) + time.perf_counter() - t0

        def timed_step(*args, **kwargs):
            t0 = time.perf_counter()
            out = step(*args, **kwargs)
            self.step_s += time.perf_counter() - t0
            self.steps += 1
            return out

        runner.start, runner.step = timed_start, timed_step

    def reset(self) -> None:
        self.prefill_s, self.step_s, self.steps = None, 0.0, 0


async def hybrid_run(generator, probe: RunnerProbe, prompt_ids: list[int], max_tokens: int) -> dict:
    """One hybrid generation, timed.

    Args:
        generator: a HybridGenerator.
        probe: the RunnerProbe on its runner.
        prompt_ids: [n] the chat-templated prompt.
        max_tokens: tokens to generate at most.

    Returns:
        tokens, total_s (the whole generate() call), prefill_s, decode_s (total - prefill), step_s (in
        runner.step), check_points, handoffs, bytes_sent, bytes_received.
    """
    probe.reset()
    # runner.start() reuses the prefix already in the context; the plain run prefills afresh, so must this.
    generator.runner.model.reset()
    t0 = time.perf_counter()
    result = await generator.generate(prompt_ids, max_tokens)
    total = time.perf_counter() - t0
    if probe.prefill_s is None:
        print(
            "warning: the controller did not call runner.start(); the hybrid time includes no prefill to subtract"
        )
    prefill = probe.prefill_s or 0.0
    tokens = [
        int(t) for t in (result.tokens if hasattr(result, "tokens") else [r.token_id for r in result.records])
    ]
    return {
        "tokens": tokens,
        "total_s": total,
        "prefill_s": prefill,
        "decode_s": total - prefill,
        "step_s": probe.step_s,
        "steps": probe.steps,
        "check_points": getattr(result, "check_points", None),
        "handoffs": getattr(result, "handoffs", None),
        "cloud_failures": getattr(result, "cloud_failures", None),
        "by_source": result.counts() if hasattr(result, "counts") else None,
        "bytes_sent": getattr(result, "bytes_sent", None),
        "bytes_received": getattr(result, "bytes_received", None),
    }


def in_fresh_thread(fn, *args):
    """Run fn(*args) on a new thread that ends with it; returns its result or raises its exception.

    llama-cpp-python here is built with OpenMP (libgomp), and every live thread that has run a llama.cpp
    decode keeps its own OpenMP team. With two teams on a 2-core machine libgomp has more threads than
    CPUs and then spins only 100 times at a barrier before sleeping (GOMP_SPINCOUNT's documented
    rule); ggml waits at such a barrier after every op, and every decode gets ~1.6x slower (measured:
    31-34 ms -> 50-55 ms per token of the 0.5B). The controller decodes on its own worker thread, so
    the baseline and the view timing run on threads that are gone before it starts.

    Args:
        fn: the function.
        *args: its arguments.

    Returns:
        What fn returned.
    """
    import threading

    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, name="bench-llama")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def plain_run(llm, prompt_ids: list[int], max_tokens: int, stop_ids: frozenset[int]) -> dict:
    """Greedy generation with llama-cpp-python's own API, timed like the hybrid run.

    The generator yields a token after sampling it and evaluates it when asked for the next one, so
    the window from the first yield to the (N+1)-th holds N evaluations and N samplings: the same work
    as N runner steps (each picks a token and evaluates it). The prefill is before the first yield.

    Args:
        llm: a llama_cpp.Llama.
        prompt_ids: [n] the chat-templated prompt.
        max_tokens: tokens to generate at most; stops after a stop token as the controller does.
        stop_ids: the runner's stop token ids.

    Returns:
        tokens, total_s, prefill_s (up to the first token), decode_s.
    """
    llm.reset()  # otherwise generate() reuses the previous run's cache for the prompt
    tokens: list[int] = []
    t0 = time.perf_counter()
    gen = llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
    first = end = None
    for tok in gen:
        now = time.perf_counter()
        if first is None:
            first = now
        if len(tokens) == max_tokens or (tokens and tokens[-1] in stop_ids):
            end = now  # the last token is now evaluated too
            break
        tokens.append(int(tok))
    gen.close()
    if end is None:  # the generator ended by itself (full context): time what there is
        end = time.perf_counter()
    return {"tokens": tokens, "total_s": end - t0, "prefill_s": first - t0, "decode_s": end - first}


def runner_run(runner, prompt_ids: list[int], max_tokens: int, hidden: bool, gate=None) -> dict:
    """Greedy generation with EdgeRunner.step alone (no controller, no cloud), timed like plain_run.

    Args:
        runner: an EdgeRunner (greedy sampling).
        prompt_ids: [n] the chat-templated prompt.
        max_tokens: steps at most; stops after a stop token as plain_run does.
        hidden: the runner's `hidden` for this run (switched off again after it).
        gate: a router policy (RouterPolicy) whose gate() scores every step, timed with the decode:
            the learned router's whole per-token cost on the edge (features, hidden state, score).

    Returns:
        tokens, steps (the EdgeSteps), prefill_s (start(); with hidden on it includes the decode that
        gives the last prompt token's hidden state), decode_s (the steps: N views, picks, evaluations).
    """
    runner.model.reset()  # before switching hidden on: nothing to compute for an old context
    runner.hidden = hidden
    t0 = time.perf_counter()
    runner.start(prompt_ids)
    t1 = time.perf_counter()
    steps: list = []
    if gate is not None:
        gate.begin()
    while len(steps) < max_tokens and not (steps and steps[-1].token_id in runner.stop_token_ids):
        steps.append(runner.step())
        if gate is not None:
            gate.gate(steps[-1], len(steps) - 1)
    end = time.perf_counter()
    runner.hidden = False
    tokens = [s.token_id for s in steps]
    return {"tokens": tokens, "steps": steps, "prefill_s": t1 - t0, "decode_s": end - t1}


def score_diffs(runner, prompt_ids: list[int], steps: list, batch: int) -> dict:
    """EdgeRunner.score_sequence against the same positions' steps (one token per decode).

    Args:
        runner: the EdgeRunner.
        prompt_ids: [n] the prompt the steps followed.
        steps: [T] EdgeSteps of a hidden-on greedy run.
        batch: score_sequence's tokens per decode.

    Returns:
        batch, seconds, rows with the same top-1 / top-k id set / top-k ids in order, max |diff| of
        topk_logprobs (rows with the same ids in order), token_logprob, entropy and hidden, the
        largest |hidden entry| and hidden's largest relative L2 difference.
    """
    import numpy as np

    t0 = time.perf_counter()
    sc = runner.score_sequence(prompt_ids, [s.token_id for s in steps], batch=batch)
    seconds = time.perf_counter() - t0
    same = [t for t, s in enumerate(steps) if np.array_equal(sc.topk_ids[t], s.topk_ids)]
    h = np.stack([s.hidden for s in steps])  # [T, n_embd]
    return {
        "batch": batch,
        "tokens": len(steps),
        "seconds": seconds,
        "top1_same": sum(int(sc.topk_ids[t, 0] == s.topk_ids[0]) for t, s in enumerate(steps)),
        "topk_set_same": sum(set(sc.topk_ids[t].tolist()) == set(s.topk_ids.tolist()) for t, s in enumerate(steps)),
        "topk_same": len(same),
        "topk_logprobs_max_abs": max((float(np.abs(sc.topk_logprobs[t] - steps[t].topk_logprobs).max()) for t in same), default=0.0),
        "token_logprob_max_abs": float(np.abs(sc.token_logprob - [s.token_logprob for s in steps]).max()),
        "entropy_max_abs": float(np.abs(sc.entropy - [s.entropy for s in steps]).max()),
        "hidden_max_abs": float(np.abs(sc.hidden - h).max()),
        "hidden_abs_max": float(np.abs(h).max()),
        "hidden_rel_l2_max": float((np.linalg.norm(sc.hidden - h, axis=1) / np.linalg.norm(h, axis=1)).max()),
    }  # fmt: skip


def hidden_rounds(args: argparse.Namespace, runner, llm, prompt_ids: list[int], stops, gate=None) -> dict:
    """--hidden both: plain vs the runner with hidden off vs on, interleaved; then score_diffs.

    Every run decodes on a short-lived thread (in_fresh_thread), in an order rotated each round.

    Args:
        args: the command line (max_tokens, repeats).
        runner: the EdgeRunner (greedy).
        llm: the plain llama_cpp.Llama.
        prompt_ids: [n] the prompt.
        stops: the runner's stop token ids.
        gate: --router's policy: the hidden-on run also scores every step with it.

    Returns:
        summary (medians of tok/s, ratios, prefill ms; tokens_match, views_identical), rounds, scoring.
    """
    import numpy as np

    runs = {
        "plain": lambda n: plain_run(llm, prompt_ids, n, stops),
        "hidden_off": lambda n: runner_run(runner, prompt_ids, n, False),
        "hidden_on": lambda n: runner_run(runner, prompt_ids, n, True, gate),
    }
    names = list(runs)
    for name in names:  # warm-up
        in_fresh_thread(runs[name], min(16, args.max_tokens))
    rounds = []
    for r in range(args.repeats):
        order = names[r % 3 :] + names[: r % 3]
        out = {name: in_fresh_thread(runs[name], args.max_tokens) for name in order}
        row = {"order": order} | {f"{n}_tok_s": len(out[n]["tokens"]) / out[n]["decode_s"] for n in names}
        row |= {f"{n}_prefill_ms": out[n]["prefill_s"] * 1e3 for n in names}
        row["off_ratio"] = row["hidden_off_tok_s"] / row["plain_tok_s"]
        row["on_ratio"] = row["hidden_on_tok_s"] / row["plain_tok_s"]
        row["on_vs_off"] = row["hidden_on_tok_s"] / row["hidden_off_tok_s"]
        row["tokens_match"] = (
            out["plain"]["tokens"] == out["hidden_off"]["tokens"] == out["hidden_on"]["tokens"]
        )
        # Hidden on must not change Q's views: the same top-k log-probs, bit for bit, at every step.
        row["views_identical"] = all(
            np.array_equal(a.topk_ids, b.topk_ids) and np.array_equal(a.topk_logprobs, b.topk_logprobs)
            for a, b in zip(out["hidden_off"]["steps"], out["hidden_on"]["steps"], strict=True)
        )
        rounds.append(row)
        print(
            f"hidden round {r + 1}/{args.repeats} ({', '.join(order)}): plain {row['plain_tok_s']:.1f}, runner "
            f"hidden off {row['hidden_off_tok_s']:.1f}, on {row['hidden_on_tok_s']:.1f} tok/s; on/plain "
            f"{row['on_ratio']:.3f}, off/plain {row['off_ratio']:.3f}, on/off {row['on_vs_off']:.3f}",
            flush=True,
        )
    scoring = [
        in_fresh_thread(score_diffs, runner, prompt_ids, out["hidden_on"]["steps"], b) for b in (256, 1)
    ]
    keys = [k for k in rounds[0] if k.endswith(("_tok_s", "_ms", "_ratio", "on_vs_off"))]
    summary = {k: median(rounds, k) for k in keys}
    summary["tokens_match"] = all(r["tokens_match"] for r in rounds)
    summary["views_identical"] = all(r["views_identical"] for r in rounds)
    return {"summary": summary, "rounds": rounds, "scoring": scoring}


def print_hidden(h: dict, repeats: int) -> None:
    """The --hidden both table (see hidden_rounds)."""
    s, sc = h["summary"], h["scoring"]
    print(
        f"\n{'median of ' + str(repeats) + ' rounds':<28} {'plain':>10} {'hidden off':>11} {'hidden on':>10}"
    )
    print(
        f"{'decode tok/s':<28} {s['plain_tok_s']:>10.1f} {s['hidden_off_tok_s']:>11.1f} {s['hidden_on_tok_s']:>10.1f}"
    )
    print(
        f"{'ratio to plain':<28} {'':>10} {s['off_ratio']:>11.3f} {s['on_ratio']:>10.3f}   (target >= 0.95); "
        f"on/off {s['on_vs_off']:.3f}"
    )
    print(
        f"{'prefill ms':<28} {s['plain_prefill_ms']:>10.1f} {s['hidden_off_prefill_ms']:>11.1f} "
        f"{s['hidden_on_prefill_ms']:>10.1f}"
    )
    print(
        "tokens: plain = runner off = runner on"
        if s["tokens_match"]
        else "warning: the three runs' tokens differ",
        "; views with hidden on = off, bit for bit"
        if s["views_identical"]
        else "; warning: hidden on changed views",
        sep="",
    )
    for d in sc:
        print(
            f"score_sequence(batch={d['batch']}) vs steps, {d['tokens']} tokens in {d['seconds']:.2f} s: same "
            f"top-1 / top-k set / top-k order in {d['top1_same']} / {d['topk_set_same']} / {d['topk_same']} rows; "
            f"max |diff|: top-k log-probs {d['topk_logprobs_max_abs']:.3g}, token log-prob "
            f"{d['token_logprob_max_abs']:.3g}, entropy {d['entropy_max_abs']:.3g}, hidden {d['hidden_max_abs']:.3g} "
            f"(entries up to {d['hidden_abs_max']:.3g}; relative L2 <= {d['hidden_rel_l2_max']:.3g})"
        )


def topk_overhead(model, prompt_ids: list[int], n_tokens: int, k: int) -> dict:
    """Per-token cost of the edge's view next to one llama.cpp decode, on the runner's own context.

    Args:
        model: the runner's shared.llama_cpp_model.LlamaCppModel.
        prompt_ids: [n] the prompt to start from.
        n_tokens: tokens to time (greedy continuation).
        k: top-k size.

    Returns:
        Median µs per token of: decode (llama eval of one token), logits (reading the last position's
        logits), view (shared.divergence.logits_view: top-k and entropy, what EdgeRunner.step does),
        argmax (the greedy pick), and float64 (log_softmax_and_entropy + top_k: the float64 path the
        runner used before, for comparison); the view's total (logits + view) and its fraction of the
        decode.
    """
    import numpy as np

    from handoff.shared.divergence import log_softmax_and_entropy, logits_view, top_k

    model.reset()
    model.eval(prompt_ids)
    rows = []
    for _ in range(n_tokens):
        t0 = time.perf_counter()
        logits = model.next_logits()
        t1 = time.perf_counter()
        logits_view(logits, k)
        t2 = time.perf_counter()
        token = int(np.argmax(logits))
        t3 = time.perf_counter()
        top_k(log_softmax_and_entropy(logits)[0], k)
        t4 = time.perf_counter()
        model.eval([token])
        t5 = time.perf_counter()
        rows.append((t5 - t4, t1 - t0, t2 - t1, t3 - t2, t4 - t3))
    cols = list(zip(*rows, strict=True))
    med = {
        name: statistics.median(c) * 1e6
        for name, c in zip(
            ("decode_us", "logits_us", "view_only_us", "argmax_us", "float64_us"), cols, strict=True
        )
    }
    view = statistics.median(r[1] + r[2] for r in rows) * 1e6
    return med | {"tokens": n_tokens, "k": k, "view_us": view, "view_fraction": view / med["decode_us"]}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token lists differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------
# Main


def resolve_model(name: str, workdir: Path):
    """The edge model to benchmark and the settings to read its metadata with.

    Args:
        name: `tiny`, a registry name or a GGUF path.
        workdir: where the tiny model is written.

    Returns:
        (ModelRef, HandoffSettings).
    """
    from handoff.shared.models import ModelRef, ensure_model, resolve
    from handoff.shared.settings import DEFAULT_EDGE_MODEL, HandoffSettings, get_settings

    if name != "tiny":
        settings = get_settings()
        return resolve(name, "edge", settings), settings
    from handoff.shared.tiny_gguf import SEED_A, extract_tokenizer, write_tiny_qwen2_gguf

    print("building the tiny model (reads the edge GGUF's tokenizer, ~10 s)", flush=True)
    tokenizer = extract_tokenizer(ensure_model(DEFAULT_EDGE_MODEL))
    path = write_tiny_qwen2_gguf(workdir / "tiny-a.gguf", tokenizer, SEED_A)
    # The metadata cache keys on the path: keep the throw-away tiny files out of the user's cache.
    return ModelRef("gguf", path, "tiny"), HandoffSettings(cache_dir=workdir / "cache")


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


async def bench(args: argparse.Namespace, workdir: Path) -> dict:
    """Load everything, run the alternating pairs and the top-k timing, print and return the results.

    Args:
        args: the parsed command line.
        workdir: a temporary directory.

    Returns:
        The JSON-ready result.
    """
    import llama_cpp

    from handoff.edge.controller import HybridGenerator
    from handoff.edge.policy import PolicyConfig
    from handoff.edge.runner import EdgeRunner
    from handoff.edge.verifier_client import GrpcTransport, VerifierClient
    from handoff.shared.model_info import load_model_info

    ref, settings = resolve_model(args.model, workdir)
    model_info, vocabulary = load_model_info(ref, settings)
    print(
        f"model {model_info.name} ({ref.name}, {model_info.quantization}, vocab {model_info.vocab_size:,}); "
        f"{args.threads} threads; {args.max_tokens} tokens, check every {args.check_interval}, k={args.top_k}",
        flush=True,
    )
    verifier = VerifierProcess(service_info(model_info, vocabulary))
    runner = llm = client = None
    try:
        runner = EdgeRunner(ref.path, k=args.top_k, n_threads=args.threads)
        # The same parameters as the runner's context (shared/llama_cpp_model.py), fresh.
        llm = llama_cpp.Llama(
            model_path=str(ref.path), n_ctx=runner.n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
            n_batch=512, logits_all=False, seed=0, verbose=False,
        )  # fmt: skip
        client = VerifierClient(GrpcTransport(f"127.0.0.1:{verifier.port}"))
        await client.check_vocabulary(vocabulary)  # also connects the channel before any timing
        text = runner.model.chat_prompt([{"role": "user", "content": args.prompt}])
        prompt_ids = runner.model.tokenize(text)
        policy = PolicyConfig(check_interval=args.check_interval, top_k=args.top_k)
        generator = HybridGenerator(runner, client, vocabulary, policy)
        stops = runner.stop_token_ids
        hidden = None
        if args.hidden == "both":  # before the controller's thread decodes (one OpenMP team at a time)
            gate = None
            if args.router is not None:
                from handoff.edge.policy import make_policy

                gate = make_policy(PolicyConfig(kind="router", router=str(args.router)))
                gate.attach(vocabulary)
            hidden = hidden_rounds(args, runner, llm, prompt_ids, stops, gate)
        probe = RunnerProbe(runner)
        # --baseline-thread main keeps this thread an OpenMP master next to the controller's (see
        # in_fresh_thread): it shows what two long-lived llama.cpp threads cost the hybrid's decodes.
        on_thread = in_fresh_thread if args.baseline_thread == "fresh" else (lambda fn, *a: fn(*a))
        print(
            f"prompt: {len(prompt_ids)} tokens; verifier on 127.0.0.1:{verifier.port} (process {verifier.pid})"
        )

        # Warm-up: first decodes page the weights in and size llama.cpp's buffers.
        warm = min(16, args.max_tokens)
        on_thread(plain_run, llm, prompt_ids, warm, stops)
        await hybrid_run(generator, probe, prompt_ids, warm)

        pairs = []
        mismatch: int | None = None
        for r in range(args.repeats):
            plain = on_thread(plain_run, llm, prompt_ids, args.max_tokens, stops)
            hybrid = await hybrid_run(generator, probe, prompt_ids, args.max_tokens)
            diff = first_difference(hybrid["tokens"], plain["tokens"])
            if diff is not None:
                mismatch = diff if mismatch is None else min(mismatch, diff)
                print(
                    f"warning: repeat {r + 1}: hybrid and plain tokens differ from generated position {diff} "
                    f"({len(hybrid['tokens'])} vs {len(plain['tokens'])} tokens)"
                )
            if hybrid["handoffs"] or hybrid["cloud_failures"] or (hybrid["by_source"] or {}).get("unchecked"):
                print(
                    f"warning: repeat {r + 1}: with an always-agreeing cloud: {hybrid['handoffs']} handoffs, "
                    f"{hybrid['cloud_failures']} cloud failures, tokens by source {hybrid['by_source']}"
                )
            n_plain, n_hybrid = len(plain["tokens"]), len(hybrid["tokens"])
            pair = {
                "plain_tokens": n_plain, "plain_prefill_s": plain["prefill_s"], "plain_decode_s": plain["decode_s"],
                "plain_total_s": plain["total_s"], "plain_tok_s": n_plain / plain["decode_s"],
                "hybrid_tokens": n_hybrid, "hybrid_prefill_s": hybrid["prefill_s"],
                "hybrid_decode_s": hybrid["decode_s"], "hybrid_total_s": hybrid["total_s"],
                "hybrid_tok_s": n_hybrid / hybrid["decode_s"], "hybrid_step_s": hybrid["step_s"],
                "check_points": hybrid["check_points"], "handoffs": hybrid["handoffs"],
                "cloud_failures": hybrid["cloud_failures"],
                "by_source": hybrid["by_source"], "bytes_sent": hybrid["bytes_sent"],
                "bytes_received": hybrid["bytes_received"], "tokens_match": diff is None,
            }  # fmt: skip
            pair["ratio"] = pair["hybrid_tok_s"] / pair["plain_tok_s"]
            pair["ratio_with_prefill"] = (n_hybrid / hybrid["total_s"]) / (n_plain / plain["total_s"])
            pairs.append(pair)
            print(
                f"repeat {r + 1}/{args.repeats}: plain {pair['plain_tok_s']:.1f} tok/s ({n_plain} tokens, "
                f"{plain['decode_s']:.3f} s), hybrid {pair['hybrid_tok_s']:.1f} tok/s ({n_hybrid} tokens, "
                f"{hybrid['decode_s']:.3f} s, {hybrid['check_points']} check points), ratio {pair['ratio']:.3f}",
                flush=True,
            )

        print(f"timing the per-token view over {args.max_tokens} tokens", flush=True)
        view = on_thread(topk_overhead, runner.model, prompt_ids, args.max_tokens, args.top_k)
        sample_tokens = pairs[-1]["hybrid_tokens"]
    finally:
        if client is not None:
            await client.close()
        if runner is not None:
            runner.close()
        if llm is not None:
            llm.close()
        verifier.stop()

    n = max(1, sample_tokens)
    last = pairs[-1]
    summary = {
        "plain_tok_s": median(pairs, "plain_tok_s"),
        "hybrid_tok_s": median(pairs, "hybrid_tok_s"),
        "ratio": median(pairs, "ratio"),
        "ratio_with_prefill": median(pairs, "ratio_with_prefill"),
        "plain_prefill_ms": median(pairs, "plain_prefill_s") * 1e3,
        "hybrid_prefill_ms": median(pairs, "hybrid_prefill_s") * 1e3,
        "plain_ms_per_token": statistics.median(p["plain_decode_s"] / p["plain_tokens"] for p in pairs) * 1e3,
        "hybrid_ms_per_token": statistics.median(p["hybrid_decode_s"] / p["hybrid_tokens"] for p in pairs)
        * 1e3,
        "hybrid_step_ms_per_token": statistics.median(p["hybrid_step_s"] / p["hybrid_tokens"] for p in pairs)
        * 1e3,
        "tokens_match": all(p["tokens_match"] for p in pairs),
        "first_mismatch": mismatch,
        "bytes_sent_per_token": last["bytes_sent"] / n if last["bytes_sent"] is not None else None,
    }
    summary["hybrid_rest_ms_per_token"] = summary["hybrid_ms_per_token"] - summary["hybrid_step_ms_per_token"]

    print()
    print(f"{'median of ' + str(args.repeats) + ' pairs':<28} {'plain':>10} {'hybrid':>10} {'ratio':>7}")
    print(
        f"{'decode tok/s':<28} {summary['plain_tok_s']:>10.1f} {summary['hybrid_tok_s']:>10.1f} "
        f"{summary['ratio']:>7.3f}   (target >= 0.95)"
    )
    print(
        f"{'decode ms/token':<28} {summary['plain_ms_per_token']:>10.2f} {summary['hybrid_ms_per_token']:>10.2f}"
    )
    print(f"{'prefill ms':<28} {summary['plain_prefill_ms']:>10.1f} {summary['hybrid_prefill_ms']:>10.1f}")
    print(f"{'ratio with prefill':<28} {'':>10} {'':>10} {summary['ratio_with_prefill']:>7.3f}")
    print(
        f"hybrid ms/token: {summary['hybrid_step_ms_per_token']:.2f} in runner.step (view, pick, decode) + "
        f"{summary['hybrid_rest_ms_per_token']:.2f} elsewhere (controller, protobuf, gRPC round trips)"
    )
    print(
        f"per token: llama.cpp decode {view['decode_us']:.0f} µs; view {view['view_us']:.0f} µs = logits "
        f"{view['logits_us']:.0f} + top-{args.top_k}/entropy (logits_view) {view['view_only_us']:.0f} "
        f"({view['view_fraction']:.1%} of the decode); greedy argmax {view['argmax_us']:.0f} µs; "
        f"the float64 path (log-softmax + top-k) would take {view['float64_us']:.0f} µs"
    )
    if summary["bytes_sent_per_token"] is not None:
        print(f"uplink: {summary['bytes_sent_per_token']:.1f} B per generated token (k={args.top_k})")
    print(
        "tokens: hybrid = plain on every repeat"
        if summary["tokens_match"]
        else f"warning: tokens differ (first at generated position {mismatch})"
    )
    if hidden is not None:
        print_hidden(hidden, args.repeats)
    return {
        "model": ref.name,
        "model_path": str(ref.path),
        "router": None if args.router is None else str(args.router),
        "model_name": model_info.name,
        "vocab_size": model_info.vocab_size,
        "threads": args.threads,
        "baseline_thread": args.baseline_thread,
        "max_tokens": args.max_tokens,
        "check_interval": args.check_interval,
        "top_k": args.top_k,
        "repeats": args.repeats,
        "prompt": args.prompt,
        "prompt_tokens": len(prompt_ids),
        "timing": "decode only: prefill excluded from both (reported apart); N picks + N evaluations each",
        "summary": summary,
        "topk_overhead": view,
        "pairs": pairs,
        "hidden": hidden,
    }


def main() -> None:
    from handoff.cli import DEFAULT_PROMPT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        help="`tiny`, a registry name or a GGUF path (default: the edge model setting)",
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--check-interval", type=int, default=8, help="N: edge tokens per check point")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (the machine's cores)")
    parser.add_argument("--repeats", type=int, default=3, help="(plain, hybrid) pairs, alternated")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message, chat-templated")
    parser.add_argument(
        "--baseline-thread",
        choices=["fresh", "main"],
        default="fresh",
        help="where the plain runs and the view timing decode: a short-lived thread each (default), or "
        "the main thread, which then stays a second OpenMP master next to the controller's",
    )
    parser.add_argument(
        "--hidden",
        choices=["off", "both"],
        default="off",
        help="both: also time plain vs EdgeRunner.step with Q's hidden state off and on, and compare "
        "score_sequence with the steps",
    )
    parser.add_argument(
        "--router",
        type=Path,
        help="with --hidden both: the hidden-on run also scores every step with this router file "
        "(the learned router's features and score on the edge)",
    )
    parser.add_argument("--json-out", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.model is None:
        from handoff.shared.settings import get_settings

        args.model = get_settings().edge_model
    if args.max_tokens < 1 or args.repeats < 1 or args.check_interval < 1 or args.top_k < 1:
        parser.error("--max-tokens, --repeats, --check-interval and --top-k must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
