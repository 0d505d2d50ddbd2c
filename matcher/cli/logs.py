"""How the commands write their log: the text line (the default) or one JSON object per line.

``--log-format json`` is for log shippers (journald, Loki, Elasticsearch). Each record
becomes one object with ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``,
plus the record's own ``key=value`` fields as typed JSON values: the request log's lines
(``rpc=%s request_id=%s lane_id=%s decision=%s ...``, service/outcome.py) carry rpc,
request_id, lane_id, decision, reason, score, faces, frames_used, batch_queue_ms,
total_ms. The fields are read from the record's format string and arguments, so the JSON
carries exactly what the text line does and no call site writes a log line twice; like
the text line, it never holds a template, an image or a document.
"""
from __future__ import annotations

import json
import logging
import math
import re
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
RESERVED = ("time", "level", "logger", "message", "exc")
# One printf conversion of a log format string ("%%" is a literal percent sign).
_CONVERSION = re.compile(r"%(?:%|[-#0 +]*\d*(?:\.(\d+))?([sdifgrxe]))")
# key=VALUE in a format string: VALUE is one conversion or literal text up to a space.
_PAIR = re.compile(r"(?<![\w.])([a-z][a-z0-9_]*)=(%[-#0 +]*\d*(?:\.\d+)?[sdifgrxe]|[^\s%,;()]+)")
# Text fields the request log formats as numbers itself ("%.3f" of the score, "-" when
# there is none): JSON carries them as numbers.
NUMERIC_TEXT = frozenset({"score"})
ABSENT = "-"  # how the text log writes "no value"


def _typed(key: str, conversion: str, value: object) -> object:
    """A JSON value for one argument, as the text line would have shown it."""
    if value is None or (isinstance(value, str) and value == ABSENT):
        return None
    match = _CONVERSION.fullmatch(conversion)
    kind, decimals = (match.group(2), match.group(1)) if match else ("s", None)
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    if isinstance(value, int | float):
        if kind in "fe" and decimals is not None:
            return round(float(value), int(decimals))
        if kind in "di":
            return int(value)
        return value
    if isinstance(value, str):
        if key in NUMERIC_TEXT:
            try:
                return float(value)
            except ValueError:
                return value
        return value
    return conversion % (value,) if match else str(value)


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The ``key=value`` fields of a record's format string, with its arguments' values."""
    msg, args = record.msg, record.args
    if not isinstance(msg, str):
        return {}
    if not isinstance(args, tuple):
        args = ()
    # Which argument each conversion consumes, by its position in the format string.
    slots: dict[int, int] = {}
    for match in _CONVERSION.finditer(msg):
        if match.group(0) != "%%":
            slots[match.start()] = len(slots)
    if len(slots) != len(args):
        return {}  # not a plain printf-style record: its message stands alone
    fields: dict[str, object] = {}
    for match in _PAIR.finditer(msg):
        key, value = match.group(1), match.group(2)
        if key in RESERVED or key in fields:
            continue
        if value.startswith("%"):
            fields[key] = _typed(key, value, args[slots[match.start(2)]])
        else:
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (json.dumps escapes every newline)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(record_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: int, log_format: str = "text") -> None:
    """The root logger's one handler (stderr), in ``log_format`` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    # force: a JSON log replaces any handler set up before; the text log, as it always
    # did, leaves an existing one (an embedding program's, or a test runner's) alone.
    logging.basicConfig(level=level, handlers=[handler], force=log_format == "json")
    # Python's warnings become records too, so a JSON log holds nothing but JSON lines.
    logging.captureWarnings(log_format == "json")
