"""Logging setup: human-readable lines, or one JSON object per line for log collectors."""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else was passed in `extra=` and is kept as a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# llama.cpp's own log lines (shared/llama_cpp_model.py routes them here, one record per line).
NATIVE_LOGGER = "llama.cpp"


def setup_logging(level: str = "WARNING", fmt: str = "text", native: bool = False) -> None:
    """Configure the root logger once, on stderr.

    Args:
        level: the Python logging level.
        fmt: "text", or "json" for one object per line.
        native: show llama.cpp's own log (model loading, its warnings about model files); hidden
            otherwise, whatever `level` is, because it is noise to a user of a working model.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    show_native_logs(native)


def show_native_logs(show: bool) -> None:
    """Let llama.cpp's log through (every level) or drop it (the default of the command line)."""
    logging.getLogger(NATIVE_LOGGER).setLevel(logging.DEBUG if show else logging.CRITICAL + 1)


def native_logs_shown() -> bool:
    """Whether llama.cpp's log reaches a handler (decides llama-cpp-python's `verbose` too)."""
    return logging.getLogger(NATIVE_LOGGER).isEnabledFor(logging.INFO)
