"""Choose and build the model backend for `handoff serve-cloud`."""

from __future__ import annotations

import logging

from handoff.cloud.backend import Backend
from handoff.cloud.settings import CloudSettings
from handoff.shared.errors import HandoffError
from handoff.shared.models import resolve
from handoff.shared.settings import HandoffSettings, get_settings

logger = logging.getLogger(__name__)


def pick_backend(settings: CloudSettings) -> str:
    """`auto` means transformers where CUDA is usable, llama.cpp elsewhere (it loads in seconds on CPU)."""
    if settings.backend != "auto":
        return settings.backend
    try:
        import torch

        return "transformers" if torch.cuda.is_available() else "llama.cpp"
    except ImportError:
        return "llama.cpp"


def load_backend(settings: CloudSettings, handoff: HandoffSettings | None = None) -> Backend:
    """Resolve the model (fetching a registry model if needed) and load it in the chosen backend."""
    handoff = handoff or get_settings()
    ref = resolve(settings.model, "cloud", handoff)
    kind = pick_backend(settings)
    logger.info("loading %s with the %s backend", ref.name, kind)
    if kind == "transformers":
        from handoff.cloud.backends.transformers_backend import TransformersBackend

        return TransformersBackend(
            ref,
            device=settings.device,
            dtype=settings.dtype,
            max_context=settings.max_context,
            settings=handoff,
            threads=settings.threads,
            max_sequences=settings.max_sessions,
            max_batch_tokens=settings.max_batch_tokens,
            deterministic=settings.deterministic,
        )
    if ref.kind != "gguf":
        raise HandoffError(f"the llama.cpp backend needs a GGUF file; {ref.path} is a Hugging Face directory")
    from handoff.cloud.backends.llama_backend import LlamaCppBackend

    return LlamaCppBackend(
        ref,
        max_sequences=settings.max_sessions,
        max_context=settings.max_context,
        threads=settings.threads,
        settings=handoff,
        kv_cache_tokens=settings.kv_cache_tokens,
        kv_unified=settings.kv_unified,
        deterministic=settings.deterministic,
        deterministic_path=settings.deterministic_path,
    )
