"""
Dropping root in a worker while keeping the one capability that
IP_TRANSPARENT needs on every upstream socket.

setuid() from root clears the effective and permitted capability sets
unless PR_SET_KEEPCAPS is on; with it, the permitted set survives and we
raise just one capability back into the effective set with capset(2).
The socket module does not wrap capset, so this uses ctypes: the one
place in the package that does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import os
import pwd

import attrs

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
_PR_SET_KEEPCAPS = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _capget() -> tuple[int, int]:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    effective = data[0].effective | (data[1].effective << 32)
    permitted = data[0].permitted | (data[1].permitted << 32)
    return effective, permitted


def _capset(capabilities: int) -> None:
    """Set effective = permitted = C{capabilities}, inheritable empty."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        word = (capabilities >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = word
        data[i].permitted = word
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def transparent_capability() -> int | None:
    """The capability this process can use for IP_TRANSPARENT (NET_RAW preferred)."""
    effective, permitted = _capget()
    for capability in (CAP_NET_RAW, CAP_NET_ADMIN):
        if (effective | permitted) & (1 << capability):
            return capability
    return None


@attrs.frozen
class Identity:
    uid: int
    gid: int
    user: str
    group: str


def resolve(user: str, group: str | None) -> Identity:
    entry = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group is not None else entry.pw_gid
    return Identity(entry.pw_uid, gid, user, grp.getgrgid(gid).gr_name)


def drop_to(identity: Identity) -> int:
    """
    Become C{identity}, keeping only the capability IP_TRANSPARENT needs.
    Returns that capability.  Raises C{OSError} if it cannot be kept.
    """
    keep = transparent_capability()
    if keep is None:
        raise OSError(1, "neither CAP_NET_RAW nor CAP_NET_ADMIN to keep for IP_TRANSPARENT")
    _check(_libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    _capset(1 << keep)
    _check(_libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    return keep


def can_write_directory(path: str, identity: Identity) -> bool:
    """
    Whether C{identity} may create files in the directory C{path}, judged
    from its mode bits and the user's groups (as root, before dropping).
    """
    import stat

    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return False
    if identity.uid == 0:
        return os.access(path, os.W_OK | os.X_OK)
    if st.st_uid == identity.uid:
        bits = stat.S_IWUSR | stat.S_IXUSR
    elif st.st_gid in os.getgrouplist(identity.user, identity.gid):
        bits = stat.S_IWGRP | stat.S_IXGRP
    else:
        bits = stat.S_IWOTH | stat.S_IXOTH
    return st.st_mode & bits == bits and os.access(path, os.W_OK)  # a read-only mount
