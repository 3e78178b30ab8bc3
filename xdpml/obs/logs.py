"""Logs to stdout, where `kubectl logs` and journald pick them up.

    setup_logging("text", "info")    # 2026-11-23T14:58:00.123Z INFO  agent.loader: attached eth0 mode=native
    setup_logging("json", "debug")   # {"ts": "...", "level": "info", "logger": "...", "msg": "...", ...}

Text is for people; JSON lines are for log pipelines (Loki, Elasticsearch), one object
per line, never split. Structured fields passed as ``extra={...}`` appear as key=value in
text and as top-level keys in JSON, so "what" and "which" stay machine-readable.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from xdpml.errors import ConfigError

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}

# Marks the handler this module installed, so a second call replaces it rather than
# doubling every line, and handlers others installed (pytest's caplog) are left alone.
_MARK = "_xdpml_handler"


class LoggingConfigError(ConfigError):
    """Unknown log format or level; the message lists the allowed ones."""


def _utc_iso(created: float) -> str:
    secs = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{int((created - secs) * 1000):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc_iso(record.created)} {record.levelname:<5} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(v: Any) -> str:
    s = str(v)
    # Quote values with spaces or quotes so key=value stays parseable.
    return json.dumps(s) if (not s or any(c in s for c in ' "=')) else s


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in _extras(record).items():
            doc.setdefault(k, v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that is not JSON (a Path, an exception) must never make
        # the log line itself fail.
        return json.dumps(doc, default=str, ensure_ascii=False)


def setup_logging(fmt: str = "text", level: str = "info", *, stream: IO[str] | None = None) -> logging.Handler:
    """Send the root logger to ``stream`` (default stdout) as text or JSON lines.

    Calling it again replaces the previous configuration. Returns the handler.
    Raises LoggingConfigError for an unknown format or level.
    """
    fmt_l = str(fmt).lower()
    level_l = str(level).lower()
    if fmt_l not in FORMATS:
        raise LoggingConfigError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if level_l not in LEVELS:
        raise LoggingConfigError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt_l == "json" else TextFormatter())
    setattr(handler, _MARK, True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _MARK, False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level_l.upper()))
    # Third-party chatter at INFO (gRPC, kubernetes client's urllib3) drowns the
    # agent's own summary lines; keep it to warnings unless debugging.
    noisy_level = logging.DEBUG if level_l == "debug" else logging.WARNING
    for name in ("urllib3", "kubernetes", "grpc"):
        logging.getLogger(name).setLevel(noisy_level)
    return handler
