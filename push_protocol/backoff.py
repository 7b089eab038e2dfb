"""Exponential backoff with jitter, one implementation for every retry loop.

Each delay is drawn from [ceiling / 2, ceiling], the ceiling doubling from
`first` up to `cap`: retries spread out (no herd after an outage) and never
come sooner than half the ceiling. `reset` after a success. Pure: the random
source is passed in, so tests are deterministic.
"""

import random


class Backoff:
    __slots__ = ("_random", "attempt", "cap", "first")

    def __init__(self, first: float, cap: float, rng: random.Random | None = None) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"backoff needs 0 < first <= cap, not {first}, {cap}")
        self.first, self.cap, self.attempt = first, cap, 0
        self._random = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.first * 2 ** min(self.attempt, 64))
        self.attempt += 1
        return self._random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
