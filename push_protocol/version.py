"""Which pushgate this is: every command's `--version` and the servers'
`pushgate_build_info` metric, from the installed package's metadata (the version
in pyproject.toml; the client executable bundles that metadata)."""

import argparse
from importlib import metadata


def version() -> str:
    try:
        return metadata.version("pushgate")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")


def register_build_info(registry) -> None:
    """`pushgate_build_info{version="..."} 1` in a prometheus_client registry."""
    from prometheus_client import Info  # (not in the client executable, which has no metrics)

    Info("pushgate_build", "The running pushgate", registry=registry).info({"version": version()})
