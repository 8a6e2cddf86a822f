"""Logging setup for the server process: plain text or one JSON object per line (``log_format=json``).

The access log writes a line per request, so lines are written in batches (``BufferedHandler``) and records skip
the caller lookup; a line reaches stderr within ``FLUSH_S``, warnings and errors at once.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}`` plus ``request_id``/``worker`` when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "worker", "model"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


FLUSH_S = 0.1
MAX_BUFFERED = 512


class BufferedHandler(logging.Handler):
    """Formats each record at once and writes them to stderr in batches: every ``FLUSH_S`` seconds (a daemon
    thread), when ``MAX_BUFFERED`` lines wait, or at once for a warning or an error."""

    def __init__(self) -> None:
        super().__init__()
        self._lines: list[str] = []
        threading.Thread(target=self._flush_periodically, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self._lines) >= MAX_BUFFERED:
            self._write()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()

    def _flush_periodically(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            self.flush()


def configure(log_format: str) -> None:
    logging._srcfile = None  # no caller lookup per record (the logging HOWTO's "Optimization")
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = BufferedHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
