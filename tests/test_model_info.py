"""Model info for the two forms a cloud model can take: a GGUF file and a Hugging Face directory."""

from __future__ import annotations

import pytest

from handoff.shared.errors import ModelError
from handoff.shared.model_info import load_model_info
from handoff.shared.models import ModelRef, resolve
from handoff.shared.settings import HandoffSettings


@pytest.fixture(scope="module")
def hf_dir(tiny_gguf_a, tmp_path_factory):
    """Tiny model A converted by transformers into a Hugging Face directory (safetensors + tokenizer.json)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(tiny_gguf_a.parent), tiny_gguf_a.name
    out = tmp_path_factory.mktemp("hf-tiny-a")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: copy the weights
    # into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return out


def test_hf_directory_has_the_same_vocabulary_and_size_as_its_gguf(hf_dir, tiny_gguf_a, tmp_path):
    settings = HandoffSettings(cache_dir=tmp_path)
    ref = resolve(str(hf_dir), "cloud", settings)
    assert ref.kind == "hf"
    hf_info, hf_vocab = load_model_info(ref, settings)
    gguf_info, gguf_vocab = load_model_info(ModelRef("gguf", tiny_gguf_a, "tiny-a"), settings)
    assert hf_info.architecture == "Qwen2ForCausalLM"
    assert hf_info.vocab_size == gguf_info.vocab_size == 1022
    assert hf_vocab.fingerprint == gguf_vocab.fingerprint
    assert hf_info.parameter_count == gguf_info.parameter_count
    assert hf_info.context_length == gguf_info.context_length == 2048
    assert hf_info.quantization == "float32"


def test_hf_directory_without_tokenizer_is_a_clear_error(hf_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"has no tokenizer\.json"):
        load_model_info(resolve(str(broken), "cloud"), HandoffSettings(cache_dir=tmp_path))
