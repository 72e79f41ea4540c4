"""Logging: text or JSON lines, with run id, worker id, chunk id and attempt where known."""

from __future__ import annotations

import json
import logging
import sys
import time

CONTEXT_FIELDS = ("run_id", "worker", "chunk", "attempt")


class _ContextFilter(logging.Filter):
    """Fills every record with the process-wide context (run id, worker id)."""

    context: dict = {}

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.context.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "logger": record.name,
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        extra = getattr(record, "fields", None)
        if extra:
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        ctx = " ".join(
            f"{key}={getattr(record, key)}"
            for key in CONTEXT_FIELDS
            if getattr(record, key, None) is not None
        )
        extra = getattr(record, "fields", None) or {}
        tail = " ".join(f"{k}={v}" for k, v in extra.items())
        line = f"{stamp} {record.levelname:<5} {ctx} {record.getMessage()} {tail}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_filter = _ContextFilter()


def setup(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pika", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def bind(**context: object) -> None:
    """Set process-wide context fields (e.g. run_id, worker) on every later line."""
    _filter.context.update({k: v for k, v in context.items() if v is not None})


def chunk_extra(chunk: int, attempt: int | None = None, **fields: object) -> dict:
    """`extra=` for a log call about a chunk."""
    return {"chunk": chunk, "attempt": attempt, "fields": fields or None}
