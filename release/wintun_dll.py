"""Obtain and check the official signed wintun.dll (WinTun 0.14.1) for packaging.

The DLL is never committed. `fetch` downloads the `pytun-pmd3==3.0.3` wheel from
PyPI with pip (it carries WireGuard's prebuilt, signed WinTun 0.14.1 under
`pytun_pmd3/wintun/bin/<arch>/wintun.dll` with its LICENSE.txt), takes the DLL
and the licence out of it, and refuses a DLL whose SHA-256 is not the pinned
one. `check` verifies a DLL: the pinned hash, a PE32+ image for the expected
machine whose export table (read here in pure Python) has every function the
client binds, and a certificate table (the Authenticode signature itself is
verified by Windows when it loads the driver, not here).

    python release/wintun_dll.py fetch --dest build/wintun
    python release/wintun_dll.py check build/wintun/amd64/wintun.dll
"""

import argparse
import hashlib
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root is importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from client.wintun import WINTUN_DLL_SHA256

WHEEL_REQUIREMENT = "pytun-pmd3==3.0.3"
WHEEL_PREFIX = "pytun_pmd3/wintun/"
WINTUN_VERSION = "0.14.1"
# SHA-256 of WireGuard's signed wintun.dll 0.14.1: one pin, the client's own
# (client/wintun.py checks it again before every load).
PINNED_SHA256 = WINTUN_DLL_SHA256
PE_MACHINE = {"amd64": 0x8664}
# Every export client/wintun.py declares.
REQUIRED_EXPORTS = frozenset(
    {
        "WintunCreateAdapter",
        "WintunOpenAdapter",
        "WintunCloseAdapter",
        "WintunDeleteDriver",
        "WintunGetAdapterLUID",
        "WintunGetRunningDriverVersion",
        "WintunSetLogger",
        "WintunStartSession",
        "WintunEndSession",
        "WintunGetReadWaitEvent",
        "WintunReceivePacket",
        "WintunReleaseReceivePacket",
        "WintunAllocateSendPacket",
        "WintunSendPacket",
    }
)
LICENSE_NAME = "wintun-LICENSE.txt"


class DllCheckError(ValueError):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _u16(data: bytes, offset: int) -> int:
    return struct.unpack_from("<H", data, offset)[0]


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


class PeImage:
    """Just enough of the PE/COFF format to read the export table."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"MZ":
            raise DllCheckError("not a PE image (no MZ header)")
        pe = _u32(data, 0x3C)
        if data[pe : pe + 4] != b"PE\0\0":
            raise DllCheckError("not a PE image (no PE signature)")
        coff = pe + 4
        self.machine = _u16(data, coff)
        sections = _u16(data, coff + 2)
        optional = coff + 20
        optional_size = _u16(data, coff + 16)
        if _u16(data, optional) != 0x20B:
            raise DllCheckError("not a PE32+ (64-bit) image")
        directories = optional + 112  # PE32+: data directories start here
        self.export_rva, _ = struct.unpack_from("<II", data, directories)
        self.certificates_offset, self.certificates_size = struct.unpack_from(
            "<II", data, directories + 4 * 8
        )
        self.sections = []
        table = optional + optional_size
        for index in range(sections):
            entry = table + 40 * index
            virtual_size, virtual_address, raw_size, raw_offset = struct.unpack_from(
                "<IIII", data, entry + 8
            )
            self.sections.append((virtual_address, max(virtual_size, raw_size), raw_offset))
        self.data = data

    def offset(self, rva: int) -> int:
        for virtual_address, size, raw_offset in self.sections:
            if virtual_address <= rva < virtual_address + size:
                return rva - virtual_address + raw_offset
        raise DllCheckError(f"RVA {rva:#x} is in no section")

    def _string(self, rva: int) -> str:
        start = self.offset(rva)
        return self.data[start : self.data.index(b"\0", start)].decode("ascii")

    def exports(self) -> tuple[str, set[str]]:
        """(the DLL's own name, its exported function names)."""
        if not self.export_rva:
            return "", set()
        directory = self.offset(self.export_rva)
        name_rva = _u32(self.data, directory + 12)
        count = _u32(self.data, directory + 24)
        names = self.offset(_u32(self.data, directory + 32))
        exported = {self._string(_u32(self.data, names + 4 * i)) for i in range(count)}
        return self._string(name_rva), exported


def check_dll(data: bytes, arch: str = "amd64") -> list[str]:
    """Every way `data` is not the pinned WinTun DLL for `arch` (empty: it is)."""
    problems = []
    digest = sha256(data)
    if digest != PINNED_SHA256[arch]:
        problems.append(f"SHA-256 {digest} is not the pinned {PINNED_SHA256[arch]}")
    try:
        image = PeImage(data)
        name, exported = image.exports()
    except (DllCheckError, struct.error, ValueError) as error:
        return [*problems, str(error)]
    if image.machine != PE_MACHINE[arch]:
        problems.append(f"machine {image.machine:#x} is not {arch}")
    if name.lower() != "wintun.dll":
        problems.append(f"export table names the DLL {name!r}")
    missing = REQUIRED_EXPORTS - exported
    if missing:
        problems.append(f"missing exports: {', '.join(sorted(missing))}")
    if not image.certificates_size:
        problems.append("no certificate table: the DLL is not signed")
    return problems


def fetch(dest: Path, arch: str = "amd64") -> Path:
    """Download the wheel, extract and check the DLL; returns the DLL's path."""
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--only-binary=:all:", "--platform", "win_amd64", "--dest", download,
                WHEEL_REQUIREMENT,
            ],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(download).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            dll = archive.read(f"{WHEEL_PREFIX}bin/{arch}/wintun.dll")
            license_text = archive.read(f"{WHEEL_PREFIX}LICENSE.txt")
    problems = check_dll(dll, arch)
    if problems:
        raise DllCheckError(f"{WHEEL_REQUIREMENT} wintun.dll ({arch}): " + "; ".join(problems))
    target = dest / arch / "wintun.dll"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(dll)
    (dest / LICENSE_NAME).write_bytes(license_text)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="download, check and place the DLL")
    fetch_parser.add_argument("--dest", type=Path, default=Path("build/wintun"))
    fetch_parser.add_argument("--arch", default="amd64", choices=sorted(PINNED_SHA256))
    check_parser = commands.add_parser("check", help="check a DLL")
    check_parser.add_argument("dll", type=Path)
    check_parser.add_argument("--arch", default="amd64", choices=sorted(PINNED_SHA256))
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            path = fetch(args.dest, args.arch)
            print(f"{path}: WinTun {WINTUN_VERSION} ({args.arch}), SHA-256 verified")
            return 0
        problems = check_dll(args.dll.read_bytes(), args.arch)
    except DllCheckError as error:
        print(f"wintun_dll: {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"{args.dll}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.dll}: WinTun {WINTUN_VERSION} ({args.arch}), SHA-256 and exports verified")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
