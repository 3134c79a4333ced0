"""Error types for mistakes a user can make: the CLI prints their message, not a traceback."""

from __future__ import annotations


class HandoffError(Exception):
    """Base of every error whose message is meant for the user."""


class ShapeError(HandoffError, ValueError):
    """An array given to the math has the wrong shape, dtype or values."""


class ModelError(HandoffError):
    """A model file is missing, corrupt, or not what it claims to be."""


class FetchError(HandoffError):
    """A model could not be downloaded from the package index."""


class VocabularyMismatch(HandoffError):
    """Two models do not share a vocabulary on their common id range."""


class CapacityError(HandoffError):
    """A limit is reached: sessions, context length, queue depth (gRPC RESOURCE_EXHAUSTED)."""


class VerifierError(HandoffError):
    """A verifier request failed; `code` is the gRPC status code name, e.g. "INVALID_ARGUMENT"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        # Pickled whole (e.g. from a Ray Serve replica to its proxy): the default pickles only args.
        return (type(self), (self.code, str(self)))
