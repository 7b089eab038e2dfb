"""Local security of the elevated Windows client (issue 20, item 5), on any OS:
the private %ProgramData% directory (client/winsecurity.py) against a fake of its
four Windows calls over a real temporary directory, the status file's checks,
the pinned wintun.dll copy (client/wintun.py), the spec's refusal of a bad DLL,
and `disconnect` ending only a pushgate client.

Not verified without Windows: that the SDDL, GetNamedSecurityInfoW and
SetNamedSecurityInfoW calls do on NTFS what the fake models.
"""

import hashlib
import os
import runpy
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from client import status as status_module
from client import wintun
from client.auth import ClientError
from client.windows_host import WindowsHost
from client.winsecurity import (
    ADMINISTRATORS_SID,
    FILE_ATTRIBUTE_DIRECTORY,
    FILE_ATTRIBUTE_REPARSE_POINT,
    SYSTEM_SID,
    DirectoryState,
    UnsafeDirectory,
    ensure_private_directory,
    judge_directory,
    same_image,
)

ROOT = Path(__file__).resolve().parent.parent
USER_SID = "S-1-5-21-1004336348-1177238915-682003330-1001"
ADMIN_USER_SID = "S-1-5-21-1004336348-1177238915-682003330-500"
DIRECTORY_JUNCTION = FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_REPARSE_POINT
ADMIN_USER_SID = "S-1-5-21-1004336348-1177238915-682003330-500"
DIRECTORY_JUNCTION = FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_REPARSE_POINT


class FakeSecurity:
    """Owners, reparse points and DACLs of a real temporary tree, in memory: what
    GetFileAttributesW / GetNamedSecurityInfoW / CreateDirectoryW with a security
    descriptor / SetNamedSecurityInfoW report and do on NTFS."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.reparse: set[str] = set()
        self.private: set[str] = set()  # paths whose DACL is ours
        self.calls: list[tuple[str, str]] = []

    def state(self, path: str) -> DirectoryState:
        if not os.path.lexists(path):
            return DirectoryState(exists=False)
        attributes = FILE_ATTRIBUTE_DIRECTORY if os.path.isdir(path) else 0
        if path in self.reparse:
            attributes |= FILE_ATTRIBUTE_REPARSE_POINT
        return DirectoryState(True, attributes, self.owner.get(path, ADMINISTRATORS_SID))

    def create_private(self, path: str) -> None:
        self.calls.append(("create", path))
        os.mkdir(path)
        self.owner[path] = ADMINISTRATORS_SID
        self.private.add(path)

    def make_private(self, path: str) -> None:
        self.calls.append(("dacl", path))
        self.private.add(path)

    def plant(self, path: str, owner: str = USER_SID, directory: bool = False) -> None:
        """A standard user was there first."""
        os.mkdir(path) if directory else Path(path).write_text("{}")
        self.owner[path] = owner

    def own_sid(self) -> str:
        return ADMIN_USER_SID  # the elevated administrator running the client

    def process_image(self, pid):
        return {1: sys.executable, 2: r"C:\Windows\System32\lsass.exe"}.get(pid)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (DirectoryState(False), "create"),
        (DirectoryState(True, FILE_ATTRIBUTE_DIRECTORY, ADMINISTRATORS_SID), "secure"),
        (DirectoryState(True, FILE_ATTRIBUTE_DIRECTORY, SYSTEM_SID), "secure"),
        (DirectoryState(True, FILE_ATTRIBUTE_DIRECTORY, USER_SID), "owned by S-1-5-21"),
        (DirectoryState(True, DIRECTORY_JUNCTION, ADMINISTRATORS_SID), "reparse point"),
        (DirectoryState(True, 0, ADMINISTRATORS_SID), "not a directory"),
    ],
)
def test_judge_directory(state, expected):
    if expected in ("create", "secure"):
        assert judge_directory(state) == expected
    else:
        with pytest.raises(UnsafeDirectory, match=expected):
            judge_directory(state)


def test_an_administrator_owning_it_is_trusted_only_when_it_is_us():
    state = DirectoryState(True, FILE_ATTRIBUTE_DIRECTORY, ADMIN_USER_SID)
    assert judge_directory(state, own_sid=ADMIN_USER_SID) == "secure"
    with pytest.raises(UnsafeDirectory, match="owned by"):
        judge_directory(state, own_sid=USER_SID)


def test_a_missing_directory_is_created_private(tmp_path):
    security, path = FakeSecurity(), str(tmp_path / "pushgate")
    ensure_private_directory(path, security)
    assert ("create", path) in security.calls and path in security.private


def test_a_directory_a_user_created_first_is_refused(tmp_path):
    security, path = FakeSecurity(), str(tmp_path / "pushgate")
    security.plant(path, directory=True)
    with pytest.raises(UnsafeDirectory, match="owned by S-1-5-21"):
        ensure_private_directory(path, security)
    assert security.calls == []  # not even its DACL touched


def test_a_junction_is_refused(tmp_path):
    security, path = FakeSecurity(), str(tmp_path / "pushgate")
    os.symlink(tmp_path, path)  # where a junction would point elsewhere
    security.reparse.add(path)
    with pytest.raises(UnsafeDirectory, match="reparse point"):
        ensure_private_directory(path, security)
    assert security.calls == []


def test_an_earlier_versions_directory_gets_our_dacl_unless_a_user_planted_a_file(tmp_path):
    security, path = FakeSecurity(), str(tmp_path / "pushgate")
    os.mkdir(path)  # made by an elevated older client: inherited %ProgramData%'s DACL
    ensure_private_directory(path, security)
    assert ("dacl", path) in security.calls
    other, planted = str(tmp_path / "other"), str(tmp_path / "other" / "client-pgc0.json")
    os.mkdir(other)
    security.plant(planted)  # a user's status file, with undo steps of their choosing
    with pytest.raises(UnsafeDirectory, match=r"client-pgc0\.json in it is owned by S-1-5-21"):
        ensure_private_directory(other, security)


def test_the_status_file_is_not_read_from_a_directory_that_is_not_private(tmp_path):
    security, path = FakeSecurity(), str(tmp_path / "pushgate")
    security.plant(path, directory=True)
    with pytest.raises(ClientError, match="refusing"):
        status_module.check_status_dir_windows(path, security)
    with pytest.raises(ClientError, match="refusing"):
        status_module.secure_status_dir_windows(path, security)
    with pytest.raises(FileNotFoundError):  # `status`: not connected
        status_module.check_status_dir_windows(str(tmp_path / "absent"), security)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_only_the_pinned_dll_is_copied_and_loaded(tmp_path, monkeypatch):
    good, bad = b"MZ the pinned wintun", b"MZ something else"
    monkeypatch.setitem(wintun.WINTUN_DLL_SHA256, "amd64", sha(good))
    unpacked, private = tmp_path / "_MEI1234", tmp_path / "bin"
    unpacked.mkdir()
    private.mkdir()
    (unpacked / "wintun.dll").write_bytes(bad)  # swapped in the user's temp folder
    with pytest.raises(wintun.DllRefused, match="not the pinned"):
        wintun.install_checked_dll(str(unpacked / "wintun.dll"), str(private))
    assert not (private / "wintun.dll").exists()

    (unpacked / "wintun.dll").write_bytes(good)
    (private / "wintun.dll").write_bytes(bad)  # a stale copy is replaced
    loaded = wintun.install_checked_dll(str(unpacked / "wintun.dll"), str(private))
    assert loaded == str(private / "wintun.dll")
    assert Path(loaded).read_bytes() == good


def test_the_pin_is_one_and_the_same():
    from release import wintun_dll

    assert wintun_dll.PINNED_SHA256 is wintun.WINTUN_DLL_SHA256


def run_spec(tmp_path, monkeypatch, dll: bytes) -> list[str]:
    """Run release/pushgate-client.spec in a checkout holding `dll`, with
    PyInstaller's spec globals stubbed; returns what it asked PyInstaller to build."""
    root = tmp_path / "checkout"
    (root / "release").mkdir(parents=True)
    (root / "build" / "wintun" / "amd64").mkdir(parents=True)
    (root / "build" / "wintun" / "amd64" / "wintun.dll").write_bytes(dll)
    (root / "build" / "wintun" / "wintun-LICENSE.txt").write_text("licence")
    spec = root / "release" / "pushgate-client.spec"
    spec.write_text((ROOT / "release" / "pushgate-client.spec").read_text())
    hooks = types.ModuleType("PyInstaller.utils.hooks")
    hooks.copy_metadata = lambda name: []
    for name in ("PyInstaller", "PyInstaller.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "PyInstaller.utils.hooks", hooks)
    built = []
    names = {"SPECPATH": str(root / "release")}
    for call in ("Analysis", "PYZ", "EXE"):
        names[call] = lambda *a, _call=call, **k: (
            built.append(_call) or SimpleNamespace(pure=[], scripts=[], binaries=[], datas=[])
        )
    monkeypatch.setattr(sys, "path", list(sys.path))
    runpy.run_path(str(spec), init_globals=names)
    return built


def test_the_spec_refuses_to_bundle_a_dll_that_fails_the_check(tmp_path, monkeypatch):
    built = []
    with pytest.raises(SystemExit, match=r"refusing to bundle .*SHA-256"):
        built = run_spec(tmp_path, monkeypatch, b"MZ not wintun")
    assert built == []  # nothing analysed, nothing bundled


def test_the_spec_bundles_the_pinned_dll(tmp_path, monkeypatch):
    from release import wintun_dll

    built_dll = ROOT / "build" / "wintun" / "amd64" / "wintun.dll"  # make client-exe's
    path = built_dll if built_dll.is_file() else wintun_dll.fetch(tmp_path / "fetched")
    assert run_spec(tmp_path, monkeypatch, path.read_bytes()) == ["Analysis", "PYZ", "EXE"]


def test_disconnect_ends_only_a_pushgate_client(monkeypatch):
    security = FakeSecurity()
    host = WindowsHost()
    assert host.is_pushgate_client(1, security)
    assert not host.is_pushgate_client(2, security)  # a forged pid: lsass
    assert not host.is_pushgate_client(3, security)  # gone, or not ours to open
    assert same_image(r"C:\Program Files\PG\pushgate-client.exe",
                      r"c:\program files\pg\.\pushgate-client.exe") == (os.sep == "\\")  # fmt: skip

    # The stop event is not there, so request_stop would end the process: not lsass.
    host._kernel32 = SimpleNamespace(
        lib=SimpleNamespace(OpenEventW=lambda *a: 0, CloseHandle=lambda h: 1)
    )
    monkeypatch.setattr("client.windows_host.WinSecurity", lambda: security)
    ended = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: ended.append(pid))
    with pytest.raises(ClientError, match="not a pushgate client"):
        host.request_stop(2)
    assert host.request_stop(1) is False and ended == [1]


# -- the ctypes layer itself, against a fake of advapi32/kernel32 --------------------


def test_the_calls_create_a_private_directory_and_free_what_they_get(tmp_path):
    from client.winsecurity import PRIVATE_SDDL, WinSecurity
    from tests.fakes.fake_winsecurity import FakeNtfs

    ntfs = FakeNtfs(ADMIN_USER_SID)
    security = WinSecurity(*ntfs.libraries())
    path = str(tmp_path / "pushgate")
    ensure_private_directory(path, security)
    assert ntfs.meta[path] == {
        "owner": ADMINISTRATORS_SID,
        "dacl": PRIVATE_SDDL.split("D:", 1)[1],  # protected, SYSTEM and Administrators
        "reparse": False,
    }
    assert ntfs.allocated == {} and ntfs.open_handles == set()  # all freed and closed

    # An earlier version's directory, its DACL inherited: reset to ours.
    older = str(tmp_path / "older")
    ntfs.plant(older, ADMIN_USER_SID)
    ensure_private_directory(older, security)
    assert ntfs.meta[older]["dacl"] == PRIVATE_SDDL.split("D:", 1)[1]

    # A user's directory, a junction, a user's file inside: refused, untouched.
    for name, kwargs in (
        ("users", {"owner": USER_SID}),
        ("junction", {"owner": ADMINISTRATORS_SID, "reparse": True}),
    ):
        planted = str(tmp_path / name)
        ntfs.plant(planted, **kwargs)
        with pytest.raises(UnsafeDirectory):
            ensure_private_directory(planted, security)
        assert ntfs.meta[planted]["dacl"].startswith("D:AI")
    ntfs.plant(os.path.join(path, "client-pgc0.json"), USER_SID, directory=False)
    with pytest.raises(UnsafeDirectory, match="owned by S-1-5-21"):
        ensure_private_directory(path, security)
    assert ntfs.allocated == {} and ntfs.open_handles == set()


def test_the_calls_name_a_process_image():
    from client.winsecurity import WinSecurity
    from tests.fakes.fake_winsecurity import FakeNtfs

    image = r"C:\Program Files\pushgate\pushgate-client.exe"
    ntfs = FakeNtfs(ADMIN_USER_SID, processes={4242: image})
    security = WinSecurity(*ntfs.libraries())
    assert security.process_image(4242) == image
    assert security.process_image(4243) is None
    assert security.own_sid() == ADMIN_USER_SID
    assert ntfs.allocated == {} and ntfs.open_handles == set()
