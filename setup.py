"""The compiled part of pushgate; everything else is in pyproject.toml.

push_protocol/_codec.c (the packet cipher, against OpenSSL's libcrypto) and
pushgate_io/_offload.c (the TUN write merge and read cut) are built on Linux, where the gateway
and the Linux client run. Elsewhere (the Windows
client), or where no compiler or OpenSSL headers are at hand, the package
installs without it and the pure-Python reference of each runs:
`optional` turns a failed build into a warning, and tests/test_codec_compiled.py and
tests/test_offload_compiled.py fail under `make test` if either is missing on Linux.
"""

import sys

from setuptools import Extension, setup

FLAGS = ["-O2", "-std=c11", "-Wall", "-Werror"]
compiled = [
    Extension(
        "push_protocol._codec",
        ["push_protocol/_codec.c"],
        libraries=["crypto"],
        extra_compile_args=FLAGS,
        optional=True,
    ),
    Extension(
        "pushgate_io._offload", ["pushgate_io/_offload.c"], extra_compile_args=FLAGS, optional=True
    ),
]

setup(ext_modules=compiled if sys.platform.startswith("linux") else [])
