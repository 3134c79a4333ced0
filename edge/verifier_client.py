"""The edge's side of the edge↔cloud boundary: one client API over two transports.

`VerifierClient` speaks the handoff.v1 session protocol; a transport moves the messages:
`GrpcTransport` over the network, `InProcessTransport` straight into a VerifierService in the same
process (tests, the single-machine demo). Errors arrive as VerifierError with a gRPC status code
name either way.

Requests are pipelined: `append_nowait` sends without waiting for the reply, so the edge can keep
streaming tokens while a check point is in flight; replies are matched to requests by request_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from shared.errors import VerifierError, VocabularyMismatch
from shared.vocab import Vocabulary, check_compatible, local_block_digest
from shared.wire import PROTOCOL_VERSION, fingerprint_from_proto, fingerprint_to_proto, pb, pb_grpc

logger = logging.getLogger(__name__)


class MessageStream(Protocol):
    async def send(self, msg: pb.EdgeMessage) -> None: ...
    async def recv(self) -> pb.CloudMessage | None: ...  # None: the cloud ended the stream cleanly
    async def done_sending(self) -> None: ...
    def cancel(self) -> None: ...


class Transport(Protocol):
    async def get_info(self, request: pb.GetInfoRequest) -> pb.ServiceInfo: ...
    def open_stream(self) -> MessageStream: ...
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
    ) -> None:
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

    async def get_info(self, request: pb.GetInfoRequest) -> pb.ServiceInfo:
        try:
            return await self.stub.GetInfo(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise _from_rpc_error(e) from None

    def open_stream(self) -> MessageStream:
        return _GrpcStream(self.stub.Session(metadata=self.metadata))

    async def close(self) -> None:
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

    def open_stream(self) -> MessageStream:
        return _InProcessStream(self.service)

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Client


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
        self.length = 0
        self.info: pb.ServiceInfo | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    async def _start(self, open_req: pb.OpenSession) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())
        reply = await self._request(pb.EdgeMessage(open=open_req))
        self.session_id, self.length, self.info = (
            reply.opened.session_id,
            reply.opened.length,
            reply.opened.info,
        )

    async def _read(self) -> None:
        try:
            while (msg := await self._stream.recv()) is not None:
                self.bytes_received += msg.ByteSize()
                waiter = self._waiting.get(msg.request_id)
                if isinstance(waiter, asyncio.Queue):
                    waiter.put_nowait(msg)
                    if msg.WhichOneof("body") == "handoff_done":
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

    async def check(self, from_position: int, through_position: int) -> pb.CheckPointResult:
        """P's views at every position in [from_position, through_position]."""
        reply = await self._request(
            pb.EdgeMessage(
                check=pb.CheckPoint(from_position=from_position, through_position=through_position)
            )
        )
        return reply.check

    async def send_check(self, from_position: int, through_position: int) -> asyncio.Future:
        """Send a check point now and return the future of its CheckPointResult (pipelining).

        The request is on the wire when this returns, so later messages are ordered after it.
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
            check=pb.CheckPoint(from_position=from_position, through_position=through_position)
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

    async def info(self, token_hashes: tuple[int, int] | None = None) -> pb.ServiceInfo:
        req = pb.GetInfoRequest()
        if token_hashes is not None:
            req.token_hashes.start, req.token_hashes.end = token_hashes
        return await self.transport.get_info(req)

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
    ) -> RemoteSession:
        session = RemoteSession(self.transport.open_stream())
        req = pb.OpenSession(
            prompt_token_ids=list(prompt_ids),
            vocab=fingerprint_to_proto(vocabulary.fingerprint),
            sampling=sampling or pb.SamplingParams(),
            policy=policy or pb.Policy(),
            top_k=top_k,
            client=client,
            protocol_version=PROTOCOL_VERSION,
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
