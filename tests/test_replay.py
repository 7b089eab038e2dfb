import pytest

from push_protocol.constants import REPLAY_WINDOW_SIZE
from push_protocol.drops import Replayed, TooOld
from push_protocol.replay import ReplayWindow


def test_window_is_at_least_2048():
    assert REPLAY_WINDOW_SIZE >= 2048


# Table-driven, as wireguard-go's replay_test.go: (counter, accepted?) in order.
W = REPLAY_WINDOW_SIZE
CASES = [
    (0, True),
    (1, True),
    (1, False),
    (9, True),
    (8, True),
    (7, True),
    (7, False),
    (W, True),
    (W - 1, True),
    (W - 1, False),
    (0, False),  # W - 0 >= W behind the highest: too old
    (1, False),  # W - 1 behind: inside the window, and seen before
    (2, True),
    (2, False),
    (W + 10, True),
    (11, True),
    (10, False),  # too old now
    (3 * W, True),  # a jump clears everything in between
    (3 * W - 1, True),
    (2 * W + 1, True),
    (2 * W, False),
    (3 * W, False),
    (2**64 - 1, True),
    (2**64 - 1, False),
    (2**64 - W, True),
    (2**64 - W - 1, False),
]


def test_replay_table():
    window = ReplayWindow()
    for step, (counter, accepted) in enumerate(CASES):
        if accepted:
            window.update(counter)
        else:
            with pytest.raises((Replayed, TooOld)):
                window.update(counter)
        assert window.highest == max(c for c, ok in CASES[: step + 1] if ok)


def test_check_does_not_record():
    window = ReplayWindow()
    window.check(5)
    window.check(5)
    window.update(5)
    with pytest.raises(Replayed):
        window.check(5)


def test_errors_distinguish_duplicate_from_too_old():
    window = ReplayWindow()
    window.update(W + 100)
    with pytest.raises(Replayed):
        window.update(W + 100)
    with pytest.raises(TooOld):
        window.update(99)


def test_accepts_any_order_inside_the_window():
    window = ReplayWindow()
    counters = list(range(W))
    for counter in reversed(counters):
        window.update(counter)
    for counter in counters:
        with pytest.raises(Replayed):
            window.update(counter)
