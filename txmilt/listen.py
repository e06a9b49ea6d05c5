"""Listen addresses: the libmilter/Postfix grammar as Twisted strports, and unix socket hygiene."""

from __future__ import annotations

import errno
import grp
import os
import re
import socket
import stat

from txmilt.address import MilterAddress, parse_address, split_kind
from txmilt.errors import ConfigurationError

#: Mode given to unix sockets whose description sets none (never world-writable).
DEFAULT_SOCKET_MODE = "660"

_STRPORTS_KINDS = ("tcp", "tcp6", "unix", "systemd", "ssl", "tls")
_UNESCAPE = re.compile(r"\\(.)")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def to_strports(spec: str) -> str:
    """A Twisted strports description for ``spec``, which may also be a libmilter/Postfix address.

    The grammar of txmilt.address (``inet:8891@127.0.0.1``, ``inet:127.0.0.1:8891``,
    ``inet6:[::1]:8891``, ``inet:8891`` for every interface, ``unix:/path``,
    ``local:/path``) is accepted besides strports (``tcp:8891:interface=127.0.0.1``,
    ``unix:/path:mode=660``, ``systemd:...``). Unix sockets get mode 660 unless
    the description sets one; a mode that lets every local user write (connect)
    is refused.
    """
    address = parse_address(spec, "listen address")
    if address is not None:
        return _address_strports(address)
    kind, rest = split_kind(spec, "listen address")
    if kind == "unix":
        description = f"unix:{rest}"
        if not os.path.isabs(_unix_path(description)):
            raise ConfigurationError(f"listen address {spec!r}: the socket path must be absolute")
        if not re.search(r"(?<!\\):mode=", rest):
            description += f":mode={DEFAULT_SOCKET_MODE}"
        check_socket_mode(description)
        return description
    if kind in _STRPORTS_KINDS:
        return f"{kind}:{rest}"
    raise ConfigurationError(
        f"listen address {spec!r}: unknown kind {kind!r}; use tcp, tcp6, unix, systemd, inet, inet6 or local"
    )


def _address_strports(address: MilterAddress) -> str:
    """The strports description that listens on ``address``."""
    if address.kind == "unix":
        return f"unix:{_escape(address.path)}:mode={DEFAULT_SOCKET_MODE}"
    host = address.host
    if address.kind == "inet6" and host is None:
        host = "::"
    interface = f":interface={_escape(host)}" if host is not None else ""
    return f"{'tcp6' if address.kind == 'inet6' else 'tcp'}:{address.port}{interface}"


def _unix_path(description: str) -> str:
    """The path of a ``unix:`` strports description (before any option)."""
    body = description[len("unix:"):]
    parts = re.split(r"(?<!\\):", body)
    path = parts[0]
    if path.startswith("address="):
        path = path[len("address="):]
    return _UNESCAPE.sub(r"\1", path)


def socket_mode(description: str) -> int | None:
    """The mode a ``unix:`` strports description sets, or None if it sets none."""
    for option in re.split(r"(?<!\\):", description[len("unix:"):])[1:]:
        name, _, value = option.partition("=")
        if name == "mode":
            try:
                return int(value, 8)
            except ValueError:
                raise ConfigurationError(
                    f"listen address {description!r}: mode {value!r} is not an octal file mode such as 660"
                ) from None
    return None


def check_socket_mode(description: str) -> None:
    """ConfigurationError if a ``unix:`` description would leave its socket writable by every user.

    Connecting to a unix socket needs write permission on it: a world-writable
    milter socket lets any local user feed the milter and read its verdicts.
    Give the MTA's group access instead (mode 660 and ``socket_group``).
    """
    mode = socket_mode(description)
    if mode is not None and mode & 0o002:
        raise ConfigurationError(
            f"listen address {description!r}: mode {mode:03o} makes the socket world-writable, so any local"
            " user could talk to the milter; use mode=660 and set socket_group to the MTA's group"
        )


def unix_socket_path(description: str) -> str | None:
    """The socket path a strports description listens on, or None for other kinds."""
    if description.lower().startswith("unix:"):
        return _unix_path(description)
    return None


def group_id(name: str) -> int:
    """The id of the group ``name``; ConfigurationError if there is none."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigurationError(f"socket group {name!r} does not exist") from None


def check_socket_directory(path: str) -> None:
    """ConfigurationError if the directory of socket ``path`` does not exist."""
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        raise ConfigurationError(f"directory {directory} for socket {path} does not exist")


def stale_socket(path: str) -> bool:
    """Whether ``path`` is a unix socket nobody listens on (False if nothing is there).

    Raises ConfigurationError for anything that is not a socket, and for a
    socket another process still answers on.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise ConfigurationError(f"{path} exists and is not a socket; refusing to remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigurationError(f"cannot check socket {path}: {e}") from e
    else:
        raise ConfigurationError(f"{path} is in use by another process; stop it or choose another path")
    finally:
        probe.close()
    return True


def remove_stale_socket(path: str) -> bool:
    """Remove a unix socket nobody listens on; True if one was removed.

    Refuses (ConfigurationError) to remove anything that is not a socket, or a
    socket another process still answers on.
    """
    if not stale_socket(path):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def check_strports(description: str) -> None:
    """ConfigurationError unless Twisted can make a server endpoint of ``description``.

    Only parses; nothing listens.
    """
    from twisted.internet.endpoints import serverFromString

    if description.lower().startswith("unix:"):
        check_socket_mode(description)
    try:
        serverFromString(None, description)
    except Exception as e:
        if description.startswith("systemd:") and isinstance(e, IndexError | KeyError):
            reason = "systemd passed no socket at that index (is the .socket unit active?)"
        else:
            reason = f"{type(e).__name__}: {e}"
        raise ConfigurationError(f"listen address {description!r} cannot be used: {reason}") from e
