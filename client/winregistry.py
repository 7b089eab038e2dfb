"""HKEY_LOCAL_MACHINE through the standard library's winreg, behind four calls.

The NRPT rules (client/nrpt.py) and the Windows client's undo records
(client/windows_host.py) live here. HKLM\\SOFTWARE and HKLM\\SYSTEM are writable
by administrators and SYSTEM only, which is why the undo records are kept here
and not in a file a standard user could have created first. Tests use an
in-memory twin with the same four calls (tests/fakes/fake_registry.py).
"""

import contextlib

REG_SZ, REG_DWORD, REG_MULTI_SZ = 1, 4, 7

Values = dict[str, tuple[int, object]]  # name -> (type, value)


class Registry:
    """HKLM, 64-bit view."""

    def __init__(self) -> None:
        import winreg  # Windows only

        self._winreg = winreg
        self._view = winreg.KEY_WOW64_64KEY

    def write(self, path: str, values: Values) -> None:
        """Create `path` (and its parents) and set `values` in it."""
        reg = self._winreg
        access = reg.KEY_SET_VALUE | self._view
        with reg.CreateKeyEx(reg.HKEY_LOCAL_MACHINE, path, 0, access) as key:
            for name, (kind, value) in values.items():
                reg.SetValueEx(key, name, 0, kind, value)

    def read(self, path: str) -> Values | None:
        """The values of `path`, or None when it does not exist."""
        reg = self._winreg
        try:
            key = reg.OpenKeyEx(reg.HKEY_LOCAL_MACHINE, path, 0, reg.KEY_READ | self._view)
        except FileNotFoundError:
            return None
        values: Values = {}
        with key:
            for index in range(reg.QueryInfoKey(key)[1]):
                name, value, kind = reg.EnumValue(key, index)
                values[name] = (kind, value)
        return values

    def delete(self, path: str) -> bool:
        """Delete the key `path` (it has no subkeys); False when it was not there."""
        reg = self._winreg
        try:
            reg.DeleteKeyEx(reg.HKEY_LOCAL_MACHINE, path, self._view, 0)
        except FileNotFoundError:
            return False
        return True

    def subkeys(self, path: str) -> list[str]:
        reg = self._winreg
        names = []
        with contextlib.suppress(FileNotFoundError):
            access = reg.KEY_READ | self._view
            with reg.OpenKeyEx(reg.HKEY_LOCAL_MACHINE, path, 0, access) as key:
                for index in range(reg.QueryInfoKey(key)[0]):
                    names.append(reg.EnumKey(key, index))
        return names
