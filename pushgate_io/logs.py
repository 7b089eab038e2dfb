"""One way for every pushgate service to log: `--log-level` and `--log-format`.

Text (the default) is for a person at a terminal or journald:

    2026-12-03 07:40:46,123 INFO pushgate.auth: session=0x0ac35e44 user='alice' ended: logout

JSON is one object a line, for a log shipper (Loki, Elasticsearch, journald's
JSON export), with the same five keys from every service:

    {"time": "2026-12-03T07:40:46.123Z", "level": "info", "service": "pushgate-auth",
     "event": "session=0x0ac35e44 user='alice' ended: logout",
     "fields": {"logger": "pushgate.auth"}}

`event` is the rendered message; `fields` holds the logger's name, whatever a call
passes as `extra={"fields": {...}}`, and a traceback under `exception`. What goes
into a message is the caller's care: no password, key, token or secret is ever
logged (tests/test_logs.py runs a gateway at debug level and looks for them).
"""

import argparse
import datetime
import json
import logging
import sys

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--log-level`, `--log-format`, and `-v` (the same as `--log-level debug`)."""
    parser.add_argument(
        "--log-level", choices=LEVELS, help="the least severe level logged (default info)"
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text lines (default) or one JSON object a line: time, level, service, event, fields",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="--log-level debug")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        fields = {"logger": record.name}
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            fields.update(extra)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        return json.dumps(
            {
                "time": moment.strftime("%Y-%m-%dT%H:%M:%S.")
                + f"{moment.microsecond // 1000:03d}Z",
                "level": record.levelname.lower(),
                "service": self.service,
                "event": record.getMessage(),
                "fields": fields,
            },
            default=str,
            ensure_ascii=False,
        )


def configure(service: str, args: argparse.Namespace, stream=None) -> None:
    """Set up the root logger from the parsed arguments (see `add_arguments`)."""
    level = "debug" if args.verbose else (args.log_level or "info")
    handler = logging.StreamHandler(stream or sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
