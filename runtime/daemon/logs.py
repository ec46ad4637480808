"""Logging to journald with structured fields, or readable lines on stderr.

Callers pass journal fields in `extra=` (CRI_METHOD, GRPC_CODE, POD_SANDBOX_ID,
CONTAINER_ID, ...). Under journald (JOURNAL_STREAM names our stderr, as systemd sets
it) records go to the journal natively so those fields are queryable with
`journalctl -o json`; otherwise they are appended to the stderr line as KEY=value.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

# Journal field names: upper-case letters, digits and underscores, not starting with '_'.
_FIELD = re.compile(r"^[A-Z][A-Z0-9_]*$")
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def journal_fields(record: logging.LogRecord) -> dict[str, str]:
    """The structured fields a record carries: upper-case attributes given via extra=."""
    return {k: str(v) for k, v in record.__dict__.items() if _FIELD.match(k)}


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to journald (JOURNAL_STREAM=dev:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


class StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"{ts}.{int(record.msecs):03d}Z {record.levelname:<7} "
            f"{record.name}: {record.getMessage()}"
        )
        fields = journal_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JournalHandler(logging.Handler):
    """Sends records to journald natively, keeping the extra= fields as journal fields."""

    def __init__(self, identifier: str = "arktos-vm-runtime") -> None:
        super().__init__()
        # python3-systemd; imported only under journald
        from systemd import journal  # type: ignore[attr-defined]

        self._send = journal.send
        self._identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            fields: dict[str, Any] = journal_fields(record)
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(
                message,
                PRIORITY=str(_SYSLOG_PRIORITY.get(record.levelno, 6)),
                SYSLOG_IDENTIFIER=self._identifier,
                LOGGER=record.name,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                **fields,
            )
        except Exception:
            self.handleError(record)


def setup(level: str = "info") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if stderr_is_journal():
        try:
            handler = JournalHandler()
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(StderrFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
