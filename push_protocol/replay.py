"""Sliding replay window, RFC 6479 style.

A ring of 64-bit words holds one bit per counter. Moving the window forward
clears whole words instead of shifting bits, so an update costs O(1) amortised.
One word is always being recycled, so counters up to REPLAY_WINDOW_SIZE - 1
behind the highest seen are tracked exactly; older ones are rejected.

The ring is an array of unsigned 64-bit words, allocated on the first update:
an installed session that never received a packet holds no ring at all.

Use `check` before decrypting (cheap, changes nothing) and `update` only after
the packet authenticated, so forged packets cannot move the window.
"""

from array import array

from .constants import REPLAY_RING_WORDS, REPLAY_WINDOW_SIZE, REPLAY_WORD_BITS
from .drops import DropReason, Replayed, TooOld

_WORD_SHIFT = REPLAY_WORD_BITS.bit_length() - 1  # 6
_BIT_MASK = REPLAY_WORD_BITS - 1
_RING_MASK = REPLAY_RING_WORDS - 1


class ReplayWindow:
    __slots__ = ("_ring", "highest")

    def __init__(self) -> None:
        self._ring: array | None = None  # allocated by the first update
        self.highest = -1  # the highest counter accepted so far; read-only outside

    def rejects(self, counter: int) -> DropReason | None:
        """Why `counter` must not be accepted (`too_old`, `replay`), or None."""
        if counter > self.highest:  # always true before the first update
            return None
        if self.highest - counter >= REPLAY_WINDOW_SIZE:
            return DropReason.TOO_OLD
        word = self._ring[(counter >> _WORD_SHIFT) & _RING_MASK]
        if word >> (counter & _BIT_MASK) & 1:
            return DropReason.REPLAY
        return None

    def check(self, counter: int) -> None:
        """Raise `Replayed` or `TooOld` if `counter` must not be accepted."""
        reason = self.rejects(counter)
        if reason is DropReason.TOO_OLD:
            raise TooOld(f"counter {counter} is behind window ending at {self.highest}")
        if reason is DropReason.REPLAY:
            raise Replayed(f"counter {counter}")

    def update(self, counter: int) -> None:
        """Check `counter` and record it as seen."""
        highest = self.highest
        if counter == highest + 1 and counter & _BIT_MASK:  # the next one, in the same word
            self._ring[counter >> _WORD_SHIFT & _RING_MASK] |= 1 << (counter & _BIT_MASK)
            self.highest = counter
            return
        ring = self._ring
        index = counter >> _WORD_SHIFT
        if counter > highest:
            if ring is None:
                ring = self._ring = array("Q", bytes(8 * REPLAY_RING_WORDS))
            current = highest >> _WORD_SHIFT
            if index != current:  # the window moves into new words: clear them
                for step in range(1, min(index - current, REPLAY_RING_WORDS) + 1):
                    ring[(current + step) & _RING_MASK] = 0
            self.highest = counter
        else:
            self.check(counter)
        ring[index & _RING_MASK] |= 1 << (counter & _BIT_MASK)
