"""Client profiles: one file with everything `pushgate-client connect` needs but the
password (`pushgate-admin user profile NAME > NAME.pushgate`).

TOML, one [profile] table: `server` (the auth service, HOST:PORT), `server_name`
(the TLS name to verify, if not the server's host), `user`, `ca` (the gateway's CA
certificate, PEM) and `login`: "password" (the default) or "sso" (single sign-on:
the gateway names the provider; `user` may then be left out). No secret: the CA
certificate is public.
"""

import tomllib
from dataclasses import dataclass

PEM_BEGIN = "-----BEGIN CERTIFICATE-----"


class ProfileError(ValueError):
    """The file is no usable profile; the message says why."""


@dataclass(frozen=True)
class Profile:
    server: str
    user: str
    ca_pem: str
    server_name: str | None = None
    login: str = "password"  # or "sso"

    def to_toml(self) -> str:
        lines = [
            f"# pushgate client profile for {self.user}: pushgate-client connect --profile FILE",
            "# (no password in here: the client asks for it, or reads --password-file)",
            "[profile]",
            f"server = {_quote(self.server)}",
        ]
        if self.server_name:
            lines.append(f"server_name = {_quote(self.server_name)}")
        if self.login != "password":
            lines.append(f"login = {_quote(self.login)}")
        if self.user:
            lines.append(f"user = {_quote(self.user)}")
        lines += [f'ca = """\n{self.ca_pem.strip()}\n"""', ""]
        return "\n".join(lines)


def _quote(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's for these characters)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in escaped):
        raise ProfileError(f"control character in {text!r}")
    return f'"{escaped}"'


def parse(text: str, origin: str = "profile") -> Profile:
    try:
        table = tomllib.loads(text).get("profile")
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(f"{origin} is not a pushgate profile (TOML): {error}") from None
    if not isinstance(table, dict):
        raise ProfileError(f"{origin} has no [profile] table")
    values = {}
    sso = table.get("login") == "sso"
    if table.get("login", "password") not in ("password", "sso"):
        raise ProfileError(f'{origin}: [profile] login must be "password" or "sso"')
    for key, required in (
        ("server", True),
        ("user", not sso),
        ("ca", True),
        ("server_name", False),
    ):
        value = table.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, str) or not value:
            raise ProfileError(f"{origin}: [profile] {key} must be a non-empty string")
        values[key] = value
    if PEM_BEGIN not in values["ca"]:
        raise ProfileError(f"{origin}: [profile] ca holds no PEM certificate")
    return Profile(
        server=values["server"],
        user=values.get("user", ""),
        ca_pem=values["ca"],
        server_name=values.get("server_name"),
        login="sso" if sso else "password",
    )


def read(path: str) -> Profile:
    try:
        with open(path, encoding="utf-8") as handle:
            return parse(handle.read(), path)
    except (OSError, UnicodeDecodeError) as error:
        raise ProfileError(f"cannot read profile {path}: {error}") from None
