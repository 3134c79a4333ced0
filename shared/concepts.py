"""Concept maps: token ids grouped into concepts, for divergence over concepts instead of tokens.

Seed note §0.9.3: "map the token space to higher-level concepts, like king and queen to ruler, and
compare the distributions over these concepts". Three maps, each computed once per vocabulary (or
model pair) and cached under the vocabulary's fingerprint:

- surface: tokens that decode to the same string after normalising case and leading whitespace
  (" The", "the", "THE") share a concept; tokens that are only whitespace, and control tokens, keep
  their own (a newline is not a space in code);
- char: tokens whose text starts with the same character share a concept (the KL over the next
  character; control tokens keep their own);
- cluster: k-means clusters of P's output embedding matrix (the rows that turn P's last hidden state
  into logits): tokens P scores alike share a concept ("king"/"queen" if P puts them close).

A map is a [V] int32 array of concept ids (handoff.shared.divergence.topk_kl(concept_of=...)).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from handoff.shared.errors import HandoffError, ShapeError
from handoff.shared.vocab import Vocabulary

logger = logging.getLogger(__name__)

DIVERGENCES: tuple[str, ...] = ("token", "surface", "char", "concept")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (what byte-level BPE GGUFs store tokens in) back to bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_text(token: bytes) -> str | None:
    """A token's text: byte-level BPE decoded when it is in that alphabet; None for a control token."""
    s = token.decode("utf-8", errors="replace")
    if s.startswith("<|") and s.endswith("|>"):
        return None
    decoder = _byte_decoder()
    if all(ch in decoder for ch in s):
        return bytes(decoder[ch] for ch in s).decode("utf-8", errors="replace")
    return s.replace("▁", " ")  # SentencePiece's space


@dataclass(frozen=True)
class ConceptMap:
    """A concept id per token id.

    concept_of: [V] int32, concept ids in [0, n_concepts).
    kind: "surface" or "cluster"; k: the clusters asked for (0 for surface).
    """

    concept_of: np.ndarray
    kind: str
    k: int = 0

    def __post_init__(self) -> None:
        c = np.asarray(self.concept_of)
        if c.ndim != 1 or c.dtype.kind not in "iu" or (c.size and c.min() < 0):
            raise ShapeError(
                f"concept_of: expected non-negative integer ids of shape [V], got {c.shape} {c.dtype}"
            )

    @property
    def n_concepts(self) -> int:
        return int(self.concept_of.max()) + 1 if self.concept_of.size else 0

    def merged_tokens(self) -> int:
        """Token ids that share their concept with another id."""
        counts = np.bincount(self.concept_of)
        return int(counts[counts > 1].sum())


def surface_concepts(vocabulary: Vocabulary) -> ConceptMap:
    """Tokens with the same text after dropping leading whitespace and folding case share a concept."""
    ids: dict[str, int] = {}
    out = np.empty(len(vocabulary), dtype=np.int32)
    for i, token in enumerate(vocabulary.tokens):
        text = token_text(token)
        key = text.lstrip().casefold() if text is not None and text.strip() else None
        # Control and whitespace-only tokens are their own concept (keyed by id, never shared).
        key = f"\0{i}" if key is None else key
        out[i] = ids.setdefault(key, len(ids))
    return ConceptMap(out, "surface")


def first_char(text: str | bytes | None) -> str | None:
    """The first character of a token's text (its first byte, escaped, when the text starts inside
    a UTF-8 character); None for a token without text (a control token)."""
    if not text:
        return None
    if isinstance(text, str):
        return text[0]
    for n in range(1, min(4, len(text)) + 1):
        try:
            return text[:n].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return f"\\x{text[0]:02x}"


def char_concepts(vocabulary: Vocabulary) -> ConceptMap:
    """Tokens whose text starts with the same character share a concept: the KL over the next
    character (what text comes next, whatever its tokenization), a lower bound of the token KL."""
    ids: dict[str, int] = {}
    out = np.empty(len(vocabulary), dtype=np.int32)
    for i, token in enumerate(vocabulary.tokens):
        key = first_char(token_text(token))
        out[i] = ids.setdefault(f"\0{i}" if key is None else key, len(ids))  # no text: its own concept
    return ConceptMap(out, "char")


def cluster_concepts(
    embeddings: np.ndarray, k: int, *, seed: int = 0, dims: int = 64, iters: int = 25
) -> ConceptMap:
    """k-means clusters (k-means++ seeding, Lloyd iterations) of centred, randomly projected,
    unit-normalised embedding rows.

    Args:
        embeddings: [V, d] one row per token id (P's output embedding matrix).
        k: clusters, 1 <= k <= V.
        seed: the projection's and the initialisation's randomness.
        dims: the random projection's width (k-means in d = 1,536 would cost 24x more for the same
            groups, by Johnson-Lindenstrauss up to small distortions).
        iters: Lloyd iterations (full assignment each).

    Returns:
        The cluster map (kind "cluster").
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or not 1 <= k <= emb.shape[0]:
        raise ShapeError(f"embeddings: expected [V, d] with V >= k = {k}, got {emb.shape}")
    rng = np.random.default_rng(seed)
    # Output embeddings share a large common direction (every row is "a token"); without removing
    # it, cosine similarity sees little else and clusters mix unrelated tokens.
    emb = emb - emb.mean(axis=0, keepdims=True)
    if emb.shape[1] > dims:
        proj = rng.standard_normal((emb.shape[1], dims), dtype=np.float32) / np.sqrt(dims)
        emb = emb @ proj  # [V, dims]
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    centers = _kmeans_pp(emb, k, rng)  # [k, dims]
    for _ in range(iters):
        assign = _nearest(emb, centers)
        sums = np.zeros_like(centers)
        np.add.at(sums, assign, emb)
        counts = np.bincount(assign, minlength=k)
        empty = counts == 0
        centers[~empty] = sums[~empty] / counts[~empty, None]
        centers[empty] = emb[rng.choice(emb.shape[0], size=int(empty.sum()), replace=False)]
    _, dense = np.unique(_nearest(emb, centers), return_inverse=True)  # ids 0..n-1, no gaps
    return ConceptMap(dense.astype(np.int32), "cluster", k)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each next center drawn with probability
    proportional to the squared distance to the nearest center so far."""
    centers = np.empty((k, x.shape[1]), dtype=x.dtype)
    centers[0] = x[rng.integers(x.shape[0])]
    d2 = ((x - centers[0]) ** 2).sum(axis=1)  # [V]
    for j in range(1, k):
        total = d2.sum()
        idx = rng.choice(x.shape[0], p=d2 / total) if total > 0 else rng.integers(x.shape[0])
        centers[j] = x[idx]
        d2 = np.minimum(d2, ((x - centers[j]) ** 2).sum(axis=1))
    return centers


def _nearest(x: np.ndarray, centers: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Index of the closest center (squared Euclidean) for each row of x, in chunks of rows."""
    c2 = (centers * centers).sum(axis=1)  # [k]
    out = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], chunk):
        block = x[s : s + chunk]
        out[s : s + chunk] = np.argmin(c2[None, :] - 2.0 * block @ centers.T, axis=1)
    return out


def output_embeddings(gguf_path: Path) -> np.ndarray:
    """A GGUF model's output embedding matrix [V, d] (the tied input embedding when it has none)."""
    import gguf
    from gguf import quants

    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if tensor is None:
        raise HandoffError(f"{gguf_path} has neither output.weight nor token_embd.weight")
    weights = quants.dequantize(tensor.data, tensor.tensor_type)  # [V, d]
    return np.asarray(weights, dtype=np.float32).reshape(int(tensor.shape[1]), int(tensor.shape[0]))


def concept_map_for(divergence: str, vocabulary: Vocabulary, k: int = 1024) -> np.ndarray | None:
    """The [V] concept ids a divergence needs for this vocabulary (cached), or None for "token".

    "concept" clusters the output embeddings of the default cloud model (P), fetched if needed; its
    vocabulary must be this one.
    """
    from handoff.shared.settings import DEFAULT_CLOUD_MODEL, get_settings

    if divergence == "token":
        return None
    settings = get_settings()
    if divergence == "surface":
        path = concept_map_path(settings.cache_dir, vocabulary, "surface", 0)
        return load_or_build(path, lambda: surface_concepts(vocabulary).concept_of)
    if divergence == "char":
        path = concept_map_path(settings.cache_dir, vocabulary, "char", 0)
        return load_or_build(path, lambda: char_concepts(vocabulary).concept_of)
    if divergence != "concept":
        raise ShapeError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    from handoff.shared.models import resolve

    ref = resolve(DEFAULT_CLOUD_MODEL, "cloud", settings)
    path = concept_map_path(settings.cache_dir, vocabulary, "cluster", k, ref.name)

    def build() -> np.ndarray:
        logger.info("clustering %s's output embeddings into %d concepts (once; cached)", ref.name, k)
        embeddings = output_embeddings(ref.path)
        if embeddings.shape[0] != len(vocabulary):
            raise HandoffError(
                f"{ref.name} has {embeddings.shape[0]} output rows, the edge's vocabulary {len(vocabulary)} tokens"
            )
        return cluster_concepts(embeddings, k).concept_of

    return load_or_build(path, build)


def concept_map_path(cache_dir: Path, vocabulary: Vocabulary, kind: str, k: int, model_tag: str = "") -> Path:
    """Where a concept map is cached: by vocabulary fingerprint, kind, k and the model it came from."""
    fp = vocabulary.fingerprint.digest.hex()[:16]
    tag = hashlib.sha256(model_tag.encode()).hexdigest()[:8] if model_tag else "vocab"
    return cache_dir / "concepts" / f"{fp}-{kind}-{k}-{tag}.npy"


def load_or_build(path: Path, build) -> np.ndarray:
    """The cached [V] concept ids at path, or build() them, save and return them."""
    if path.is_file():
        return np.load(path)
    concepts = np.asarray(build(), dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, concepts)
    tmp.replace(path)
    logger.info("concept map cached at %s", path)
    return concepts
