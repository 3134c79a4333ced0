"""TextTokens: a growing text kept tokenized, re-tokenising only its tail (tiny models' tokenizers).

Random texts arrive in random pieces (cut anywhere, inside UTF-8 characters too) with random
rollbacks: a consumer that applies each Change keeps exactly the settled tokens, their text plus the
pending bytes is always the text, and the final tokens are the tokenizer's own for the whole text.
"""

from __future__ import annotations

import numpy as np
import pytest

from handoff.shared.errors import ShapeError
from handoff.shared.retokenize import TextTokens

TEXTS = [
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "The quick brown fox jumps over the lazy dog. Über café — naïve 東京 🙂!",
    "17 * 23 = 391; 1234567 + 89 = 1234656.\n\n\n   indented   spaces\t\ttabs",
    '<html><body class="x">Hello, world!</body></html>',
]


@pytest.fixture(scope="module", params=["tiny_gguf_a", "tiny_gguf_small_vocab"])
def tokenizer(request):
    from handoff.shared.llama_cpp_model import LlamaCppModel

    model = LlamaCppModel(request.getfixturevalue(request.param), n_ctx=64, n_threads=1)
    yield (lambda b: model.llm.tokenize(b, add_bos=False, special=False)), model.detokenize
    model.close()


def test_pieces_and_rollbacks_keep_the_text_whole(tokenizer) -> None:
    tokenize, detokenize = tokenizer
    rng = np.random.default_rng(0)
    for text in TEXTS:
        data = text.encode()
        for _ in range(6):
            tt = TextTokens(tokenize, detokenize, lookback=8)
            mirror: list[int] = []  # what a KV cache holds, applying each change
            sent = 0
            while sent < len(data):
                if sent and rng.random() < 0.2:  # a rollback to somewhere in the text
                    sent = int(rng.integers(0, sent))
                    change = tt.truncate(sent)
                else:
                    step = int(rng.integers(1, 9))
                    change = tt.extend(data[sent : sent + step])
                    sent = min(sent + step, len(data))
                del mirror[change.keep :]
                mirror.extend(change.added)
                assert mirror == tt.tokens
                assert detokenize(tt.tokens) + tt.pending == tt.text == data[:sent]
            change = tt.extend(b"", settle=True)
            del mirror[change.keep :]
            mirror.extend(change.added)
            assert mirror == tt.tokens == list(tokenize(data)), text
            assert tt.pending == b""


def test_bad_calls_are_refused(tokenizer) -> None:
    tokenize, detokenize = tokenizer
    tt = TextTokens(tokenize, detokenize)
    tt.extend(b"abc")
    with pytest.raises(ShapeError, match="not settled"):
        tt.append_tokens([1], [b"x"])
    with pytest.raises(ShapeError, match="truncate"):
        tt.truncate(4)
    with pytest.raises(ShapeError, match="lookback"):
        TextTokens(tokenize, detokenize, lookback=0)
