"""The transformers + torch backend: the large model on CUDA (bf16) or CPU, many sequences, one batched pass.

Loading. A Hugging Face directory is loaded as is. A GGUF file is dequantized by transformers
(`from_pretrained(folder, gguf_file=name)`, one to two minutes for the 1.5B model) once; the weights, in
the dtype the backend runs in, with the config and tokenizer, are then kept in
`<cache_dir>/converted/<stem>-<dtype>-<key>` as a plain Hugging Face directory, and every later start
loads that directory instead (seconds). The key covers the GGUF's identity (its registry sha256, or its
path, size and mtime) and the transformers version. The directory is written
under a temporary name and renamed when complete, so an interrupted conversion is never used.

KV caches. Every sequence owns one key and one value buffer per layer, `[1, kv_heads, capacity,
head_dim]`, of which the first `length` positions are valid. The buffers grow geometrically (never past
`max_context`), so appending a few tokens does not copy the whole cache each time, and `truncate` only
lowers `length`.

Batching. `forward` runs all items in one model call (several only when `max_batch_tokens` would be
exceeded). With past lengths c_i (C = max c_i) and new-token counts n_i (N = max n_i), each layer gets a
batched buffer `[B, kv_heads, C + N, head_dim]`: item i's past is *left*-padded into columns
[C - c_i, C), its new tokens are *right*-padded into [C, C + N). A 2-D attention mask marks the real
columns, and `position_ids` give the real token j of item i the position c_i + j, so padding changes
neither attention nor RoPE. transformers 5.23's `create_causal_mask` combines that 2-D mask with its
causal mask (causality by column: query C + j sees columns <= C + j) for both the sdpa and the eager
attention; the tests check the result against single-sequence passes. Afterwards only the n_i new
columns of each item are copied back into the item's own buffers. A batch of one sequence needs no
padding: it runs directly on the sequence's own buffers.

Deterministic mode (the default). The batched pass above is fast but not batch-invariant: a session's
rows change in the last bits with the other sessions in the pass and with how its tokens are split
into passes. With `deterministic=True` every pass is built so that they do not (cloud/backends/
deterministic.py says what changed them and how): the items' tokens packed into one sequence padded
with dummy tokens to a multiple of 8 rows, attention per sequence over its own buffers in fixed
blocks of keys, the output layer on a multiple of 8 rows. Everything but the attention still runs
batched over all sessions.

Views. The decoder's hidden states of the rows that are asked for go through the output layer (never
the whole batch), then log-softmax in float32 and `topk` on the device; only the top-k, the gathered
ids' values and the full last rows that were asked for cross to the host, as float64.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from handoff.cloud.backend import Backend, ForwardItem, ForwardOutput, make_backend_info
from handoff.cloud.backends import deterministic as det
from handoff.shared.constraints import RowAdjust
from handoff.shared.errors import CapacityError, HandoffError, ModelError, ShapeError
from handoff.shared.model_info import load_model_info
from handoff.shared.models import ModelRef
from handoff.shared.settings import HandoffSettings, get_settings

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Bump when the layout of a converted directory changes: old ones are then converted again.
_CONVERT_FORMAT = 1
_CONVERTED_MARKER = "handoff-converted.json"
# Cache buffers grow by this factor, in multiples of _CAPACITY_STEP tokens.
_GROWTH = 1.5
_CAPACITY_STEP = 64
# Output rows put through the output layer at a time: bounds the [rows, V] float32 logits (V = 151,936:
# 256 rows = 156 MB) for long prefills that ask for many rows.
_VIEW_ROWS = 256
_PAD_TOKEN = 0  # input id of padding positions (any valid id: padded rows are masked and never read)

LoadSource = Literal["hf", "converted-now", "converted-cache"]


# ---------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(device: str) -> torch.device:
    """The torch device for `device`: "auto" = cuda:0 when CUDA is available, else cpu; or "cpu", "cuda", "cuda:N"."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise HandoffError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HandoffError(f"device {device!r} asked for, but torch sees no CUDA device")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise HandoffError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise HandoffError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for `dtype`: "auto" = bfloat16 on CUDA, float32 on CPU; or one of DTYPES."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise HandoffError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}") from None


# ---------------------------------------------------------------------------------------------
# GGUF -> converted Hugging Face directory, cached


def converted_dir(ref: ModelRef, settings: HandoffSettings, dtype: torch.dtype = torch.float32) -> Path:
    """Where the dequantized weights of a GGUF `ref`, stored in `dtype`, are (or will be) cached."""
    import transformers

    if ref.spec is not None:
        identity = f"sha256={ref.spec.sha256}"  # a verified registry file: its content hash
    else:
        st = ref.path.stat()
        identity = f"path={ref.path.resolve()}:size={st.st_size}:mtime_ns={st.st_mtime_ns}"
    key = hashlib.sha256(f"{_CONVERT_FORMAT}:{transformers.__version__}:{identity}".encode()).hexdigest()[:24]
    return settings.cache_dir / "converted" / f"{ref.path.stem}-{_dtype_name(dtype)}-{key}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_complete(folder: Path) -> bool:
    return (folder / _CONVERTED_MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise conversions of one model across processes (two services starting at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def convert_gguf(ref: ModelRef, dest: Path, dtype: torch.dtype = torch.float32) -> None:
    """Dequantize the GGUF `ref` with transformers and save it in `dtype` as a Hugging Face directory at `dest`.

    The weights are dequantized in float32, then stored in the dtype the model will run in: casting before
    saving gives the same tensors as casting at every load, and a bfloat16 copy loads twice as fast from
    half the bytes (a float32 file cast at load time also keeps the float32 pages resident meanwhile).

    The weights are written into a temporary sibling directory that is renamed to `dest` only when
    complete (safetensors, config, tokenizer and a marker file).

    Raises:
        ModelError: transformers cannot load the GGUF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(ref.path.parent), ref.path.name
    t0 = time.perf_counter()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers raises ValueError, KeyError, RuntimeError, ... on odd files
        raise ModelError(f"transformers cannot load {ref.path}: {type(e).__name__}: {e}") from None
    t_load = time.perf_counter() - t0
    # transformers marks a GGUF-loaded model as quantized and refuses to save it ("quantized with gguf and
    # is not serializable"). The weights are plain float32 tensors by now: hand them to a model of the same
    # config without the quantization marker. Built on the meta device and filled with assign=True, the
    # copy shares the loaded tensors instead of allocating a second model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    del loaded
    plain.to(dtype)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is as readable as the models beside it
    try:
        t1 = time.perf_counter()
        # Shards of 1 GB: safetensors serializes a shard through an in-memory copy; one 6 GB file would
        # double the peak memory of the conversion.
        plain.save_pretrained(tmp, max_shard_size="1GB")
        del plain
        gc.collect()  # free the weights (6 GB in float32 for 1.5B parameters) before the tokenizer
        t2 = time.perf_counter()
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        t3 = time.perf_counter()
        st = ref.path.stat()
        marker = {
            "format": _CONVERT_FORMAT,
            "dtype": _dtype_name(dtype),
            "source": str(ref.path.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": ref.spec.sha256 if ref.spec else None,
            "seconds": {
                "dequantize": round(t_load, 1),
                "save": round(t2 - t1, 1),
                "tokenizer": round(t3 - t2, 1),
            },
        }
        (tmp / _CONVERTED_MARKER).write_text(json.dumps(marker, indent=1))
        if dest.exists():  # an incomplete leftover (complete ones are never converted again)
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "converted %s into %s in %.1f s (dequantize %.1f s, save %.1f s, tokenizer %.1f s)",
        ref.path.name,
        dest,
        time.perf_counter() - t0,
        t_load,
        t2 - t1,
        t3 - t2,
    )


def ensure_converted(
    ref: ModelRef, settings: HandoffSettings, dtype: torch.dtype = torch.float32
) -> tuple[Path, bool]:
    """The converted directory of the GGUF `ref` in `dtype`, converting it first if needed.

    Returns:
        (directory, True when it was already there).
    """
    dest = converted_dir(ref, settings, dtype)
    if _is_complete(dest):
        return dest, True
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if _is_complete(dest):  # another process finished while we waited
            return dest, True
        logger.warning(
            "dequantizing %s with transformers (once; 1-2 minutes and ~9 GB of memory for a 1.5B model) into %s",
            ref.path.name,
            dest,
        )
        convert_gguf(ref, dest, dtype)
    return dest, False


# ---------------------------------------------------------------------------------------------
# KV cache pieces


class _BufferLayer(DynamicLayer):
    """One attention layer's cache during a forward pass, in a preallocated buffer.

    `keys`/`values` are [B, kv_heads, capacity, head_dim] with `length` valid positions. `update` writes
    the new positions in place (a `DynamicLayer` grows by `torch.cat`, copying the whole cache on every
    call) and returns views of the valid part. `get_seq_length` is what transformers 5.23 reads for the
    query offset and the mask size (`get_mask_sizes` = length + query length, offset 0).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)  # sets dtype, device, is_initialized
        self.keys, self.values, self.length = keys, values, length

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [B, kv_heads, n, head_dim] of the new tokens (keys already rotated)
        end = self.length + key_states.shape[-2]
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length


def _grown_capacity(needed: int, capacity: int, limit: int) -> int:
    """A capacity >= needed: at least _GROWTH x the old one, in _CAPACITY_STEP steps, at most max(limit, needed)."""
    target = max(needed, int(capacity * _GROWTH), _CAPACITY_STEP)
    target = -(-target // _CAPACITY_STEP) * _CAPACITY_STEP
    return max(needed, min(target, limit))


class TransformersSequence:
    """A handle for one sequence of a TransformersBackend: its KV buffers and its length."""

    __slots__ = ("_owner", "alive", "keys", "length", "seq_id", "values")

    def __init__(self, owner: TransformersBackend, seq_id: int) -> None:
        self._owner = owner
        self.seq_id = seq_id
        self.length = 0
        self.alive = True
        # per layer [1, kv_heads, capacity, head_dim]; empty until the first forward
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def __repr__(self) -> str:
        state = "" if self.alive else ", released"
        return f"TransformersSequence(seq_id={self.seq_id}, length={self.length}{state})"


@dataclass
class _Row:
    """One output row of a group: where its hidden state is and what to read from its distribution."""

    flat: int  # index into the group's [rows, H] hidden states (_run_decoder)
    gather: list[int]  # ids whose log-probabilities to return (may be empty)
    full: bool  # return the whole [V] log-probabilities (an item's last row, with full_last)
    adjust: RowAdjust | None = None  # the row's constraint (shared/constraints.py), applied first


@dataclass
class _HostViews:
    """The views of a group's R output rows, on the host."""

    topk_logprobs: np.ndarray | None  # [R, k_max] float64, descending, ties by ascending id
    topk_ids: np.ndarray | None  # [R, k_max] int32
    gathered: np.ndarray | None  # [R, G] float64, row r valid up to len(rows[r].gather)
    full: dict[int, np.ndarray]  # row -> [V] float64

    def output(self, item: ForwardItem, start: int) -> ForwardOutput:
        """The ForwardOutput of an item whose rows are [start, start + item.n_out)."""
        if item.n_out == 0:
            empty = np.zeros((0, item.k))
            return ForwardOutput(empty.astype(np.int32), empty, [], None)
        rows = slice(start, start + item.n_out)
        gathered: list[np.ndarray | None] = []
        for j, ids in enumerate(item.gather or [None] * item.n_out):
            if ids is None:
                gathered.append(None)
            elif len(ids) == 0:  # self.gathered is None when no row of the group gathers anything
                gathered.append(np.zeros(0))
            else:
                gathered.append(self.gathered[start + j, : len(ids)].copy())
        return ForwardOutput(
            topk_ids=self.topk_ids[rows, : item.k].copy(),
            topk_logprobs=self.topk_logprobs[rows, : item.k].copy(),
            gathered=gathered,
            last_logprobs=self.full.get(start + item.n_out - 1) if item.full_last else None,
            full_logprobs=np.stack([self.full[start + j] for j in range(item.n_out)])
            if item.full_rows
            else None,
        )


# ---------------------------------------------------------------------------------------------
# The backend


class TransformersBackend(Backend):
    """A causal LM in transformers + torch serving many sequences with batched forward passes.

    Args:
        ref: a resolved model: a GGUF file (dequantized once, then cached) or a Hugging Face directory.
        device: "auto" (cuda:0 if available, else cpu), "cpu", "cuda", "cuda:N".
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", "float16".
        max_context: tokens per sequence at most; a forward that would pass it raises CapacityError.
        settings: where the converted weights and model metadata are cached (default: process settings).
        threads: torch CPU threads (process-wide: `torch.set_num_threads`); None leaves torch's default.
        max_sequences: live sequences at most (None = no limit; memory is allocated as caches grow).
        max_batch_tokens: padded new tokens (batch size x longest item) per model call; a forward with
            more is split into several calls.
        attn_implementation: transformers attention ("sdpa", "eager"); None = the model's default. Only
            without `deterministic`, which brings its own.
        deterministic: batch-invariant passes: a sequence's views are bit-identical whatever else is in
            the batch and however its tokens are split into forward calls (module docstring).
    """

    name = "transformers"
    sequence_type = TransformersSequence

    def __init__(
        self,
        ref: ModelRef,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_context: int = 4096,
        settings: HandoffSettings | None = None,
        threads: int | None = None,
        max_sequences: int | None = None,
        max_batch_tokens: int = 8192,
        attn_implementation: str | None = None,
        deterministic: bool = True,
    ) -> None:
        for name, value in (("max_context", max_context), ("max_batch_tokens", max_batch_tokens)):
            if int(value) < 1:
                raise HandoffError(f"{name} must be >= 1, got {value}")
        if max_sequences is not None and max_sequences < 1:
            raise HandoffError(f"max_sequences must be >= 1 or None, got {max_sequences}")
        if deterministic and attn_implementation is not None:
            raise HandoffError(
                "attn_implementation applies only with deterministic=False (it brings its own)"
            )
        if threads is not None:
            if threads < 1:
                raise HandoffError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        settings = settings or get_settings()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_context = int(max_context)
        self.max_sequences = max_sequences
        self.max_batch_tokens = int(max_batch_tokens)
        self.deterministic = bool(deterministic)

        model_info, self.vocabulary = load_model_info(ref, settings)  # ModelError for bad files
        self.model_ref = ref
        t0 = time.perf_counter()
        self.load_source: LoadSource
        if ref.kind == "gguf":
            folder, cached = ensure_converted(ref, settings, self.dtype)
            self.load_source = "converted-cache" if cached else "converted-now"
        else:
            folder, self.load_source = ref.path, "hf"
        self._model = self._load(folder, det.ATTENTION if self.deterministic else attn_implementation)
        self.load_seconds = time.perf_counter() - t0
        if self.deterministic:
            det.make_activations_invariant(self._model)
        self._decoder = self._model.get_decoder()  # the transformer body: hidden states, no output layer
        self._lm_head = self._model.get_output_embeddings()

        config = self._model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        if any(t != "full_attention" for t in layer_types):
            raise ModelError(
                f"{ref.name}: only full-attention layers are supported, got {sorted(set(layer_types))}"
            )
        self._n_layers = config.num_hidden_layers
        self._kv_heads = config.num_key_value_heads
        self._group = config.num_attention_heads // config.num_key_value_heads  # query heads per key head
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._softcap = getattr(config, "final_logit_softcapping", None)
        vocab_size = int(self._lm_head.weight.shape[0])  # rows of the output layer
        self.info = make_backend_info(
            "transformers", ref, model_info, vocab_size=vocab_size, device=str(self.device),
            dtype=_dtype_name(self.dtype), max_context=max_context,
        )  # fmt: skip
        # guards the registry of live sequences: new_sequence may come from any thread
        self._lock = threading.Lock()
        self._live: dict[int, TransformersSequence] = {}
        self._next_id = 0
        self._closed = False
        if self.deterministic:
            self.check_invariance()  # refuses a machine where the measured kernel properties do not hold
        logger.info(
            "transformers backend: %s on %s (%s%s), loaded from %s in %.1f s",
            ref.name,
            self.device,
            self.info.dtype,
            ", deterministic" if self.deterministic else "",
            self.load_source,
            self.load_seconds,
        )

    def _load(self, folder: Path, attn_implementation: str | None):
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": self.dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"transformers cannot load {folder}: {e}") from None
        return model.to(self.device).eval()

    def check_invariance(self) -> None:
        """Verify bit-invariance of deterministic mode on this machine (deterministic.check_invariance).

        Raises:
            ModelError: it does not hold here.
        """
        det.check_invariance(self)

    # -- sequences ------------------------------------------------------------------------------

    @property
    def active_sequences(self) -> int:
        return len(self._live)

    def new_sequence(self) -> TransformersSequence:
        self._check_open()
        with self._lock:
            if self.max_sequences is not None and len(self._live) >= self.max_sequences:
                raise CapacityError(
                    f"all {self.max_sequences} sequences of the transformers backend are in use"
                )
            seq = TransformersSequence(self, self._next_id)
            self._next_id += 1
            self._live[seq.seq_id] = seq
        return seq

    def truncate(self, seq: object, length: int) -> None:
        """Forget positions >= length (the buffers keep their capacity; later tokens overwrite them)."""
        s = self._own(seq)
        if not 0 <= length <= s.length:
            raise ShapeError(f"cannot truncate a sequence of {s.length} tokens to {length}")
        s.length = length

    def release(self, seq: object) -> None:
        """Drop the sequence's buffers; releasing a released handle does nothing."""
        if isinstance(seq, TransformersSequence) and seq._owner is self and not seq.alive:
            return
        s = self._own(seq)
        s.alive = False
        s.length = 0
        s.keys, s.values = [], []
        with self._lock:
            del self._live[s.seq_id]

    def _reserve(self, s: TransformersSequence, needed: int) -> None:
        """Make the sequence's buffers hold at least `needed` positions (keeps the valid ones)."""
        if needed <= s.capacity:
            return
        cap = _grown_capacity(needed, s.capacity, self.max_context)
        shape = (1, self._kv_heads, cap, self._head_dim)
        # Deterministic attention reads whole blocks of columns, the unused ones with zero weight: they
        # must hold finite values (0 x NaN is NaN), so its buffers start zeroed.
        alloc = torch.zeros if self.deterministic else torch.empty
        keys, values = [], []
        for layer in range(self._n_layers):
            k = alloc(shape, dtype=self.dtype, device=self.device)
            v = alloc(shape, dtype=self.dtype, device=self.device)
            if s.length:
                k[:, :, : s.length] = s.keys[layer][:, :, : s.length]
                v[:, :, : s.length] = s.values[layer][:, :, : s.length]
            keys.append(k)
            values.append(v)
        s.keys, s.values = keys, values

    # -- forward --------------------------------------------------------------------------------

    def forward(self, items: Sequence[ForwardItem]) -> list[ForwardOutput]:
        return self._apply(items, read=True)  # type: ignore[return-value]  (read=True: no None)

    def raw_forward(self, items: Sequence[ForwardItem]) -> None:
        """The same batched passes as `forward`, the output rows' logits computed, nothing read back."""
        self._apply(items, read=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # "computed": CUDA kernels run asynchronously

    def _apply(self, items: Sequence[ForwardItem], read: bool) -> list[ForwardOutput | None]:
        """Check every item, then run them in as few model calls as `max_batch_tokens` allows.

        All or nothing: when any call fails, every sequence goes back to its length before.
        """
        self._check_open()
        items = list(items)
        seqs = [self._own(item.seq) for item in items]
        if len({s.seq_id for s in seqs}) != len(seqs):
            raise ShapeError("forward: two items refer to the same sequence")
        vocab = self.info.vocab_size
        for item, s in zip(items, seqs, strict=True):
            item.check(vocab)
            self._check_views(item, vocab)
            if s.length + len(item.tokens) > self.max_context:
                raise CapacityError(
                    f"sequence {s.seq_id} would hold {s.length} + {len(item.tokens)} tokens, "
                    f"more than max_context={self.max_context}"
                )

        outputs: list[ForwardOutput | None] = [None] * len(items)
        old_lengths = [s.length for s in seqs]
        try:
            for group in self._plan(items):
                with torch.inference_mode():
                    views = self._forward_group([items[i] for i in group], [seqs[i] for i in group], read)
                for i, view in zip(group, views, strict=True):
                    outputs[i] = view
        except BaseException as e:
            # A later call of a split forward may fail after earlier ones succeeded. Lowering the
            # lengths is enough: what was written past them is overwritten later.
            for s, length in zip(seqs, old_lengths, strict=True):
                s.length = length
            if isinstance(e, torch.OutOfMemoryError):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise CapacityError(
                    f"out of memory on {self.device} for a batch of {len(items)} items: {e}"
                ) from None
            raise
        return outputs

    @staticmethod
    def _check_views(item: ForwardItem, vocab: int) -> None:
        """What ForwardItem.check leaves out: k and the gathered ids."""
        if item.n_out and not 1 <= item.k <= vocab:
            raise ShapeError(f"k: expected 1 <= k <= V = {vocab}, got {item.k}")
        for row in item.gather or ():
            bad = [t for t in row or () if not 0 <= t < vocab]
            if bad:
                raise ShapeError(f"gather: token ids out of range [0, {vocab}): {bad[:5]}")

    def _plan(self, items: list[ForwardItem]) -> list[list[int]]:
        """Item indices per model call, in order, keeping each call's size within max_batch_tokens: B x
        N_max padded rows, or in deterministic mode the packed tokens. A single item over the limit
        gets a call of its own.
        """
        groups: list[list[int]] = []
        longest = total = 0
        for i, item in enumerate(items):
            n = len(item.tokens)
            if not groups:
                fits = False
            elif self.deterministic:
                fits = total + n <= self.max_batch_tokens
            else:
                fits = max(longest, n) * (len(groups[-1]) + 1) <= self.max_batch_tokens
            if fits:
                groups[-1].append(i)
                longest, total = max(longest, n), total + n
            else:
                groups.append([i])
                longest = total = n
        return groups

    def _forward_group(
        self, items: list[ForwardItem], seqs: list[TransformersSequence], read: bool = True
    ) -> list[ForwardOutput | None]:
        """One model call for `items` (distinct sequences), then their views; lengths advance at the end.

        With read=False the output rows' logits are computed on the device and dropped (raw_forward).
        """
        active = [i for i, item in enumerate(items) if item.tokens]  # items without tokens need no call
        hidden = None
        rows: list[_Row] = []
        if active:
            # [rows, H], and the row of each item's first new token
            hidden, starts = self._run_decoder([items[i] for i in active], [seqs[i] for i in active])
            for b, i in enumerate(active):
                item = items[i]
                first = len(item.tokens) - item.n_out  # the item's output rows are its last n_out tokens
                for j in range(item.n_out):
                    gather = item.gather[j] if item.gather is not None else None
                    full = item.full_rows or (item.full_last and j == item.n_out - 1)
                    adjust = item.adjust[j] if item.adjust is not None else None
                    rows.append(_Row(starts[b] + first + j, list(gather or ()), full, adjust))
        k = max((item.k for item in items if item.n_out), default=1)
        if read:
            views = self._views(hidden, rows, k)
        elif rows:  # raw_forward: the output rows' logits, computed and dropped
            self._row_logits(hidden, [r.flat for r in rows])
        for item, s in zip(items, seqs, strict=True):
            s.length += len(item.tokens)
        if not read:
            return [None] * len(items)
        outputs, start = [], 0
        for item in items:  # rows were appended in item order, n_out per item
            outputs.append(views.output(item, start))
            start += item.n_out
        return outputs

    def _run_decoder(
        self, items: list[ForwardItem], seqs: list[TransformersSequence]
    ) -> tuple[torch.Tensor, list[int]]:
        """Run the transformer body over the new tokens of `items`; write their keys/values into the sequences.

        Returns:
            ([B * N, H] final hidden states (after the last norm), the row where each item's tokens
            start): row b * N + j is item b's j-th new token for j < n_b, padding after. In
            deterministic mode the items are packed instead (deterministic.run_decoder).
        """
        if self.deterministic:
            return det.run_decoder(self, items, seqs, pad_token=_PAD_TOKEN)
        past = [s.length for s in seqs]
        new = [len(item.tokens) for item in items]
        batch, c_max, n_max = len(items), max(past), max(new)
        dev = self.device

        input_ids = torch.full((batch, n_max), _PAD_TOKEN, dtype=torch.long)
        for b, item in enumerate(items):
            input_ids[b, : new[b]] = torch.as_tensor(item.tokens, dtype=torch.long)
        # Real token j of item b sits at position c_b + j; padded columns get positions past the end,
        # which RoPE accepts and the mask hides.
        position_ids = torch.as_tensor(past).unsqueeze(1) + torch.arange(n_max).unsqueeze(0)  # [B, N]

        if batch == 1:
            # No padding: attend over the sequence's own buffers, extended in place.
            s = seqs[0]
            self._reserve(s, s.length + n_max)
            layers = [_BufferLayer(k, v, s.length) for k, v in zip(s.keys, s.values, strict=True)]
            attention_mask = None
        else:
            layers = self._padded_layers(seqs, c_max, n_max)
            attention_mask = torch.zeros((batch, c_max + n_max), dtype=torch.long)  # [B, C + N], 1 = real
            for b in range(batch):
                attention_mask[b, c_max - past[b] : c_max + new[b]] = 1
            attention_mask = attention_mask.to(dev)

        out = self._decoder(
            input_ids=input_ids.to(dev),
            attention_mask=attention_mask,
            position_ids=position_ids.to(dev),
            past_key_values=Cache(layers=layers),
            use_cache=True,
        )
        if batch > 1:  # copy each item's new columns [C, C + n_b) back into its own buffers
            for b, s in enumerate(seqs):
                self._reserve(s, past[b] + new[b])
                for layer, (s_k, s_v) in enumerate(zip(s.keys, s.values, strict=True)):
                    s_k[0, :, past[b] : past[b] + new[b]] = layers[layer].keys[b, :, c_max : c_max + new[b]]
                    s_v[0, :, past[b] : past[b] + new[b]] = layers[layer].values[b, :, c_max : c_max + new[b]]
        hidden = out.last_hidden_state  # [B, N, H]
        return hidden.reshape(-1, hidden.shape[-1]), [b * n_max for b in range(batch)]

    def _padded_layers(self, seqs: list[TransformersSequence], c_max: int, n_max: int) -> list:
        """Per layer, batched buffers [B, kv_heads, C + N, head_dim] with each past left-padded into [C - c_b, C)."""
        shape = (len(seqs), self._kv_heads, c_max + n_max, self._head_dim)
        layers = []
        for layer in range(self._n_layers):
            # zeros, not empty: masked columns still enter the attention matmul, and garbage there
            # could be NaN/inf, which a mask does not cancel (0 * inf).
            keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            values = torch.zeros(shape, dtype=self.dtype, device=self.device)
            for b, s in enumerate(seqs):
                if s.length:
                    keys[b, :, c_max - s.length : c_max] = s.keys[layer][0, :, : s.length]
                    values[b, :, c_max - s.length : c_max] = s.values[layer][0, :, : s.length]
            layers.append(_BufferLayer(keys, values, c_max))
        return layers

    def _row_logits(self, hidden: torch.Tensor, flat: list[int]) -> torch.Tensor:
        """The output layer on some rows of the decoder's output.

        Args:
            hidden: [rows, H] final hidden states (_run_decoder).
            flat: [r] row indices into hidden.

        Returns:
            [r, V] logits in the model's dtype.
        """
        selected = hidden.index_select(0, torch.as_tensor(flat, device=self.device))  # [r, H]
        if self.deterministic:  # a multiple of 8 rows: the same product kernel for any r
            selected = det.pad_rows(selected)
        return self._lm_head(selected)[: len(flat)]

    def _views(self, hidden: torch.Tensor | None, rows: list[_Row], k: int) -> _HostViews:
        """Top-k, gathered and full views of the output rows: computed on the device, then one transfer.

        Args:
            hidden: [B * N, H] final hidden states (None when there are no rows).
            rows: the output rows.
            k: top-k width (the largest k asked for; each item keeps its own prefix).
        """
        g_max = max((len(r.gather) for r in rows), default=0)
        top_vals, top_ids, gathered, full = [], [], [], {}
        for start in range(0, len(rows), _VIEW_ROWS):  # bounds the [rows, V] logits of long prefills
            chunk = rows[start : start + _VIEW_ROWS]
            logits = self._row_logits(hidden, [r.flat for r in chunk]).float()  # [r, V]
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            for x, r in enumerate(chunk):
                if r.adjust is not None:
                    self._adjust_row(logits[x], r.adjust)
            lp = torch.log_softmax(logits, dim=-1)  # [r, V] float32
            vals, ids = torch.topk(lp, k, dim=-1)  # [r, k], descending
            top_vals.append(vals)
            top_ids.append(ids)
            if g_max:
                idx = torch.zeros((len(chunk), g_max), dtype=torch.long)  # padded with id 0, cut on the host
                for x, r in enumerate(chunk):
                    idx[x, : len(r.gather)] = torch.as_tensor(r.gather, dtype=torch.long)
                gathered.append(lp.gather(1, idx.to(self.device)))  # [r, G]
            full.update({start + x: lp[x] for x, r in enumerate(chunk) if r.full})  # [V] each

        def host(parts: list[torch.Tensor], dtype) -> np.ndarray | None:
            return torch.cat(parts).cpu().numpy().astype(dtype) if parts else None

        vals_h, ids_h = host(top_vals, np.float64), host(top_ids, np.int32)
        if vals_h is not None:
            vals_h, ids_h = _lower_id_first(vals_h, ids_h)
        full_h = {}
        if full:
            stacked = torch.stack(list(full.values())).cpu().numpy().astype(np.float64)  # [F, V]
            full_h = dict(zip(full, stacked, strict=True))
        return _HostViews(vals_h, ids_h, host(gathered, np.float64), full_h)

    def grammar_tokenizer(self, stop_ids: Sequence[int]):
        """The grammar engine's tokenizer: from the GGUF file (see Backend), or a Hugging Face folder's."""
        ref = self.model_ref
        if ref is not None and ref.kind != "gguf":
            import llguidance.hf
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(ref.path))
            return llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=self.info.vocab_size, eos_token=sorted(stop_ids)
            )
        return super().grammar_tokenizer(stop_ids)

    def _adjust_row(self, logits: torch.Tensor, adjust: RowAdjust) -> None:
        """A constraint's adjustment of one row, in place on the device (as shared.constraints.adjust_logits).

        Args:
            logits: [V] float32 logits of one output row.
            adjust: its bias and mask.
        """
        vocab = logits.shape[0]
        if adjust.bias_ids.size:
            keep = adjust.bias_ids < vocab
            ids = torch.as_tensor(adjust.bias_ids[keep], device=self.device)
            logits[ids] += torch.as_tensor(adjust.bias_values[keep], device=self.device)
        if adjust.allowed is not None:
            allowed = np.zeros(vocab, dtype=bool)
            width = min(vocab, adjust.allowed.size)
            allowed[:width] = adjust.allowed[:width]
            logits.masked_fill_(~torch.from_numpy(allowed).to(self.device), float("-inf"))

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop every sequence and the model (idempotent); the backend is unusable after."""
        self._closed = True
        for seq in list(getattr(self, "_live", {}).values()):
            seq.alive = False
            seq.keys, seq.values = [], []
        if hasattr(self, "_live"):
            self._live.clear()
        self._model = self._decoder = self._lm_head = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> TransformersBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lower_id_first(vals: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row's top-k so that equal values come in ascending id (torch.topk leaves ties unordered).

    Args:
        vals: [R, k] descending values; ids: [R, k].
    """
    order = np.lexsort((ids, -vals), axis=-1)  # by value descending, then id ascending
    return np.take_along_axis(vals, order, -1), np.take_along_axis(ids, order, -1)


__all__ = [
    "DTYPES",
    "TransformersBackend",
    "TransformersSequence",
    "convert_gguf",
    "converted_dir",
    "ensure_converted",
]
