"""The two implementations of the hot path, side by side in one process: the
pure-Python reference and the compiled one (setup.py builds it on Linux).

`implementation(name)` runs a block with that one: what `codec.new_cipher`
builds and what `gro.coalesce` is. PUSHGATE_PURE_PYTHON chooses for a whole
process; a bench compares both in one run, so that the ratio is of one machine
at one moment.
"""

import contextlib

from push_protocol import codec
from pushgate_io import gro

PURE, COMPILED = "pure Python", "compiled"
COMPILED_BUILT = codec.COMPILED and gro.COMPILED
NAMES = [PURE, COMPILED] if COMPILED_BUILT else [PURE]
_PARTS = {
    PURE: (codec.PythonCipher, gro.python_coalesce),
    COMPILED: (codec.Cipher, gro.coalesce),
}


@contextlib.contextmanager
def implementation(name: str):
    saved = codec.Cipher, gro.coalesce
    codec.Cipher, gro.coalesce = _PARTS[name]
    try:
        yield
    finally:
        codec.Cipher, gro.coalesce = saved


def missing_note() -> str | None:
    """What to print when the compiled one is not built here."""
    if COMPILED_BUILT:
        return None
    return "the compiled hot path is not built here: pure Python only"
