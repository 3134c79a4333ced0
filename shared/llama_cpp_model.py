"""A thin layer over llama-cpp-python: the edge runner and the cloud's llama.cpp backend build on it.

Only the last position's logits are read (`llama_get_logits_ith(ctx, -1)`): `logits_all=True`
costs about a quarter of the generation speed, and in llama-cpp-python 0.3.36 `Llama.scores` is
not filled without it (you would read a uniform distribution).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

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
        self.metadata: dict[str, str] = dict(self.llm.metadata)

    # -- tokens --------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens such as <|im_start|> included, no BOS added."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        """Bytes of the tokens (a token may end mid-way through a UTF-8 character)."""
        return self.llm.detokenize(list(ids), special=True)

    def token_id(self, text: str) -> int | None:
        """Id of a single special token given by its text, None if it is not one token."""
        ids = self.tokenize(text)
        return ids[0] if len(ids) == 1 else None

    def stop_token_ids(self) -> set[int]:
        """End-of-generation tokens: EOS and the chat end-of-turn marker where the model has one."""
        stops = {int(self.llm.token_eos())}
        for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
            tid = self.token_id(marker)
            if tid is not None and self.detokenize([tid]).decode(errors="replace") == marker:
                stops.add(tid)
        return stops

    def chat_prompt(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own chat template (the same string transformers renders)."""
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
        return formatter(messages=list(messages)).prompt

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

    def truncate(self, length: int) -> None:
        """Forget tokens at positions >= length; llama-cpp-python drops their KV cells on the next eval."""
        if not 0 <= length <= self.n_past:
            raise ShapeError(f"cannot truncate a context of {self.n_past} tokens to {length}")
        self.llm.n_tokens = length
        # Remove the cells now too, so a truncate without an eval after it leaves a consistent cache.
        self.llm._ctx.kv_cache_seq_rm(-1, length, -1)

    def eval(self, ids: Sequence[int]) -> None:
        """Append tokens to the context (one forward pass in batches of n_batch)."""
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise ShapeError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")
        if self.n_past + len(ids) > self.n_ctx:
            raise ShapeError(f"context overflow: {self.n_past} + {len(ids)} tokens > n_ctx {self.n_ctx}")
        if ids:
            self.llm.eval(ids)

    def next_logits(self) -> np.ndarray:
        """Raw logits of the next-token distribution after the last evaluated token.

        Returns:
            float32 array [n_vocab] (a copy: llama.cpp reuses its buffer).
        """
        if self.n_past == 0:
            raise ShapeError("no tokens evaluated yet: there is no next-token distribution")
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def next_logprobs(self) -> np.ndarray:
        """Log-softmax of next_logits(). Returns: float64 [n_vocab]."""
        return log_softmax(self.next_logits())

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
