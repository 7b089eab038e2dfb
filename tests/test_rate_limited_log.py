"""pushgate_io.rate_limited_log.RateLimitedLog: the one rate-limited log (dataplane bad input, auth
service failed logins), driven by a stepped clock."""

import logging

import pytest

from push_protocol.drops import UsageError
from pushgate_io.rate_limited_log import RateLimitedLog

LOGGER = logging.getLogger("pushgate.test.ratelimit")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER.name)

    def written() -> list[str]:
        messages = [record.getMessage() for record in caplog.records]
        caplog.clear()
        return messages

    return written


def test_one_line_per_key_per_interval_then_the_count_held_back(lines):
    clock = Clock()
    log = RateLimitedLog(LOGGER, interval=10.0, clock=clock)
    assert log.warning("header", "bad header from %s", "198.18.0.1")
    assert not log.warning("header", "bad header from %s", "198.18.0.2")
    clock.now += 9.9
    assert not log.warning("header", "bad header from %s", "198.18.0.3")
    assert log.warning("tun", "TUN write failed: %s", "EIO")  # another key: its own budget
    assert lines() == ["bad header from 198.18.0.1", "TUN write failed: EIO"]
    clock.now += 0.1
    assert log.warning("header", "bad header from %s", "198.18.0.4")
    assert lines() == ["bad header from 198.18.0.4 (2 similar held back)"]
    clock.now += 10.0
    log.warning("header", "bad header from %s", "198.18.0.5")
    assert lines() == ["bad header from 198.18.0.5"]  # the count starts again


def test_keys_beyond_the_bound_share_one_line_and_memory_stays_bounded(lines):
    clock = Clock()
    log = RateLimitedLog(LOGGER, interval=10.0, max_keys=3, clock=clock)
    for n in range(1000):  # distinct names, as a password spray sends them
        log.warning(f"u{n}", "login failed user=%r", f"u{n}")
        assert len(log) <= 3
    assert lines() == [
        "login failed user='u0'",
        "login failed user='u1'",
        "login failed user='u2'",
        "login failed user='u3'",  # the first of the others
    ]
    clock.now += 10.0
    log.warning("u999", "login failed user=%r", "u999")
    assert lines() == ["login failed user='u999' (and 996 more lines held back for other keys)"]


def test_prune_forgets_keys_quiet_for_an_interval(lines):
    clock = Clock()
    log = RateLimitedLog(LOGGER, interval=10.0, max_keys=2, clock=clock)
    log.warning("alice", "a")
    clock.now += 5.0
    log.warning("bob", "b")
    clock.now += 5.0
    log.prune()
    assert len(log) == 1  # alice's interval is over, bob's is not
    log.warning("carol", "c")  # room again: a line of her own
    assert lines() == ["a", "b", "c"]


@pytest.mark.parametrize(("interval", "max_keys"), [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_a_log_that_could_not_work_is_a_usage_error(interval, max_keys):
    with pytest.raises(UsageError, match="no rate-limited log"):
        RateLimitedLog(LOGGER, interval, max_keys)
