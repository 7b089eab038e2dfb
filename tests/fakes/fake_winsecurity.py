"""advapi32 and kernel32's security calls, in memory, over a real directory tree.

It plays NTFS's side of client/winsecurity.py's calls through the same ctypes
declarations: wide strings read from the addresses passed, out-pointers
filled with handles the fake allocated, every LocalFree checked against what
it handed out, the last error set on failure. Owners, reparse points and DACLs
live in a dict keyed by path; the files themselves are real (os.listdir sees
them).
"""

import ctypes
import itertools
import os
from types import SimpleNamespace

from client import winsecurity as ws
from client.wintun import read_wide, wide

INHERITED_PROGRAMDATA_DACL = "D:AI(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)(A;CIID;DCLCRPCR;;;BU)"


class FakeNtfs:
    def __init__(self, own_sid: str, processes: dict[int, str] | None = None) -> None:
        self.own_sid = own_sid
        self.meta: dict[str, dict] = {}  # path -> owner, dacl, reparse
        self.processes = processes or {}
        self.error = 0
        self._handles = itertools.count(0x10000, 0x10)
        self.allocated: dict[int, object] = {}  # LocalAlloc'd: address -> what
        self.freed: list[int] = []
        self.sid_of: dict[int, str] = {}
        self.descriptors: dict[int, str] = {}  # SD handle -> SDDL
        self.dacls: dict[int, str] = {}  # DACL handle -> its SDDL part
        self.open_handles: set[int] = set()

    # -- what the tests set up -------------------------------------------------------

    def plant(self, path: str, owner: str, *, directory=True, reparse=False) -> None:
        os.mkdir(path) if directory else open(path, "w").close()
        self.meta[path] = {"owner": owner, "dacl": INHERITED_PROGRAMDATA_DACL, "reparse": reparse}

    def libraries(self):
        def export(method):
            return lambda *args: method(*args)  # takes ctypes' argtypes/restype

        names = [n for n in dir(self) if n[0].isupper()]
        exports = SimpleNamespace(**{n: export(getattr(self, n)) for n in names})
        return exports, exports, lambda: self.error

    # -- helpers ---------------------------------------------------------------------

    def _fail(self, code: int, result=0):
        self.error = code
        return result

    def _alloc(self, thing) -> int:
        if isinstance(thing, str):
            buffer = wide(thing)
            self.allocated[ctypes.addressof(buffer)] = buffer
            return ctypes.addressof(buffer)
        handle = next(self._handles)
        self.allocated[handle] = thing
        return handle

    @staticmethod
    def _value(pointer) -> int:
        return pointer.value if hasattr(pointer, "value") else pointer

    def _meta(self, path: str) -> dict:
        return self.meta.setdefault(
            path, {"owner": self.own_sid, "dacl": INHERITED_PROGRAMDATA_DACL, "reparse": False}
        )

    # -- kernel32 --------------------------------------------------------------------

    def GetFileAttributesW(self, name):
        path = read_wide(name)
        if not os.path.lexists(path):
            return self._fail(ws.ERROR_FILE_NOT_FOUND, ws.INVALID_FILE_ATTRIBUTES)
        attributes = ws.FILE_ATTRIBUTE_DIRECTORY if os.path.isdir(path) else 0x80
        if self._meta(path)["reparse"]:
            attributes |= ws.FILE_ATTRIBUTE_REPARSE_POINT
        return attributes

    def CreateDirectoryW(self, name, attributes):
        path = read_wide(name)
        if os.path.lexists(path):
            return self._fail(ws.ERROR_ALREADY_EXISTS)
        sa = attributes._obj
        assert sa.nLength == ctypes.sizeof(ws.SECURITY_ATTRIBUTES)
        sddl = self.descriptors[sa.lpSecurityDescriptor]
        os.mkdir(path)
        owner = "S-1-5-32-544" if sddl.startswith("O:BA") else self.own_sid
        self.meta[path] = {"owner": owner, "dacl": sddl.split("D:", 1)[1], "reparse": False}
        return 1

    def LocalFree(self, pointer):
        address = self._value(pointer)
        assert address in self.allocated, f"LocalFree of {address:#x}: not ours"
        del self.allocated[address]
        self.freed.append(address)
        return None

    def OpenProcess(self, access, inherit, pid):
        assert access == ws.PROCESS_QUERY_LIMITED_INFORMATION
        if pid not in self.processes:
            return self._fail(87, None)
        handle = next(self._handles)
        self.open_handles.add(handle)
        self.allocated[handle] = ("process", pid)
        return handle

    def QueryFullProcessImageNameW(self, handle, flags, buffer, size):
        pid = self.allocated[handle][1]
        image = self.processes[pid].encode("utf-16-le")
        if len(image) // 2 + 1 > size._obj.value:
            return self._fail(122)  # ERROR_INSUFFICIENT_BUFFER
        ctypes.memmove(buffer, image + b"\0\0", len(image) + 2)
        size._obj.value = len(image) // 2  # characters, without the NUL
        return 1

    def CloseHandle(self, handle):
        handle = self._value(handle)
        self.open_handles.discard(handle)
        self.allocated.pop(handle, None)
        return 1

    def GetCurrentProcess(self):
        return 0xFFFFFFFFFFFFFFFF  # the pseudo-handle

    # -- advapi32 --------------------------------------------------------------------

    def OpenProcessToken(self, process, access, token):
        assert access == ws.TOKEN_QUERY
        handle = next(self._handles)
        self.open_handles.add(handle)
        token._obj.value = handle
        return 1

    def GetTokenInformation(self, token, kind, buffer, length, needed):
        assert kind == ws.TOKEN_USER_CLASS
        if length < 16:
            needed._obj.value = 16
            return self._fail(122)
        sid = next(self._handles)  # points inside the caller's buffer: not freed alone
        self.sid_of[sid] = self.own_sid
        address = ctypes.addressof(buffer) if isinstance(buffer, ctypes.Array) else buffer
        ctypes.c_uint64.from_address(address).value = sid  # TOKEN_USER.User.Sid
        return 1

    def ConvertSidToStringSidW(self, sid, text):
        text._obj.value = self._alloc(self.sid_of[self._value(sid)])
        return 1

    def ConvertStringSecurityDescriptorToSecurityDescriptorW(self, sddl, revision, out, size):
        assert revision == ws.SDDL_REVISION_1 and size is None
        text = read_wide(sddl)
        handle = self._alloc(("sd", text))
        self.descriptors[handle] = text
        out._obj.value = handle
        return 1

    def GetSecurityDescriptorDacl(self, descriptor, present, dacl, defaulted):
        text = self.descriptors[self._value(descriptor)]
        handle = next(self._handles)  # points inside the descriptor: not freed alone
        self.dacls[handle] = text.split("D:", 1)[1]
        present._obj.value, dacl._obj.value = 1, handle
        return 1

    def GetNamedSecurityInfoW(self, name, kind, info, owner, group, dacl, sacl, descriptor):
        path = read_wide(name)
        assert kind == ws.SE_FILE_OBJECT and info == ws.OWNER_SECURITY_INFORMATION
        if not os.path.lexists(path):
            return ws.ERROR_FILE_NOT_FOUND
        sd = self._alloc(("sd", path))
        sid = next(self._handles)  # points inside the descriptor
        self.sid_of[sid] = self._meta(path)["owner"]
        owner._obj.value, descriptor._obj.value = sid, sd
        return 0

    def SetNamedSecurityInfoW(self, name, kind, info, owner, group, dacl, sacl):
        path = read_wide(name)
        wanted = ws.DACL_SECURITY_INFORMATION | ws.PROTECTED_DACL_SECURITY_INFORMATION
        assert kind == ws.SE_FILE_OBJECT and info == wanted and owner is None
        self._meta(path)["dacl"] = self.dacls[self._value(dacl)]
        return 0
