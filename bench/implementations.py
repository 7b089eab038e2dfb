"""The two implementations of the hot path, side by side in one process: the
pure-Python reference and the compiled one (setup.py builds it on Linux).

`implementation(name)` runs a block with that one: what `codec.new_cipher`
builds, and the TUN offloads of gro.py and tso.py. PUSHGATE_PURE_PYTHON chooses for a whole
process; a bench compares both in one run, so that the ratio is of one machine
at one moment.
"""

import contextlib

from push_protocol import codec
from pushgate_io import gro, tso

PURE, COMPILED = "pure Python", "compiled"
COMPILED_BUILT = codec.COMPILED and tso.COMPILED
NAMES = [PURE, COMPILED] if COMPILED_BUILT else [PURE]
_PLACES = [
    (codec, "Cipher"),
    (gro, "coalesce"),
    (tso, "complete"),
    (tso, "to_partial"),
    (tso, "packets"),
]
_PARTS = {
    PURE: [
        codec.PythonCipher,
        gro.python_coalesce,
        tso.python_complete,
        tso.python_to_partial,
        tso.python_packets,
    ],
    COMPILED: [getattr(module, name) for module, name in _PLACES],
}


@contextlib.contextmanager
def implementation(name: str):
    saved = [getattr(module, name) for module, name in _PLACES]
    for (module, attribute), part in zip(_PLACES, _PARTS[name], strict=True):
        setattr(module, attribute, part)
    try:
        yield
    finally:
        for (module, attribute), part in zip(_PLACES, saved, strict=True):
            setattr(module, attribute, part)


def missing_note() -> str | None:
    """What to print when the compiled one is not built here."""
    if COMPILED_BUILT:
        return None
    return "the compiled hot path is not built here: pure Python only"
