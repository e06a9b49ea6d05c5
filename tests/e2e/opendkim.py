"""A private OpenDKIM signer on loopback, with a freshly generated key, and DNS-free verification."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .milterd import is_listening
from .postfix import free_port

__all__ = ["OpenDKIM", "opendkim_available"]

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _tool(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def opendkim_available() -> str | None:
    """A reason to skip the OpenDKIM tests, or None if they can run."""
    missing = [name for name in ("opendkim", "opendkim-genkey") if _tool(name) is None]
    if missing:
        return f"OpenDKIM is not installed (missing {', '.join(missing)}); run .ci/install-postfix.sh"
    if importlib.util.find_spec("dkim") is None:
        return "dkimpy is not installed (pip install dkimpy, part of the 'test' extra)"
    return None


class OpenDKIM:
    """``opendkim -f -x CONF`` signing mail from ``domain`` with a new key, on 127.0.0.1.

    The key pair is made by ``opendkim-genkey`` in a temporary directory;
    :meth:`dns_txt` answers the selector's TXT lookup from the generated
    ``.txt`` file, so signatures can be verified without DNS.
    """

    def __init__(
        self,
        domain: str = "example.org",
        selector: str = "txmilt",
        *,
        canonicalization: str = "relaxed/simple",
        extra_config: Sequence[str] = (),
        startup_timeout: float = 15.0,
    ) -> None:
        self.domain = domain
        self.selector = selector
        self.canonicalization = canonicalization
        #: More opendkim.conf lines (``"MTA mx.example.net"``), after the generated ones.
        self.extra_config = tuple(extra_config)
        #: Chosen when it starts (free a moment before), so that the key generation does not widen the race.
        self.port = 0
        self.startup_timeout = startup_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="txmilt-opendkim-"))
        self.log_path = self.directory / "opendkim.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def spec(self) -> str:
        """Its address as libmilter spells it (for a ``remote =`` filter)."""
        return f"inet:{self.port}@127.0.0.1"

    @property
    def postfix_spec(self) -> str:
        """Its address as Postfix spells it (for ``smtpd_milters``)."""
        return f"inet:127.0.0.1:{self.port}"

    @property
    def key_path(self) -> Path:
        """The private key."""
        return self.directory / f"{self.selector}.private"

    @property
    def record_path(self) -> Path:
        """The public key, as a zone-file TXT record."""
        return self.directory / f"{self.selector}.txt"

    def config_text(self) -> str:
        """opendkim.conf: sign (only) for ``domain``; no syslog, no DNS needed for signing."""
        return "\n".join([
            f"Domain {self.domain}",
            f"KeyFile {self.key_path}",
            f"Selector {self.selector}",
            "Mode s",
            f"Socket inet:{self.port}@127.0.0.1",
            f"Canonicalization {self.canonicalization}",
            "Background no",
            "Syslog no",
            # The key lives under /tmp, which other users can write to; OpenDKIM refuses that by default.
            "RequireSafeKeys no",
            *self.extra_config,
            "",
        ])

    def prepare(self) -> list[str]:
        """Generate the key and write the config; the command that runs OpenDKIM in the foreground with them."""
        subprocess.run(
            [str(_tool("opendkim-genkey")), "-b", "2048", "-d", self.domain, "-s", self.selector,
             "-D", str(self.directory)],
            check=True, capture_output=True, timeout=60,
        )
        self.port = free_port()
        config = self.directory / "opendkim.conf"
        config.write_text(self.config_text(), encoding="ascii")
        return [str(_tool("opendkim")), "-f", "-x", str(config)]

    def start(self) -> Self:
        """Generate the key, write the config, start OpenDKIM and wait until it listens."""
        command = self.prepare()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while not is_listening(self.port, pid=self.process.pid):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"opendkim is not listening on 127.0.0.1:{self.port}:\n{self.output()}")
            time.sleep(0.02)
        return self

    def output(self) -> str:
        """What OpenDKIM wrote to stdout and stderr."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def dns_txt(self) -> bytes:
        """The TXT record's text, from the ``.txt`` file opendkim-genkey wrote."""
        return "".join(re.findall(r'"([^"]*)"', self.record_path.read_text(encoding="ascii"))).encode()

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        """A DNS lookup for ``dkim.verify(..., dnsfunc=...)`` that knows only our selector."""
        wanted = f"{self.selector}._domainkey.{self.domain}.".encode()
        return self.dns_txt() if name.lower() == wanted.lower() else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within a second.

        libmilter notices the signal only when its listener's select times out
        (every five seconds), and the tests need no graceful shutdown.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(1)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def cleanup(self) -> None:
        """Remove the key, config and log (unless $TXMILT_E2E_KEEP is set)."""
        if not os.environ.get("TXMILT_E2E_KEEP"):
            with contextlib.suppress(OSError):
                shutil.rmtree(self.directory)

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
