"""Model runtimes behind `cloud.backend.Backend`: llama.cpp and transformers."""
