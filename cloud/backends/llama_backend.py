"""The llama.cpp backend: one llama.cpp context, many sequences, one `llama_decode` per batch.

Every session is a llama.cpp *sequence* (`seq_id`) in a single context's KV cache, so the check
points of different sessions go into one `llama_batch` and one `llama_decode` call. Built on the
low-level API of llama-cpp-python 0.3.36 (`llama_model_load_from_file`, `llama_init_from_model`,
`llama_batch_init`, `llama_decode`, `llama_get_logits_ith`, `llama_get_memory` +
`llama_memory_seq_rm`); the high-level `Llama` class drives a single sequence only.

KV-cache sizing. The context holds `n_ctx = max_sequences * max_context` cells. With the default
`kv_unified=True` they form one pool that every sequence draws from: since no sequence may grow past
`max_context` and at most `max_sequences` are live, every sequence can always reach `max_context`.
llama.cpp's other layout (`kv_unified=False`) gives each sequence its own stream of
`n_ctx / n_seq_max` cells, but then a micro-batch may only span sequences with *consecutive* ids
(llama.cpp's `split_equal(sequential=true)`): sessions 0, 2 and 5 are decoded one after the other
inside the same `llama_decode`, which loses the batching this backend exists for. The unified pool
batches any set of sequences; with flash attention the masked cells of other sequences cost little.

Forward passes are all-or-nothing: when a `llama_decode` fails (or anything else goes wrong half
way), every sequence of the call is cut back to its length before the call.

Deterministic mode (the default; docs/determinism.md). Measured on the 1.5B Q4_K_M (CPU, AVX-512):
a row's logits depend on the micro-batch it is computed in — micro-batches of 1-7 rows, and the
last `n % 4` rows of larger ones, take other matmul kernels than rows in full groups of 4 (up to 0.5
nats of top-1 log-probability on random-token text) — and, in the unified KV pool, on how other
sessions' cells are interleaved with the session's own (up to 0.03 nats). So in deterministic mode
every session has its own KV stream (its cells are its positions, in order), and its tokens go one
per call ("single") or in padded blocks with the logits of every row requested, blocks of one length
from different sessions sharing calls ("padded": llama_calls.py says why that is safe). The causal
mask keeps the dummy rows out of the real rows' attention, their cells are removed right after, and
every real row is computed by the same kernels on the same cells whatever else the server does and
however the session's tokens were split. A self-check at load time verifies this on the machine
(`check_invariance`) and refuses to start deterministic when it does not hold.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from handoff.cloud.backend import Backend, ForwardItem, ForwardOutput, make_backend_info, views_from_logits
from handoff.cloud.backends.llama_calls import MIN_ROWS, ROW_GROUP, padded_calls
from handoff.shared.errors import CapacityError, HandoffError, ModelError, ShapeError
from handoff.shared.llama_cpp_model import route_native_logs
from handoff.shared.logs import show_native_logs
from handoff.shared.model_info import load_model_info
from handoff.shared.models import ModelRef
from handoff.shared.settings import HandoffSettings

logger = logging.getLogger(__name__)

DETERMINISTIC_PATHS = ("single", "padded")

_backend_initialized = False
_init_lock = threading.Lock()

# llama_decode's return codes (llama.h).
_DECODE_ERRORS = {
    1: "no KV-cache slot for the batch (the cache is full)",
    2: "aborted",
    -1: "invalid input batch",
}


def _llama_lib():
    """The ctypes bindings, with the llama.cpp backend initialised once per process."""
    global _backend_initialized
    import llama_cpp.llama_cpp as lib

    route_native_logs()
    with _init_lock:
        if not _backend_initialized:
            lib.llama_backend_init()
            _backend_initialized = True
    return lib


class LlamaSequence:
    """A handle for one sequence of a LlamaCppBackend (a llama.cpp seq_id and its length)."""

    __slots__ = ("_owner", "alive", "length", "seq_id")

    def __init__(self, owner: LlamaCppBackend, seq_id: int) -> None:
        self._owner = owner
        self.seq_id = seq_id
        self.length = 0
        self.alive = True

    def __repr__(self) -> str:
        state = "" if self.alive else ", released"
        return f"LlamaSequence(seq_id={self.seq_id}, length={self.length}{state})"


class LlamaCppBackend(Backend):
    """A GGUF model in llama.cpp (CPU) serving up to `max_sequences` sequences from one context.

    Args:
        ref: a resolved GGUF model.
        max_sequences: live sequences at most (llama.cpp's n_seq_max).
        max_context: tokens per sequence at most; a forward that would pass it raises CapacityError.
        threads: CPU threads for decoding (single tokens and batches alike).
        n_batch: tokens per `llama_decode` call (and per micro-batch); larger forwards are split.
        settings: where the model-info cache lives (default: the process settings).
        kv_unified: one KV pool shared by all sequences (default; see the module docstring) or
            llama.cpp's per-sequence streams.
        flash_attn: use flash attention (lets attention skip the cells of other sequences).
        verbose: show llama.cpp's own log (process-wide; the command line's --verbose does the same).
        kv_cache_tokens: size of the unified KV pool when smaller than max_sequences x max_context
            (memory is allocated up front: 28 KiB per token for the 1.5B model).
        n_ubatch: tokens per micro-batch (default n_batch).
        deterministic: bit-identical rows whatever the batch (module docstring); implies one KV
            stream of max_context (+ padding) cells per sequence, allocated up front, and no
            batching across sequences.
        deterministic_path: the canonical computation: "single" (one token per llama_decode call:
            the decode path of cloud-only generation; check points and prompts cost a call per
            token) or "padded" (calls padded to >= 8 rows, all of them output rows: prompts and
            check points cost as in fast mode, a single token ~5x). docs/determinism.md.
    """

    name = "llama.cpp"
    sequence_type = LlamaSequence

    def __init__(
        self,
        ref: ModelRef,
        *,
        max_sequences: int = 8,
        max_context: int = 4096,
        threads: int = 2,
        n_batch: int = 512,
        settings: HandoffSettings | None = None,
        kv_unified: bool = True,
        flash_attn: bool = True,
        verbose: bool = False,
        kv_cache_tokens: int | None = None,
        n_ubatch: int | None = None,
        deterministic: bool = True,
        deterministic_path: str = "single",
    ) -> None:
        self._model = None
        self._ctx = None
        self._batch = None
        self._closed = True
        for name, value in (
            ("max_sequences", max_sequences),
            ("max_context", max_context),
            ("threads", threads),
            ("n_batch", n_batch),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if deterministic_path not in DETERMINISTIC_PATHS:
            raise ValueError(
                f"deterministic_path must be one of {DETERMINISTIC_PATHS}, got {deterministic_path!r}"
            )
        if deterministic:
            kv_unified = False  # the session's cells must be its positions, in order
            n_batch = max(MIN_ROWS, n_batch - n_batch % ROW_GROUP)
            n_ubatch = n_batch  # one padded call is one micro-batch
        if ref.kind != "gguf":
            raise ModelError(f"the llama.cpp backend needs a GGUF file, got a {ref.kind} model at {ref.path}")
        model_info, self.vocabulary = load_model_info(ref, settings)  # raises ModelError for bad files
        self.model_ref = ref

        lib = _llama_lib()
        if verbose:
            show_native_logs(True)
        self._lib = lib
        limit = int(lib.llama_max_parallel_sequences())
        if max_sequences > limit:
            raise CapacityError(
                f"max_sequences={max_sequences} exceeds llama.cpp's limit of {limit} sequences"
            )

        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(ref.path).encode("utf-8"), mparams)
        if not model:
            raise ModelError(
                f"llama.cpp could not load {ref.path} (run with --verbose to see llama.cpp's log)"
            )
        self._model = model

        cparams = lib.llama_context_default_params()
        # The unified pool may be smaller than max_sequences x max_context: sessions share it, and
        # a decode that finds it full fails with CapacityError (RESOURCE_EXHAUSTED).
        # Deterministic calls pad past the sequence's end: room for MIN_ROWS + ROW_GROUP more cells.
        per_seq_cells = max_context + (MIN_ROWS + ROW_GROUP if deterministic else 0)
        n_ctx = max_sequences * per_seq_cells
        if kv_cache_tokens is not None and kv_unified:
            n_ctx = max(max_context, min(n_ctx, kv_cache_tokens))
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch if n_ubatch is None else n_ubatch
        cparams.n_seq_max = max_sequences
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = kv_unified
        cparams.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            self._model = None
            raise ModelError(
                f"llama.cpp could not create a context of {max_sequences} x {max_context} tokens for "
                f"{ref.path} (out of memory?)"
            )
        self._ctx = ctx
        self._closed = False
        per_seq = int(lib.llama_n_ctx_seq(ctx))
        if per_seq < per_seq_cells:  # never expected: llama.cpp only rounds n_ctx up
            self.close()
            raise ModelError(
                f"llama.cpp gave {per_seq} tokens per sequence, fewer than max_context={max_context}"
            )
        self._mem = lib.llama_get_memory(ctx)
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        # numpy views of the batch's arrays (seq_id is an array of pointers: filled per token)
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(n_batch,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(n_batch,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_batch,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(n_batch,))
        self._b_nseq[:] = 1

        vocab = lib.llama_model_get_vocab(model)
        self._n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        self.max_sequences = max_sequences
        self.max_context = max_context
        self.n_batch = n_batch
        self.threads = threads
        self.kv_unified = kv_unified
        self.deterministic = deterministic
        self.deterministic_path = deterministic_path
        self.info = make_backend_info(
            "llama.cpp", ref, model_info, vocab_size=self._n_vocab, device="cpu",
            dtype=model_info.quantization, max_context=max_context,
        )  # fmt: skip
        self._lock = threading.Lock()  # guards the free list: new_sequence may come from any thread
        self._free: list[int] = list(range(max_sequences))
        self._live: dict[int, LlamaSequence] = {}
        logger.info(
            "llama.cpp backend: %s, %d sequences x %d tokens (n_ctx %d, %s KV), n_batch %d, %d threads%s",
            ref.name,
            max_sequences,
            max_context,
            int(lib.llama_n_ctx(ctx)),
            "unified" if kv_unified else "per-sequence",
            n_batch,
            threads,
            ", deterministic" if deterministic else "",
        )
        if deterministic:
            try:
                self.check_invariance()
            except BaseException:
                self.close()
                raise

    # -- sequences ------------------------------------------------------------------------------

    @property
    def active_sequences(self) -> int:
        return len(self._live)

    def new_sequence(self) -> LlamaSequence:
        self._check_open()
        with self._lock:
            if not self._free:
                raise CapacityError(f"all {self.max_sequences} sequences of the llama.cpp backend are in use")
            seq = LlamaSequence(self, self._free.pop(0))
            self._live[seq.seq_id] = seq
        # No llama.cpp call here (new_sequence may run beside a forward): release and the rollback of
        # failed forwards leave a free id without cells.
        return seq

    def truncate(self, seq: object, length: int) -> None:
        s = self._own(seq)
        if not 0 <= length <= s.length:
            raise ShapeError(f"cannot truncate a sequence of {s.length} tokens to {length}")
        if length < s.length:
            if not self._lib.llama_memory_seq_rm(self._mem, s.seq_id, length, -1):
                raise HandoffError(f"llama.cpp could not remove positions >= {length} of sequence {s.seq_id}")
            s.length = length

    def release(self, seq: object) -> None:
        """Free the sequence's cells and its id; releasing a released handle (or after close) does nothing."""
        if isinstance(seq, LlamaSequence) and seq._owner is self and (not seq.alive or self._closed):
            return
        s = self._own(seq)
        self._lib.llama_memory_seq_rm(self._mem, s.seq_id, -1, -1)  # a whole sequence never fails
        s.alive = False
        s.length = 0
        with self._lock:
            del self._live[s.seq_id]
            self._free.append(s.seq_id)
            self._free.sort()

    # -- forward --------------------------------------------------------------------------------

    def forward(self, items: Sequence[ForwardItem]) -> list[ForwardOutput]:
        logits = self._decode_items(items, read_logits=True)
        return [views_from_logits(lg, item) for lg, item in zip(logits, items, strict=True)]

    def raw_forward(self, items: Sequence[ForwardItem]) -> None:
        self._decode_items(items, read_logits=False)

    def _decode_items(self, items: Sequence[ForwardItem], read_logits: bool) -> list[np.ndarray]:
        """Decode every item's tokens (logits computed for each item's last n_out rows); lengths advance."""
        self._check_open()
        seqs = [self._own(item.seq) for item in items]
        if len({s.seq_id for s in seqs}) != len(seqs):
            raise ShapeError("forward: two items refer to the same sequence")
        for item, s in zip(items, seqs, strict=True):
            item.check(self._n_vocab)
            if s.length + len(item.tokens) > self.max_context:
                raise CapacityError(
                    f"sequence {s.seq_id} would hold {s.length} + {len(item.tokens)} tokens, "
                    f"more than max_context={self.max_context}"
                )

        # One row per new token: (item index, token, position, seq_id, output row or -1).
        rows: list[tuple[int, int, int, int, int]] = []
        for i, (item, s) in enumerate(zip(items, seqs, strict=True)):
            first_out = len(item.tokens) - item.n_out
            for j, tok in enumerate(item.tokens):
                rows.append((i, int(tok), s.length + j, s.seq_id, j - first_out if j >= first_out else -1))
        logits = [
            np.empty((item.n_out if read_logits else 0, self._n_vocab), dtype=np.float32) for item in items
        ]
        old_lengths = [s.length for s in seqs]
        try:
            for chunk, pads in self._chunks(rows):
                self._decode(chunk)
                if read_logits:
                    for b, (i, _, _, _, out) in enumerate(chunk):
                        if out >= 0:
                            logits[i][out] = self._row_logits(b)
                for sid, pos in pads:  # the dummy rows' cells: gone before anything else runs
                    if not self._lib.llama_memory_seq_rm(self._mem, sid, pos, -1):
                        raise HandoffError(f"llama.cpp could not remove the padding of sequence {sid}")
        except BaseException:
            self._rollback(seqs, old_lengths)
            raise
        for item, s in zip(items, seqs, strict=True):
            s.length += len(item.tokens)
        return logits

    def _chunks(self, rows: list[tuple[int, int, int, int, int]]):
        """The llama_decode calls for a forward's rows: (rows of the call, [(seq_id, first padding
        position)] whose cells to remove after it).

        Fast mode: up to n_batch rows per call, any sequences together. Deterministic mode: one row
        per call ("single"), or padded blocks, those of one length from different sequences sharing
        calls ("padded": llama_calls.padded_calls).
        """
        if not self.deterministic:
            for start in range(0, len(rows), self.n_batch):
                yield rows[start : start + self.n_batch], []
            return
        if self.deterministic_path == "single":
            for row in rows:
                yield [row], []
            return
        yield from padded_calls(rows, self.n_batch)  # n_batch: a multiple of ROW_GROUP, >= MIN_ROWS

    def check_invariance(self, n_tokens: int = 12) -> None:
        """Verify on this machine that deterministic rows do not depend on how tokens are passed in.

        Scores the same tokens on a scratch sequence in one forward with every row's logits; again
        after a prefix without logits, one token per forward, with another sequence's tokens decoded
        in between; and again in one forward shared with another sequence's block of the same length
        (on a longer cache). Compares the logits bit for bit.

        Raises:
            ModelError: they differ (this CPU or quantization takes other kernels than measured);
                run with deterministic off, or report the machine.
        """
        tokens = [int(t) % self._n_vocab for t in range(17, 17 + 7 * n_tokens, 7)]
        half = n_tokens // 2
        # One scratch sequence at a time (plus a neighbour when there is room), so that a backend of
        # a single sequence can check itself.
        a = self.new_sequence()
        try:
            whole = self._decode_items([ForwardItem(a, tokens, len(tokens), 1)], read_logits=True)[0][half:]
        finally:
            self.release(a)
        b = self.new_sequence()
        other = self.new_sequence() if self.max_sequences > 1 else None
        try:
            self._decode_items([ForwardItem(b, tokens[:half], 0, 1)], read_logits=False)
            ones = []
            for j, t in enumerate(tokens[half:]):
                if other is not None:
                    self._decode_items([ForwardItem(other, [31 + j, 5, 9][: 1 + j % 3], 1, 1)], True)
                ones.append(self._decode_items([ForwardItem(b, [t], 1, 1)], read_logits=True)[0][0])
        finally:
            self.release(b)
            if other is not None:
                self.release(other)
        if other is not None:  # the same tokens in a call shared with another sequence's block
            c, d = self.new_sequence(), self.new_sequence()
            try:
                self._decode_items([ForwardItem(d, tokens[::-1], 0, 1)], read_logits=False)  # a longer cache
                shared = self._decode_items(
                    [ForwardItem(c, tokens, len(tokens), 1), ForwardItem(d, tokens[1:] + tokens[:1], 1, 1)],
                    read_logits=True,
                )[0][half:]
            finally:
                self.release(c)
                self.release(d)
            ones.extend(shared)
            whole = np.concatenate([whole, whole])
        if not np.array_equal(whole, np.stack(ones)):
            diff = float(np.abs(whole - np.stack(ones)).max())
            raise ModelError(
                f"deterministic mode is not bit-invariant with llama.cpp on this machine ({self.info.model_id}: "
                f"logits differ by up to {diff:.3g} between one call and one token per call); "
                "start the service with --no-deterministic (HANDOFF_CLOUD_DETERMINISTIC=0)"
            )

    def _decode(self, chunk: list[tuple[int, int, int, int, int]]) -> None:
        n = len(chunk)
        # Deterministic: every row is an output row. llama.cpp runs the last layer and the output head on
        # the output rows only, so their number must be the call's canonical row count too.
        every = self.deterministic and self.deterministic_path == "padded"
        arr = np.asarray(
            [(tok, pos, sid, every or out >= 0) for _, tok, pos, sid, out in chunk], dtype=np.int64
        )
        self._b_token[:n] = arr[:, 0]
        self._b_pos[:n] = arr[:, 1]
        self._b_logits[:n] = arr[:, 3]
        seq_id = self._batch.seq_id
        for b in range(n):
            seq_id[b][0] = int(arr[b, 2])
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            what = _DECODE_ERRORS.get(rc, "fatal error")
            # A full cache is a capacity problem (RESOURCE_EXHAUSTED), anything else a failure.
            error = CapacityError if rc == 1 else HandoffError
            raise error(f"llama_decode failed with code {rc}: {what}; the batch was not applied")

    def _row_logits(self, b: int) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._ctx, b)
        if not ptr:
            raise HandoffError(f"llama.cpp returned no logits for batch row {b}")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _rollback(self, seqs: list[LlamaSequence], old_lengths: list[int]) -> None:
        for s, length in zip(seqs, old_lengths, strict=True):
            s.length = length
            if not self._lib.llama_memory_seq_rm(self._mem, s.seq_id, length, -1):
                logger.error("could not roll sequence %d back to %d tokens", s.seq_id, length)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the batch, the context and the model (idempotent); the backend is unusable after."""
        self._closed = True
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if self._batch is not None:
            self._b_token = self._b_pos = self._b_nseq = self._b_logits = None
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None
        for seq in getattr(self, "_live", {}).values():
            seq.alive = False
        if hasattr(self, "_live"):
            self._live.clear()

    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


__all__ = ["LlamaCppBackend", "LlamaSequence"]
