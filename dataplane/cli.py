"""`pushgate-dataplane`: the UDP push dataplane (one receive loop, server TUN, /metrics)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pushgate-dataplane",
        description="the UDP push dataplane (one receive loop, server TUN, /metrics)",
    )
    parser.parse_args(argv)
    print("pushgate-dataplane: not built yet (issue 4)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
