"""How deterministic mode cuts a forward's rows into `llama_decode` calls on the padded path (pure).

Measured on the default 1.5B Q4_K_M (CPU; docs/determinism.md): a row's logits depend on the
micro-batch it is computed in. Micro-batches of fewer than MIN_ROWS rows, and the last `n % ROW_GROUP`
rows of larger ones, take other matmul kernels. So a session's tokens go in blocks padded with dummy
tokens at later positions to padded_rows() rows.

Blocks of the same length from different sequences may share a call. In deterministic mode every
sequence has its own KV stream, and llama.cpp splits such a call into micro-batches of whole blocks
(`split_equal`: equal tokens per sequence, consecutive ids), so each row still sits in a full group of
ROW_GROUP within a micro-batch of at least MIN_ROWS rows, and attends over its own stream. Blocks of
different lengths never share a call: the split would leave a short tail micro-batch. Measured: a
12-row block sharing a call with an 8-row one had logits off by up to 0.33.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["MIN_ROWS", "PAD_TOKEN", "ROW_GROUP", "Row", "padded_calls", "padded_rows"]

MIN_ROWS = 8
ROW_GROUP = 4
PAD_TOKEN = 0  # any valid id: the dummy rows' values never reach a real row

# One row per new token: (item index, token, position, seq_id, output row or -1).
Row = tuple[int, int, int, int, int]


def padded_rows(n: int) -> int:
    """Rows of a deterministic block holding n real rows: >= MIN_ROWS, a multiple of ROW_GROUP."""
    return max(MIN_ROWS, -(-n // ROW_GROUP) * ROW_GROUP)


def padded_calls(rows: list[Row], step: int) -> Iterator[tuple[list[Row], list[tuple[int, int]]]]:
    """The padded path's calls: (rows of the call, [(seq_id, first padding position)] to remove after).

    Each item's rows (one item per sequence) are cut into blocks of at most `step` real rows, each
    padded to padded_rows(). The r-th blocks of all items form round r (a sequence's blocks go in
    successive calls); within a round, blocks of one length share calls of at most `step` rows, one
    block per sequence, in seq id order.

    Args:
        rows: the forward's rows, each item's in order.
        step: rows per call at most (llama.cpp's n_batch = n_ubatch): a multiple of ROW_GROUP, >= MIN_ROWS.
    """
    by_item: dict[int, list[Row]] = {}
    for row in rows:
        by_item.setdefault(row[0], []).append(row)
    rounds: list[list[tuple[int, list[Row], int]]] = []  # per round: (seq_id, block, padding rows)
    for i, item_rows in by_item.items():
        for r, start in enumerate(range(0, len(item_rows), step)):
            real = item_rows[start : start + step]
            n_pad = padded_rows(len(real)) - len(real)
            _, _, pos, sid, _ = real[-1]
            pad = [(i, PAD_TOKEN, pos + 1 + j, sid, -1) for j in range(n_pad)]
            if r == len(rounds):
                rounds.append([])
            rounds[r].append((sid, real + pad, n_pad))
    for blocks in rounds:
        by_length: dict[int, list[tuple[int, list[Row], int]]] = {}
        for block in sorted(blocks, key=lambda b: b[0]):
            by_length.setdefault(len(block[1]), []).append(block)
        for length, same in by_length.items():
            per_call = max(1, step // length)
            for start in range(0, len(same), per_call):
                call = same[start : start + per_call]
                yield (
                    [row for _, block, _ in call for row in block],
                    [(sid, block[-n_pad][2]) for sid, block, n_pad in call if n_pad],
                )
