"""Logs: one schema from every service (`--log-format json`: time, level, service,
event, fields), `--log-level`, and no secret in them even at debug level."""

import argparse
import base64
import io
import json
import logging
import signal
import sqlite3
import subprocess
import time

import pytest

from netlab import Lab, wait_for
from netlab.gateway import LAN_HOST, METRICS_PORT, PASSWORD, GatewayLab, tool
from pushgate_io import logs

KEYS = {"time", "level", "service", "event", "fields"}


def configured(*argv: str) -> tuple[io.StringIO, logging.Logger]:
    parser = argparse.ArgumentParser()
    logs.add_arguments(parser)
    stream = io.StringIO()
    logs.configure("pushgate-test", parser.parse_args(argv), stream)
    return stream, logging.getLogger("pushgate.test")


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_have_the_one_schema():
    stream, log = configured("--log-format", "json", "--log-level", "debug")
    log.debug("session=%#010x installed", 0x0AC35E44, extra={"fields": {"session": "0x0ac35e44"}})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert set(first) == KEYS == set(second)
    assert first["level"] == "debug" and first["service"] == "pushgate-test"
    assert first["event"] == "session=0x0ac35e44 installed"
    assert first["fields"] == {"logger": "pushgate.test", "session": "0x0ac35e44"}
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert second["level"] == "error" and "ValueError: boom" in second["fields"]["exception"]


def test_the_level_filters_and_text_stays_the_default():
    stream, log = configured("--log-level", "warning")
    log.info("not shown")
    log.warning("shown %d", 1)
    (line,) = stream.getvalue().splitlines()
    assert line.endswith("WARNING pushgate.test: shown 1")
    stream, log = configured("-v")
    log.debug("debug too")
    assert "DEBUG pushgate.test: debug too" in stream.getvalue()


def encodings(secret: bytes) -> set[str]:
    """How a secret could appear in a log line."""
    return {
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
    }


@pytest.mark.netns
def test_a_debug_run_of_the_gateway_logs_json_and_no_secret(tmp_path):
    """Auth service and dataplane at debug level, in JSON, while a client logs in,
    passes traffic, rekeys, roams and logs out: every line has the schema, and no
    line holds the password, a session key (current or previous, as the database has
    them while the session lives) or a line of a private key."""
    flags = ["--log-level", "debug", "--log-format", "json"]
    with Lab("pglogs") as lab:
        gateway = GatewayLab(lab, str(tmp_path))
        gateway.add_user("alice")
        gateway.auth = lab.start(
            gateway.gw,
            [tool("pushgate-auth"), "--config", gateway.config, *flags],
            stdout=gateway._log("auth"),
            stderr=subprocess.STDOUT,
        )
        gateway.dataplane = lab.start(
            gateway.gw,
            [
                *(tool("pushgate-dataplane"), "--config", gateway.config, *flags),
                *("--metrics-listen", f"127.0.0.1:{METRICS_PORT}"),
            ],
            stdout=gateway._log("dataplane"),
            stderr=subprocess.STDOUT,
        )
        wait_for(gateway._scrape_or_none, 20, what="the dataplane's /metrics")
        lab.exec(gateway.gw, [tool("pushgate-nat"), "--config", gateway.config, gateway.lan_dev])
        gateway.connect(0, "alice")
        gateway.ping(0, LAN_HOST, count=3)
        gateway.signal_client(0, signal.SIGUSR2)  # rekey now
        time.sleep(1)
        gateway.signal_client(0, signal.SIGUSR1)  # a new source port
        gateway.ping(0, LAN_HOST, count=3)
        database = sqlite3.connect(f"file:{tmp_path / 'pushgate.db'}?mode=ro", uri=True)
        with database:
            rows = database.execute(
                "SELECT c2s_key, s2c_key, previous_c2s_key, previous_s2c_key FROM sessions"
            ).fetchall()
        database.close()
        keys = {key for row in rows for key in row if key}
        assert len(keys) >= 4  # the rekeyed session's current and previous keys
        gateway.disconnect(0)
        lab.stop(gateway.dataplane)
        lab.stop(gateway.auth)

    secrets = {PASSWORD} | {text for key in keys for text in encodings(key)}
    for name in ("ca.key", "server.key"):
        path = tmp_path / "tls" / name
        if path.exists():
            body = path.read_text().splitlines()[1:-1]
            secrets |= {line for line in body if len(line) > 16}
    for service in ("auth", "dataplane"):
        text = (tmp_path / f"{service}.log").read_text()
        records = []
        for line in text.splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
            else:  # gRPC's C core writes its own lines to stderr: none expected
                pytest.fail(f"{service}: not a JSON line: {line!r}")
        assert records, service
        for record in records:
            assert set(record) == KEYS, record
            assert record["service"] == f"pushgate-{service}"
        assert any(record["level"] == "debug" for record in records), service
        for secret in secrets:
            assert secret not in text, f"{service}.log holds a secret ({secret[:6]}...)"


def test_the_log_audit_finds_a_planted_password_key_line_and_a_stray_line(tmp_path):
    from netlab import log_audit

    (tmp_path / "gw" / "tls").mkdir(parents=True)
    key_line = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg"
    (tmp_path / "gw" / "tls" / "server.key").write_text(
        f"-----BEGIN PRIVATE KEY-----\n{key_line}\n-----END PRIVATE KEY-----\n"
    )
    good = {"time": "t", "level": "info", "service": "pushgate-auth", "event": "e", "fields": {}}
    (tmp_path / "gw" / "auth.log").write_text(json.dumps(good) + "\n")
    (tmp_path / "gw" / "dataplane.log").write_text(json.dumps(good) + "\n")
    assert log_audit.audit(tmp_path) == []
    (tmp_path / "gw" / "client0.log").write_text(f"password {PASSWORD}\n")
    (tmp_path / "gw" / "dataplane.log").write_text(f"{json.dumps(good)}\nkey {key_line}\n")
    problems = log_audit.audit(tmp_path)
    assert any("client0.log: holds a secret (correc" in p for p in problems)
    assert any("dataplane.log: holds a secret (MIGHAg" in p for p in problems)
    assert any("dataplane.log:2: not JSON" in p for p in problems)
