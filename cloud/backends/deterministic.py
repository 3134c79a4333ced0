"""Batch-invariant forward passes for the transformers backend (its deterministic mode, the default).

A session's rows must come out bit-identical whatever else shares the pass (other sessions, their
lengths, their order) and however the session's own tokens are split into passes. The fast path
(deterministic=False) does not: between one pass and one token per pass, or alone and next to other
sessions, rows differed by up to 1.3e-4 in log-probability (1.5B, CPU float32; 1e-5 on the tiny test
model, 0.09 on it in bfloat16). Measured on CPU (torch 2.13 with MKL, AVX-512, 1-16 threads), what
made them differ, and what this module does instead:

- Matrix products change kernel with their shape. With M rows: M = 1 takes a matrix-vector path,
  M < 8 and the 1-3 tail rows of some M (which ones depends on the thread count: M = 9 at 8 threads,
  M = 17 at 16) another one, each with another summation order. With M a multiple of 8, a row came
  out identical for every M tested (8 to 2048, at any position, 1 to 16 threads). So a pass packs
  the items' new tokens one after the other into a single sequence and appends dummy tokens up to a
  multiple of 8 rows (they belong to no session: no cache entry, zero attention output, never
  read); attention pads each session's query rows with zero rows to a multiple of 8, and the output
  layer gets a multiple of 8 rows. The padding is per pass, not per session: 64 sessions decoding
  one token each need no padding at all.
- The other dimensions matter too: q @ k^T over fewer than 16 keys, and p @ v over a number of keys
  that grows past a blocking size (300 vs 308), differ even when the extra keys have zero weight.
  And torch's SDPA (the CPU flash kernel) depends on the query count and on where a query sits
  relative to the end of the keys; the batched pass also left-pads each past, which moves its keys.
  Here attention runs per session over its own cache, keys at columns [0, length), in blocks of
  KEY_BLOCK keys: every product has the shape [rows, head_dim] x [head_dim, KEY_BLOCK] or
  [rows, KEY_BLOCK] x [KEY_BLOCK, head_dim], and the blocks are added one after the other. A block
  past a row's position has zero weight and adds exact zeros, so the number of blocks (the session's
  length, how many tokens came in the same pass) changes nothing.
- SiLU: torch computes the tail of each thread's chunk of an elementwise op with the scalar code,
  and its scalar sigmoid differs from the vectorized one in ~4% of inputs; the chunks depend on the
  tensor's size (the batch) and the thread count. x / (1 + exp(-x)) uses only operations whose
  scalar and vector results agree (checked on 20,000 inputs: all equal).

The linear layers, norms and the MLP still run batched over all sessions' rows: with those row counts
their rows do not depend on the rest of the batch. Only the attention runs session by session (a
Python loop: B x layers small products per pass), over the session's own buffers, with no batched
copy of the caches.

All of this rests on kernel properties measured on CPU; they are not known to hold elsewhere (cuBLAS
chooses kernels by shape, and may split the inner dimension). `check_invariance` tries them on the
machine at load time and refuses to start deterministic where they fail.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer

from handoff.cloud.backend import ForwardItem
from handoff.shared.errors import ModelError

if TYPE_CHECKING:
    from handoff.cloud.backends.transformers_backend import TransformersBackend

logger = logging.getLogger(__name__)

ROW_MULTIPLE = 8  # rows per matrix product come in multiples of this
KEY_BLOCK = 256  # keys per attention block: the fixed inner size of every attention product
ATTENTION = "handoff_batch_invariant"  # the attention implementation registered with transformers


def padded_rows(n: int) -> int:
    """`n` rounded up to a positive multiple of ROW_MULTIPLE."""
    return max(ROW_MULTIPLE, -(-n // ROW_MULTIPLE) * ROW_MULTIPLE)


def padded_keys(n: int) -> int:
    """`n` rounded up to a positive multiple of KEY_BLOCK: the key columns attention reads."""
    return max(KEY_BLOCK, -(-n // KEY_BLOCK) * KEY_BLOCK)


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` [r, H] with zero rows appended up to padded_rows(r) rows."""
    extra = padded_rows(x.shape[0]) - x.shape[0]
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))]) if extra else x


@dataclass(frozen=True)
class Packing:
    """Where each session's rows sit in a packed pass, and which keys they see."""

    starts: list[int]  # session b's new tokens are rows [starts[b], starts[b] + counts[b]) of the pass
    counts: list[int]
    past: list[int]  # session b's cache length before the pass: its row j sits at position past[b] + j
    masks: list[
        torch.Tensor
    ]  # per session [blocks_b, padded_rows(group * n_b), KEY_BLOCK] bool (causal_mask)


def causal_mask(past: int, n: int, group: int, device: torch.device) -> torch.Tensor:
    """Which key columns a session's attention rows may see, in the block layout of the attention.

    Args:
        past: the session's cache length before the pass; its query j sits at position past + j.
        n: the session's new tokens.
        group: query heads per key head: the attention's rows are (head in group, query j), then zero
            rows up to padded_rows(group * n), which see column `past` (any non-empty set will do).

    Returns:
        [padded_keys(past + n) / KEY_BLOCK, padded_rows(group * n), KEY_BLOCK] bool, True = attend.
    """
    rows = padded_rows(group * n)
    pos = torch.full((rows,), past, device=device)
    pos[: group * n] = torch.arange(past, past + n, device=device).repeat(group)
    cols = torch.arange(padded_keys(past + n), device=device)
    mask = cols.unsqueeze(0) <= pos.unsqueeze(1)  # [rows, L]
    return mask.view(rows, -1, KEY_BLOCK).transpose(0, 1)


class SessionLayer(DynamicLayer):
    """One attention layer's cache in a packed pass: every session's own buffers, no batched copy.

    `update` writes each session's new keys and values right after its past and returns, per session,
    views of its first padded_keys(past_b + n_b) columns: lists, which only `batch_invariant_attention`
    reads. Columns past the new tokens hold old finite values (the buffers start zeroed); the mask
    gives them zero weight.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], packing: Packing) -> None:
        """
        Args:
            keys, values: per session [1, kv_heads, capacity_b, head_dim], capacity_b >= padded_keys(past_b + n_b).
            packing: the pass's layout.
        """
        super().__init__()
        self.lazy_initialization(keys[0], values[0])  # sets dtype, device, is_initialized
        self.session_keys, self.session_values, self.packing = keys, values, packing

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[list, list]:
        # key_states, value_states: [1, kv_heads, R, head_dim], the pass's rows (keys already rotated)
        p = self.packing
        keys, values = [], []
        for b, (k, v) in enumerate(zip(self.session_keys, self.session_values, strict=True)):
            c, o, n = p.past[b], p.starts[b], p.counts[b]
            k[0, :, c : c + n] = key_states[0, :, o : o + n]
            v[0, :, c : c + n] = value_states[0, :, o : o + n]
            end = padded_keys(c + n)
            keys.append(k[0, :, :end])  # [kv, L, d]
            values.append(v[0, :, :end])
        return keys, values

    def get_seq_length(self) -> int:
        return max(self.packing.past)


def batch_invariant_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: list[torch.Tensor],
    value: list[torch.Tensor],
    attention_mask: Packing,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention, session by session and block by block, in products whose shapes are fixed.

    Args:
        module: the attention layer (unused: the shapes say everything).
        query: [1, heads, R, head_dim], the pass's packed rows.
        key, value: per session [kv_heads, L_b, head_dim], L_b a multiple of KEY_BLOCK (SessionLayer).
        attention_mask: the pass's Packing (its masks from causal_mask).
        scaling: the softmax scale.

    Returns:
        ([1, R, heads, head_dim] attention output, None); rows outside every session are zero.
    """
    _, heads, total, head_dim = query.shape
    kv_heads = key[0].shape[0]
    group = heads // kv_heads
    p = attention_mask
    out = query.new_zeros((total, heads, head_dim))
    for b, (o, n) in enumerate(zip(p.starts, p.counts, strict=True)):
        blocks = key[b].shape[1] // KEY_BLOCK
        # The query heads that share a key head become rows of one product (the keys are never
        # repeated), padded with zero rows to a multiple of ROW_MULTIPLE.
        q = query[0, :, o : o + n].reshape(kv_heads, group * n, head_dim)
        q = torch.cat([q, q.new_zeros((kv_heads, padded_rows(group * n) - group * n, head_dim))], dim=1)
        k = key[b].view(kv_heads, blocks, KEY_BLOCK, head_dim)
        v = value[b].view(kv_heads, blocks, KEY_BLOCK, head_dim)
        scores = (
            torch.matmul(q.unsqueeze(1), k.transpose(2, 3)).float() * scaling
        )  # [kv, blocks, rows, KEY_BLOCK]
        scores = scores.masked_fill(~p.masks[b], float("-inf"))
        # the maximum over all blocks is exact whatever the order; every row sees at least one key
        top = scores.amax(dim=(1, 3), keepdim=True)  # [kv, 1, rows, 1]
        weights = torch.exp(scores - top)
        sums = weights.sum(dim=3)  # [kv, blocks, rows], each over KEY_BLOCK columns
        partial = torch.matmul(weights.to(v.dtype), v).float()  # [kv, blocks, rows, d]
        # block after block, in order: later blocks add exact zeros to the rows they are masked for
        num, den = partial[:, 0], sums[:, 0]
        for i in range(1, blocks):
            num = num + partial[:, i]
            den = den + sums[:, i]
        attn = (num[:, : group * n] / den[:, : group * n].unsqueeze(-1)).to(query.dtype)  # [kv, group * n, d]
        out[o : o + n] = attn.reshape(heads, n, head_dim).transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION, batch_invariant_attention)


def run_decoder(
    backend: TransformersBackend, items: list[ForwardItem], seqs: list, pad_token: int
) -> tuple[torch.Tensor, list[int]]:
    """The backend's `_run_decoder` in deterministic mode: every row computed as alone and in one pass.

    The items' tokens are packed one after the other into one sequence of R rows, R the next multiple
    of ROW_MULTIPLE, the rest dummy tokens (`pad_token`) that belong to no session: the linear layers
    see R rows whatever the items. Each session's keys and values go into its own buffers right after
    its past, and attention runs per session over them in blocks of keys.

    Args:
        backend: the deterministic backend (its decoder, buffers and dimensions).
        items, seqs: the call's items with tokens, and their sequences.
        pad_token: the dummy tokens' id.

    Returns:
        ([R, H] final hidden states, the row where each item's tokens start).
    """
    from transformers.cache_utils import Cache

    past = [s.length for s in seqs]
    counts = [len(item.tokens) for item in items]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
    rows = padded_rows(sum(counts))
    input_ids = torch.full((1, rows), pad_token, dtype=torch.long)
    position_ids = torch.zeros((1, rows), dtype=torch.long)  # the dummies' positions do not matter
    for item, c, o, n in zip(items, past, starts, counts, strict=True):
        input_ids[0, o : o + n] = torch.as_tensor(item.tokens, dtype=torch.long)
        position_ids[0, o : o + n] = torch.arange(c, c + n)
    for s, n in zip(seqs, counts, strict=True):
        backend._reserve(s, padded_keys(s.length + n))  # attention reads whole blocks of keys
    masks = [causal_mask(c, n, backend._group, backend.device) for c, n in zip(past, counts, strict=True)]
    packing = Packing(starts, counts, past, masks)
    layers = [
        SessionLayer([s.keys[layer] for s in seqs], [s.values[layer] for s in seqs], packing)
        for layer in range(backend._n_layers)
    ]
    out = backend._decoder(
        input_ids=input_ids.to(backend.device),
        # a ready mapping: transformers builds no mask of its own and hands this to the attention
        attention_mask={"full_attention": packing},
        position_ids=position_ids.to(backend.device),
        past_key_values=Cache(layers=layers),
        use_cache=True,
    )
    return out.last_hidden_state[0], starts


class InvariantSiLU(torch.nn.Module):
    """SiLU as x / (1 + exp(-x)): the same value whichever code path (scalar or vector) computes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (1 + torch.exp(-x))


def make_activations_invariant(model: torch.nn.Module) -> int:
    """Replace every SiLU activation of `model` by InvariantSiLU; returns how many were replaced."""
    from transformers.activations import SiLUActivation

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SiLUActivation | torch.nn.SiLU):
                setattr(module, name, InvariantSiLU())
                replaced += 1
    return replaced


def check_invariance(backend: TransformersBackend, n_tokens: int = 12) -> None:
    """Verify on this machine that a deterministic backend's rows depend neither on the split nor on the batch.

    Scores the same tokens on one scratch sequence in one call, and on another in a call of 1 token
    and one of the rest, each shared with another sequence's tokens (before it, then after it); the
    full log-probability rows must be bit-identical. Three passes: seconds for the 1.5B on two CPU
    cores. What it cannot see: batch shapes it does not try. The invariance rests on kernel
    properties measured on CPU (module docstring); another device, dtype or BLAS may break it, and
    this says so at load time.

    Raises:
        ModelError: the rows differ; run with deterministic off, or report the machine.
    """
    t0 = time.perf_counter()
    vocab = backend.info.vocab_size
    toks = [(17 + 7 * i) % vocab for i in range(n_tokens)]
    other = [(5 + 11 * i) % vocab for i in range(6)]
    limit, backend.max_sequences = backend.max_sequences, None  # two scratch sequences, whatever the limit
    a, b = backend.new_sequence(), backend.new_sequence()
    try:
        whole = backend.forward([ForwardItem(a, toks, n_tokens, 1, full_rows=True)])[0].full_logprobs
        first = backend.forward(
            [ForwardItem(a, other[:4], 1, 1), ForwardItem(b, toks[:1], 1, 1, full_rows=True)]
        )
        rest = backend.forward(
            [ForwardItem(b, toks[1:], n_tokens - 1, 1, full_rows=True), ForwardItem(a, other[4:], 1, 1)]
        )
        parts = [first[1].full_logprobs, rest[0].full_logprobs]
    finally:
        backend.release(a)
        backend.release(b)
        backend.max_sequences = limit
    split = np.concatenate(parts)
    if not np.array_equal(whole, split):
        diff = float(np.abs(whole - split).max())
        raise ModelError(
            f"deterministic mode is not bit-invariant with transformers on this machine ({backend.info.model_id} "
            f"on {backend.info.device}, {backend.info.dtype}: log-probabilities differ by up to {diff:.3g} between "
            "one call and split, shared calls); start the service with --no-deterministic "
            "(HANDOFF_CLOUD_DETERMINISTIC=0)"
        )
    logger.info(
        "deterministic mode checked on %s in %.1f s: bit-invariant",
        backend.info.device,
        time.perf_counter() - t0,
    )


__all__ = [
    "ATTENTION",
    "KEY_BLOCK",
    "ROW_MULTIPLE",
    "InvariantSiLU",
    "Packing",
    "SessionLayer",
    "batch_invariant_attention",
    "causal_mask",
    "check_invariance",
    "make_activations_invariant",
    "pad_rows",
    "padded_keys",
    "padded_rows",
    "run_decoder",
]
