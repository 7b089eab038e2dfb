"""Local security of the elevated Windows client: private directories and
process identity, through advapi32/kernel32 with ctypes.

The client runs as Administrator and keeps its status file (and the checked
copy of wintun.dll) under %ProgramData%\\pushgate. %ProgramData% lets standard
users create folders, so a user could create that directory first, or plant a
junction there, and have the elevated client write, rename or load files
wherever they point. So:

- `ensure_private_directory` creates the directory with an explicit, protected
  DACL (SYSTEM and Administrators: full control; nobody else anything), and for
  an existing one refuses a reparse point (junction, symlink) or an owner other
  than SYSTEM or Administrators, and resets its DACL to ours (a directory an
  earlier version made inherited %ProgramData%'s, which lets users add files).
  The decision is the pure `judge_directory`; the calls are a thin layer.
- `process_image` names the executable of a process (QueryFullProcessImageNameW),
  so `disconnect` ends only a process that runs our own executable.
"""

import ctypes
import os
from ctypes import POINTER, c_int32, c_uint32, c_void_p
from dataclasses import dataclass

from .wintun import load_library, read_wide, wide

SYSTEM_SID = "S-1-5-18"
ADMINISTRATORS_SID = "S-1-5-32-544"
TRUSTED_OWNERS = frozenset({SYSTEM_SID, ADMINISTRATORS_SID})
# Protected (P: no inheritance from %ProgramData%), owner Administrators, full
# control for SYSTEM and Administrators, inherited by what is created inside.
PRIVATE_SDDL = "O:BAG:SYD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)"

SDDL_REVISION_1 = 1
SE_FILE_OBJECT = 1
OWNER_SECURITY_INFORMATION = 0x1
DACL_SECURITY_INFORMATION = 0x4
PROTECTED_DACL_SECURITY_INFORMATION = 0x80000000
FILE_ATTRIBUTE_DIRECTORY = 0x10
FILE_ATTRIBUTE_REPARSE_POINT = 0x400
INVALID_FILE_ATTRIBUTES = 0xFFFFFFFF
ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND, ERROR_ACCESS_DENIED = 2, 3, 5
ERROR_ALREADY_EXISTS = 183
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
TOKEN_QUERY = 0x0008
TOKEN_USER_CLASS = 1  # TOKEN_INFORMATION_CLASS TokenUser
MAX_PATH_CHARS = 32768


class UnsafeDirectory(OSError):
    """The directory is not ours to trust; the message says why."""


@dataclass(frozen=True)
class DirectoryState:
    exists: bool
    attributes: int = 0
    owner_sid: str = ""


def judge_directory(state: DirectoryState, own_sid: str = "") -> str:
    """create | secure (reset its DACL, then use it); raises UnsafeDirectory.

    Trusted owners: SYSTEM, Administrators, and the (elevated) user running us:
    Windows makes an administrator the owner of what they create unless told
    otherwise, so an earlier version's directory is theirs."""
    if not state.exists:
        return "create"
    if state.attributes & FILE_ATTRIBUTE_REPARSE_POINT:
        raise UnsafeDirectory("it is a reparse point (junction or symbolic link)")
    if not state.attributes & FILE_ATTRIBUTE_DIRECTORY:
        raise UnsafeDirectory("it is not a directory")
    if not trusted_owner(state.owner_sid, own_sid):
        raise UnsafeDirectory(f"it is owned by {state.owner_sid}, not SYSTEM or Administrators")
    return "secure"


def trusted_owner(owner_sid: str, own_sid: str = "") -> bool:
    return owner_sid in TRUSTED_OWNERS or bool(own_sid and owner_sid == own_sid)


class SECURITY_ATTRIBUTES(ctypes.Structure):
    _fields_ = (
        ("nLength", c_uint32),
        ("lpSecurityDescriptor", c_void_p),
        ("bInheritHandle", c_int32),
    )


class WinSecurity:
    """The advapi32/kernel32 calls, declared with fixed-width types."""

    def __init__(self, advapi32=None, kernel32=None, last_error=None) -> None:
        if advapi32 is None:
            advapi32, last_error = load_library("advapi32.dll")
            kernel32, _ = load_library("kernel32.dll")
        self._a, self._k = advapi32, kernel32
        self.last_error = last_error
        self._own_sid: str | None = None
        out = POINTER(c_void_p)
        for library, name, restype, argtypes in (
            (advapi32, "ConvertStringSecurityDescriptorToSecurityDescriptorW", c_int32,
             (c_void_p, c_uint32, out, c_void_p)),
            (advapi32, "GetNamedSecurityInfoW", c_uint32,
             (c_void_p, c_uint32, c_uint32, out, out, out, out, out)),
            (advapi32, "SetNamedSecurityInfoW", c_uint32,
             (c_void_p, c_uint32, c_uint32, c_void_p, c_void_p, c_void_p, c_void_p)),
            (advapi32, "GetSecurityDescriptorDacl", c_int32,
             (c_void_p, POINTER(c_int32), out, POINTER(c_int32))),
            (advapi32, "ConvertSidToStringSidW", c_int32, (c_void_p, out)),
            (kernel32, "CreateDirectoryW", c_int32, (c_void_p, POINTER(SECURITY_ATTRIBUTES))),
            (kernel32, "GetFileAttributesW", c_uint32, (c_void_p,)),
            (kernel32, "LocalFree", c_void_p, (c_void_p,)),
            (kernel32, "OpenProcess", c_void_p, (c_uint32, c_int32, c_uint32)),
            (kernel32, "QueryFullProcessImageNameW", c_int32,
             (c_void_p, c_uint32, c_void_p, POINTER(c_uint32))),
            (kernel32, "CloseHandle", c_int32, (c_void_p,)),
            (kernel32, "GetCurrentProcess", c_void_p, ()),
            (advapi32, "OpenProcessToken", c_int32, (c_void_p, c_uint32, out)),
            (advapi32, "GetTokenInformation", c_int32,
             (c_void_p, c_uint32, c_void_p, c_uint32, POINTER(c_uint32))),
        ):  # fmt: skip
            function = getattr(library, name)
            function.restype, function.argtypes = restype, argtypes

    def _error(self, call: str, code: int | None = None) -> OSError:
        code = self.last_error() if code is None else code
        kind = PermissionError if code == ERROR_ACCESS_DENIED else OSError
        error = kind(f"{call} failed: Windows error {code}")
        error.winerror_code = code
        return error

    def state(self, path: str) -> DirectoryState:
        name = wide(path)
        attributes = self._k.GetFileAttributesW(ctypes.addressof(name))
        if attributes == INVALID_FILE_ATTRIBUTES:
            code = self.last_error()
            if code in (ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND):
                return DirectoryState(exists=False)
            raise self._error("GetFileAttributesW", code)
        return DirectoryState(True, attributes, self._owner(path))

    def _owner(self, path: str) -> str:
        name = wide(path)
        owner, descriptor = c_void_p(), c_void_p()
        code = self._a.GetNamedSecurityInfoW(
            ctypes.addressof(name), SE_FILE_OBJECT, OWNER_SECURITY_INFORMATION,
            ctypes.byref(owner), None, None, None, ctypes.byref(descriptor),
        )  # fmt: skip
        if code:
            raise self._error("GetNamedSecurityInfoW", code)
        try:
            return self._sid_text(owner)
        finally:
            self._k.LocalFree(descriptor)

    def _private_descriptor(self) -> c_void_p:
        sddl = wide(PRIVATE_SDDL)
        descriptor = c_void_p()
        if not self._a.ConvertStringSecurityDescriptorToSecurityDescriptorW(
            ctypes.addressof(sddl), SDDL_REVISION_1, ctypes.byref(descriptor), None
        ):
            raise self._error("ConvertStringSecurityDescriptorToSecurityDescriptorW")
        return descriptor

    def create_private(self, path: str) -> None:
        descriptor = self._private_descriptor()
        try:
            attributes = SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), descriptor, 0)
            name = wide(path)
            if not self._k.CreateDirectoryW(ctypes.addressof(name), ctypes.byref(attributes)):
                raise self._error("CreateDirectoryW")
        finally:
            self._k.LocalFree(descriptor)

    def make_private(self, path: str) -> None:
        """Replace the DACL of `path` with ours, protected from inheritance."""
        descriptor = self._private_descriptor()
        try:
            present, defaulted, dacl = c_int32(), c_int32(), c_void_p()
            if not self._a.GetSecurityDescriptorDacl(
                descriptor, ctypes.byref(present), ctypes.byref(dacl), ctypes.byref(defaulted)
            ):
                raise self._error("GetSecurityDescriptorDacl")
            name = wide(path)
            code = self._a.SetNamedSecurityInfoW(
                ctypes.addressof(name), SE_FILE_OBJECT,
                DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
                None, None, dacl, None,
            )  # fmt: skip
            if code:
                raise self._error("SetNamedSecurityInfoW", code)
        finally:
            self._k.LocalFree(descriptor)

    def own_sid(self) -> str:
        """The SID of the user this process runs as (TokenUser)."""
        if self._own_sid is None:
            token = c_void_p()
            process = self._k.GetCurrentProcess()
            if not self._a.OpenProcessToken(process, TOKEN_QUERY, ctypes.byref(token)):
                raise self._error("OpenProcessToken")
            try:
                size = c_uint32()
                self._a.GetTokenInformation(token, TOKEN_USER_CLASS, None, 0, ctypes.byref(size))
                buffer = ctypes.create_string_buffer(size.value or 256)
                if not self._a.GetTokenInformation(
                    token, TOKEN_USER_CLASS, buffer, len(buffer), ctypes.byref(size)
                ):
                    raise self._error("GetTokenInformation")
                sid = c_void_p.from_buffer(buffer).value  # TOKEN_USER.User.Sid
                self._own_sid = self._sid_text(sid)
            finally:
                self._k.CloseHandle(token)
        return self._own_sid

    def _sid_text(self, sid) -> str:
        text = c_void_p()
        if not self._a.ConvertSidToStringSidW(sid, ctypes.byref(text)):
            raise self._error("ConvertSidToStringSidW")
        try:
            return read_wide(text.value)
        finally:
            self._k.LocalFree(text)

    def process_image(self, pid: int) -> str | None:
        """The full path of `pid`'s executable; None when it cannot be opened."""
        handle = self._k.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid)
        if not handle:
            return None
        try:
            buffer = ctypes.create_string_buffer(MAX_PATH_CHARS * 2)
            size = c_uint32(MAX_PATH_CHARS)
            if not self._k.QueryFullProcessImageNameW(
                handle, 0, ctypes.addressof(buffer), ctypes.byref(size)
            ):
                return None
            return buffer.raw[: size.value * 2].decode("utf-16-le")
        finally:
            self._k.CloseHandle(handle)


def ensure_private_directory(path: str, security: WinSecurity) -> None:
    """Make `path` a directory only SYSTEM and Administrators can touch, or raise
    UnsafeDirectory (a reparse point, another owner)."""
    parent = os.path.dirname(os.path.normpath(path))
    if parent and parent != path and not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)  # %ProgramData% exists; tests use a temp dir
    try:
        action = judge_directory(security.state(path), security.own_sid())
    except UnsafeDirectory as error:
        raise UnsafeDirectory(f"refusing {path}: {error}") from None
    if action == "create":
        try:
            security.create_private(path)
        except OSError as error:
            if getattr(error, "winerror_code", None) != ERROR_ALREADY_EXISTS:
                raise
            # Created under us: judge what is there now.
            ensure_private_directory(path, security)
            return
    # Ours, or an earlier version's (its DACL inherited): the DACL becomes ours.
    security.make_private(path)
    check_private_directory(path, security)


def check_private_directory(path: str, security: "WinSecurity") -> None:
    """Refuse `path` unless it and everything in it belong to SYSTEM or
    Administrators and none is a reparse point (a file a user planted before the
    DACL was ours, a junction). FileNotFoundError when it does not exist."""
    try:
        state = security.state(path)
        if not state.exists:
            raise FileNotFoundError(path)
        own_sid = security.own_sid()
        judge_directory(state, own_sid)
        for entry in sorted(os.listdir(path)):
            entry_state = security.state(os.path.join(path, entry))
            if not entry_state.exists:
                continue  # gone meanwhile
            if entry_state.attributes & FILE_ATTRIBUTE_REPARSE_POINT:
                raise UnsafeDirectory(f"{entry} in it is a reparse point")
            if not trusted_owner(entry_state.owner_sid, own_sid):
                raise UnsafeDirectory(f"{entry} in it is owned by {entry_state.owner_sid}")
    except UnsafeDirectory as error:
        raise UnsafeDirectory(f"refusing {path}: {error}") from None


def same_image(a: str | None, b: str | None) -> bool:
    """Two executable paths name the same file (Windows compares them case-blind)."""
    if not a or not b:
        return False
    return os.path.normcase(os.path.normpath(a)) == os.path.normcase(os.path.normpath(b))
