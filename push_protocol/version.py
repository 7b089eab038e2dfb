"""Which pushgate this is: every command's `--version` and the servers'
`pushgate_build_info` metric, from the installed package's metadata (the version
in pyproject.toml; the client executable bundles that metadata), and which hot
path runs: the compiled one (setup.py) or the pure-Python reference."""

import argparse
from importlib import metadata


def version() -> str:
    try:
        return metadata.version("pushgate")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def hot_path() -> str:
    """ "compiled" where the packet cipher and the TUN write merge both run
    compiled, "python" where both run the reference (not built, or
    PUSHGATE_PURE_PYTHON), "partly compiled" otherwise."""
    # (imported here: pushgate_io builds on push_protocol, not the other way)
    from pushgate_io import tso

    from . import codec

    compiled = codec.COMPILED + tso.COMPILED
    return ("python", "partly compiled", "compiled")[compiled]


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version()} (hot path: {hot_path()})"
    )


def register_build_info(registry) -> None:
    """`pushgate_build_info{version="...", hot_path="..."} 1` in a prometheus_client
    registry, which every
    service creates first: it also turns off prometheus_client's `*_created` series
    (a timestamp sample per counter and histogram child that doubles the series count
    and that no rule or dashboard reads)."""
    # (imported here: the client executable has no metrics and no prometheus_client)
    from prometheus_client import Info, disable_created_metrics

    disable_created_metrics()

    Info("pushgate_build", "The running pushgate", registry=registry).info(
        {"version": version(), "hot_path": hot_path()}
    )
