"""A private Sendmail MTA on loopback, from Debian packages unpacked by ``install-sendmail.sh``.

Debian's sendmail packages conflict with postfix, so they are not installed:
``tests/e2e/install-sendmail.sh`` unpacks sendmail-bin, sendmail-cf, m4 and
libwrap0 into ``$TXMILT_SENDMAIL_ROOT`` (default ``/opt/txmilt-sendmail``).
:class:`PrivateSendmail` builds a ``.cf`` from a generated ``.mc`` with the
unpacked m4 files (one ``INPUT_MAIL_FILTER`` for the milter under test, a
smart host for the relay) and runs ``sendmail -bD`` in its own UTS namespace
with a fully qualified host name, because Sendmail sleeps a minute at start
when it cannot qualify its host name, and in its own PID namespace, so that
the delivery processes it double-forks are reaped (and killed) with it
rather than left as zombies of the system's init.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .milterd import is_listening
from .postfix import free_port

__all__ = ["PrivateSendmail", "sendmail_available", "sendmail_root"]

_BINARY = "usr/libexec/sendmail/sendmail"
_CF_DIR = "usr/share/sendmail/cf"
_LIBRARIES = "usr/lib/x86_64-linux-gnu"


def sendmail_root() -> Path:
    """Where install-sendmail.sh unpacked the packages."""
    return Path(os.environ.get("TXMILT_SENDMAIL_ROOT", "/opt/txmilt-sendmail"))


def sendmail_available() -> str | None:
    """A reason to skip the Sendmail tests, or None if they can run."""
    root = sendmail_root()
    if not (root / _BINARY).exists() or not (root / _CF_DIR / "m4" / "cf.m4").exists():
        return f"no unpacked Sendmail in {root}; run tests/e2e/install-sendmail.sh (Debian only)"
    if os.geteuid() != 0:
        return "a private Sendmail must be started as root"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is needed to give Sendmail its own host name and PID namespace"
    if shutil.which("m4") is None and not (root / "usr/bin/m4").exists():
        return "m4 is needed to build sendmail.cf"
    return None


class PrivateSendmail:
    """``sendmail -bD`` on 127.0.0.1:``smtp_port``, filtering through ``milter`` and relaying to ``relay``.

    ``milter`` is one milter address in Sendmail's notation (``inet:PORT@HOST``),
    or a list of them: Sendmail's ``INPUT_MAIL_FILTER`` list, in that order.
    """

    def __init__(
        self,
        milter: str | Sequence[str],
        relay: tuple[str, int],
        *,
        hostname: str = "mx.sendmail.test",
        startup_timeout: float = 20.0,
    ) -> None:
        self.root = sendmail_root()
        self.milters = (milter,) if isinstance(milter, str) else tuple(milter)
        self.relay = relay
        self.hostname = hostname
        self.smtp_port = free_port()
        self.startup_timeout = startup_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="txmilt-sendmail-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def smtp_address(self) -> tuple[str, int]:
        """Where Sendmail listens."""
        return ("127.0.0.1", self.smtp_port)

    def mc_text(self) -> str:
        """The sendmail.mc: loopback only, smart host = the relay, the milters, no DNS, no aliases."""
        d = self.directory
        relay_host, relay_port = self.relay
        return "\n".join([
            "divert(0)dnl",
            "OSTYPE(`linux')dnl",
            f"define(`confDOMAIN_NAME', `{self.hostname}')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{d}/service.switch')dnl",
            f"define(`QUEUE_DIR', `{d}/mqueue')dnl",
            f"define(`confPID_FILE', `{d}/sendmail.pid')dnl",
            f"define(`STATUS_FILE', `{d}/statistics')dnl",
            f"define(`confCW_FILE', `-o {d}/local-host-names')dnl",
            f"define(`confCT_FILE', `-o {d}/trusted-users')dnl",
            "define(`ALIAS_FILE', `')dnl",
            "define(`confTO_IDENT', `0s')dnl",
            "define(`confDONT_BLAME_SENDMAIL', `GroupWritableDirPathSafe')dnl",
            f"define(`SMART_HOST', `esmtp:[{relay_host}]')dnl",
            f"define(`ESMTP_MAILER_ARGS', `TCP $h {relay_port}')dnl",
            "define(`confMILTER_MACROS_CONNECT', `j, _, {daemon_name}, {if_name}, {if_addr}, {client_addr}')dnl",
            "FEATURE(`nocanonify')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`promiscuous_relay')dnl",  # it listens on loopback only
            f"DAEMON_OPTIONS(`Port={self.smtp_port}, Addr=127.0.0.1, Name=MTA')dnl",
            *(f"INPUT_MAIL_FILTER(`{name}', `S={address}, F=T, T=S:10s;R:30s;E:5m')dnl"
              for name, address in self.milter_names().items()),
            "MAILER(`smtp')dnl",
            "",
        ])

    def milter_names(self) -> dict[str, str]:
        """The milters' addresses by their names in sendmail.cf (``txmilt``, or ``txmilt1``, ``txmilt2``, ...)."""
        if len(self.milters) == 1:
            return {"txmilt": self.milters[0]}
        return {f"txmilt{number}": address for number, address in enumerate(self.milters, 1)}

    @property
    def queue_dir(self) -> Path:
        """The mail queue: ``qf``/``df`` files, ``hf`` for quarantined messages."""
        return self.directory / "mqueue"

    def quarantined(self) -> list[str]:
        """Queue ids of the quarantined messages."""
        return sorted(path.name[2:] for path in self.queue_dir.glob("hf*"))

    def release(self) -> None:
        """Lift every quarantine and run the queue once (the messages are delivered)."""
        self._run("-qQ", "-Q")
        self._run("-q")

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        """``sendmail -C sendmail.cf ARGS`` under Sendmail's host name, waiting for it."""
        subprocess.run(
            ["unshare", "--uts", "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", self.hostname,
             str(self.root / _BINARY), "-C", str(self.directory / "sendmail.cf"), *args],
            env=self._environment(), check=True, capture_output=True, timeout=timeout,
        )

    def _environment(self) -> dict[str, str]:
        return {**os.environ, "LD_LIBRARY_PATH": str(self.root / _LIBRARIES)}

    def _write_config(self) -> Path:
        d = self.directory
        self.queue_dir.mkdir(mode=0o700)
        (d / "service.switch").write_text("hosts files\naliases files\n", encoding="ascii")
        (d / "sendmail.mc").write_text(self.mc_text(), encoding="ascii")
        m4 = shutil.which("m4") or str(self.root / "usr/bin/m4")
        cf_dir = self.root / _CF_DIR
        built = subprocess.run(
            [m4, f"-D_CF_DIR_={cf_dir}/", str(cf_dir / "m4" / "cf.m4"), str(d / "sendmail.mc")],
            check=True, capture_output=True, timeout=30,
        )
        cf = d / "sendmail.cf"
        cf.write_bytes(built.stdout)
        return cf

    def start(self) -> Self:
        """Build the .cf, start Sendmail in its own UTS namespace, wait until it listens."""
        cf = self._write_config()
        env = self._environment()
        with (self.directory / "sendmail.out").open("wb") as out:
            self.process = subprocess.Popen(
                ["unshare", "--uts", "--pid", "--fork", "sh", "-c", 'hostname "$1" && exec "$2" -bD -C "$3"', "sh",
                 self.hostname, str(self.root / _BINARY), str(cf)],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while not is_listening(self.smtp_port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sendmail is not listening on 127.0.0.1:{self.smtp_port}:\n{self.output()}")
            time.sleep(0.02)
        return self

    def output(self) -> str:
        """What Sendmail wrote (it logs to syslog; only startup errors show here)."""
        try:
            return (self.directory / "sendmail.out").read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM to Sendmail's process group (the daemon and its children), SIGKILL if needed."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait(10)

    def cleanup(self) -> None:
        """Remove the work directory (unless $TXMILT_E2E_KEEP is set)."""
        if not os.environ.get("TXMILT_E2E_KEEP"):
            shutil.rmtree(self.directory, ignore_errors=True)

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
