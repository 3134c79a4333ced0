"""Tiny Qwen2 GGUF models for tests: real tokenizer (reduced), random weights, both runtimes.

The Qwen2.5 tokenizer metadata is read once from the edge GGUF and cut down to its first `keep`
tokens (the first 256 are the byte tokens, so any text still tokenizes), the merges that stay inside
that set, and the control tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, the fim tokens, ...)
renumbered right after them. A model of a few layers with random weights is then written around it
with `gguf.GGUFWriter`. Such a file is < 1 MB, loads in llama.cpp in milliseconds and in transformers
in about a second, and both runtimes give it the same next-token distribution.

Nothing here imports llama_cpp, torch or transformers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# llama.cpp token types (gguf.TokenType), spelled out so this module imports without gguf.
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4  # `<tool_call>`, `</tool_call>`: matched whole in text by both runtimes
TOKEN_UNUSED = 5  # the `[PAD151665]` fillers

# Token types carried over from past `keep`. USER_DEFINED is included with CONTROL because the chat
# template emits `<tool_call>` when tools are given, and both runtimes treat those as whole tokens.
_SPECIAL_TYPES = (TOKEN_CONTROL, TOKEN_USER_DEFINED)


@dataclass(frozen=True)
class TinyTokenizer:
    """A reduced byte-level BPE vocabulary in GGUF terms (what goes under `tokenizer.*`)."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    # the id each token had in the source GGUF, same order as `tokens`
    source_ids: tuple[int, ...]
    bos_token_id: int | None
    eos_token_id: int | None
    padding_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    model: str = "gpt2"
    pre: str = "qwen2"

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int:
        return self.tokens.index(token)

    def permuted(self, seed: int) -> tuple[TinyTokenizer, np.ndarray]:
        """The same tokenizer with its ids shuffled: the same texts, other token ids.

        Tokenization follows the merges' order and the strings, not the ids, so every text splits
        into the same tokens; only their ids change (special tokens included).

        Returns:
            (the tokenizer, order [V]): new id i is old id order[i]; pass `order` as
            write_tiny_qwen2_gguf's vocab_order to give a model the same weights per token.
        """
        order = np.random.default_rng(seed).permutation(self.n_vocab)
        new_id = np.empty_like(order)
        new_id[order] = np.arange(self.n_vocab)

        def remap(i: int | None) -> int | None:
            return None if i is None else int(new_id[i])

        return TinyTokenizer(
            tokens=tuple(self.tokens[i] for i in order),
            token_types=tuple(self.token_types[i] for i in order),
            merges=self.merges,
            source_ids=tuple(self.source_ids[i] for i in order),
            bos_token_id=remap(self.bos_token_id),
            eos_token_id=remap(self.eos_token_id),
            padding_token_id=remap(self.padding_token_id),
            add_bos_token=self.add_bos_token,
            chat_template=self.chat_template,
            model=self.model,
            pre=self.pre,
        ), order


def _field_scalar(reader, key: str):
    """The value of a metadata key, or None when the file does not have it."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def extract_tokenizer(edge_gguf: Path, keep: int = 1000) -> TinyTokenizer:
    """The first `keep` tokens of `edge_gguf`'s vocabulary, their merges and the special tokens.

    Reading the 151k-token metadata with `GGUFReader` takes ~9 s: call this once per test run.
    """
    import gguf

    reader = gguf.GGUFReader(str(edge_gguf))
    tokens: list[str] = reader.fields["tokenizer.ggml.tokens"].contents()
    types: list[int] = [int(t) for t in reader.fields["tokenizer.ggml.token_type"].contents()]
    merges: list[str] = reader.fields["tokenizer.ggml.merges"].contents()
    model = _field_scalar(reader, "tokenizer.ggml.model")
    pre = _field_scalar(reader, "tokenizer.ggml.pre")
    if model != "gpt2":
        raise ValueError(f"{edge_gguf}: expected a byte-level BPE ('gpt2') tokenizer, found {model!r}")
    if not 256 <= keep <= len(tokens):
        raise ValueError(f"keep must be in [256, {len(tokens)}], got {keep}")

    # The kept normal tokens, then every special token past them, in their original order.
    source_ids = [i for i in range(keep) if types[i] != TOKEN_UNUSED]
    source_ids += [i for i in range(keep, len(tokens)) if types[i] in _SPECIAL_TYPES]
    new_id = {old: new for new, old in enumerate(source_ids)}
    kept_tokens = [tokens[i] for i in source_ids]
    kept_types = [types[i] for i in source_ids]

    # A merge survives only if both halves and the result stay in the vocabulary; byte-level tokens
    # never contain a literal space (it is spelled 'Ġ'), so a merge splits unambiguously.
    normal = {tokens[i] for i in source_ids if types[i] == TOKEN_NORMAL}
    kept_merges = []
    for merge in merges:
        left, right = merge.split(" ")
        if left in normal and right in normal and left + right in normal:
            kept_merges.append(merge)

    def remap(key: str) -> int | None:
        old = _field_scalar(reader, key)
        if old is None:
            return None
        if int(old) not in new_id:
            raise ValueError(f"{edge_gguf}: {key}={old} is not a kept token")
        return new_id[int(old)]

    add_bos = _field_scalar(reader, "tokenizer.ggml.add_bos_token")
    return TinyTokenizer(
        tokens=tuple(kept_tokens),
        token_types=tuple(kept_types),
        merges=tuple(kept_merges),
        source_ids=tuple(source_ids),
        bos_token_id=remap("tokenizer.ggml.bos_token_id"),
        eos_token_id=remap("tokenizer.ggml.eos_token_id"),
        padding_token_id=remap("tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(add_bos) if add_bos is not None else False,
        chat_template=_field_scalar(reader, "tokenizer.chat_template"),
        model="gpt2",
        pre=pre if pre is not None else "qwen2",
    )


# --- weights -----------------------------------------------------------------------------------

# Standard deviations of the random init, as multiples of 1/sqrt(fan_in) for the matrices, so that
# every projection's output has about unit RMS. The output head is larger on purpose: after the final
# RMSNorm the hidden state has unit RMS, so the logits get a std of about OUTPUT_LOGIT_STD and the
# next-token distribution is peaked (entropy ~4 nats of ln(1022) ~6.9), not uniform, and two seeds
# disagree by several nats.
OUTPUT_LOGIT_STD = 3.0
BIAS_STD = 0.1
NORM_STD = 0.05  # norms are 1 + NORM_STD * z

# The seeds of the conftest fixtures. A-near is A's weights + NEAR_SCALE * std * z(SEED_NEAR): with
# 0.03, KL(A || A-near) is ~0.02 nats on average (0.05 gives ~0.05, 0.1 ~0.2); A vs B is ~7 nats.
SEED_A = 1
SEED_B = 2
SEED_NEAR = 3
NEAR_SCALE = 0.03


def _tensor_specs(
    n_vocab: int, n_layer: int, hidden: int, n_head: int, n_kv_head: int, ffn: int
) -> list[tuple[str, tuple[int, ...], float, float]]:
    """(gguf name, PyTorch [out, in] shape, mean, std) for every tensor, in file order."""
    head_dim = hidden // n_head
    kv = n_kv_head * head_dim
    inv = lambda fan_in: 1.0 / np.sqrt(fan_in)  # noqa: E731
    specs = [("token_embd.weight", (n_vocab, hidden), 0.0, 1.0)]
    for i in range(n_layer):
        b = f"blk.{i}"
        specs += [
            (f"{b}.attn_norm.weight", (hidden,), 1.0, NORM_STD),
            (f"{b}.attn_q.weight", (hidden, hidden), 0.0, inv(hidden)),
            (f"{b}.attn_q.bias", (hidden,), 0.0, BIAS_STD),
            (f"{b}.attn_k.weight", (kv, hidden), 0.0, inv(hidden)),
            (f"{b}.attn_k.bias", (kv,), 0.0, BIAS_STD),
            (f"{b}.attn_v.weight", (kv, hidden), 0.0, inv(hidden)),
            (f"{b}.attn_v.bias", (kv,), 0.0, BIAS_STD),
            (f"{b}.attn_output.weight", (hidden, hidden), 0.0, inv(hidden)),
            (f"{b}.ffn_norm.weight", (hidden,), 1.0, NORM_STD),
            (f"{b}.ffn_gate.weight", (ffn, hidden), 0.0, inv(hidden)),
            (f"{b}.ffn_up.weight", (ffn, hidden), 0.0, inv(hidden)),
            (f"{b}.ffn_down.weight", (hidden, ffn), 0.0, inv(ffn)),
        ]
    specs += [
        ("output_norm.weight", (hidden,), 1.0, NORM_STD),
        ("output.weight", (n_vocab, hidden), 0.0, OUTPUT_LOGIT_STD * inv(hidden)),
    ]
    return specs


def _noise(seed: int, specs) -> Iterator[np.ndarray]:
    """Standard normal draws, one per tensor, from one generator in file order."""
    rng = np.random.default_rng(seed)
    for _, shape, _, _ in specs:
        yield rng.standard_normal(shape, dtype=np.float32)


def tiny_weights(
    seed: int,
    n_vocab: int,
    *,
    n_layer: int = 2,
    hidden: int = 64,
    n_head: int = 4,
    n_kv_head: int = 2,
    ffn: int = 128,
    perturb_from_seed: int | None = None,
    perturb_scale: float = 0.0,
) -> dict[str, np.ndarray]:
    """The float32 tensors, by GGUF name, in PyTorch [out, in] layout.

    Weights are mean + std * z(seed). With `perturb_from_seed`, they are the weights of that seed plus
    `perturb_scale` * std * z(seed): a model close to the other one.
    """
    if hidden % n_head or n_head % n_kv_head:
        raise ValueError("hidden must be a multiple of n_head, and n_head of n_kv_head")
    specs = _tensor_specs(n_vocab, n_layer, hidden, n_head, n_kv_head, ffn)
    base_seed = seed if perturb_from_seed is None else perturb_from_seed
    out: dict[str, np.ndarray] = {}
    for (name, _, mean, std), z in zip(specs, _noise(base_seed, specs), strict=True):
        out[name] = (np.float32(mean) + np.float32(std) * z).astype(np.float32)
    if perturb_from_seed is not None and perturb_scale:
        for (name, _, _, std), z in zip(specs, _noise(seed, specs), strict=True):
            out[name] = (out[name] + np.float32(perturb_scale * std) * z).astype(np.float32)
    return out


def write_tiny_qwen2_gguf(
    path: Path | str,
    tokenizer: TinyTokenizer,
    seed: int,
    *,
    n_layer: int = 2,
    hidden: int = 64,
    n_head: int = 4,
    n_kv_head: int = 2,
    ffn: int = 128,
    context_length: int = 2048,
    perturb_from_seed: int | None = None,
    perturb_scale: float = 0.0,
    rope_freq_base: float = 1_000_000.0,
    rms_eps: float = 1e-6,
    quantize: str | None = None,
    vocab_order: np.ndarray | None = None,
) -> Path:
    """Write a random-weight Qwen2 GGUF (F32, separate `output.weight`) with `tokenizer`.

    The same arguments give the same bytes.

    Args:
        vocab_order: [V] the rows of the vocabulary's tensors (embedding, output) in this order: with
            a TinyTokenizer.permuted() tokenizer and its order, the model is the seed's model with
            its token ids shuffled (the same distribution over texts).
        quantize: None for all F32, or "Q8_0" / "Q4_0": every 2-D weight quantized like a real model's,
            so llama.cpp runs its quantized kernels (and their batch-size-dependent paths) on it;
            transformers dequantizes the same values when it loads the file.
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = tiny_weights(
        seed,
        tokenizer.n_vocab,
        n_layer=n_layer,
        hidden=hidden,
        n_head=n_head,
        n_kv_head=n_kv_head,
        ffn=ffn,
        perturb_from_seed=perturb_from_seed,
        perturb_scale=perturb_scale,
    )
    if vocab_order is not None:
        for tensor_name in ("token_embd.weight", "output.weight"):
            weights[tensor_name] = np.ascontiguousarray(weights[tensor_name][vocab_order])
    name = f"tiny-qwen2-seed{seed}" + ("-permuted" if vocab_order is not None else "")
    if quantize is not None:
        name += f"-{quantize.lower()}"
    if perturb_from_seed is not None:
        name = f"tiny-qwen2-seed{perturb_from_seed}-perturbed{seed}x{perturb_scale:g}"

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name(name)
    qtype = None if quantize is None else gguf.GGMLQuantizationType[quantize]
    if qtype not in (None, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        raise ValueError(f"quantize: expected None, Q8_0 or Q4_0, got {quantize!r}")
    file_type = {None: "ALL_F32", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0"}[quantize]
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_context_length(context_length)
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv_head)
    writer.add_rope_freq_base(rope_freq_base)
    writer.add_layer_norm_rms_eps(rms_eps)

    writer.add_tokenizer_model(tokenizer.model)
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(list(tokenizer.tokens))
    writer.add_token_types(list(tokenizer.token_types))
    writer.add_token_merges(list(tokenizer.merges))
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.padding_token_id is not None:
        writer.add_pad_token_id(tokenizer.padding_token_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)

    for tensor_name, array in weights.items():
        if qtype is not None and array.ndim == 2:
            # Rows are [out, in]; blocks of 32 run along `in`, which every tiny dimension divides.
            writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor_name, array)  # the writer reverses the dims into GGUF order

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_quantize(src: Path | str, dst: Path | str, ftype: str = "Q4_K_M", threads: int = 2) -> Path:
    """Quantize a GGUF with llama.cpp itself (K-quants have no numpy quantizer in gguf-py).

    A tiny model quantized to Q4_K_M (it needs hidden sizes that are multiples of 256) runs the same
    quantized kernels as the real models, including their batch-size-dependent paths.

    Args:
        src: an F32 GGUF (e.g. from write_tiny_qwen2_gguf).
        dst: where to write the quantized file.
        ftype: a llama.cpp file type name without the prefix, e.g. "Q4_K_M", "Q8_0".

    Returns:
        dst.
    """
    import ctypes

    import llama_cpp.llama_cpp as lib

    from handoff.shared.llama_cpp_model import route_native_logs

    route_native_logs()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    dst = Path(dst)
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype} (code {rc})")
    return dst


def sha256_of(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
