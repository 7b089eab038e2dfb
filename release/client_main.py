"""Entry point of the one-file pushgate-client executable (PyInstaller)."""

import sys

from client.cli import main

if __name__ == "__main__":
    sys.exit(main())
