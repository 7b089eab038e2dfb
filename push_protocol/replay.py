"""Sliding replay window, RFC 6479 style.

A ring of 64-bit words holds one bit per counter. Moving the window forward
clears whole words instead of shifting bits, so an update costs O(1) amortised.
One word is always being recycled, so counters up to REPLAY_WINDOW_SIZE - 1
behind the highest seen are tracked exactly; older ones are rejected.

Use `check` before decrypting (cheap, changes nothing) and `update` only after
the packet authenticated, so forged packets cannot move the window.
"""

from .constants import REPLAY_RING_WORDS, REPLAY_WINDOW_SIZE, REPLAY_WORD_BITS
from .drops import Replayed, TooOld

_WORD_SHIFT = REPLAY_WORD_BITS.bit_length() - 1  # 6
_BIT_MASK = REPLAY_WORD_BITS - 1
_RING_MASK = REPLAY_RING_WORDS - 1


class ReplayWindow:
    __slots__ = ("_highest", "_ring")

    def __init__(self) -> None:
        self._ring = [0] * REPLAY_RING_WORDS
        self._highest = -1  # nothing seen yet

    @property
    def highest(self) -> int:
        """The highest counter accepted so far, -1 before the first."""
        return self._highest

    def check(self, counter: int) -> None:
        """Raise `Replayed` or `TooOld` if `counter` must not be accepted."""
        if counter > self._highest:
            return
        if self._highest - counter >= REPLAY_WINDOW_SIZE:
            raise TooOld(f"counter {counter} is behind window ending at {self._highest}")
        word = self._ring[(counter >> _WORD_SHIFT) & _RING_MASK]
        if word >> (counter & _BIT_MASK) & 1:
            raise Replayed(f"counter {counter}")

    def update(self, counter: int) -> None:
        """Check `counter` and record it as seen."""
        self.check(counter)
        index = counter >> _WORD_SHIFT
        if counter > self._highest:
            current = self._highest >> _WORD_SHIFT
            for step in range(1, min(index - current, REPLAY_RING_WORDS) + 1):
                self._ring[(current + step) & _RING_MASK] = 0
            self._highest = counter
        self._ring[index & _RING_MASK] |= 1 << (counter & _BIT_MASK)
