"""The packaging step's check of wintun.dll (release/wintun_dll.py): pinned
SHA-256, PE32+ image for amd64, the export table read in pure Python, a
certificate table. Runs on the real DLL and on copies damaged on purpose.
"""

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from release import wintun_dll

ROOT = Path(__file__).resolve().parent.parent
BUILT_DLL = ROOT / "build" / "wintun" / "amd64" / "wintun.dll"


@pytest.fixture(scope="module")
def dll(tmp_path_factory) -> bytes:
    # `make test` fetched it (make client-exe); otherwise fetch it here from PyPI.
    path = BUILT_DLL if BUILT_DLL.is_file() else wintun_dll.fetch(tmp_path_factory.mktemp("w"))
    return path.read_bytes()


def test_the_official_dll_passes(dll):
    assert wintun_dll.check_dll(dll) == []
    name, exported = wintun_dll.PeImage(dll).exports()
    assert name == "wintun.dll"
    assert exported == wintun_dll.REQUIRED_EXPORTS  # 0.14.1 exports exactly these


def test_one_changed_byte_fails_the_hash_only(dll):
    changed = bytearray(dll)
    changed[len(dll) // 2] ^= 0xFF
    (problem,) = wintun_dll.check_dll(bytes(changed))
    assert problem.startswith("SHA-256")


def test_a_renamed_export_is_missing(dll):
    renamed = dll.replace(b"WintunSendPacket\0", b"WintunSendPackeX\0")
    assert renamed != dll
    problems = wintun_dll.check_dll(renamed)
    assert "missing exports: WintunSendPacket" in problems


def test_another_machine_is_refused(dll):
    pe = struct.unpack_from("<I", dll, 0x3C)[0]
    arm64 = bytearray(dll)
    struct.pack_into("<H", arm64, pe + 4, 0xAA64)
    assert "machine 0xaa64 is not amd64" in wintun_dll.check_dll(bytes(arm64))


def test_an_unsigned_dll_is_refused(dll):
    image = wintun_dll.PeImage(dll)
    assert image.certificates_size > 0
    pe = struct.unpack_from("<I", dll, 0x3C)[0]
    security_directory = pe + 4 + 20 + 112 + 4 * 8
    unsigned = bytearray(dll)
    struct.pack_into("<II", unsigned, security_directory, 0, 0)
    assert "no certificate table: the DLL is not signed" in wintun_dll.check_dll(bytes(unsigned))


def test_something_else_is_not_a_pe():
    source = Path(__file__).read_bytes()  # not an executable on any OS
    assert "not a PE image (no MZ header)" in wintun_dll.check_dll(source)


def test_the_check_command_exits_nonzero_on_a_bad_dll(dll, tmp_path):
    good, bad = tmp_path / "good.dll", tmp_path / "bad.dll"
    good.write_bytes(dll)
    bad.write_bytes(dll[:-1] + b"\0" if dll[-1] else dll[:-1] + b"\1")
    script = str(ROOT / "release" / "wintun_dll.py")
    ok = subprocess.run([sys.executable, script, "check", str(good)], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([sys.executable, script, "check", str(bad)], capture_output=True)
    assert refused.returncode == 1
    assert b"SHA-256" in refused.stderr
