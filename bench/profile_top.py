"""Summarise py-spy collapsed stacks (`py-spy record -f raw`): where the time goes.

    python bench/profile_top.py STACKS.txt [N]

Prints the N (default 25) functions with the most samples on top of the stack
(self) and the most samples anywhere on the stack (inclusive), in % of all
samples, so a profile can be quoted in docs/performance.md as text.
"""

import collections
import sys


def _name(frame: str) -> str:
    """`Device._inbound (dataplane/device.py:163)` -> `Device._inbound (device.py)`."""
    function, _, where = frame.partition(" (")
    if not where:
        return frame
    return f"{function} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})"


def main(argv: list[str]) -> int:
    path, top = argv[0], int(argv[1]) if len(argv) > 1 else 25
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            samples = int(count)
            frames = [_name(frame) for frame in stack.split(";")]
            total += samples
            own[frames[-1]] += samples
            for frame in set(frames):
                inclusive[frame] += samples
    print(f"{total} samples")
    for title, table in (("self", own), ("inclusive", inclusive)):
        print(f"-- {title}")
        for frame, samples in table.most_common(top):
            print(f"{100 * samples / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
