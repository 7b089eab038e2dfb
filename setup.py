"""The compiled part of pushgate; everything else is in pyproject.toml.

push_protocol/_codec.c (the packet cipher, against OpenSSL's libcrypto) is built
on Linux, where the gateway and the Linux client run. Elsewhere (the Windows
client), or where no compiler or OpenSSL headers are at hand, the package
installs without it and push_protocol/codec.py's pure-Python cipher runs:
`optional` turns a failed build into a warning, and tests/test_codec_compiled.py
fails under `make test` if the compiled cipher is missing on Linux.
"""

import sys

from setuptools import Extension, setup

compiled = [
    Extension(
        "push_protocol._codec",
        ["push_protocol/_codec.c"],
        libraries=["crypto"],
        extra_compile_args=["-O2", "-std=c11", "-Wall", "-Werror"],
        optional=True,
    )
]

setup(ext_modules=compiled if sys.platform.startswith("linux") else [])
