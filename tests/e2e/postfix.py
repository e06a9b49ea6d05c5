"""Throwaway private Postfix instances on loopback, for end-to-end tests.

A :class:`PostfixInstance` owns a temporary directory holding its own
``config_directory`` (``etc/``), ``queue_directory`` (``spool/``),
``data_directory`` (``data/``) and log file (``maillog``).  It listens for
SMTP on ``127.0.0.1:<smtp_port>`` only and relays every message to
``[relay_host]:relay_port`` (normally a :class:`tests.e2e.sink.SMTPSink`).

It must be started as root (Postfix's master drops to the ``postfix`` user
created by the Debian package); :func:`postfix_available` says why not when
that is impossible, so tests can skip with a clear reason.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "PostfixError",
    "PostfixFactory",
    "PostfixInstance",
    "free_port",
    "pid_alive",
    "postfix_available",
    "postfix_version",
]

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
_TOOLS = ("postfix", "postconf", "postqueue", "postsuper", "sendmail")
_LOGGED_VERSION = re.compile(r"daemon started -- version (\S+),")

#: Type of the ``postfix_factory`` fixture: ``(main_cf=None, relay=None, **kw)``.
PostfixFactory = Callable[..., "PostfixInstance"]

# Instances started in this process, stopped at exit if a test forgot to.
_RUNNING: set[PostfixInstance] = set()


@atexit.register
def _stop_leftovers() -> None:
    for instance in list(_RUNNING):
        with contextlib.suppress(Exception):
            instance.stop()


class PostfixError(RuntimeError):
    """Postfix could not be configured, started, stopped or queried."""


def _tool(name: str) -> str:
    """Return the full path of a Postfix command, or raise PostfixError."""
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        raise PostfixError(f"Postfix command {name!r} not found")
    return path


def postfix_available() -> str | None:
    """Return a reason to skip Postfix tests, or None if they can run."""
    missing = [name for name in _TOOLS if shutil.which(name, path=_SEARCH_PATH) is None]
    if missing:
        return f"Postfix is not installed (missing {', '.join(missing)}); run .ci/install-postfix.sh"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user; run .ci/install-postfix.sh"
    return None


def postfix_version() -> str:
    """Return the installed Postfix version (``postconf -d mail_version``)."""
    out = subprocess.run(
        [_tool("postconf"), "-dh", "mail_version"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return False
    # The state follows the parenthesised command name.
    state = stat.rpartition(")")[2].split()
    return bool(state) and state[0] != "Z"


class PostfixInstance:
    """A private Postfix mail system, listening on 127.0.0.1 only.

    Use as a context manager (which also deletes an auto-created work
    directory on exit), or call :meth:`start` and :meth:`stop`.
    """

    #: Services in master.cf besides the SMTP listener (chroot is off).
    MASTER_SERVICES: tuple[tuple[str, str, str, str, str, str, str], ...] = (
        # service, type, private, unpriv, chroot, wakeup, maxproc + command
        ("pickup", "unix", "n", "-", "n", "60", "1 pickup"),
        ("cleanup", "unix", "n", "-", "n", "-", "0 cleanup"),
        ("qmgr", "unix", "n", "-", "n", "300", "1 qmgr"),
        ("rewrite", "unix", "-", "-", "n", "-", "- trivial-rewrite"),
        ("bounce", "unix", "-", "-", "n", "-", "0 bounce"),
        ("defer", "unix", "-", "-", "n", "-", "0 bounce"),
        ("trace", "unix", "-", "-", "n", "-", "0 bounce"),
        ("verify", "unix", "-", "-", "n", "-", "1 verify"),
        ("flush", "unix", "n", "-", "n", "1000?", "0 flush"),
        ("proxymap", "unix", "-", "-", "n", "-", "- proxymap"),
        ("proxywrite", "unix", "-", "-", "n", "-", "1 proxymap"),
        ("smtp", "unix", "-", "-", "n", "-", "- smtp"),
        ("relay", "unix", "-", "-", "n", "-", "- smtp"),
        ("showq", "unix", "n", "-", "n", "-", "- showq"),
        ("error", "unix", "-", "-", "n", "-", "- error"),
        ("retry", "unix", "-", "-", "n", "-", "- error"),
        ("discard", "unix", "-", "-", "n", "-", "- discard"),
        ("anvil", "unix", "-", "-", "n", "-", "1 anvil"),
        ("scache", "unix", "-", "-", "n", "-", "1 scache"),
        ("postlog", "unix-dgram", "n", "-", "n", "-", "1 postlogd"),
    )

    def __init__(
        self,
        smtp_port: int,
        relay: tuple[str, int],
        workdir: str | os.PathLike[str] | None = None,
        main_cf: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
        startup_timeout: float = 20.0,
        keep_workdir: bool | None = None,
    ) -> None:
        """Describe an instance; nothing is written until :meth:`start`.

        ``workdir`` must be traversable by the ``postfix`` user; by default a
        fresh ``/tmp/txmilt-postfix-*`` directory is created (and removed by
        :meth:`cleanup` unless ``keep_workdir`` or ``$TXMILT_E2E_KEEP`` is set).
        ``main_cf`` entries override or extend the generated main.cf.
        """
        self.smtp_port = smtp_port
        self.relay = relay
        self.name = name or f"txmilt-{smtp_port}"
        self.startup_timeout = startup_timeout
        self.extra_main_cf: dict[str, str] = dict(main_cf or {})
        self._own_workdir = workdir is None
        if keep_workdir is None:
            keep_workdir = bool(os.environ.get("TXMILT_E2E_KEEP"))
        self.keep_workdir = keep_workdir
        self._workdir: Path | None = Path(workdir).resolve() if workdir is not None else None
        self._master_pid: int | None = None
        self._version: str | None = None

    # -- paths -------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        """The instance's private directory (created on first use)."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="txmilt-postfix-"))
        return self._workdir

    @property
    def config_dir(self) -> Path:
        """``config_directory``: holds main.cf and master.cf."""
        return self.workdir / "etc"

    @property
    def queue_dir(self) -> Path:
        """``queue_directory``: the instance's spool (root-owned top)."""
        return self.workdir / "spool"

    @property
    def data_dir(self) -> Path:
        """``data_directory``: owned by the postfix user."""
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        """``maillog_file``, written by postlogd."""
        return self.workdir / "maillog"

    @property
    def smtp_address(self) -> tuple[str, int]:
        """Where the instance's smtpd listens."""
        return ("127.0.0.1", self.smtp_port)

    @property
    def version(self) -> str:
        """The installed Postfix version, e.g. ``"3.7.11"``."""
        if self._version is None:
            self._version = postfix_version()
        return self._version

    # -- configuration ------------------------------------------------------

    def main_cf_params(self) -> dict[str, str]:
        """Return the full main.cf settings: the defaults plus the extras."""
        relay_host, relay_port = self.relay
        work = str(self.workdir)
        version = _version_tuple(self.version)
        params: dict[str, str] = {
            "compatibility_level": "3.6" if version >= (3, 6) else "2",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "multi_instance_name": self.name,
            "syslog_name": self.name,
            "myhostname": "mx.txmilt.test",
            "mydomain": "txmilt.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[{relay_host}]:{relay_port}",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "",
            "smtpd_banner": "$myhostname ESMTP",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtp_connect_timeout": "2s",
            "smtp_connection_cache_on_demand": "no",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
            "in_flow_delay": "0",
            "message_size_limit": str(50 * 1024 * 1024),
            "mailbox_size_limit": "0",
            "default_process_limit": "20",
            "biff": "no",
            "append_dot_mydomain": "no",
            # Relay headers byte for byte: no Date:/Message-ID: added and no
            # address rewriting for SMTP clients (127.0.0.1 would qualify).
            "local_header_rewrite_clients": "",
        }
        if version >= (3, 4):
            params["maillog_file"] = str(self.log_path)
            params["maillog_file_prefixes"] = work
        params.update(self.extra_main_cf)
        return params

    def master_cf_text(self) -> str:
        """Return master.cf: one loopback smtpd plus internal services."""
        rows = [
            (f"127.0.0.1:{self.smtp_port}", "inet", "n", "-", "n", "-", "- smtpd"),
            *self.MASTER_SERVICES,
        ]
        lines = ["# Generated by tests/e2e/postfix.py; chroot is off everywhere."]
        for row in rows:
            if row[0] == "postlog" and _version_tuple(self.version) < (3, 4):
                continue
            lines.append(" ".join(f"{field:<10}" for field in row).rstrip())
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        workdir = self.workdir
        workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)
        self._check_traversable(workdir)
        self.config_dir.mkdir(mode=0o755, exist_ok=True)
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.queue_dir, 0, 0)
        main_cf = "".join(f"{key} = {value}\n" for key, value in self.main_cf_params().items())
        (self.config_dir / "main.cf").write_text(
            "# Generated by tests/e2e/postfix.py\n" + main_cf, encoding="utf-8"
        )
        (self.config_dir / "master.cf").write_text(self.master_cf_text(), encoding="utf-8")
        self._backdate_config()

    def _backdate_config(self) -> None:
        """Age main.cf/master.cf so Postfix need not wait for them to settle.

        Postfix re-reads a configuration file that was modified within the
        current second (5 x 300 ms), which would slow every start/reload.
        """
        past = time.time() - 60
        for fname in ("main.cf", "master.cf"):
            path = self.config_dir / fname
            if path.exists():
                os.utime(path, (past, past))

    @staticmethod
    def _check_traversable(path: Path) -> None:
        """Fail early if the postfix user cannot reach ``path``."""
        for parent in [path, *path.parents]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                raise PostfixError(
                    f"{parent} is not searchable by other users, so the postfix "
                    f"user cannot reach {path}; use a directory under /tmp"
                )

    def set_main_cf(self, params: Mapping[str, str], reload: bool = True) -> None:
        """Change main.cf parameters (``postconf -e``) and reload if running."""
        self.extra_main_cf.update(params)
        if not self.config_dir.joinpath("main.cf").exists():
            return
        args = [f"{key}={value}" for key, value in params.items()]
        self._run([_tool("postconf"), "-c", str(self.config_dir), "-e", *args])
        self._backdate_config()
        if reload and self.is_running():
            self.reload()

    def unset_main_cf(self, names: Sequence[str], reload: bool = True) -> None:
        """Remove main.cf parameters (``postconf -X``) and reload if running."""
        for name in names:
            self.extra_main_cf.pop(name, None)
        if not self.config_dir.joinpath("main.cf").exists():
            return
        self._run([_tool("postconf"), "-c", str(self.config_dir), "-X", *names])
        self._backdate_config()
        if reload and self.is_running():
            self.reload()

    def postconf(self, name: str) -> str:
        """Return the effective value of one parameter of this instance."""
        return self._run([_tool("postconf"), "-c", str(self.config_dir), "-h", name]).strip()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Self:
        """Write the configuration, start the master, wait until it listens."""
        if self.is_running():
            raise PostfixError(f"Postfix instance {self.name} is already running")
        self._write_config()
        mark = self.log_mark()
        try:
            self._postfix("start", timeout=self.startup_timeout)
        except PostfixError as exc:
            raise PostfixError(f"{exc}\n--- maillog tail ---\n{self.log_tail()}") from None
        self._master_pid = self._read_master_pid()
        _RUNNING.add(self)
        deadline = time.monotonic() + self.startup_timeout
        while not self.is_listening():
            if time.monotonic() > deadline or not self.is_running():
                self.stop()
                raise PostfixError(
                    f"Postfix {self.name} is not listening on "
                    f"127.0.0.1:{self.smtp_port} after {self.startup_timeout:.0f}s\n"
                    f"--- maillog tail ---\n{self.log_tail()}"
                )
            time.sleep(0.02)
        if self.log_path.exists():
            with contextlib.suppress(TimeoutError):
                self.wait_for_log(_LOGGED_VERSION, timeout=2.0, since=mark)
        return self

    def is_listening(self) -> bool:
        """True if something listens on 127.0.0.1:``smtp_port``.

        Reads ``/proc/net/tcp`` rather than connecting, so that no probe
        connection reaches smtpd (or its milters); without /proc it falls
        back to a connect-and-read-banner probe.
        """
        wanted = f"0100007F:{self.smtp_port:04X}"
        try:
            with open("/proc/net/tcp", encoding="ascii") as fh:
                next(fh, None)
                return any(
                    fields[1] == wanted and fields[3] == "0A" for fields in (line.split() for line in fh)
                )
        except OSError:
            pass
        try:
            with socket.create_connection(self.smtp_address, timeout=1.0) as sock:
                sock.settimeout(2.0)
                return sock.recv(512).startswith(b"220")
        except OSError:
            return False

    def reload(self, timeout: float = 10.0) -> None:
        """Run ``postfix reload`` and wait for the master to log it."""
        mark = self.log_mark()
        self._postfix("reload")
        if self.log_path.exists():
            self.wait_for_log(r"reload -- version", timeout=timeout, since=mark)
        # Give children that were busy a moment to be replaced.
        time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the instance and wait until none of its processes is left.

        Runs ``postfix -c DIR stop``; once the master has exited, the
        script's own 1-second polling is cut short.  If the master is still
        alive at ``timeout`` its process group is killed, and so is any
        straggling child.
        """
        deadline = time.monotonic() + timeout
        pid = self._master_pid or self._read_master_pid()
        if pid is not None and pid not in self.processes():
            pid = None  # stale pid file
        if pid is not None and self.config_dir.joinpath("main.cf").exists():
            script = subprocess.Popen(
                [_tool("postfix"), "-c", str(self.config_dir), "stop"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                while pid_alive(pid) and script.poll() is None:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
            finally:
                if script.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(script.pid, signal.SIGTERM)
                script.wait()
        if pid is not None:
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid_alive(pid) and pid in self.processes():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # Children exit by themselves once the master is gone; make sure.
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.02)
        for child in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        self._master_pid = None
        _RUNNING.discard(self)

    def cleanup(self) -> None:
        """Remove an auto-created work directory (unless kept)."""
        if self._own_workdir and not self.keep_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()

    def master_pid(self) -> int | None:
        """The master's PID from ``$queue_directory/pid/master.pid``."""
        return self._read_master_pid()

    def is_running(self) -> bool:
        """True if this instance's master process is alive."""
        pid = self._read_master_pid()
        return pid is not None and pid_alive(pid)

    def processes(self) -> list[int]:
        """PIDs of live processes belonging to this instance.

        Postfix passes ``MAIL_CONFIG`` to every daemon it spawns, so a scan
        of ``/proc/*/environ`` finds the master and all its children.
        """
        if self._workdir is None:
            return []
        needle = b"MAIL_CONFIG=" + bytes(self.config_dir)
        pids: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    environ = fh.read().split(b"\0")
            except OSError:
                continue
            if needle in environ and pid_alive(int(entry)):
                pids.append(int(entry))
        return pids

    def _read_master_pid(self) -> int | None:
        if self._workdir is None:
            return None
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text(encoding="ascii")
        except OSError:
            return None
        text = text.strip()
        return int(text) if text.isdigit() else None

    # -- log ---------------------------------------------------------------

    def log_text(self) -> str:
        """The whole maillog so far ("" if nothing was logged yet)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the maillog."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_mark(self) -> int:
        """An offset into the log, for ``wait_for_log(..., since=mark)``."""
        return len(self.log_text())

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, since: int = 0
    ) -> re.Match[str]:
        """Wait until ``pattern`` appears in the log after offset ``since``.

        Returns the match; raises :class:`TimeoutError` with the log tail.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text(), since)
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{regex.pattern!r} not logged within {timeout:.1f}s\n"
                    f"--- maillog tail ---\n{self.log_tail()}"
                )
            time.sleep(0.05)

    # -- queue -------------------------------------------------------------

    def queue(self) -> list[dict[str, object]]:
        """All queued messages, as parsed from ``postqueue -j``."""
        out = self._run([_tool("postqueue"), "-c", str(self.config_dir), "-j"])
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def hold_queue(self) -> list[str]:
        """Queue IDs of the messages in the hold queue."""
        return [str(item["queue_id"]) for item in self.queue() if item.get("queue_name") == "hold"]

    def flush(self) -> None:
        """Ask the queue manager to attempt delivery of deferred mail now."""
        self._run([_tool("postqueue"), "-c", str(self.config_dir), "-f"])

    def release(self, queue_id: str = "ALL") -> None:
        """Move message(s) from the hold queue back to the deferred queue."""
        self._run([_tool("postsuper"), "-c", str(self.config_dir), "-H", queue_id])

    def delete(self, queue_id: str = "ALL", queue: str | None = None) -> None:
        """Delete message(s) from the queue (``postsuper -d``)."""
        args = [_tool("postsuper"), "-c", str(self.config_dir), "-d", queue_id]
        if queue is not None:
            args.append(queue)
        self._run(args)

    def sendmail(self, message: bytes, sender: str, recipients: Sequence[str]) -> None:
        """Submit a message locally via ``sendmail`` (pickup, non-SMTP path)."""
        self._run(
            [_tool("sendmail"), "-C", str(self.config_dir), "-i", "-f", sender, "--", *recipients],
            input_bytes=message,
        )

    # -- helpers -----------------------------------------------------------

    def _postfix(self, command: str, timeout: float = 30.0) -> str:
        return self._run([_tool("postfix"), "-c", str(self.config_dir), command], timeout=timeout)

    def _run(self, args: Sequence[str], input_bytes: bytes | None = None, timeout: float = 30.0) -> str:
        env = dict(os.environ)
        env.pop("MAIL_CONFIG", None)
        proc = subprocess.run(
            list(args),
            input=input_bytes,
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        out = proc.stdout.decode("utf-8", "replace")
        if proc.returncode != 0:
            output = "\n".join(
                text for text in (proc.stderr.decode("utf-8", "replace").strip(), out.strip()) if text
            )
            raise PostfixError(
                f"{' '.join(args)} exited with {proc.returncode}" + (f":\n{output}" if output else "")
            )
        return out

    def __repr__(self) -> str:
        return (
            f"PostfixInstance(name={self.name!r}, smtp=127.0.0.1:{self.smtp_port}, "
            f"relay={self.relay[0]}:{self.relay[1]}, workdir={str(self._workdir)!r})"
        )
