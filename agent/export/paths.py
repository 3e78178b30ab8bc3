"""Safe local outputs: files and Unix sockets other local users cannot squat or read.

Flow records say who talks to whom on the node, so the agent's local outputs follow
three rules:

* an output path's directory must not be writable by other users (world-writable,
  sticky or not): in such a directory (``/tmp``) anyone can create the path first,
  as a file they own or as a listening socket that receives every record;
* files are created 0600 (an existing regular file of ours is narrowed to 0600),
  never through a symbolic link, and never a file owned by another user;
* a Unix socket's listener must run as root, as the agent's user, or as the owner
  of the socket's directory (SO_PEERCRED, checked on every connection).

A socket given as a bare name (``--unix-socket ids.sock``) lives in
:data:`DEFAULT_SOCKET_DIR`, which the agent creates owned by itself with mode 0700.
"""

from __future__ import annotations

import os
import socket
import stat
import struct

from xdpml.errors import OutputError, describe_os_error

DEFAULT_SOCKET_DIR = "/run/xdpml"


def check_directory(path: str, what: str) -> os.stat_result:
    """Refuse (OutputError) when the directory holding ``path`` is missing or others can write to it."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(d)
    except OSError as exc:
        raise OutputError(describe_os_error(exc, f"{what} {path!r}: directory {d}")) from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what} {path!r}: {d} is not a directory")
    if st.st_mode & stat.S_IWOTH:
        raise OutputError(
            f"{what} {path!r}: directory {d} is writable by every user (mode "
            f"{stat.S_IMODE(st.st_mode):04o}), so another user could create this path "
            "first; use a directory only you can write to"
        )
    return st


def open_private_append(path: str):
    """Open ``path`` for appending, created 0600, as a text stream; OutputError with the reason."""
    if os.path.basename(path) in ("", ".", ".."):
        raise OutputError(f"output file {path!r}: not a file name")
    check_directory(path, "output file")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise OutputError(f"output file {path!r} is a symbolic link; give the real path") from None
        raise OutputError(describe_os_error(exc, f"cannot open output file {path!r}")) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if st.st_uid not in (os.geteuid(), 0):
                raise OutputError(
                    f"output file {path!r} belongs to another user (uid {st.st_uid}); "
                    "refusing to write flow records into it"
                )
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.fchmod(fd, 0o600)
        elif stat.S_ISDIR(st.st_mode):  # pragma: no cover - O_WRONLY on a directory fails first
            raise OutputError(f"output file {path!r} is a directory")
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def resolve_socket_path(path: str, default_dir: str = DEFAULT_SOCKET_DIR) -> str:
    """A bare name -> ``default_dir``/name (the directory made 0700 if missing); the
    directory of any socket path is checked with :func:`check_directory`."""
    if "/" not in path:
        if not path or path in (".", ".."):
            raise OutputError(f"unix socket {path!r}: not a socket name")
        ensure_private_dir(default_dir)
        path = os.path.join(default_dir, path)
    check_directory(path, "unix socket")
    return path


def ensure_private_dir(d: str) -> None:
    """Create ``d`` with mode 0700 if missing; refuse one owned by someone else or open to others."""
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise OutputError(describe_os_error(exc, f"cannot create socket directory {d}")) from None
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"socket directory {d} is not a directory")
    if st.st_uid != os.geteuid():
        raise OutputError(
            f"socket directory {d} belongs to uid {st.st_uid}, not to the agent's user "
            f"(uid {os.geteuid()}); remove it or give a socket path elsewhere"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise OutputError(
            f"socket directory {d} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700 (chmod 700 it or remove it)"
        )


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process on the other end of a connected Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def trusted_peer_uids(path: str) -> set[int]:
    """Who may listen on the socket at ``path``: root, the agent's user, the directory's owner."""
    return {0, os.geteuid(), os.stat(os.path.dirname(os.path.abspath(path))).st_uid}
