"""`pushgate-admin`: gateway administration (init, users)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pushgate-admin", description="gateway administration (init, users)"
    )
    parser.parse_args(argv)
    print("pushgate-admin: not built yet (issue 3)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
