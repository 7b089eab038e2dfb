"""The dataplane gives up every privilege once its TUN, socket and filter are set up.

It faces the internet, so a flaw in its receive path must not hand out root's
powers: after set-up it holds no capability (effective, permitted, inheritable,
ambient, and the bounding set where it may change it), has no_new_privs set (no
execve can give any back), and, when started as root with `[dataplane] user`,
runs as that user, who cannot read the auth service's secrets. What needs
CAP_NET_ADMIN later (NAT) is the one-shot `pushgate-nat`, never this process.

Capabilities are per thread: `drop_privileges` refuses to run once a second
thread exists, so call it at the end of set-up, before anything starts threads
(gRPC servers and channels do). A helper that must keep a privilege (a separate
process) is forked before it.

ctypes on glibc's capget/capset/prctl: the Python bindings for them
(python-prctl, cap-ng) compile against libcap headers or ship only as Debian
packages, and these are three calls with fixed layouts (linux/capability.h,
linux/prctl.h).
"""

import ctypes
import os
import pwd
from dataclasses import dataclass

from push_protocol.drops import UsageError

_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # two 32-bit words per set
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ, PR_CAPBSET_DROP = 23, 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
CAP_SETGID, CAP_SETUID, CAP_SETPCAP, CAP_NET_ADMIN = 6, 7, 8, 12


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return result


def prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    args = (ctypes.c_ulong(option), ctypes.c_ulong(arg), ctypes.c_ulong(arg3))
    return _check(_libc.prctl(*args, ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl({option})")


@dataclass(frozen=True)
class CapabilitySets:
    """The calling thread's capability sets as bit masks (bit n = capability n)."""

    effective: int
    permitted: int
    inheritable: int


def current_capabilities() -> CapabilitySets:
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")

    def mask(field: str) -> int:
        return getattr(data[0], field) | getattr(data[1], field) << 32

    return CapabilitySets(mask("effective"), mask("permitted"), mask("inheritable"))


def set_capabilities(mask: int, inheritable: int = 0) -> None:
    """The calling thread's effective and permitted sets become `mask`, its
    inheritable set `inheritable`."""
    header, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    for word in (0, 1):
        data[word].effective = data[word].permitted = (mask >> (32 * word)) & 0xFFFFFFFF
        data[word].inheritable = (inheritable >> (32 * word)) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def hand_capabilities_to_children() -> None:
    """The programs a non-root process runs during set-up (`ip`, `nft`) get the
    capabilities it holds (ambient), as under systemd's AmbientCapabilities.

    Needed where they come from file capabilities on the interpreter (the container
    image's unprivileged user): an exec'd program gets none of them otherwise, and
    file capabilities on `ip` itself do not help, since iproute2 drops every
    capability at start unless CAP_NET_ADMIN is inheritable. `drop_privileges`
    clears them again. Root needs nothing: its children are root.
    """
    if os.geteuid() == 0:
        return
    held = current_capabilities().permitted
    if not held:
        return
    set_capabilities(held, inheritable=held)  # ambient ones must be inheritable too
    for capability in range(held.bit_length()):
        if held >> capability & 1:
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, capability)


def drop_bounding_set(keep: int = 0) -> None:
    """Every capability not in the mask `keep` leaves the bounding set (needs CAP_SETPCAP)."""
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        last = int(handle.read())
    for capability in range(last + 1):
        if not keep >> capability & 1 and prctl(PR_CAPBSET_READ, capability) == 1:
            prctl(PR_CAPBSET_DROP, capability)


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def drop_privileges(user: str | None) -> None:
    """Become `user` (if started as root) and hold no capability from now on.

    Raises SystemExit with a message for a configuration that cannot be met (an
    unknown user, or a user asked for without root to switch to it).
    """
    if _thread_count() != 1:
        raise UsageError("drop_privileges must run before any other thread starts")
    account = None
    if user is not None:
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            raise SystemExit(
                f"pushgate-dataplane: [dataplane] user {user!r} does not exist"
            ) from None
        if os.geteuid() not in (0, account.pw_uid):
            raise SystemExit(
                f"pushgate-dataplane: [dataplane] user {user!r}: started as uid "
                f"{os.geteuid()}, which can neither be it nor switch to it (start as root)"
            )
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if current_capabilities().effective & (1 << CAP_SETPCAP):
        # Only with CAP_SETPCAP; without it (a systemd unit's own user) the unit's
        # CapabilityBoundingSet limits it, and no_new_privs keeps execve from using it.
        drop_bounding_set()
    if account is not None and os.geteuid() != account.pw_uid:
        os.initgroups(account.pw_name, account.pw_gid)
        os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
        os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)
    set_capabilities(0)
    left = current_capabilities()
    if left != CapabilitySets(0, 0, 0):
        raise SystemExit(f"pushgate-dataplane: capabilities left after dropping them: {left}")
