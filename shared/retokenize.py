"""A growing text kept tokenized by one tokenizer: re-tokenise only the unsettled tail.

Across tokenizers the text is what both sides share. A side that receives text (the other model's
tokens, written out) must keep its own tokens for it, and its KV cache holds those tokens: it should
re-tokenise as little as possible and say exactly which of its tokens changed. BPE tokenizers split
text into pre-tokens (words, runs of spaces, digits) and merge inside them, so new text can change
only the last few tokens: `TextTokens` re-tokenises the last `lookback` tokens plus the new text and
keeps everything before untouched. The last token stays *pending* (its text may still grow into a
longer token) until more text follows or the text is final.

Invariant, after every call: detokenize(tokens) + pending == text (no text lost or repeated), and the
tokens are a prefix of what tokenizing the whole text at once gives whenever no pre-token is longer
than the lookback window (tested on the Qwen2.5 tokenizer with random texts and random cuts).

The approach is that of Hugging Face's universal assisted generation (re-encoding a window of the
target's tail) and of Timor et al. (ICML 2025, SLEM: string-level exact matching).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from handoff.shared.errors import ShapeError


@dataclass(frozen=True)
class Change:
    """What an update did to the settled tokens: keep the first `keep`, then append `added`."""

    keep: int
    added: tuple[int, ...]


class TextTokens:
    """One tokenizer's settled tokens of a growing text, plus the pending tail's bytes."""

    def __init__(
        self,
        tokenize: Callable[[bytes], Sequence[int]],
        detokenize: Callable[[Sequence[int]], bytes],
        *,
        lookback: int = 8,
    ) -> None:
        """Start with no text.

        Args:
            tokenize: text bytes -> token ids (no BOS, special tokens not parsed).
            detokenize: token ids -> their bytes (concatenation of each token's bytes).
            lookback: settled tokens re-tokenised with new text (the longest a merge can reach back).
        """
        if lookback < 1:
            raise ShapeError(f"lookback: expected >= 1, got {lookback}")
        self._tokenize = tokenize
        self._detokenize = detokenize
        self.lookback = lookback
        self.tokens: list[int] = []  # settled
        self._ends: list[int] = []  # byte offset where each settled token's text ends
        self.text = b""

    @property
    def pending(self) -> bytes:
        """Text past the settled tokens (waiting for more text to know its tokens)."""
        return self.text[self._ends[-1] if self._ends else 0 :]

    def extend(self, data: bytes, *, settle: bool = False, raw: bool = False) -> Change:
        """Add text; `settle`: the pending tail is tokenised now too (all but an unfinished UTF-8
        character at the very end, which no tokenizer can read), as if no text followed. Text may
        still follow: the tokens it can merge with are re-tokenised then, like any others. `raw`
        (with settle): an unfinished character too, as the tokenizer takes bytes that are not UTF-8.

        Returns:
            The change to the settled tokens (tokens past `keep` were dropped, `added` follow).
        """
        if not data and not self.pending:
            return Change(len(self.tokens), ())  # nothing new: the settled tokens stand as they are
        self.text += data
        start = max(0, len(self.tokens) - self.lookback)
        offset = self._ends[start - 1] if start else 0
        while start and offset < len(self.text) and self.text[offset] & 0xC0 == 0x80:
            start -= 1  # byte tokens may split a character: re-read from the character's start
            offset = self._ends[start - 1] if start else 0
        # Tokenizers read text: an unfinished UTF-8 character at the end waits, pending.
        window = self.text[offset : len(self.text) if raw and settle else complete_utf8(self.text, offset)]
        tail = list(self._tokenize(window)) if window else []
        pieces = [self._detokenize([t]) for t in tail]
        if b"".join(pieces) != window:
            raise ShapeError("tokenize and detokenize disagree on the text: cannot keep it aligned")
        if tail and not (settle and len(window) == len(self.text) - offset):
            tail, pieces = tail[:-1], pieces[:-1]  # the last token may still grow
        same = 0
        for old, new in zip(self.tokens[start:], tail, strict=False):
            if old != new:
                break
            same += 1
        keep = start + same
        del self.tokens[keep:]
        del self._ends[keep:]
        end = self._ends[-1] if self._ends else 0
        added = tail[same:]
        for t, piece in zip(added, pieces[same:], strict=True):
            end += len(piece)
            self.tokens.append(t)
            self._ends.append(end)
        return Change(keep, tuple(added))

    def truncate(self, length: int) -> Change:
        """Cut the text to its first `length` bytes (a rollback): settled tokens past it are dropped.

        Returns:
            The change (keep: tokens whose text lies wholly within the kept text; nothing added: the
            cut tail waits as pending text, to be settled by what follows).
        """
        if not 0 <= length <= len(self.text):
            raise ShapeError(f"truncate: cannot cut {len(self.text)} bytes of text to {length}")
        keep = 0
        while keep < len(self._ends) and self._ends[keep] <= length:
            keep += 1
        # A token ending exactly at the cut is still one the longer text might have merged further:
        # re-tokenised with what follows (extend looks back `lookback` tokens anyway).
        del self.tokens[keep:]
        del self._ends[keep:]
        self.text = self.text[:length]
        return Change(keep, ())

    def append_tokens(self, ids: Sequence[int], pieces: Sequence[bytes]) -> Change:
        """Settle tokens as they are (a model's own tokens, whatever the tokenizer would make of their text).

        Args:
            ids: [n] token ids.
            pieces: [n] their bytes (b"" for a special token: it holds no text).

        Raises:
            ShapeError: text is pending (settle it first: these tokens follow the settled ones).
        """
        if self.pending:
            raise ShapeError(f"append_tokens: {len(self.pending)} bytes of text are not settled")
        if len(ids) != len(pieces):
            raise ShapeError(f"append_tokens: {len(ids)} ids but {len(pieces)} pieces")
        keep = len(self.tokens)
        end = len(self.text)
        for t, piece in zip(ids, pieces, strict=True):
            end += len(piece)
            self.tokens.append(int(t))
            self._ends.append(end)
        self.text += b"".join(pieces)
        return Change(keep, tuple(int(t) for t in ids))

    def starts(self) -> list[int]:
        """[len(tokens) + 1] the byte offset where each settled token starts, then where the pending tail does."""
        return [0, *self._ends]


def complete_utf8(data: bytes, start: int = 0) -> int:
    """The end of data's longest prefix that does not stop inside a UTF-8 character (>= start)."""
    end = len(data)
    for back in range(1, min(4, end - start) + 1):
        byte = data[end - back]
        if byte & 0xC0 != 0x80:  # a character's first byte: does its sequence fit?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return end if need <= back else end - back
    return end
