"""What a model is: architecture, size, quantization, context, vocabulary and its fingerprint.

GGUF metadata is read with the `gguf` package. Parsing a 151,936-token vocabulary that way takes
10-20 s, so the result is cached in the cache directory, keyed by the file's path, size and mtime:
a changed file is read afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from handoff.shared.errors import ModelError
from handoff.shared.models import ModelRef, check_gguf
from handoff.shared.settings import HandoffSettings, get_settings
from handoff.shared.vocab import Vocabulary

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1


@dataclass(frozen=True)
class ModelInfo:
    """Facts about one model file or directory."""

    path: str
    name: str
    architecture: str
    parameter_count: int  # tensor elements stored (a GGUF with an untied output counts it)
    quantization: str
    context_length: int
    vocab_size: int  # token strings in the tokenizer
    file_size: int
    fingerprint: str  # short hex of the vocabulary digest

    def as_dict(self) -> dict:
        return asdict(self)


def _file_type_name(value: int) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {value}"


def _read_gguf(path: Path) -> tuple[dict, list[bytes]]:
    import gguf

    check_gguf(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError...
        raise ModelError(f"{path} is not a readable GGUF file: {e}") from None
    fields = reader.fields

    def scalar(key: str, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    arch = scalar("general.architecture")
    if arch is None:
        raise ModelError(f"{path} has no general.architecture in its GGUF metadata")
    tokens_field = fields.get("tokenizer.ggml.tokens")
    if tokens_field is None:
        raise ModelError(f"{path} has no tokenizer.ggml.tokens: it carries no vocabulary")
    tokens = [bytes(tokens_field.parts[i]) for i in tokens_field.data]
    file_type = scalar("general.file_type")
    meta = {
        "name": scalar("general.name", path.stem),
        "architecture": arch,
        "parameter_count": int(sum(int(t.n_elements) for t in reader.tensors)),
        "quantization": _file_type_name(file_type) if file_type is not None else "unknown",
        "context_length": int(scalar(f"{arch}.context_length", 0)),
    }
    return meta, tokens


def _read_hf_dir(path: Path) -> tuple[dict, list[bytes]]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}/config.json is unreadable: {e}") from None
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelError(f"{path} has no tokenizer.json; the vocabulary cannot be fingerprinted")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    size = tok.get_vocab_size(with_added_tokens=True)
    tokens = [(tok.id_to_token(i) or "").encode() for i in range(size)]
    params = 0
    from safetensors import safe_open

    for st in sorted(path.glob("*.safetensors")):
        with safe_open(str(st), "np") as f:
            for key in f.keys():
                params += int(np.prod(f.get_slice(key).get_shape()))
    meta = {
        "name": config.get("_name_or_path") or path.name,
        "architecture": (config.get("architectures") or [config.get("model_type", "unknown")])[0],
        "parameter_count": params,
        "quantization": str(config.get("torch_dtype") or config.get("dtype") or "unknown"),
        "context_length": int(config.get("max_position_embeddings", 0)),
    }
    return meta, tokens


def _cache_paths(path: Path, settings: HandoffSettings) -> tuple[Path, Path]:
    st = path.stat()
    key = hashlib.sha256(
        f"{_CACHE_VERSION}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()[:24]
    base = settings.cache_dir / "meta"
    return base / f"{key}.json", base / f"{key}.tokens.npz"


def load_model_info(ref: ModelRef, settings: HandoffSettings | None = None) -> tuple[ModelInfo, Vocabulary]:
    """Info and vocabulary of a resolved model, from the cache when the file is unchanged.

    Raises:
        ModelError: the file is missing, not a model, or lacks the metadata we need.
    """
    settings = settings or get_settings()
    path = ref.path
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    meta_file, tokens_file = _cache_paths(path, settings)
    try:
        meta = json.loads(meta_file.read_text())
        with np.load(tokens_file) as z:
            data, offsets = z["data"].tobytes(), z["offsets"]
        tokens = [data[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    except (OSError, ValueError, KeyError):
        meta, tokens = _read_hf_dir(path) if ref.kind == "hf" else _read_gguf(path)
        _store(meta_file, tokens_file, meta, tokens)
    vocab = Vocabulary(tuple(tokens), name=ref.name)
    size = (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )
    info = ModelInfo(
        path=str(path),
        file_size=size,
        vocab_size=len(tokens),
        fingerprint=vocab.fingerprint.short,
        **meta,
    )
    return info, vocab


def _store(meta_file: Path, tokens_file: Path, meta: dict, tokens: list[bytes]) -> None:
    try:
        meta_file.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in tokens], out=offsets[1:])
        data = np.frombuffer(b"".join(tokens), dtype=np.uint8)
        tmp = tokens_file.with_name(tokens_file.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, data=data, offsets=offsets)
        os.replace(tmp, tokens_file)
        meta_file.write_text(json.dumps(meta))
    except OSError as e:  # a read-only cache only costs speed
        logger.warning("could not cache model metadata in %s: %s", meta_file.parent, e)
