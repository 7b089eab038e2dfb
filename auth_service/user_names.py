"""The rule for user names, one place for Login (server.py) and `pushgate-admin user add`:
a name Login would refuse can never be created."""

MAX_USERNAME_BYTES = 256


def user_name_problem(name: str) -> str | None:
    """Why Login refuses `name`, or None if it is a valid user name."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:  # from a command line that was not UTF-8
        return "user name must be UTF-8"
    if not name or size > MAX_USERNAME_BYTES or not name.isprintable():
        return f"user name must be 1-{MAX_USERNAME_BYTES} printable bytes"
    return None
