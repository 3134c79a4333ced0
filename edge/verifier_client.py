"""The edge's side of the edge↔cloud boundary: one client API over two transports.

`VerifierClient` speaks the handoff.v1 session protocol; a transport moves the messages:
`GrpcTransport` over the network, `InProcessTransport` straight into a VerifierService in the same
process (tests, the single-machine demo). Errors arrive as VerifierError with a gRPC status code
name either way.

Requests are pipelined: `append_nowait` sends without waiting for the reply, so the edge can keep
streaming tokens while a check point is in flight; replies are matched to requests by request_id.

`GrpcTransport(delay=NetworkDelay(...))` adds a simulated network (latency, bandwidth) on top of a
loopback connection, so that real runs can be compared with the latency simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from handoff.shared.alignment import VocabAlignment, align, cached_alignment, store_alignment
from handoff.shared.errors import VerifierError, VocabularyMismatch
from handoff.shared.vocab import Vocabulary, check_compatible, local_block_digest
from handoff.shared.wire import PROTOCOL_VERSION, fingerprint_from_proto, fingerprint_to_proto, pb, pb_grpc

logger = logging.getLogger(__name__)

# gRPC metadata carrying a session's routing key. Ray Serve's gRPC proxy hands this key to the
# deployment's request router (the consistent-hash router keeps a key on one replica); a plain
# `serve-cloud` ignores it.
ROUTING_KEY_METADATA = "session_id"
# Token pieces asked for per GetInfo call (the server's limit, cloud/service.py MAX_TOKEN_PIECES).
PIECES_PER_CALL = 65536


class MessageStream(Protocol):
    async def send(self, msg: pb.EdgeMessage) -> None: ...
    async def recv(self) -> pb.CloudMessage | None: ...  # None: the cloud ended the stream cleanly
    async def done_sending(self) -> None: ...
    def cancel(self) -> None: ...


class Transport(Protocol):
    async def get_info(self, request: pb.GetInfoRequest) -> pb.ServiceInfo: ...
    def open_stream(self, routing_key: str | None = None) -> MessageStream: ...
    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# gRPC


def _from_rpc_error(e: grpc.aio.AioRpcError) -> VerifierError:
    return VerifierError(e.code().name, e.details() or e.code().name)


class _GrpcStream:
    def __init__(self, call) -> None:
        self._call = call

    async def send(self, msg: pb.EdgeMessage) -> None:
        try:
            await self._call.write(msg)
        except grpc.aio.AioRpcError as e:
            raise _from_rpc_error(e) from None
        except asyncio.InvalidStateError:  # the call already ended; its status tells why
            raise await self._final_error() from None

    async def recv(self) -> pb.CloudMessage | None:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise _from_rpc_error(e) from None
        if msg is grpc.aio.EOF:
            if await self._call.code() != grpc.StatusCode.OK:
                raise await self._final_error()
            return None
        return msg

    async def _final_error(self) -> VerifierError:
        code = await self._call.code()
        return VerifierError(code.name, await self._call.details() or code.name)

    async def done_sending(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call.done_writing()

    def cancel(self) -> None:
        self._call.cancel()


# ---------------------------------------------------------------------------------------------
# A simulated network on top of a (loopback) gRPC connection


@dataclass(frozen=True)
class NetworkDelay:
    """A simulated network between the edge and the cloud, for loopback runs compared with a simulator.

    Every message takes a one-way delay of rtt_s / 2 in each direction. A message of B bytes (its
    protobuf `ByteSize()`) also takes B / bandwidth seconds to transmit, and transmissions in one
    direction are serialised: a message starts transmitting when the previous one in the same
    direction has finished. So a message sent at `now` arrives at
    `max(now, previous_tx_end) + B / bandwidth + rtt_s / 2`. The sender never waits for that.

    Args:
        rtt_s: round-trip time in seconds (>= 0).
        uplink_bytes_per_s: edge -> cloud bandwidth; None: unlimited.
        downlink_bytes_per_s: cloud -> edge bandwidth; None: unlimited.
    """

    rtt_s: float = 0.0
    uplink_bytes_per_s: float | None = None
    downlink_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise ValueError(f"rtt_s must be a finite number >= 0, not {self.rtt_s}")
        for name in ("uplink_bytes_per_s", "downlink_bytes_per_s"):
            bw = getattr(self, name)
            if bw is not None and not bw > 0:  # `not >`: NaN is rejected too
                raise ValueError(f"{name} must be > 0 (or None: unlimited), not {bw}")

    @property
    def one_way_s(self) -> float:
        return self.rtt_s / 2


class _Pipe:
    """One direction of the simulated link: when each message arrives, transmissions in turn."""

    def __init__(self, one_way_s: float, bytes_per_s: float | None) -> None:
        self.one_way_s = one_way_s
        self.bytes_per_s = bytes_per_s
        self.free_at = -math.inf  # when the transmission in progress ends

    def schedule(self, size: int, now: float) -> float:
        """Start transmitting `size` bytes at `now` or after the previous message; returns its arrival.

        Args:
            size: the message's size in bytes.
            now: the event loop's clock.

        Returns:
            The arrival time on the same clock.
        """
        start = max(now, self.free_at)
        self.free_at = start + (size / self.bytes_per_s if self.bytes_per_s else 0.0)
        return self.free_at + self.one_way_s


async def _sleep_until(when: float) -> None:
    delay = when - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


def _cancelled_by_grpc() -> bool:
    """True if a CancelledError came from the call (cancelled by the channel), not from our task."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class _DelayedStream:
    """A _GrpcStream behind a simulated network: sends return at once, messages arrive later, in order.

    A writer task writes each message to the real call at its uplink arrival time; a reader task
    takes replies off the call as they come and stamps each with its downlink arrival time, at which
    `recv` hands it over. The end of the stream and errors travel in order behind the messages.
    """

    def __init__(self, inner: _GrpcStream, uplink: _Pipe, downlink: _Pipe) -> None:
        self._inner = inner
        self._uplink, self._downlink = uplink, downlink
        loop = asyncio.get_running_loop()
        # (arrival, message); None: the half-close.
        self._outbox: asyncio.Queue[tuple[float, pb.EdgeMessage | None]] = asyncio.Queue()
        # (arrival, reply); None: the cloud ended the stream; an error: the call failed.
        self._inbox: asyncio.Queue[tuple[float, pb.CloudMessage | VerifierError | None]] = asyncio.Queue()
        self._head: tuple[float, pb.CloudMessage | VerifierError | None] | None = None
        self._ended = False
        self._last: VerifierError | None = None  # recv's last word once ended (None: a clean end)
        self._send_error: VerifierError | None = None
        self._half_closed = False
        self._cancelled = False
        self._woken = loop.create_future()  # wakes a recv waiting for an arrival time
        self.last_uplink_arrival = -math.inf
        self._writer = loop.create_task(self._write_loop(), name="delay-uplink")
        self._reader = loop.create_task(self._read_loop(), name="delay-downlink")

    # -- background tasks ------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            while True:
                arrival, msg = await self._outbox.get()
                await _sleep_until(arrival)
                if msg is None:
                    await self._inner.done_sending()
                    return
                await self._inner.send(msg)
        except VerifierError as e:
            error = e
        except asyncio.CancelledError:
            if not _cancelled_by_grpc():
                raise
            error = VerifierError("CANCELLED", "the call was cancelled")
        except Exception as e:  # not gRPC's: still an error the session must see, not a dead task
            logger.warning("delayed stream: a write failed unexpectedly", exc_info=True)
            error = VerifierError("UNKNOWN", f"{type(e).__name__}: {e}")
        # What was still queued is lost with the call; the sender learns of it on its next send,
        # the receiver after the replies that came before (a hang would be worse than a duplicate).
        logger.debug("delayed stream: a write failed: %s", error)
        self._send_error = error
        self._deliver(error)

    async def _read_loop(self) -> None:
        while True:
            try:
                item = await self._inner.recv()
            except VerifierError as e:
                item = e
            except asyncio.CancelledError:
                if not _cancelled_by_grpc():
                    raise
                item = VerifierError("CANCELLED", "the call was cancelled")
            except Exception as e:  # not gRPC's: end the stream with it rather than leave recv waiting
                logger.warning("delayed stream: a read failed unexpectedly", exc_info=True)
                item = VerifierError("UNKNOWN", f"{type(e).__name__}: {e}")
            self._deliver(item)
            if not isinstance(item, pb.CloudMessage):
                return

    def _deliver(self, item: pb.CloudMessage | VerifierError | None) -> None:
        size = item.ByteSize() if isinstance(item, pb.CloudMessage) else 0
        self._inbox.put_nowait((self._downlink.schedule(size, asyncio.get_running_loop().time()), item))

    # -- MessageStream ---------------------------------------------------------------------------

    async def send(self, msg: pb.EdgeMessage) -> None:
        if self._cancelled:
            raise VerifierError("CANCELLED", "the session was cancelled")
        if self._send_error is not None:
            raise self._send_error
        if self._half_closed:
            raise VerifierError("FAILED_PRECONDITION", "send after done_sending")
        # A copy: the message is on the wire once sent, whatever the caller does with it next.
        copy = pb.EdgeMessage()
        copy.CopyFrom(msg)
        self._enqueue(copy.ByteSize(), copy)

    def _enqueue(self, size: int, msg: pb.EdgeMessage | None) -> None:
        arrival = self._uplink.schedule(size, asyncio.get_running_loop().time())
        self.last_uplink_arrival = arrival
        self._outbox.put_nowait((arrival, msg))

    async def recv(self) -> pb.CloudMessage | None:
        while not self._ended:
            if self._head is None:
                self._head = await self._inbox.get()
            # The head stays put while we wait: a cancelled recv loses nothing.
            delay = self._head[0] - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.wait([self._woken], timeout=delay)
            if self._ended:  # cancel() came meanwhile
                break
            item, self._head = self._head[1], None
            if isinstance(item, pb.CloudMessage):
                return item
            # After the end, every recv repeats it, as a finished gRPC call does.
            self._ended, self._last = True, item
        if self._last is not None:
            raise self._last
        return None

    async def done_sending(self) -> None:
        # Like done_writing: the half-close is on its way when this returns, behind the messages.
        if not (self._half_closed or self._cancelled or self._send_error is not None):
            self._half_closed = True
            self._enqueue(0, None)

    def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self._inner.cancel()
        self._writer.cancel()
        self._reader.cancel()
        # A cancelled call delivers nothing more: drop what is in flight and wake a waiting recv.
        if not self._ended:
            self._ended, self._last = True, VerifierError("CANCELLED", "the session was cancelled")
        self._woken.set_result(None)
        self._head = None
        while not self._inbox.empty():
            self._inbox.get_nowait()
        self._inbox.put_nowait((-math.inf, None))

    async def aclose(self, linger_s: float) -> None:
        """Stop the background tasks and wait for them (the transport is closing).

        Args:
            linger_s: at most this long, let a half-close still in flight reach the cloud first.
        """
        if self._half_closed and not self._writer.done():
            loop = asyncio.get_running_loop()
            wait = min(linger_s, max(0.0, self.last_uplink_arrival - loop.time()) + 0.05)
            await asyncio.wait([self._writer], timeout=wait)
        self.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)


class GrpcTransport:
    """A channel to a remote verifier, with keepalive, size limits, optional TLS and bearer token."""

    def __init__(
        self,
        target: str,
        *,
        root_certificates: bytes | None = None,
        tls: bool = False,
        auth_token: str | None = None,
        max_message_bytes: int = 4 << 20,
        timeout_s: float = 30.0,
        server_name: str | None = None,
        max_reconnect_backoff_ms: int = 4_000,
        delay: NetworkDelay | None = None,
    ) -> None:
        """Open a channel (connections are made lazily, on the first call).

        Args:
            target: HOST:PORT of the verifier.
            root_certificates: PEM roots to trust (implies TLS).
            tls: connect with TLS (system roots unless root_certificates).
            auth_token: bearer token sent with every call.
            max_message_bytes: the largest message either way.
            timeout_s: deadline of unary calls (GetInfo).
            server_name: the TLS name to expect, when it differs from target's host.
            max_reconnect_backoff_ms: cap of gRPC's reconnect backoff.
            delay: a simulated network on top of the connection (loopback testing); None: none.
        """
        options = [
            # gRPC's own reconnect backoff (1 s initial, up to 120 s) would keep a restarted cloud
            # unreachable long after it is back; the edge retries on its own schedule on top of this.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.VerifierStub(self.channel)
        self.metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self.timeout_s = timeout_s
        self.delay = delay
        if delay is not None:
            # One link for the whole channel: sessions and GetInfo share each direction's bandwidth.
            self._uplink = _Pipe(delay.one_way_s, delay.uplink_bytes_per_s)
            self._downlink = _Pipe(delay.one_way_s, delay.downlink_bytes_per_s)
            self._delayed: weakref.WeakSet[_DelayedStream] = weakref.WeakSet()

    async def get_info(self, request: pb.GetInfoRequest) -> pb.ServiceInfo:
        if self.delay is None:
            return await self._get_info(request)
        loop = asyncio.get_running_loop()
        await _sleep_until(self._uplink.schedule(request.ByteSize(), loop.time()))
        try:
            reply = await self._get_info(request)
        except VerifierError:
            await _sleep_until(self._downlink.schedule(0, loop.time()))  # the status travels back too
            raise
        await _sleep_until(self._downlink.schedule(reply.ByteSize(), loop.time()))
        return reply

    async def _get_info(self, request: pb.GetInfoRequest) -> pb.ServiceInfo:
        try:
            return await self.stub.GetInfo(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise _from_rpc_error(e) from None

    def open_stream(self, routing_key: str | None = None) -> MessageStream:
        """A session stream; `routing_key` rides along as `session_id` metadata (see ROUTING_KEY_METADATA)."""
        metadata = self.metadata
        if routing_key:
            metadata = (*metadata, (ROUTING_KEY_METADATA, routing_key))
        stream = _GrpcStream(self.stub.Session(metadata=metadata))
        if self.delay is None:
            return stream
        delayed = _DelayedStream(stream, self._uplink, self._downlink)
        self._delayed.add(delayed)
        return delayed

    async def close(self) -> None:
        if self.delay is not None:
            for stream in list(self._delayed):
                await stream.aclose(linger_s=self.delay.one_way_s + 1.0)
        await self.channel.close()


# ---------------------------------------------------------------------------------------------
# In-process


class _InProcessStream:
    def __init__(self, service) -> None:
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(service))

    async def _messages(self) -> AsyncIterator[pb.EdgeMessage]:
        while (msg := await self._inbox.get()) is not None:
            yield msg

    async def _run(self, service) -> None:
        try:
            async for reply in service.session(self._messages()):
                # Through bytes, as over the network: nothing is shared between the two sides.
                self._outbox.put_nowait(pb.CloudMessage.FromString(reply.SerializeToString()))
            self._outbox.put_nowait(None)
        except VerifierError as e:
            self._outbox.put_nowait(e)
        except asyncio.CancelledError:
            self._outbox.put_nowait(VerifierError("CANCELLED", "the session was cancelled"))

    async def send(self, msg: pb.EdgeMessage) -> None:
        if self._task.done():
            raise VerifierError("CANCELLED", "the session has ended")
        self._inbox.put_nowait(pb.EdgeMessage.FromString(msg.SerializeToString()))

    async def recv(self) -> pb.CloudMessage | None:
        item = await self._outbox.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def done_sending(self) -> None:
        self._inbox.put_nowait(None)

    def cancel(self) -> None:
        self._task.cancel()


class InProcessTransport:
    """Talk to a VerifierService running in this process (no sockets)."""

    def __init__(self, service) -> None:
        self.service = service

    async def get_info(self, request: pb.GetInfoRequest) -> pb.ServiceInfo:
        return self.service.get_info(request)

    def open_stream(self, routing_key: str | None = None) -> MessageStream:
        return _InProcessStream(self.service)

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Client

# Replies that carry the cloud's compute for the request they answer (`compute_s`).
_COMPUTE_REPLIES = frozenset({"opened", "check", "handoff_done", "verified"})


@dataclass
class HandoffResult:
    """What a handoff produced: the cloud's tokens and why it stopped."""

    tokens: list[pb.CloudToken] = field(default_factory=list)
    done: pb.HandoffDone | None = None


class RemoteSession:
    """One open session: pipelined requests, replies matched by request_id."""

    def __init__(self, stream: MessageStream) -> None:
        self._stream = stream
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future | asyncio.Queue] = {}
        self._error: VerifierError | None = None
        self._reader: asyncio.Task | None = None
        self.session_id = ""
        self.server_id = ""
        self.reused_tokens = 0
        self.length = 0
        self.info: pb.ServiceInfo | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        # The cloud's compute for this session: the sum of its replies' compute_s, counted as they
        # arrive (an answer nobody awaits any more, e.g. of a discarded window, still cost it).
        self.compute_s = 0.0

    async def _start(self, open_req: pb.OpenSession) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())
        reply = await self._request(pb.EdgeMessage(open=open_req))
        self.session_id, self.length, self.info = (
            reply.opened.session_id,
            reply.opened.length,
            reply.opened.info,
        )
        self.reused_tokens = reply.opened.reused_tokens  # prompt tokens the cloud did not prefill again
        self.server_id = reply.opened.server_id

    async def _read(self) -> None:
        try:
            while (msg := await self._stream.recv()) is not None:
                self.bytes_received += msg.ByteSize()
                kind = msg.WhichOneof("body")
                if kind in _COMPUTE_REPLIES:
                    self.compute_s += getattr(msg, kind).compute_s
                waiter = self._waiting.get(msg.request_id)
                if isinstance(waiter, asyncio.Queue):
                    waiter.put_nowait(msg)
                    if kind == "handoff_done":
                        self._waiting.pop(msg.request_id, None)
                elif waiter is not None:
                    self._waiting.pop(msg.request_id)
                    if not waiter.done():
                        waiter.set_result(msg)
            self._fail(VerifierError("UNAVAILABLE", "the cloud ended the session"))
        except VerifierError as e:
            self._fail(e)
        except asyncio.CancelledError:
            self._fail(VerifierError("CANCELLED", "the session was closed"))
            raise

    def _fail(self, error: VerifierError) -> None:
        self._error = self._error or error
        for waiter in self._waiting.values():
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(self._error)
            elif not waiter.done():
                waiter.set_exception(self._error)
                waiter.exception()  # retrieved: a discarded request's failure is not an unhandled error
        self._waiting.clear()

    async def _send(self, msg: pb.EdgeMessage, waiter=None) -> int:
        if self._error is not None:
            raise self._error
        msg.request_id = next(self._ids)
        if waiter is not None:
            self._waiting[msg.request_id] = waiter
        self.bytes_sent += msg.ByteSize()
        await self._stream.send(msg)
        return msg.request_id

    async def _request(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        future = asyncio.get_running_loop().create_future()
        await self._send(msg, future)
        return await future

    # -- the protocol --------------------------------------------------------------------------

    async def append(self, tokens: Sequence[pb.EdgeToken]) -> int:
        """Append edge tokens and wait for the cloud's acknowledgement; returns the session length."""
        reply = await self._request(pb.EdgeMessage(append=pb.AppendTokens(tokens=list(tokens))))
        self.length = reply.appended.length
        return self.length

    async def append_nowait(self, tokens: Sequence[pb.EdgeToken]) -> None:
        """Append without waiting: an error surfaces on the next awaited request."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        await self._send(pb.EdgeMessage(append=pb.AppendTokens(tokens=list(tokens))), future)

    async def append_text(self, text: bytes, views: Sequence[pb.EdgeToken] = ()) -> int:
        """A text-aligned session: append completion text (and Q's views at byte offsets in it, ids in
        P's vocabulary); returns the completion's length in bytes."""
        reply = await self._request(pb.EdgeMessage(append_text=pb.AppendText(text=text, views=list(views))))
        self.length = reply.appended.length
        return self.length

    async def append_text_nowait(self, text: bytes, views: Sequence[pb.EdgeToken] = ()) -> None:
        """append_text without waiting (the check point sent next is answered after it); an error
        surfaces on the next awaited request."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        msg = pb.EdgeMessage(append_text=pb.AppendText(text=text, views=list(views)))
        await self._send(msg, future)

    async def check(self, from_position: int, through_position: int) -> pb.CheckPointResult:
        """P's views at every position in [from_position, through_position]."""
        reply = await self._request(
            pb.EdgeMessage(
                check=pb.CheckPoint(from_position=from_position, through_position=through_position)
            )
        )
        return reply.check

    async def send_check(
        self, from_position: int, through_position: int, *, skip_unchecked: bool = False
    ) -> asyncio.Future:
        """Send a check point now and return the future of its CheckPointResult (pipelining).

        The request is on the wire when this returns, so later messages are ordered after it.
        skip_unchecked: positions before from_position not checked yet stay unchecked (gated policies).
        """
        loop = asyncio.get_running_loop()
        reply, answer = loop.create_future(), loop.create_future()

        def unwrap(f: asyncio.Future) -> None:
            if answer.done():  # the caller gave up on it (a discarded window)
                return
            if f.cancelled():
                answer.cancel()
            elif f.exception() is not None:
                answer.set_exception(f.exception())
            else:
                answer.set_result(f.result().check)

        reply.add_done_callback(unwrap)
        # Retrieve a failure even if nobody awaits the answer any more.
        answer.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        msg = pb.EdgeMessage(
            check=pb.CheckPoint(
                from_position=from_position, through_position=through_position, skip_unchecked=skip_unchecked
            )
        )
        await self._send(msg, reply)
        return answer

    @property
    def failed(self) -> VerifierError | None:
        """The error that ended the session, or None while it is usable."""
        return self._error

    async def handoff(self, max_tokens: int) -> AsyncIterator[pb.CloudToken]:
        """Let the cloud generate; yields its tokens as they come. `last_handoff` holds the outcome."""
        queue: asyncio.Queue = asyncio.Queue()
        self.last_handoff = HandoffResult()
        await self._send(pb.EdgeMessage(handoff=pb.Handoff(max_tokens=max_tokens)), queue)
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.WhichOneof("body") == "handoff_done":
                self.last_handoff.done = item.handoff_done
                self.length = item.handoff_done.length
                return
            self.last_handoff.tokens.append(item.token)
            yield item.token

    async def stop_generation(self) -> None:
        await self._send(pb.EdgeMessage(stop=pb.StopGeneration()))

    async def rollback(self, length: int) -> int:
        reply = await self._request(pb.EdgeMessage(rollback=pb.Rollback(length=length)))
        self.length = reply.rolled_back.length
        return self.length

    async def rollback_nowait(self, length: int) -> None:
        """Roll back without waiting for the reply: an error surfaces on the next awaited request.

        Messages on a session's stream are handled in order, so what is sent next applies after it.
        """
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        await self._send(pb.EdgeMessage(rollback=pb.Rollback(length=length)), future)
        self.length = length

    async def verify(
        self, draft: Sequence[pb.EdgeToken], distributions: Sequence[pb.TopK]
    ) -> pb.VerifyResult:
        """Speculative sampling: the cloud accepts a prefix of the draft and adds one token.

        Args:
            draft: [gamma] tokens at contiguous positions from the session's end.
            distributions: [gamma] Q's truncated, renormalised distributions each was drawn from
                (ids and natural-log probabilities).

        Returns:
            How many draft tokens stand, and the next token (absent when an accepted draft token
            was a stop token).
        """
        reply = await self._request(
            pb.EdgeMessage(verify=pb.VerifyDraft(draft=list(draft), draft_distributions=list(distributions)))
        )
        self.length = reply.verified.length
        return reply.verified

    async def close(self) -> pb.Closed | None:
        """Close politely; returns the cloud's counts (None if the session had already failed)."""
        closed = None
        if self._error is None:
            with contextlib.suppress(VerifierError):
                closed = (await self._request(pb.EdgeMessage(close=pb.Close()))).closed
        await self._stream.done_sending()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        return closed

    def abort(self) -> None:
        """Drop the session without a goodbye (the cloud frees it when the stream ends)."""
        self._stream.cancel()
        if self._reader is not None:
            self._reader.cancel()


class VerifierClient:
    """Sessions with a cloud verifier over any transport."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    async def info(
        self, token_hashes: tuple[int, int] | None = None, token_pieces: tuple[int, int] | None = None
    ) -> pb.ServiceInfo:
        req = pb.GetInfoRequest()
        if token_hashes is not None:
            req.token_hashes.start, req.token_hashes.end = token_hashes
        if token_pieces is not None:
            req.token_pieces.start, req.token_pieces.end = token_pieces
        return await self.transport.get_info(req)

    async def alignment(
        self, local: Sequence[bytes | None], local_digest: str, cache_dir: Path
    ) -> VocabAlignment:
        """This vocabulary (Q's token bytes) aligned with the cloud model's, cached under both digests.

        The cloud's token bytes come in GetInfo ranges of 65,536 ids (~1 MB for 151,936 tokens), once
        per pair of vocabularies: later calls read the cache file.
        """
        info = await self.info()
        remote_digest = fingerprint_from_proto(info.vocab).digest.hex()
        cached = cached_alignment(cache_dir, local_digest, remote_digest)
        if cached is not None:
            return cached
        pieces: list[bytes | None] = []
        for start in range(0, info.vocab_size, PIECES_PER_CALL):
            reply = await self.info(token_pieces=(start, min(start + PIECES_PER_CALL, info.vocab_size)))
            pieces += [p or None for p in reply.token_pieces]
        result = align(local, pieces, local_digest, remote_digest)
        store_alignment(cache_dir, result)
        return result

    async def check_vocabulary(self, local: Vocabulary) -> pb.ServiceInfo:
        """Fail with VocabularyMismatch naming the first differing ids if the cloud's vocabulary differs.

        Block digests find the first block that differs (or straddles our end); per-token hashes of
        that one block, fetched with a second GetInfo, name the ids.
        """
        info = await self.info()
        remote = fingerprint_from_proto(info.vocab)
        start = _first_unverified_block(local, remote)
        if start is None:
            return info
        end = min(start + remote.block_size, len(local), remote.vocab_size)
        hashes = list((await self.info(token_hashes=(start, end))).token_hashes)

        def fetch(s: int, e: int) -> list[int]:
            if (s, e) != (start, end):
                raise VocabularyMismatch(f"vocabularies differ in ids [{s}, {e})")
            return hashes

        check_compatible(
            local, remote, remote_name=f"the cloud model {info.model_id}", remote_token_hashes=fetch
        )
        return info

    async def open_session(
        self,
        prompt_ids: Sequence[int],
        vocabulary: Vocabulary,
        *,
        top_k: int = 20,
        sampling: pb.SamplingParams | None = None,
        policy: pb.Policy | None = None,
        client: str = "handoff-edge",
        routing_key: str | None = None,
        constraint: pb.Constraint | None = None,
        prompt_text: bytes = b"",
    ) -> RemoteSession:
        """Open a session; `routing_key` (stable across a generation's resyncs) keeps it on one replica.

        prompt_text: a text-aligned session (an edge with another tokenizer, cloud/text_session.py):
        the prompt as text, prompt_ids then empty.
        """
        session = RemoteSession(self.transport.open_stream(routing_key))
        req = pb.OpenSession(
            prompt_text=prompt_text,
            prompt_token_ids=list(prompt_ids),
            vocab=fingerprint_to_proto(vocabulary.fingerprint),
            sampling=sampling or pb.SamplingParams(),
            policy=policy or pb.Policy(),
            top_k=top_k,
            client=client,
            protocol_version=PROTOCOL_VERSION,
            constraint=constraint,
        )
        try:
            await session._start(req)
        except BaseException:
            session.abort()
            raise
        return session

    async def close(self) -> None:
        await self.transport.close()


def _first_unverified_block(local: Vocabulary, remote) -> int | None:
    """Start of the first remote block that differs from ours or runs past our end; None if all match."""
    for block, digest in enumerate(remote.block_digests):
        start, end = remote.block_range(block)
        if start >= len(local):
            return None
        if end > len(local) or local_block_digest(local, block, start, end) != digest:
            return start
    return None
