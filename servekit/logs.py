"""Logging setup for the server process: plain text or one JSON object per line (``log_format=json``).

The access log writes a line per request, so lines are written in batches (``BufferedHandler``) and records skip
the caller lookup; a line reaches stderr within ``FLUSH_S``, warnings and errors at once.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LineFormatter(logging.Formatter):
    """A formatter that can also format an INFO line without a ``LogRecord`` (``line``), for the access log."""

    def line(self, logger: str, message: str, created: float) -> str:
        raise NotImplementedError


class JsonFormatter(LineFormatter):
    """``{"time", "level", "logger", "message"}`` plus ``request_id``/``worker`` when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        entry = self._entry(record.created, record.levelname, record.name, record.getMessage())
        for key in ("request_id", "worker", "model"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)

    def line(self, logger: str, message: str, created: float) -> str:
        return json.dumps(self._entry(created, "INFO", logger, message))

    @staticmethod
    def _entry(created: float, level: str, logger: str, message: str) -> dict[str, str]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"
        return {"time": stamp, "level": level, "logger": logger, "message": message}


class TextFormatter(LineFormatter):
    """``TEXT_FORMAT``, with the date and time formatted once a second rather than once a line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time(record.created)

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int(created % 1 * 1000):03d}"

    def line(self, logger: str, message: str, created: float) -> str:
        return f"{self._time(created)} INFO {logger}: {message}"


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

    def line(self, logger: str, message: str) -> None:
        """An INFO line of ``logger``, formatted as its record would be, without building one (the access log's
        line per request: a ``LogRecord`` and its trip through the logging machinery cost more than the line)."""
        formatter = self.formatter
        assert isinstance(formatter, LineFormatter)
        text = formatter.line(logger, message, time.time())
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(text)
            if len(self._lines) >= MAX_BUFFERED:
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


def info_writer(logger: logging.Logger) -> Callable[[str], None] | None:
    """A fast writer of INFO lines for ``logger`` (``BufferedHandler.line``) when it logs INFO to our handler
    alone, as ``configure`` sets up; ``None`` when logging is set up otherwise or INFO is off."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    handlers = logging.getLogger().handlers
    if logger.handlers or not logger.propagate or len(handlers) != 1 or not isinstance(handlers[0], BufferedHandler):
        return None
    handler = handlers[0]
    if not isinstance(handler.formatter, LineFormatter) or handler.level > logging.INFO or handler.filters:
        return None
    return functools.partial(handler.line, logger.name)


def configure(log_format: str) -> None:
    logging._srcfile = None  # no caller lookup per record (the logging HOWTO's "Optimization")
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = BufferedHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # The lines of the last FLUSH_S before exit: logging's own flush at exit misses this handler once uvicorn's
    # dictConfig has cleared logging's list of handlers (it stays the root's handler all the same).
    atexit.register(handler.flush)
