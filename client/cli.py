"""`pushgate-client`: the pushgate VPN client (connect, status, disconnect)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pushgate-client", description="the pushgate VPN client (connect, status, disconnect)"
    )
    parser.parse_args(argv)
    print("pushgate-client: not built yet (issue 5)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
