"""`pushgate-auth`: the gRPC auth service (client API over TLS, session feed on a Unix socket)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pushgate-auth",
        description="the gRPC auth service (client API over TLS, session feed on a Unix socket)",
    )
    parser.parse_args(argv)
    print("pushgate-auth: not built yet (issue 3)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
