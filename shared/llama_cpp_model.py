"""A thin layer over llama-cpp-python: the edge runner and the cloud's llama.cpp backend build on it.

Only the last position's logits are read (`llama_get_logits_ith(ctx, -1)`): `logits_all=True`
costs about a quarter of the generation speed, and in llama-cpp-python 0.3.36 `Llama.scores` is
not filled without it (you would read a uniform distribution).

Hidden states (Q's last hidden state, the router's feature): the final-normed output of the last
layer, i.e. the input of the output matrix, read with `llama_get_embeddings_ith`. In the llama.cpp
that llama-cpp-python 0.3.36 bundles, a generative model's context has pooling NONE (unspecified in
the GGUF), `llama_set_embeddings` only sets a flag read by the next decode (so it can be toggled per
decode), and a decode with it on returns the logits too, bit-identical to one with it off (checked
on the 0.5B). But with it on, every token of the batch becomes an output ("embeddings required but
some input tokens were not marked as outputs -> overriding"): the output matrix and the last layer
then run on every row, which costs and changes the last row's rounding. So only one-token decodes
and eval_all() run with it on; see ensure_hidden() for the last token of a batch.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from handoff.shared.divergence import log_softmax
from handoff.shared.errors import ModelError, ShapeError
from handoff.shared.logs import NATIVE_LOGGER, native_logs_shown

logger = logging.getLogger(__name__)

# ggml_log_level of the llama.cpp that llama-cpp-python 0.3.36 bundles (include/ggml.h): NONE=0,
# DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5 (the rest of the previous message).
_NATIVE_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_GGML_LOG_LEVEL_CONT = 5
_native = logging.getLogger(NATIVE_LOGGER)
_native_lock = threading.Lock()
_native_callback = None  # the ctypes callback: llama.cpp calls it for as long as the process lives
_native_line: list[str] = []  # the unfinished line (llama.cpp writes some lines in pieces)
_native_level = logging.INFO


def _on_native_log(level: int, text: bytes | None) -> None:
    """One piece of llama.cpp's log: complete lines become records of the llama.cpp logger."""
    global _native_level
    with _native_lock:
        if level != _GGML_LOG_LEVEL_CONT:
            if _native_line:  # a message that did not end its line
                _native.log(_native_level, "".join(_native_line))
                _native_line.clear()
            _native_level = _NATIVE_LEVELS.get(level, logging.DEBUG)
        if not _native.isEnabledFor(_native_level):
            return
        _native_line.append((text or b"").decode("utf-8", errors="replace"))
        if "\n" in _native_line[-1]:
            *lines, rest = "".join(_native_line).split("\n")
            _native_line[:] = [rest] if rest else []
            for line in lines:
                if line.strip():
                    _native.log(_native_level, line)


def route_native_logs() -> None:
    """Send llama.cpp's own log to the "llama.cpp" Python logger, one record per line, at its level.

    llama-cpp-python 0.3.36 installs a callback that reads ggml's log levels by an older numbering
    (its WARN=2 is now INFO, its ERROR=3 now WARN), so llama.cpp's warnings count as errors and
    reach stderr even with verbose=False ("control-looking token ... probably a bug in the model").
    Routed here, they follow the logging setup: the command line hides them unless --verbose
    (shared/logs.py). Idempotent; call it after importing llama_cpp (which installs its own).
    """
    global _native_callback
    import llama_cpp

    with _native_lock:
        if _native_callback is not None:
            return

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            _on_native_log(int(level), text)

        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        _native_callback = callback


class PieceReader:
    """Tokens' bytes read with llama_token_to_piece into a buffer grown to the longest piece.

    Not llama-cpp-python's Llama.detokenize: in 0.3.36 it reads each piece into a 32-byte buffer and
    silently drops longer ones (240 of Qwen2.5's tokens, e.g. the runs of 33+ spaces that indent code).
    """

    def __init__(self, vocab) -> None:
        """Read pieces of `vocab` (a llama_vocab pointer, llama_model_get_vocab)."""
        import llama_cpp

        self._lib, self._vocab = llama_cpp, vocab
        self._buf = ctypes.create_string_buffer(64)

    def __call__(self, token: int, special: bool) -> bytes:
        """The token's bytes; with `special`, control tokens are written out (else they are empty)."""
        n = self._lib.llama_token_to_piece(self._vocab, int(token), self._buf, len(self._buf), 0, special)
        if n < 0:  # -n: the bytes it needs
            self._buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, int(token), self._buf, len(self._buf), 0, special)
        return self._buf.raw[:n]


# Chat end-of-turn markers, the likeliest first.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


def stop_tokens(llm, piece: PieceReader) -> list[int]:
    """A model's end-of-generation tokens: its chat end-of-turn marker first (where it has one), then EOS.

    Args:
        llm: a llama_cpp.Llama (a vocabulary-only one will do).
        piece: the PieceReader of its vocabulary.
    """
    stops: list[int] = []
    for marker in END_OF_TURN_MARKERS:
        ids = llm.tokenize(marker.encode(), add_bos=False, special=True)
        if len(ids) == 1 and piece(ids[0], True).decode(errors="replace") == marker and ids[0] not in stops:
            stops.append(int(ids[0]))
    eos = int(llm.token_eos())
    if eos >= 0 and eos not in stops:
        stops.append(eos)
    return stops


class GGUFTokenizer:
    """A GGUF model's tokenizer alone: llama.cpp loads its vocabulary only (~0.3 s for 151k tokens)."""

    def __init__(self, path: Path | str) -> None:
        import llama_cpp

        route_native_logs()
        self.path = Path(path)
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=native_logs_shown())
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)  # the llama_vocab pointer
        self._piece = PieceReader(self.vocab)
        self.n_vocab = int(self.llm.n_vocab())
        self.stop_token_ids = stop_tokens(self.llm, self._piece)
        self._bytes: dict[int, int] | None = None  # byte -> its token, built when first needed
        self._pieces: list[bytes | None] | None = None  # text_pieces(), read when first needed

    def tokenize(self, data: bytes, *, special: bool = False) -> list[int]:
        """Token ids of text, no BOS; `special`: markers such as <|im_start|> are read as their tokens.

        Bytes that are not UTF-8 (a model may write any bytes with its byte tokens) become byte
        tokens: llama.cpp would turn them into U+FFFD, and the text would no longer be the tokens'.
        """
        out: list[int] = []
        i = 0
        while i < len(data):
            try:
                data[i:].decode("utf-8")
                good, bad = len(data), len(data)
            except UnicodeDecodeError as e:
                good, bad = i + e.start, i + e.end
            if good > i:
                out += self.llm.tokenize(data[i:good], add_bos=False, special=special)
            out += [self._byte_token(b) for b in data[good:bad]]
            i = bad
        return out

    def text_pieces(self) -> list[bytes | None]:
        """Each token's bytes as the tokenizer's own type decodes them; None for special tokens
        (control, user-defined and unused ones: they are not text). Read once (~0.2 s for 151k)."""
        if self._pieces is None:
            import llama_cpp

            special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
            special |= llama_cpp.LLAMA_TOKEN_ATTR_UNUSED
            attr = llama_cpp.llama_vocab_get_attr
            self._pieces = [
                None if attr(self.vocab, t) & special else (self._piece(t, False) or None)
                for t in range(self.n_vocab)
            ]
        return list(self._pieces)

    def _byte_token(self, byte: int) -> int:
        if self._bytes is None:
            self._bytes = {}
            for t, piece in enumerate(self.text_pieces()):
                if piece is not None and len(piece) == 1:
                    self._bytes.setdefault(piece[0], t)
        if byte not in self._bytes:
            raise ShapeError(f"{self.path.name} has no token for the byte 0x{byte:02x}")
        return self._bytes[byte]

    def piece(self, token: int) -> bytes:
        """A token's bytes (b"" for a special token: it is not text)."""
        return self._piece(token, False)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return b"".join(self._piece(t, False) for t in ids)

    def close(self) -> None:
        self.llm.close()


_TOKENIZERS: dict[str, GGUFTokenizer] = {}


def gguf_tokenizer(path: Path | str) -> GGUFTokenizer:
    """The tokenizer of a GGUF file, loaded once per process (freed at exit)."""
    key = str(Path(path).resolve())
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = tok = GGUFTokenizer(path)
        atexit.register(tok.close)  # before llama_cpp's module is torn down
    return _TOKENIZERS[key]


class LlamaCppModel:
    """One llama.cpp context: tokenize, extend, truncate, read the next-token distribution."""

    def __init__(
        self, path: Path | str, *, n_ctx: int = 4096, n_threads: int = 2, seed: int = 0, n_batch: int = 512
    ) -> None:
        import llama_cpp

        route_native_logs()
        self._llama_cpp = llama_cpp
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_batch=n_batch,
                logits_all=False,
                seed=seed,
                # False also sends stdout and stderr to /dev/null while the model loads; True prints
                # llama-cpp-python's own notes (metadata, chat template) as --verbose asks.
                verbose=native_logs_shown(),
            )
        except ValueError as e:  # llama-cpp-python's way of saying the file did not load
            raise ModelError(f"llama.cpp could not load {path}: {e}") from None
        self.path = path
        self.n_vocab = int(self.llm.n_vocab())
        self.n_ctx = int(self.llm.n_ctx())
        self.n_embd = int(self.llm.n_embd())
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        self._piece = PieceReader(llama_cpp.llama_model_get_vocab(self.llm.model))
        self._embeddings = False  # llama.cpp's embeddings flag as last set (off at creation)
        self.hidden_ready = False  # the last token's hidden state can be read (next_hidden)
        # (logits [V], hidden [n_embd]) of the last token when ensure_hidden() decoded it a second time:
        # llama.cpp's buffers then hold that decode's, the batch's logits are kept here.
        self._kept: tuple[np.ndarray, np.ndarray] | None = None

    # -- tokens --------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens such as <|im_start|> included, no BOS added."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """Bytes of the tokens (a token may end mid-way through a UTF-8 character), special ones written
        out; tokens longer than 32 bytes too (see PieceReader)."""
        return b"".join(self._piece(token, True) for token in ids)

    def token_id(self, text: str) -> int | None:
        """Id of a single special token given by its text, None if it is not one token."""
        ids = self.tokenize(text)
        return ids[0] if len(ids) == 1 else None

    def stop_token_ids(self) -> set[int]:
        """End-of-generation tokens: EOS and the chat end-of-turn marker where the model has one."""
        return set(stop_tokens(self.llm, self._piece))

    def chat_prompt(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Render messages (and tools offered, OpenAI's shape) with the model's own chat template (the
        same string transformers renders)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelError(f"{self.path.name} has no chat template in its metadata")
        eos = self.detokenize([self.llm.token_eos()]).decode(errors="replace")
        bos = (
            self.detokenize([self.llm.token_bos()]).decode(errors="replace")
            if self.llm.token_bos() >= 0
            else ""
        )
        formatter = Jinja2ChatFormatter(
            template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt
        )
        return formatter(messages=list(messages), tools=list(tools) if tools else None).prompt

    # -- context -------------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        """Tokens in the context."""
        return int(self.llm.n_tokens)

    @property
    def tokens(self) -> list[int]:
        return [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]

    def reset(self) -> None:
        self.llm.reset()
        self.hidden_ready, self._kept = False, None

    def truncate(self, length: int) -> None:
        """Forget tokens at positions >= length; llama-cpp-python drops their KV cells on the next eval."""
        if not 0 <= length <= self.n_past:
            raise ShapeError(f"cannot truncate a context of {self.n_past} tokens to {length}")
        if length < self.n_past:
            self.hidden_ready, self._kept = False, None  # they belonged to a dropped position
        self.llm.n_tokens = length
        # Remove the cells now too, so a truncate without an eval after it leaves a consistent cache.
        self.llm._ctx.kv_cache_seq_rm(-1, length, -1)

    def _checked(self, ids: Sequence[int]) -> list[int]:
        """Token ids as ints, in range and fitting after the context."""
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise ShapeError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")
        if self.n_past + len(ids) > self.n_ctx:
            raise ShapeError(f"context overflow: {self.n_past} + {len(ids)} tokens > n_ctx {self.n_ctx}")
        return ids

    def _set_embeddings(self, on: bool) -> None:
        """Set llama.cpp's embeddings flag for the next decodes (a call only when it changes)."""
        if on != self._embeddings:
            self._llama_cpp.llama_set_embeddings(self.llm.ctx, on)
            self._embeddings = on

    def eval(self, ids: Sequence[int], *, hidden: bool = False) -> None:
        """Append tokens to the context (one forward pass in batches of n_batch).

        Args:
            ids: [n] token ids.
            hidden: also make the last token's hidden state readable (next_hidden). One token: the
                same decode with embeddings on (same logits and K/V, bit for bit). Several: the batch
                as without, then ensure_hidden().
        """
        ids = self._checked(ids)
        if not ids:
            return
        one = hidden and len(ids) == 1
        self._set_embeddings(one)
        self.llm.eval(ids)
        self.hidden_ready, self._kept = one, None
        if hidden and not one:
            self.ensure_hidden()

    def ensure_hidden(self) -> None:
        """Make the last token's hidden state readable without changing the context or its logits.

        The last token is decoded a second time, alone and with embeddings on. That decode would
        rewrite its K/V cells with one-row kernels, whose rounding differs from a batch's by up to
        ~0.4 nats in later log-probabilities on Q4_K models (docs/determinism.md), so the sequence's
        KV state is saved before and restored after (~12 KB a token for the 0.5B, < 1 ms for a
        prompt), and the batch's logits are kept for next_logits(). Costs one decode.
        """
        if self.hidden_ready:
            return
        if self.n_past == 0:
            raise ShapeError("no tokens evaluated yet: there is no hidden state")
        lib, ctx, llm = self._llama_cpp, self.llm.ctx, self.llm
        logits = self.next_logits()
        size = lib.llama_state_seq_get_size(ctx, 0)
        state = (ctypes.c_uint8 * size)()
        if lib.llama_state_seq_get_data(ctx, state, size, 0) != size:
            raise ModelError("llama.cpp could not save the sequence's KV state")
        n_past = llm.n_tokens
        llm.n_tokens = n_past - 1  # Llama.eval removes the cells from n_tokens on first
        try:
            self._set_embeddings(True)
            llm.eval([int(llm.input_ids[n_past - 1])])
            self.hidden_ready = True
            hidden = self.next_hidden()
        except BaseException:
            self.hidden_ready = False
            raise
        finally:  # the context as it was, even if the decode failed
            llm.n_tokens = n_past
            if lib.llama_state_seq_set_data(ctx, state, size, 0) != size:
                raise ModelError("llama.cpp could not restore the sequence's KV state")
        self._kept = (logits, hidden)

    def eval_all(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Append tokens in one decode that outputs every position: logits and hidden states.

        Args:
            ids: [n] token ids, 1 <= n <= n_batch.

        Returns:
            (logits float32 [n, n_vocab], hidden float32 [n, n_embd]): row i is the next-token
            distribution and the hidden state after ids[i] (copies). llama.cpp keeps an output buffer
            of n * (n_vocab + n_embd) floats for the context's lifetime.
        """
        ids = self._checked(ids)
        llm = self.llm
        if not 1 <= len(ids) <= llm.n_batch:
            raise ShapeError(f"eval_all: expected 1 to n_batch = {llm.n_batch} tokens, got {len(ids)}")
        self._set_embeddings(True)
        n_past, n = llm.n_tokens, len(ids)
        # What Llama.eval does, with every position an output (logits_all for this decode only).
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        llm._batch.set_batch(batch=ids, n_past=n_past, logits_all=True)
        try:
            llm._ctx.decode(llm._batch)
        except RuntimeError as e:
            raise ModelError(f"eval_all: {e}") from None
        llm.input_ids[n_past : n_past + n] = ids
        llm.n_tokens = n_past + n
        self.hidden_ready, self._kept = True, None
        lib, ctx = self._llama_cpp, llm.ctx
        logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(n, self.n_vocab)).copy()
        hidden = np.ctypeslib.as_array(lib.llama_get_embeddings(ctx), shape=(n, self.n_embd)).copy()
        return logits, hidden

    def next_logits(self) -> np.ndarray:
        """Raw logits of the next-token distribution after the last evaluated token.

        Returns:
            float32 array [n_vocab] (a copy: llama.cpp reuses its buffer).
        """
        if self.n_past == 0:
            raise ShapeError("no tokens evaluated yet: there is no next-token distribution")
        if self._kept is not None:
            return self._kept[0].copy()
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def next_hidden(self) -> np.ndarray:
        """Q's last hidden state (final-normed) at the last evaluated token, the input of next_logits().

        Returns:
            float32 array [n_embd] (a copy). Needs eval(hidden=True), eval_all() or ensure_hidden().
        """
        if not self.hidden_ready:
            raise ShapeError("no hidden state: the last evaluated token was not evaluated with hidden=True")
        if self._kept is not None:
            return self._kept[1].copy()
        ptr = self._llama_cpp.llama_get_embeddings_ith(self.llm.ctx, -1)
        if not ptr:
            raise ModelError("llama.cpp returned no hidden state for the last token")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def next_logprobs(self) -> np.ndarray:
        """Log-softmax of next_logits(). Returns: float64 [n_vocab]."""
        return log_softmax(self.next_logits())

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
