#!/usr/bin/env python3
"""Grammar engines for constrained decoding (JSON mode, JSON schema, tool-call arguments), side by side.

Every engine gets the same vocabulary: the 151,936 token byte strings of the edge model's GGUF
(`tokenizer.ggml.tokens`, GPT-2 byte-level text decoded to bytes; control and user-defined tokens
such as <|im_start|> and <tool_call> are special and never allowed, each engine told so its own way;
the [PAD…] ids are empty), with <|im_end|> (151645) as the only stop token. The JSON layout is the
one shared/constraints.py asks llguidance for: separators ", " and ": ", no free whitespace.

Measured per engine (whichever of llguidance, xgrammar, outlines-core the running Python imports):
  setup:     the engine's tokenizer object from the token list, once (plus the engine's import time and
             whether the import drags in torch / transformers);
  compile:   per schema, schema -> matcher, and the first mask after it;
  per token: walking real documents (valid instances, tokenized with the model's own tokenizer) token
             by token: compute the next mask (timed), check the document's token is allowed, consume it
             (timed); at the end the stop token must be allowed. Mean, p50, p99, max over all steps,
             "cold" (a matcher compiled per document) and "warm" (copies of one that walked them
             before); per schema the least disturbed of --runs runs;
  rollback:  at every position of the longest document, roll back k tokens and consume them again
             (k = 1, 4, 8, 16); the masks after the rollback and after the re-consume must equal the
             ones computed on the way forward;
  coverage:  per JSON-schema feature: does it compile; is a valid instance accepted and an invalid one
             rejected (token by token, then the stop token); random walks under the mask (random
             logits: uniform among the allowed tokens, 30 % of the steps uniform among the allowed
             tokens made only of closing characters '"}],' so that walks end; stop token taken as soon
             as allowed; capped) whose finished outputs are checked with `jsonschema` (formats too);
  mask apply (engine-independent numpy, plus the engines' own kernels): bitmask int32 [4748] -> a
             [151936] float32 logits row with -inf at the masked ids, on masks recorded in the walks.

Results are merged per engine into --out (default docs/grammar_engines.json); the side-by-side tables
are printed from the merged file. Run it once per Python environment:

    .venv/bin/python scripts/bench_grammar.py                  # llguidance (the project's venv)
    /tmp/xgv/bin/python scripts/bench_grammar.py               # xgrammar, outlines-core (a separate venv)
    .venv/bin/python scripts/bench_grammar.py --table-only --markdown   # the merged tables again
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 151936
EOS = 151645  # <|im_end|>
WORDS = (VOCAB + 31) // 32
DEFAULT_GGUF = Path.home() / ".cache/handoff/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
CACHE = Path.home() / ".cache/handoff/grammar_bench"
ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("llguidance", "xgrammar", "outlines-core")
ROLLBACK_K = (1, 4, 8, 16)
CLOSING = frozenset(b'"}],')
# The layout shared/constraints.py uses (JSON_OPTIONS): ", " and ": ", no free whitespace.
ITEM_SEP, KEY_SEP = ", ", ": "


# ---------------------------------------------------------------------------------------------
# Vocabulary and tokenizer, the same for every engine


def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the byte-level BPE alphabet back to bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@dataclass
class Vocab:
    tokens: list[bytes]  # [VOCAB] the bytes of each token (special: their text; unused: b"")
    types: list[int]  # GGUF token types: 1 normal, 3 control, 4 user-defined, 5 unused
    encode: Callable[[str], list[int]]  # the model's tokenizer (text -> ids, no special tokens)
    special: list[int] = field(default_factory=list)  # control and user-defined ids
    load_s: float = 0.0


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    return f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def load_vocab(gguf: Path) -> Vocab:
    """Token bytes from the GGUF (gguf package) and the tokenizer (transformers' GGUF loading), cached."""
    t0 = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    key = _cache_key(gguf)
    vocab_file = CACHE / f"{key}.vocab.json"
    tok_file = CACHE / f"{key}.tokenizer.json"
    if not vocab_file.exists():
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        f = reader.fields["tokenizer.ggml.tokens"]
        texts = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        f = reader.fields["tokenizer.ggml.token_type"]
        types = [int(f.parts[i][0]) for i in f.data]
        dec = _byte_decoder()
        tokens = [
            bytes(dec[c] for c in s) if ty == 1 else (s.encode("utf-8") if ty in (3, 4) else b"")
            for s, ty in zip(texts, types, strict=True)
        ]
        vocab_file.write_text(json.dumps({"tokens": [t.decode("latin-1") for t in tokens], "types": types}))
    if not tok_file.exists():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf.backend_tokenizer.save(str(tok_file))
    data = json.loads(vocab_file.read_text())
    tokens = [t.encode("latin-1") for t in data["tokens"]]
    types = data["types"]
    if len(tokens) != VOCAB:
        raise SystemExit(f"{gguf}: expected {VOCAB} tokens, got {len(tokens)}")
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(tok_file))
    tk.encode_special_tokens = True  # "<|im_end|>" inside a JSON string is text, as a model writes it

    def encode(text: str) -> list[int]:
        return tk.encode(text, add_special_tokens=False).ids

    special = [i for i, ty in enumerate(types) if ty in (3, 4)]
    return Vocab(tokens, types, encode, special, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Engines: one interface (compile, matcher, fill a bitmask, consume, roll back)


class Engine:
    name = ""
    module = ""
    dist = ""
    setup_s = 0.0
    setup_detail: dict[str, float]

    def compile(self, schema: dict) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, m: Any, buf: np.ndarray) -> None:
        """The next token's bitmask into buf (int32 [WORDS], bit j of word j // 32)."""
        raise NotImplementedError

    def consume(self, m: Any, token: int) -> bool:
        raise NotImplementedError

    def rollback(self, m: Any, k: int) -> None:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {}

    def warnings_of(self, compiled: Any) -> list[str]:
        return []


class Llguidance(Engine):
    name = module = dist = "llguidance"

    def __init__(self, vocab: Vocab) -> None:
        import llguidance

        self.llg = llguidance
        self.setup_detail = {}
        # Control and user-defined tokens get llguidance's special-token marker 0xFF, as its
        # llama.cpp helper (llguidance.llamacpp.lltokenizer_from_vocab) marks them.
        tokens = [b"\xff" + t if ty in (3, 4) else t for t, ty in zip(vocab.tokens, vocab.types, strict=True)]
        encode = vocab.encode

        class _Tok:
            eos_token_id = EOS
            bos_token_id = None
            special_token_ids = vocab.special

            def __init__(self) -> None:
                self.tokens = tokens

            def __call__(self, s: bytes) -> list[int]:
                return encode(s.decode("utf-8", errors="replace"))

        t0 = time.perf_counter()
        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Tok()), n_vocab=VOCAB, eos_token=EOS)
        self.setup_s = time.perf_counter() - t0
        self.setup_detail["tokenizer_from_token_list_s"] = self.setup_s
        self._production_path(vocab)

    def _production_path(self, vocab: Vocab) -> None:
        """The project's own path (llama.cpp vocab-only load + lltokenizer_from_vocab): time and bytes."""
        if importlib.util.find_spec("llama_cpp") is None or not ARGS.gguf.exists():
            return
        import llama_cpp
        from llguidance.llamacpp import lltokenizer_from_vocab

        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=str(ARGS.gguf), vocab_only=True, verbose=False)
        t1 = time.perf_counter()
        tok = lltokenizer_from_vocab(llama_cpp.llama_model_get_vocab(llm.model), eos_token=[EOS])
        t2 = time.perf_counter()
        self.setup_detail["llama_cpp_vocab_only_load_s"] = t1 - t0
        self.setup_detail["lltokenizer_from_vocab_s"] = t2 - t1
        normal = [i for i, ty in enumerate(vocab.types) if ty == 1]
        differ = [i for i in normal if tok.decode_bytes([i]) != vocab.tokens[i]]
        self.setup_detail["llama_cpp_path_normal_tokens_identical"] = len(normal) - len(differ)
        self.setup_detail["normal_tokens"] = len(normal)
        self.setup_detail["llama_cpp_path_differing_ids"] = differ[:10]

    def options(self) -> dict[str, Any]:
        return {"whitespace_flexible": False, "item_separator": ITEM_SEP, "key_separator": KEY_SEP}

    def compile(self, schema: dict) -> Any:
        """The grammar and a fresh matcher to copy per completion (LLMatcher() compiles the grammar)."""
        g = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=self.options())
        m = self.llg.LLMatcher(self.tok, g, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return (g, m)

    def matcher(self, compiled: Any) -> Any:
        return compiled[1].deep_copy()

    def fill(self, m: Any, buf: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)

    def consume(self, m: Any, token: int) -> bool:
        return m.consume_token(token)

    def rollback(self, m: Any, k: int) -> None:
        if not m.rollback(k):
            raise RuntimeError(m.get_error() or "rollback refused")

    def warnings_of(self, compiled: Any) -> list[str]:
        _, msgs = self.llg.LLMatcher.validate_grammar_with_warnings(compiled[0], self.tok)
        return msgs


class Xgrammar(Engine):
    name = module = dist = "xgrammar"

    def __init__(self, vocab: Vocab) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        # xgrammar treats an empty token as special (never allowed); a special token given as its
        # text would be allowed inside strings (<|im_start|> is plain text to it).
        tokens = [b"" if ty in (3, 4) else t for t, ty in zip(vocab.tokens, vocab.types, strict=True)]
        t0 = time.perf_counter()
        info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=[EOS])
        t1 = time.perf_counter()
        # No cache: every compile is timed as a first compile.
        self.compiler = xgr.GrammarCompiler(info, max_threads=os.cpu_count() or 1, cache_enabled=False)
        self.setup_s = time.perf_counter() - t0
        self.setup_detail = {"tokenizer_info_s": t1 - t0, "grammar_compiler_s": time.perf_counter() - t1}

    def options(self) -> dict[str, Any]:
        return {"any_whitespace": False, "separators": [ITEM_SEP, KEY_SEP], "strict_mode": False}

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(ITEM_SEP, KEY_SEP), strict_mode=False
        )

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, buf: np.ndarray) -> None:
        m.fill_next_token_bitmask(buf.reshape(1, -1))  # numpy through DLPack, no torch tensor

    def consume(self, m: Any, token: int) -> bool:
        return m.accept_token(token)

    def rollback(self, m: Any, k: int) -> None:
        m.rollback(k)


class OutlinesCore(Engine):
    name = dist = "outlines-core"
    module = "outlines_core"
    max_rollback = 32

    def __init__(self, vocab: Vocab) -> None:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        self.Guide, self.Index, self.build = Guide, Index, build_regex_from_schema
        groups: dict[bytes, list[int]] = {}
        for i, (t, ty) in enumerate(zip(vocab.tokens, vocab.types, strict=True)):
            if ty == 1:  # special and unused tokens stay out of the vocabulary: never allowed
                groups.setdefault(t, []).append(i)
        t0 = time.perf_counter()
        self.voc = Vocabulary(EOS, groups)
        self.setup_s = time.perf_counter() - t0
        self.setup_detail = {"vocabulary_s": self.setup_s}

    def options(self) -> dict[str, Any]:
        # Its whitespace is a regex between every pair of items; the default "[ ]?" admits ", "
        # and ": " (and the compact forms: one layout cannot be asked for exactly).
        return {"whitespace_pattern": "[ ]? (default)", "max_rollback": self.max_rollback}

    def compile(self, schema: dict) -> Any:
        return self.Index(self.build(json.dumps(schema)), self.voc)

    def matcher(self, compiled: Any) -> Any:
        return self.Guide(compiled, max_rollback=self.max_rollback)

    def fill(self, m: Any, buf: np.ndarray) -> None:
        m.write_mask_into(buf.ctypes.data, buf.size, 4)

    def consume(self, m: Any, token: int) -> bool:
        try:
            m.advance(token, return_tokens=False)
        except Exception:  # an id the state has no transition for
            return False
        return True

    def rollback(self, m: Any, k: int) -> None:
        m.rollback_state(k)


ENGINE_CLASSES: dict[str, type[Engine]] = {
    "llguidance": Llguidance,
    "xgrammar": Xgrammar,
    "outlines-core": OutlinesCore,
}


# ---------------------------------------------------------------------------------------------
# Benchmark schemas and their documents (properties in schema order: every engine keeps it)

STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(props: dict, required: list[str] | None = None, extra: Any = False, **kw: Any) -> dict:
    d: dict[str, Any] = {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
    }
    if extra is not None:
        d["additionalProperties"] = extra
    d.update(kw)
    return d


NODE = {
    "type": "object",
    "properties": {
        "name": STR,
        "type": {"enum": ["file", "dir"]},
        "size": {"type": "integer", "minimum": 0},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
    },
    "required": ["name", "type"],
    "additionalProperties": False,
}

BENCH: dict[str, tuple[dict, list[Any]]] = {
    "flat_object": (
        obj(
            {"name": STR, "age": INT, "email": STR, "active": BOOL, "score": NUM},
            ["name", "age", "active"],
            None,
        ),
        [
            {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "active": True, "score": 97.5},
            {"name": "Grace Hopper", "age": 85, "active": False},
            {"name": "José Núñez", "age": 54, "email": "jose@kernel.org", "active": True, "score": -12},
        ],
    ),
    "nested_objects": (
        obj(
            {
                "name": STR,
                "address": obj(
                    {"street": STR, "city": STR, "zip": STR, "geo": obj({"lat": NUM, "lon": NUM})},
                    ["street", "city"],
                ),
                "company": obj({"name": STR, "department": obj({"name": STR, "floor": INT})}),
            }
        ),
        [
            {
                "name": "Marie Curie",
                "address": {
                    "street": "36 quai de Béthune",
                    "city": "Paris",
                    "zip": "75004",
                    "geo": {"lat": 48.8514, "lon": 2.3572},
                },
                "company": {"name": "Institut du Radium", "department": {"name": "Physics", "floor": 2}},
            },
            {
                "name": "Alan Turing",
                "address": {"street": "Adlington Road", "city": "Wilmslow"},
                "company": {"name": "University of Manchester", "department": {"name": "Maths", "floor": 1}},
            },
        ],
    ),
    "arrays_min_max": (
        obj(
            {
                "tags": {"type": "array", "items": STR, "minItems": 1, "maxItems": 5},
                "matrix": {
                    "type": "array",
                    "items": {"type": "array", "items": NUM, "minItems": 3, "maxItems": 3},
                    "minItems": 1,
                    "maxItems": 4,
                },
                "ids": {"type": "array", "items": INT},
            },
            ["tags", "matrix"],
        ),
        [
            {
                "tags": ["linear-algebra", "numpy"],
                "matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                "ids": [7, 42],
            },
            {"tags": ["a", "b", "c", "d", "e"], "matrix": [[0.5, -1.25, 3e-05]], "ids": []},
            {"tags": ["single"], "matrix": [[1, 2, 3], [4, 5, 6]]},
        ],
    ),
    "enums": (
        obj(
            {
                "status": {"enum": ["open", "in_progress", "blocked", "closed"]},
                "priority": {"enum": ["low", "medium", "high", "critical"]},
                "labels": {
                    "type": "array",
                    "items": {"enum": ["bug", "feature", "docs", "perf", "security"]},
                    "maxItems": 5,
                },
                "severity": {"enum": [1, 2, 3, 4, 5]},
            },
            ["status", "priority"],
        ),
        [
            {"status": "in_progress", "priority": "high", "labels": ["bug", "perf"], "severity": 2},
            {"status": "closed", "priority": "low"},
            {"status": "blocked", "priority": "critical", "labels": ["security"], "severity": 5},
        ],
    ),
    "string_formats": (
        obj(
            {
                "id": {"type": "string", "format": "uuid"},
                "created": {"type": "string", "format": "date"},
                "email": {"type": "string", "format": "email"},
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "phone": {"type": "string", "pattern": "^\\+[1-9][0-9]{7,14}$"},
                "nickname": {"type": "string", "minLength": 2, "maxLength": 16},
            }
        ),
        [
            {
                "id": "0b6f4c1e-9a2d-4f3b-8c7e-5d1a2b3c4d5e",
                "created": "2024-02-29",
                "email": "ops.team@example.com",
                "sku": "ABC-0042",
                "phone": "+441632960961",
                "nickname": "zed",
            },
            {
                "id": "f47ac10b-58cc-4372-a567-0e02b2c3d479",
                "created": "1999-12-31",
                "email": "x@y.io",
                "sku": "QQQ-9999",
                "phone": "+12025550143",
                "nickname": "ünïcode-nick",
            },
        ],
    ),
    "numbers_bounded": (
        obj(
            {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "minimum": -180, "maximum": 180},
                "percent": {"type": "integer", "minimum": 0, "maximum": 100},
                "price": {"type": "number", "exclusiveMinimum": 0},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
            }
        ),
        [
            {"lat": 52.52, "lon": 13.405, "percent": 100, "price": 19.99, "quantity": 3},
            {"lat": -33.8688, "lon": 151.2093, "percent": 0, "price": 0.01, "quantity": 1000},
            {"lat": 0, "lon": -180, "percent": 57, "price": 1250, "quantity": 12},
        ],
    ),
    "any_one_of": (
        obj(
            {
                "shapes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "oneOf": [
                            obj({"kind": {"const": "circle"}, "r": NUM}),
                            obj({"kind": {"const": "rect"}, "w": NUM, "h": NUM}),
                            obj(
                                {
                                    "kind": {"const": "polygon"},
                                    "points": {
                                        "type": "array",
                                        "items": {
                                            "type": "array",
                                            "items": NUM,
                                            "minItems": 2,
                                            "maxItems": 2,
                                        },
                                    },
                                }
                            ),
                        ]
                    },
                },
                "fill": {"anyOf": [{"type": "string", "pattern": "^#[0-9a-f]{6}$"}, {"type": "null"}]},
            }
        ),
        [
            {
                "shapes": [
                    {"kind": "circle", "r": 2.5},
                    {"kind": "rect", "w": 4, "h": 3},
                    {"kind": "polygon", "points": [[0, 0], [1, 0], [0.5, 0.866]]},
                ],
                "fill": "#1e90ff",
            },
            {"shapes": [{"kind": "rect", "w": 1, "h": 1}], "fill": None},
        ],
    ),
    "recursive_ref": (
        {"$defs": {"node": NODE}, "$ref": "#/$defs/node"},
        [
            {
                "name": "repo",
                "type": "dir",
                "children": [
                    {"name": "README.md", "type": "file", "size": 2048},
                    {
                        "name": "src",
                        "type": "dir",
                        "children": [
                            {"name": "main.py", "type": "file", "size": 512},
                            {
                                "name": "util",
                                "type": "dir",
                                "children": [{"name": "io.py", "type": "file", "size": 128}],
                            },
                        ],
                    },
                ],
            },
            {"name": "empty", "type": "dir", "children": []},
        ],
    ),
    "strict_config": (
        obj(
            {
                "host": STR,
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "tls": BOOL,
                "timeout_s": NUM,
                "retries": INT,
                "log_level": {"enum": ["debug", "info", "warning", "error"]},
                "features": {"type": "object", "additionalProperties": BOOL},
            },
            ["host", "port"],
        ),
        [
            {
                "host": "api.internal",
                "port": 8443,
                "tls": True,
                "timeout_s": 2.5,
                "retries": 3,
                "log_level": "info",
                "features": {"speculative": True, "handoff": False},
            },
            {"host": "localhost", "port": 50051},
        ],
    ),
    "tool_call_args": (
        # OpenAI function parameters in strict mode: every property required, optional ones nullable.
        obj(
            {
                "query": {"type": "string", "description": "What to search for, in code or prose."},
                "repo": {"type": ["string", "null"], "description": "owner/name, or null for all."},
                "language": {"type": "string", "enum": ["python", "go", "rust", "typescript", "c++"]},
                "max_results": {"type": "integer", "minimum": 1, "maximum": 50},
                "filters": {
                    "type": ["object", "null"],
                    "properties": {
                        "path_glob": {"type": ["string", "null"]},
                        "since": {"type": ["string", "null"], "format": "date"},
                        "include_tests": BOOL,
                    },
                    "required": ["path_glob", "since", "include_tests"],
                    "additionalProperties": False,
                },
            }
        ),
        [
            {
                "query": 'def "rollback" in matcher',
                "repo": "example/handoff",
                "language": "python",
                "max_results": 10,
                "filters": {"path_glob": "shared/*.py", "since": "2025-01-01", "include_tests": False},
            },
            {"query": "mmap a GGUF file", "repo": None, "language": "c++", "max_results": 5, "filters": None},
        ],
    ),
    "json_object": (
        {"type": "object"},
        [
            {
                "model": "qwen2.5-coder",
                "layers": 24,
                "rope": {"theta": 1000000.0, "scaling": None},
                "stop": ["<|im_end|>", "\n\n"],
                "ok": True,
                "ratios": [0.25, 0.5, 1.0],
                "nested": {"a": {"b": {"c": [1, {"d": "deep"}]}}},
            },
            {"message": 'line one\nline "two"', "count": -3, "empty": {}, "list": []},
        ],
    ),
}


# ---------------------------------------------------------------------------------------------
# Coverage cases: (schema, a valid instance, an invalid one or a list of invalid ones)


def wrap(sub: dict) -> dict:
    return obj({"v": sub})


def _v(x: Any) -> dict:
    return {"v": x}


# The tree node without the size bound: the recursion alone.
PLAIN_NODE = {**NODE, "properties": {**NODE["properties"], "size": INT}}

FEATURES: dict[str, tuple[dict, Any, Any]] = {
    "type_union": (wrap({"type": ["integer", "null"]}), _v(None), _v("x")),
    "enum": (wrap({"enum": ["red", "green", 3]}), _v("green"), _v("blue")),
    "const": (wrap({"const": "fixed"}), _v("fixed"), _v("other")),
    "pattern": (wrap({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}), _v("ABC-12"), _v("AB-123")),
    "format_date": (
        wrap({"type": "string", "format": "date"}),
        _v("2024-02-29"),
        [_v("2024-13-01"), _v("2024-04-31"), _v("2023-02-29")],
    ),
    "format_email": (wrap({"type": "string", "format": "email"}), _v("a.b@example.com"), _v("not-an-email")),
    "format_uuid": (
        wrap({"type": "string", "format": "uuid"}),
        _v("123e4567-e89b-12d3-a456-426614174000"),
        _v("123e4567e89b12d3a456426614174000"),
    ),
    "minLength_maxLength": (wrap({"type": "string", "minLength": 3, "maxLength": 5}), _v("abcd"), _v("ab")),
    "minimum_maximum": (wrap({"type": "integer", "minimum": 10, "maximum": 99}), _v(42), [_v(100), _v(9)]),
    "exclusiveMin_Max": (
        wrap({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
        _v(0.5),
        [_v(1), _v(0)],
    ),
    "multipleOf": (wrap({"type": "integer", "multipleOf": 5}), _v(15), _v(7)),
    "minItems_maxItems": (
        wrap({"type": "array", "items": INT, "minItems": 2, "maxItems": 3}),
        _v([1, 2]),
        _v([1, 2, 3, 4]),
    ),
    "uniqueItems": (wrap({"type": "array", "items": INT, "uniqueItems": True}), _v([1, 2]), _v([1, 1])),
    "prefixItems": (
        wrap({"type": "array", "prefixItems": [STR, INT], "items": False}),
        _v(["a", 1]),
        _v([1, "a"]),
    ),
    "additionalProperties_false": (obj({"a": INT}, [], False), {"a": 1}, {"a": 1, "b": 2}),
    "additionalProperties_schema": (obj({"a": INT}, [], STR), {"a": 1, "b": "x"}, {"a": 1, "b": 2}),
    "patternProperties": (
        {"type": "object", "patternProperties": {"^x_[a-z]+$": INT}, "additionalProperties": False},
        {"x_ab": 1},
        {"y": 1},
    ),
    "required": (obj({"a": INT, "b": INT}, ["a", "b"], None), {"a": 1, "b": 2}, {"a": 1}),
    "anyOf": (wrap({"anyOf": [INT, {"type": "string", "maxLength": 3}]}), _v("abc"), _v("abcdef")),
    "oneOf_disjoint": (
        wrap(
            {
                "oneOf": [
                    obj({"k": {"const": "a"}, "x": INT}),
                    obj({"k": {"const": "b"}, "y": STR}),
                ]
            }
        ),
        _v({"k": "a", "x": 1}),
        _v({"k": "a", "y": "s"}),
    ),
    "oneOf_exclusive": (
        wrap({"oneOf": [{"type": "integer", "multipleOf": 2}, {"type": "integer", "multipleOf": 3}]}),
        _v(4),
        _v(6),
    ),
    "allOf": (
        {
            "allOf": [
                {"type": "object", "properties": {"a": INT}, "required": ["a"]},
                {"properties": {"b": STR}, "required": ["b"]},
            ]
        },
        {"a": 1, "b": "x"},
        {"a": 1},
    ),
    "ref_defs": (
        {"$defs": {"pt": obj({"x": INT, "y": INT})}, **obj({"p": {"$ref": "#/$defs/pt"}})},
        {"p": {"x": 1, "y": 2}},
        {"p": {"x": 1}},
    ),
    "ref_recursion": (
        {"$defs": {"node": PLAIN_NODE}, "$ref": "#/$defs/node"},
        {"name": "a", "type": "dir", "children": [{"name": "b", "type": "file"}]},
        {"name": "a", "type": "dir", "children": [{"name": "b"}]},
    ),
    "if_then_else": (
        {
            **obj({"kind": {"enum": ["a", "b"]}, "n": INT}, None, False),
            "if": {"properties": {"kind": {"const": "a"}}},
            "then": {"properties": {"n": {"minimum": 10}}},
            "else": {"properties": {"n": {"maximum": 0}}},
        },
        {"kind": "a", "n": 10},
        {"kind": "a", "n": 5},
    ),
    "not": (wrap({"type": "integer", "not": {"const": 3}}), _v(4), _v(3)),
}


# ---------------------------------------------------------------------------------------------
# Measurements


def dump(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(ITEM_SEP, KEY_SEP))


def stats_us(ns: list[int]) -> dict[str, float]:
    if not ns:
        return {"n": 0}
    a = np.asarray(ns, dtype=np.float64) / 1000.0
    return {
        "n": int(a.size),
        "mean_us": round(float(a.mean()), 2),
        "p50_us": round(float(np.percentile(a, 50)), 2),
        "p99_us": round(float(np.percentile(a, 99)), 2),
        "max_us": round(float(a.max()), 2),
    }


def allowed(buf: np.ndarray, token: int) -> bool:
    return bool((int(buf[token >> 5]) >> (token & 31)) & 1)


def unpack(buf: np.ndarray) -> np.ndarray:
    return np.unpackbits(buf.view(np.uint8), bitorder="little")[:VOCAB].view(bool)


def walk_document(engine: Engine, compiled: Any, ids: list[int], buf: np.ndarray, out: dict) -> bool:
    """Mask, check, consume every token of a document; then the stop token must be allowed."""
    t0 = time.perf_counter_ns()
    m = engine.matcher(compiled)
    out["matcher_new"].append(time.perf_counter_ns() - t0)
    for i, t in enumerate([*ids, EOS]):
        t0 = time.perf_counter_ns()
        engine.fill(m, buf)
        out["mask"].append(time.perf_counter_ns() - t0)
        if out["keep_masks"] is not None:
            out["keep_masks"].append(buf.copy())
        if not allowed(buf, t):
            out["rejections"].append(f"token {i} of {len(ids)} ({t})")
            return False
        if t == EOS:
            return True
        t0 = time.perf_counter_ns()
        ok = engine.consume(m, t)
        out["consume"].append(time.perf_counter_ns() - t0)
        if not ok:
            out["rejections"].append(f"consume refused token {i} ({t})")
            return False
    return True


def _walk_schema(
    engine: Engine, schema: dict, ids_list: list[list[int]], repeat: int, keep_masks: list | None
) -> dict[str, Any]:
    """One run over a schema's documents: the cold pass, a warm-up pass, `repeat` warm passes."""
    buf = np.zeros(WORDS, dtype=np.int32)
    compile_ns: list[int] = []
    first_ns: list[int] = []
    cold: dict[str, Any] = {"mask": [], "consume": [], "matcher_new": [], "rejections": []}
    accepted = 0
    for ids in ids_list:
        t0 = time.perf_counter_ns()
        compiled = engine.compile(schema)
        compile_ns.append(time.perf_counter_ns() - t0)
        m = engine.matcher(compiled)
        t0 = time.perf_counter_ns()
        engine.fill(m, buf)
        first_ns.append(time.perf_counter_ns() - t0)
        cold["keep_masks"] = keep_masks
        accepted += walk_document(engine, compiled, ids, buf, cold)
    warm: dict[str, Any] = {
        "mask": [],
        "consume": [],
        "matcher_new": [],
        "rejections": [],
        "keep_masks": None,
    }
    for ids in ids_list:  # warm-up pass, not recorded
        walk_document(engine, compiled, ids, buf, dict(warm, mask=[], consume=[], matcher_new=[]))
    for _ in range(repeat):
        for ids in ids_list:
            walk_document(engine, compiled, ids, buf, warm)
    return {"compile": compile_ns, "first": first_ns, "cold": cold, "warm": warm, "accepted": accepted}


def bench_schemas(engine: Engine, vocab: Vocab, repeat: int, runs: int, keep_masks: list | None) -> dict:
    """Per schema: compile, first mask, then every document walked token by token, `runs` times.

    cold: each document on a matcher compiled for it alone (what a request that compiles its own
    grammar pays: lazily built engine state is built during its walk); warm: `repeat` more passes
    over the documents on copies of one compiled matcher that has walked them all once before.
    Of the runs, the one with the least total mask time is reported (as timeit takes the minimum:
    the other processes on a 2-core machine only ever add time); every run's means are kept.
    """
    res: dict[str, Any] = {}
    total: dict[str, list[int]] = {"mask_cold": [], "mask_warm": [], "consume": []}
    for name, (schema, docs) in BENCH.items():
        ids_list = [vocab.encode(dump(d)) for d in docs]
        row: dict[str, Any] = {"docs": len(docs), "doc_tokens": [len(x) for x in ids_list]}
        try:
            done = [
                _walk_schema(engine, schema, ids_list, repeat, keep_masks if i == 0 else None)
                for i in range(runs)
            ]
        except Exception as e:
            row["compile_error"] = f"{type(e).__name__}: {e}"[:300]
            res[name] = row
            print(f"  {name}: compile error {row['compile_error'][:120]}", flush=True)
            continue
        best = min(done, key=lambda d: sum(d["cold"]["mask"]) + sum(d["warm"]["mask"]))
        compile_all = [x for d in done for x in d["compile"]]
        row["compile_ms"] = round(float(np.median(compile_all)) / 1e6, 3)
        row["compile_ms_min"] = round(min(compile_all) / 1e6, 3)
        row["first_mask_ms"] = round(float(np.median([x for d in done for x in d["first"]])) / 1e6, 3)
        row["docs_accepted"] = best["accepted"]
        if best["cold"]["rejections"]:
            row["rejections"] = sorted(set(best["cold"]["rejections"]))[:5]
        row["mask_cold"] = stats_us(best["cold"]["mask"])
        row["mask_warm"] = stats_us(best["warm"]["mask"])
        row["consume"] = stats_us(best["cold"]["consume"] + best["warm"]["consume"])
        row["matcher_new"] = stats_us(best["warm"]["matcher_new"])
        row["runs_mask_cold_mean_us"] = [stats_us(d["cold"]["mask"]).get("mean_us") for d in done]
        row["runs_mask_warm_mean_us"] = [stats_us(d["warm"]["mask"]).get("mean_us") for d in done]
        res[name] = row
        total["mask_cold"] += best["cold"]["mask"]
        total["mask_warm"] += best["warm"]["mask"]
        total["consume"] += best["cold"]["consume"] + best["warm"]["consume"]
        print(
            f"  {name}: compile {row['compile_ms']:.1f} ms, first mask {row['first_mask_ms']:.2f} ms, mask cold "
            f"mean {row['mask_cold'].get('mean_us', 0):.1f} p99 {row['mask_cold'].get('p99_us', 0):.1f} us, "
            f"warm mean {row['mask_warm'].get('mean_us', 0):.1f} p99 {row['mask_warm'].get('p99_us', 0):.1f} us, "
            f"docs {best['accepted']}/{len(docs)} (run means {row['runs_mask_cold_mean_us']})",
            flush=True,
        )
    res["_all"] = {k: stats_us(v) for k, v in total.items()}
    return res


def bench_rollback(engine: Engine, vocab: Vocab) -> dict:
    """Roll back k tokens and consume them again, at every position of each schema's longest document.

    The masks right after the rollback and after the re-consume must equal the forward pass's.
    """
    buf = np.zeros(WORDS, dtype=np.int32)
    res: dict[str, Any] = {}
    for k in ROLLBACK_K:
        back: list[int] = []
        again: list[int] = []
        mismatches = checks = 0
        errors: list[str] = []
        for name, (schema, docs) in BENCH.items():
            ids = max((vocab.encode(dump(d)) for d in docs), key=len)
            try:
                compiled = engine.compile(schema)
            except Exception:
                continue
            m = engine.matcher(compiled)
            ref = []  # ref[n]: the mask after n tokens, forward only
            for t in ids:
                engine.fill(m, buf)
                ref.append(buf.copy())
                if not allowed(buf, t) or not engine.consume(m, t):
                    break
            else:
                engine.fill(m, buf)
                ref.append(buf.copy())
            m = engine.matcher(compiled)
            for n in range(1, len(ref)):
                engine.consume(m, ids[n - 1])
                if n < k:
                    continue
                try:
                    t0 = time.perf_counter_ns()
                    engine.rollback(m, k)
                    back.append(time.perf_counter_ns() - t0)
                except Exception as e:
                    errors.append(f"{name} after {n} tokens: {type(e).__name__}: {e}"[:200])
                    break
                engine.fill(m, buf)
                mismatches += not np.array_equal(buf, ref[n - k])
                t0 = time.perf_counter_ns()
                for t in ids[n - k : n]:
                    engine.consume(m, t)
                again.append(time.perf_counter_ns() - t0)
                engine.fill(m, buf)
                mismatches += not np.array_equal(buf, ref[n])
                checks += 2
        res[f"k={k}"] = {
            "rollback": stats_us(back),
            "reconsume_k_tokens": stats_us(again),
            "mask_checks": checks,
            "mask_mismatches_after_rollback": int(mismatches),
            "errors": errors[:3],
            "error_count": len(errors),
        }
        print(
            f"  rollback k={k}: {res[f'k={k}']['rollback'].get('mean_us', 0):.1f} us, re-consume "
            f"{res[f'k={k}']['reconsume_k_tokens'].get('mean_us', 0):.1f} us, mismatches {mismatches}/{checks}, "
            f"errors {len(errors)}",
            flush=True,
        )
    return res


def _validator(schema: dict):
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def accepts(engine: Engine, compiled: Any, ids: list[int], buf: np.ndarray) -> bool:
    """Whether the engine lets this exact token sequence through and then allows the stop token."""
    m = engine.matcher(compiled)
    for t in ids:
        engine.fill(m, buf)
        if not allowed(buf, t) or not engine.consume(m, t):
            return False
    engine.fill(m, buf)
    return allowed(buf, EOS)


def random_walk(
    engine: Engine,
    compiled: Any,
    rng: np.random.Generator,
    cap: int,
    closing: np.ndarray,
    special: np.ndarray,
) -> tuple[list[int], str, int]:
    buf = np.zeros(WORDS, dtype=np.int32)
    m = engine.matcher(compiled)
    out: list[int] = []
    leaks = 0
    for _ in range(cap):
        engine.fill(m, buf)
        ok = unpack(buf)
        if ok[EOS]:
            return out, "finished", leaks
        leaks += int(np.count_nonzero(ok & special))
        cand = np.flatnonzero(ok)
        if cand.size == 0:
            return out, "dead", leaks
        if rng.random() < 0.3:
            close = cand[closing[cand]]
            if close.size:
                cand = close
        t = int(cand[rng.integers(cand.size)])
        if not engine.consume(m, t):
            return out, "refused", leaks
        out.append(t)
    return out, "cap", leaks


def bench_coverage(engine: Engine, vocab: Vocab, walks: int, cap: int, seed: int) -> dict:
    buf = np.zeros(WORDS, dtype=np.int32)
    closing = np.array([bool(t) and set(t) <= CLOSING for t in vocab.tokens], dtype=bool)
    special = np.zeros(VOCAB, dtype=bool)
    special[vocab.special] = True
    special[EOS] = False
    res: dict[str, Any] = {}
    for fi, (name, (schema, good, bad)) in enumerate(FEATURES.items()):
        val = _validator(schema)
        bads = bad if isinstance(bad, list) else [bad]
        assert val.is_valid(good) and not any(val.is_valid(b) for b in bads), name
        row: dict[str, Any] = {}
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                compiled = engine.compile(schema)
                row["compile_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            msgs = [str(x.message) for x in w] + engine.warnings_of(compiled)
            if msgs:
                row["warnings"] = [m[:200] for m in msgs[:3]]
        except Exception as e:
            row["compiles"] = False
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            row["verdict"] = "refused"
            res[name] = row
            print(f"  {name}: refused ({row['error'][:100]})", flush=True)
            continue
        row["compiles"] = True
        row["valid_accepted"] = accepts(engine, compiled, vocab.encode(dump(good)), buf)
        rejected = [not accepts(engine, compiled, vocab.encode(dump(b)), buf) for b in bads]
        row["invalid_rejected"] = all(rejected)
        if len(bads) > 1:
            row["invalid_rejected_each"] = {dump(b): r for b, r in zip(bads, rejected, strict=True)}
        rng = np.random.default_rng(seed + fi)
        counts = {"finished": 0, "valid": 0, "violations": 0, "cap": 0, "dead": 0, "refused": 0}
        leaks = 0
        examples: list[str] = []
        for _ in range(walks):
            ids, how, lk = random_walk(engine, compiled, rng, cap, closing, special)
            leaks += lk
            if how != "finished":
                counts[how] += 1
                continue
            counts["finished"] += 1
            text = b"".join(vocab.tokens[t] for t in ids)
            try:
                ok = val.is_valid(json.loads(text.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
            counts["valid" if ok else "violations"] += 1
            if not ok and len(examples) < 2:
                examples.append(text.decode("utf-8", errors="replace")[:160])
        row["walks"] = counts
        if leaks:
            row["special_token_leaks"] = leaks
        if examples:
            row["violation_examples"] = examples
        if not row["valid_accepted"]:
            row["verdict"] = "over-restricts"
        elif counts["violations"] or not any(rejected):
            row["verdict"] = "not enforced"
        elif not all(rejected):
            row["verdict"] = "partial"  # some invalid instances get through (e.g. 2023-02-29 as a date)
        else:
            row["verdict"] = "enforced"
        res[name] = row
        print(
            f"  {name}: {row['verdict']} (valid ok {row['valid_accepted']}, invalid rejected "
            f"{row['invalid_rejected']}, walks {counts})",
            flush=True,
        )
    return res


def bench_mask_apply(masks: list[np.ndarray], rounds: int = 5) -> dict:
    """Bitmask -> -inf on a [VOCAB] float32 logits row, several ways, over recorded masks."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(VOCAB).astype(np.float32)
    neg = np.float32(-np.inf)

    def unpack_copy_setinf(words: np.ndarray) -> np.ndarray:  # shared/constraints.py's way
        ok = np.unpackbits(words.view(np.uint8), bitorder="little")[:VOCAB].astype(bool)
        out = logits.copy()
        out[~ok] = neg
        return out

    def unpack_view_setinf(words: np.ndarray) -> np.ndarray:
        ok = np.unpackbits(words.view(np.uint8), bitorder="little")[:VOCAB].view(bool)
        out = logits.copy()
        out[~ok] = neg
        return out

    def unpack_putmask(words: np.ndarray) -> np.ndarray:
        ok = np.unpackbits(words.view(np.uint8), bitorder="little")[:VOCAB].view(bool)
        out = logits.copy()
        np.putmask(out, ~ok, neg)
        return out

    def unpack_where(words: np.ndarray) -> np.ndarray:
        ok = np.unpackbits(words.view(np.uint8), bitorder="little")[:VOCAB].view(bool)
        return np.where(ok, logits, neg)

    def unpack_copyto(words: np.ndarray) -> np.ndarray:
        ok = np.unpackbits(words.view(np.uint8), bitorder="little")[:VOCAB].view(bool)
        out = np.full(VOCAB, neg, dtype=np.float32)
        np.copyto(out, logits, where=ok)
        return out

    def sparse_gather(words: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:VOCAB])
        out = np.full(VOCAB, neg, dtype=np.float32)
        out[idx] = logits[idx]
        return out

    variants: dict[str, Callable[[np.ndarray], Any]] = {
        "numpy unpackbits+copy+out[~ok]=-inf (shared/constraints.py)": unpack_copy_setinf,
        "numpy unpackbits.view(bool)+copy+out[~ok]=-inf": unpack_view_setinf,
        "numpy unpackbits.view(bool)+copy+np.putmask": unpack_putmask,
        "numpy unpackbits+np.where": unpack_where,
        "numpy unpackbits+np.copyto(where=)": unpack_copyto,
        "numpy flatnonzero+gather": sparse_gather,
    }
    ref = [unpack_copy_setinf(w) for w in masks[:20]]
    if importlib.util.find_spec("llguidance"):
        import llguidance.numpy as lnp

        def llg_numpy(words: np.ndarray) -> np.ndarray:
            out = logits.copy()
            lnp.apply_token_bitmask_inplace(out, words)
            return out

        variants["llguidance.numpy.apply_token_bitmask_inplace"] = llg_numpy
    if importlib.util.find_spec("torch"):
        import torch

        tl = torch.from_numpy(logits)
        if importlib.util.find_spec("llguidance"):
            import llguidance.torch as ltorch

            def llg_torch(words: np.ndarray) -> np.ndarray:
                out = tl.clone()
                ltorch.apply_token_bitmask_inplace(out, torch.from_numpy(words))
                return out.numpy()

            variants["llguidance.torch.apply_token_bitmask_inplace (CPU)"] = llg_torch
        if importlib.util.find_spec("xgrammar"):
            import xgrammar as xgr

            def xgr_torch(words: np.ndarray) -> np.ndarray:
                out = tl.clone()
                xgr.apply_token_bitmask_inplace(out, torch.from_numpy(words))
                return out.numpy()

            variants["xgrammar.apply_token_bitmask_inplace (torch CPU)"] = xgr_torch
    res: dict[str, Any] = {"masks": len(masks)}
    for name, fn in variants.items():
        try:
            for w, r in zip(masks[:20], ref, strict=False):
                got = fn(w)
                if not np.array_equal(np.asarray(got), r):
                    raise AssertionError("differs from the reference")
            ns: list[int] = []
            for _ in range(rounds):
                for w in masks:
                    t0 = time.perf_counter_ns()
                    fn(w)
                    ns.append(time.perf_counter_ns() - t0)
            res[name] = stats_us(ns)
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
        print(f"  {name}: {res[name]}", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# Environment facts, output, tables


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "accelerator": "none (CPU only)",
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def engine_facts(dist: str, module: str) -> dict:
    facts: dict[str, Any] = {}
    try:
        facts["version"] = importlib.metadata.version(dist)
        md = importlib.metadata.metadata(dist)
        facts["license"] = md.get("License-Expression") or md.get("License") or ""
        reqs = [r for r in (importlib.metadata.requires(dist) or []) if "extra ==" not in r]
        facts["requires"] = reqs
    except importlib.metadata.PackageNotFoundError:
        pass
    before = set(sys.modules)
    t0 = time.perf_counter()
    __import__(module)
    facts["import_s"] = round(time.perf_counter() - t0, 3)
    new = set(sys.modules) - before
    facts["import_pulls"] = sorted(m for m in ("torch", "transformers", "triton", "numpy") if m in new)
    return facts


def merge_out(path: Path, update: dict) -> dict:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("engines", {})
    for name, r in update.get("engines", {}).items():
        data["engines"][name] = r
    for key in ("mask_apply",):
        for env, r in update.get(key, {}).items():
            data.setdefault(key, {})[env] = r
    for key in ("machine", "method", "vocab"):
        if key in update:
            data[key] = update[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return data


def table(data: dict, markdown: bool) -> str:
    engines = [e for e in ENGINES if e in data.get("engines", {})]
    lines: list[str] = []

    def emit(header: list[str], rows: list[list[str]]) -> None:
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines.extend("| " + " | ".join(r) + " |" for r in rows)
        else:
            widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
            lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
        lines.append("")

    def g(d: dict, *keys: str, fmt: str = "{:.1f}") -> str:
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return "-"
            d = d[k]
        return fmt.format(d) if isinstance(d, (int, float)) else str(d)

    # Facts and setup
    rows = []
    for e in engines:
        r = data["engines"][e]
        rows.append(
            [
                e,
                r.get("version", "-"),
                r.get("license", "-"),
                g(r, "import_s", fmt="{:.2f}"),
                ", ".join(r.get("import_pulls", [])) or "-",
                g(r, "setup_s", fmt="{:.2f}"),
                g(r, "per_token", "_all", "mask_cold", "mean_us"),
                g(r, "per_token", "_all", "mask_cold", "p50_us"),
                g(r, "per_token", "_all", "mask_cold", "p99_us"),
                g(r, "per_token", "_all", "mask_cold", "max_us"),
                g(r, "per_token", "_all", "mask_warm", "mean_us"),
                g(r, "per_token", "_all", "mask_warm", "p50_us"),
                g(r, "per_token", "_all", "mask_warm", "p99_us"),
                g(r, "per_token", "_all", "mask_warm", "max_us"),
                g(r, "per_token", "_all", "consume", "mean_us"),
            ]
        )
    emit(
        [
            "engine",
            "version",
            "license",
            "import s",
            "import pulls in",
            "tokenizer setup s",
            "cold mask mean us",
            "p50",
            "p99",
            "max",
            "warm mask mean us",
            "p50",
            "p99",
            "max",
            "consume mean us",
        ],
        rows,
    )
    # Per schema: compile ms | cold and warm mask mean / p99 us | documents accepted
    header = ["schema (tokens)"]
    for e in engines:
        header += [f"{e} compile ms", f"{e} cold mask mean/p99 us", f"{e} warm mean/p99 us", f"{e} docs ok"]
    rows = []
    for s in BENCH:
        first = next((data["engines"][e]["per_token"].get(s) for e in engines), None) or {}
        row = [f"{s} ({sum(first.get('doc_tokens', [])) or '-'})"]
        for e in engines:
            r = data["engines"][e]["per_token"].get(s, {})
            if "compile_error" in r:
                row += ["error", "-", "-", "-"]
                continue
            row += [
                g(r, "compile_ms"),
                f"{g(r, 'mask_cold', 'mean_us')} / {g(r, 'mask_cold', 'p99_us')}",
                f"{g(r, 'mask_warm', 'mean_us')} / {g(r, 'mask_warm', 'p99_us')}",
                f"{r.get('docs_accepted', '-')}/{r.get('docs', '-')}",
            ]
        rows.append(row)
    emit(header, rows)
    # Rollback
    header = ["rollback k"]
    for e in engines:
        header += [f"{e} rollback us", f"{e} re-consume k us", f"{e} mask mismatches"]
    rows = []
    for k in ROLLBACK_K:
        row = [str(k)]
        for e in engines:
            r = data["engines"][e].get("rollback", {}).get(f"k={k}", {})
            errs = len(r.get("errors", []))
            row += [
                g(r, "rollback", "mean_us", fmt="{:.2f}"),
                g(r, "reconsume_k_tokens", "mean_us"),
                f"{g(r, 'mask_mismatches_after_rollback', fmt='{}')}" + (f" ({errs} errors)" if errs else ""),
            ]
        rows.append(row)
    emit(header, rows)
    # Coverage
    header = ["feature", *engines]
    rows = []
    for f in FEATURES:
        row = [f]
        for e in engines:
            r = data["engines"][e].get("coverage", {}).get(f, {})
            v = r.get("verdict", "-")
            if "walks" in r:
                w = r["walks"]
                v += f" ({w['valid']}/{w['finished']} walks valid)"
            row.append(v)
        rows.append(row)
    emit(header, rows)
    # Mask application
    rows = []
    for env, r in data.get("mask_apply", {}).items():
        for name, s in r.items():
            if isinstance(s, dict):
                rows.append([env, name, g(s, "mean_us"), g(s, "p50_us"), g(s, "p99_us"), s.get("error", "")])
    emit(["python env", "bitmask -> -inf on [151936] float32", "mean us", "p50 us", "p99 us", "error"], rows)
    return "\n".join(lines)


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    p.add_argument("--out", type=Path, default=ROOT / "docs/grammar_engines.json")
    p.add_argument("--engines", nargs="*", default=list(ENGINES))
    p.add_argument("--repeat", type=int, default=3, help="passes over each schema's documents")
    p.add_argument("--runs", type=int, default=3, help="runs per schema; the least disturbed is reported")
    p.add_argument("--walks", type=int, default=12, help="random walks per coverage feature")
    p.add_argument("--cap", type=int, default=384, help="tokens per random walk at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-only", action="store_true", help="print the tables of --out, run nothing")
    p.add_argument("--markdown", action="store_true")
    ARGS = p.parse_args()
    if ARGS.table_only:
        print(table(json.loads(ARGS.out.read_text()), ARGS.markdown))
        return
    names = [e for e in ARGS.engines if importlib.util.find_spec(ENGINE_CLASSES[e].module)]
    if not names:
        raise SystemExit(f"none of {ARGS.engines} is importable in {sys.executable}")
    print(f"engines here: {names} ({sys.executable})", flush=True)
    vocab = load_vocab(ARGS.gguf)
    for name, (schema, docs) in BENCH.items():  # the documents are valid instances
        val = _validator(schema)
        for d in docs:
            assert val.is_valid(d), (name, d)
    env = Path(sys.prefix).name
    update: dict[str, Any] = {
        "machine": machine(),
        "vocab": {
            "gguf": ARGS.gguf.name,
            "size": VOCAB,
            "eos": EOS,
            "special_ids": len(vocab.special),
            "unused_ids": sum(ty == 5 for ty in vocab.types),
        },
        "method": {
            "repeat": ARGS.repeat,
            "runs": ARGS.runs,
            "walks": ARGS.walks,
            "walk_cap": ARGS.cap,
            "seed": ARGS.seed,
            "layout": {"item_separator": ITEM_SEP, "key_separator": KEY_SEP, "free_whitespace": False},
        },
        "engines": {},
    }
    masks: list[np.ndarray] = []
    for name in names:
        print(f"== {name}", flush=True)
        cls = ENGINE_CLASSES[name]
        facts = engine_facts(cls.dist, cls.module)
        engine = cls(vocab)
        started = time.perf_counter()
        load0 = [round(x, 2) for x in os.getloadavg()]
        r: dict[str, Any] = {
            **facts,
            "python": sys.executable,
            "options": engine.options(),
            "setup_s": round(engine.setup_s, 3),
            "setup_detail": {
                k: (round(v, 3) if isinstance(v, float) else v) for k, v in engine.setup_detail.items()
            },
        }
        print(f"  setup {engine.setup_s:.3f} s {r['setup_detail']}; import {facts}", flush=True)
        r["per_token"] = bench_schemas(engine, vocab, ARGS.repeat, ARGS.runs, masks if not masks else None)
        r["rollback"] = bench_rollback(engine, vocab)
        r["coverage"] = bench_coverage(engine, vocab, ARGS.walks, ARGS.cap, ARGS.seed)
        r["run"] = {
            "seconds": round(time.perf_counter() - started, 1),
            "loadavg_at_start": load0,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        update["engines"][name] = r
    print("== mask application", flush=True)
    step = max(1, len(masks) // 300)
    update["mask_apply"] = {env: bench_mask_apply(masks[::step])}
    data = merge_out(ARGS.out, update)
    print(f"wrote {ARGS.out}\n")
    print(table(data, ARGS.markdown))


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
