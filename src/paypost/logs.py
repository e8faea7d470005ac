"""Structured JSON logs (NFR7): one JSON object per line, PAN-redacted as the last step.

Every line carries `timestamp`, `level`, `logger`, `event` and whatever is bound in the
current context: a stage binds `correlation-id` and `tenant` (and anything else) with
`log_context(...)`, so every line of that work carries them without passing them around.

The final processor runs `paypost.security.tokens.redact` over the rendered line: any
Luhn-valid 13–19 digit number that slipped into a log call is masked (defence in depth;
no code should log a PAN in the first place, DESIGN §3.4).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, WrappedLogger

from paypost.security.tokens import redact

LOG_LEVEL_ENV = "PAYPOST_LOG_LEVEL"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _redact_rendered(_logger: WrappedLogger, _name: str, line: Any) -> Any:
    """Last processor: mask every Luhn-valid 13–19 digit number in the rendered line."""
    if isinstance(line, str):
        return redact(line)
    if isinstance(line, bytes):
        return redact(line.decode("utf-8", "replace")).encode("utf-8")
    return line


def _redact_values(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """For the console renderer (no final string pass possible on coloured output)."""
    for key, value in list(event_dict.items()):
        if isinstance(value, str):
            event_dict[key] = redact(value)
        elif not isinstance(value, int | float | bool) and value is not None:
            event_dict[key] = redact(repr(value))
    return event_dict


class _Stderr:
    """Whatever sys.stderr is at write time (test runners and CLIs swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(
    level: str = "info", *, json: bool = True, stream: TextIO | None = None
) -> None:
    """Configure structlog process-wide: JSON lines (default) or console, at LEVEL, to STREAM.

    STREAM defaults to stderr (stdout stays for command output).
    """
    lvl = _LEVELS.get(level.lower())
    if lvl is None:
        from paypost.config import UserError

        raise UserError(
            f"log level {level!r} is not one of {', '.join(_LEVELS)}: pick one of them."
        )
    out: TextIO = stream if stream is not None else cast(TextIO, _Stderr())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: list[Any]
    if json:
        renderer = [
            structlog.processors.UnicodeDecoder(),
            structlog.processors.JSONRenderer(sort_keys=False),
            _redact_rendered,
        ]
    else:
        renderer = [_redact_values, structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


class _NamedLogger:
    """A logger named NAME that follows the configuration in force at each call.

    Module-level loggers are created at import, before `configure_logging` runs; binding
    lazily keeps them on the current configuration.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def bind(self, **values: Any) -> Any:
        _ensure_configured()
        return structlog.get_logger().bind(logger=self._name, **values)

    def __getattr__(self, method: str) -> Any:
        _ensure_configured()
        return getattr(structlog.get_logger().bind(logger=self._name), method)


def _ensure_configured() -> None:
    # Never structlog's default (coloured text on stdout, no redaction): JSON on stderr.
    if not structlog.is_configured():
        configure_from_env()


def configure_from_env(default_level: str = "info") -> None:
    """JSON lines on stderr at $PAYPOST_LOG_LEVEL (else DEFAULT_LEVEL)."""
    configure_logging(os.environ.get(LOG_LEVEL_ENV) or default_level, json=True)


def get_logger(name: str) -> Any:
    """A structlog logger whose lines carry `logger=NAME` plus the bound context."""
    return _NamedLogger(name)


@contextmanager
def log_context(
    *, correlation_id: str | None = None, tenant: str | None = None, **extra: Any
) -> Iterator[None]:
    """Bind `correlation-id`, `tenant` (and EXTRA) on every log line inside the block."""
    values: MutableMapping[str, Any] = dict(extra)
    if correlation_id is not None:
        values["correlation-id"] = correlation_id
    if tenant is not None:
        values["tenant"] = tenant
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
