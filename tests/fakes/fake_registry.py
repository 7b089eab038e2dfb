"""HKEY_LOCAL_MACHINE in memory, with client/winregistry.py's four calls.

Keys are case-insensitive as Windows' are; values keep their registry type, and
writing a value of the wrong Python type for it is refused as winreg refuses it.
"""

from client.winregistry import REG_DWORD, REG_MULTI_SZ, REG_SZ

PYTHON_TYPES = {REG_SZ: str, REG_DWORD: int, REG_MULTI_SZ: list}


class FakeRegistry:
    def __init__(self) -> None:
        self.keys: dict[str, dict] = {}  # lower-case path -> values
        self.names: dict[str, str] = {}  # lower-case path -> as written

    def write(self, path: str, values: dict) -> None:
        for name, (kind, value) in values.items():
            if not isinstance(value, PYTHON_TYPES[kind]):
                raise TypeError(f"{name}: {value!r} is not a {kind} value")
            if kind == REG_MULTI_SZ and not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name}: REG_MULTI_SZ takes strings")
        parts = path.split("\\")
        for depth in range(1, len(parts) + 1):
            parent = "\\".join(parts[:depth])
            self.keys.setdefault(parent.lower(), {})
            self.names.setdefault(parent.lower(), parent)
        self.keys[path.lower()].update(values)

    def read(self, path: str):
        values = self.keys.get(path.lower())
        return None if values is None else dict(values)

    def subkeys(self, path: str) -> list[str]:
        prefix = path.lower() + "\\"
        return [
            self.names[key].rsplit("\\", 1)[1]
            for key in self.keys
            if key.startswith(prefix) and "\\" not in key[len(prefix) :]
        ]

    def delete(self, path: str) -> bool:
        key = path.lower()
        if key not in self.keys:
            return False
        if self.subkeys(path):
            raise PermissionError(5, "the key has subkeys")
        del self.keys[key]
        del self.names[key]
        return True
