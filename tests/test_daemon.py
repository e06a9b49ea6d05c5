"""Tests for txmilt.daemon: a reload swaps the chain for new connections; a bad file is refused with one line."""

from __future__ import annotations

import signal

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from examples.header_stamp import HeaderStamp
from tests.test_protocol import LogCapture
from tests.test_tap import TempDirMixin
from txmilt.codec import encode
from txmilt.config import ConfigSource, DaemonConfig
from txmilt.daemon import Daemon, InProcess, ReloadableFactory
from txmilt.messages import Negotiate
from txmilt.protocol import MilterFactory, MilterProtocol
from txmilt.sockets import BoundSockets

STAMP = "examples.header_stamp:HeaderStamp"


def config_text(header: str, listen: str = "tcp:0:interface=127.0.0.1") -> str:
    return (
        f'[daemon]\nlisten = ["{listen}"]\ndrain_timeout = 5\n'
        f'[[filter]]\nclass = "{STAMP}"\noptions = {{ header = "{header}" }}\n'
    )


class ReloadableFactoryTests(TempDirMixin):
    """New connections get the current chain; open ones keep theirs, and still count toward the limit."""

    def connect(self, factory: ReloadableFactory) -> MilterProtocol:
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, MilterProtocol)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(encode(Negotiate()))
        return protocol

    def test_replace(self) -> None:
        clock = Clock()
        old = MilterFactory([HeaderStamp], clock, max_connections=2)
        factory = ReloadableFactory(old)
        first = self.connect(factory)
        new = MilterFactory([lambda: HeaderStamp(header="X-New")], clock, max_connections=2)
        factory.replace(new)
        second = self.connect(factory)
        self.assertEqual((first.factory, second.factory), (old, new))
        self.assertEqual((first.connection_id, second.connection_id), ("c1", "c2"))
        self.assertEqual(factory.connections, {first, second})
        self.assertIsNone(factory.buildProtocol(None))  # the limit counts the connection on the old chain
        first.connectionLost()
        self.assertEqual(factory.connections, {second})
        self.assertEqual(self.connect(factory).connection_id, "c3")


class FakeServer:
    """A Server that records reloads; each reload completes when ``finish`` is called."""

    factory: Factory[MilterProtocol] = Factory()

    def __init__(self) -> None:
        self.reloads: list[DaemonConfig] = []
        self.pending: list[Deferred[None]] = []
        self.served = False

    def serve(self, sockets: BoundSockets) -> None:
        self.served = True

    def reload(self, source: ConfigSource, config: DaemonConfig) -> Deferred[None]:
        self.reloads.append(config)
        self.pending.append(Deferred())
        return self.pending[-1]

    def finish(self) -> None:
        self.pending.pop(0).callback(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def metrics(self) -> Resource:
        return Resource()


class ReloadTests(TempDirMixin):
    """Daemon.reload re-reads the file; a file that does not build leaves everything as it was."""

    def setUp(self) -> None:
        super().setUp()
        self.path = self.write("milter.toml", config_text("X-One"))
        self.source = ConfigSource(self.path).reread()
        self.server = FakeServer()
        self.daemon = Daemon(self.source, self.source.build(), self.server, Clock())
        self.logs = LogCapture(self)
        self.daemon.startService()
        self.addCleanup(self.daemon.stopService)

    def header(self, config: DaemonConfig) -> str:
        milter = config.filters[0].factory()
        assert isinstance(milter, HeaderStamp)
        return milter.header_name

    def test_sighup_handler(self) -> None:
        """Serving installs a SIGHUP handler; stopping puts the previous one back."""
        self.assertTrue(self.server.served)
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.daemon._hangup)
        self.daemon.stopService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), self.daemon._hangup)

    def test_good_file(self) -> None:
        """The new file's configuration goes to the server, and becomes the daemon's."""
        self.write("milter.toml", config_text("X-Two"))
        self.daemon.reload()
        (config,) = self.server.reloads
        self.assertEqual(self.header(config), "X-Two")
        self.assertIs(self.daemon.config, config)
        self.assertEqual(self.logs.matching("reload"), [])

    def test_bad_file(self) -> None:
        """A file that does not parse, or names a filter that cannot be made, is refused with one line."""
        for text, error in (
            ("[daemon\n", "is not valid TOML"),
            (config_text("X-Two").replace(STAMP, "no.such:Filter"), "cannot import module 'no.such'"),
            (config_text("X-Two").replace("drain_timeout = 5", "drain_timeout = -1"), "must not be negative"),
        ):
            self.write("milter.toml", text)
            before = len(self.logs.lines())
            self.successResultOf(self.daemon.reload())
            (line,) = self.logs.lines()[before:]
            self.assertIn("reload refused, still serving the previous configuration", line)
            self.assertIn(error, line)
        self.assertEqual(self.server.reloads, [])
        self.assertEqual(self.header(self.daemon.config), "X-One")

    def test_restart_only_settings(self) -> None:
        """Changed listen addresses and a change to workers are kept until a restart, with one warning each time."""
        changed = config_text("X-Two", listen="tcp:1:interface=127.0.0.1")
        self.write("milter.toml", changed.replace("drain_timeout = 5", "drain_timeout = 5\nworkers = 2"))
        for _ in range(2):
            self.daemon.reload()
            self.server.finish()
        lines = self.logs.matching("reload:")
        self.assertEqual(lines, [
            "reload: listen, workers (one process or several) changed; that takes effect when the daemon restarts"
        ] * 2)
        for config in self.server.reloads:
            self.assertEqual((config.listen, config.workers), (("tcp:0:interface=127.0.0.1",), 1))
            self.assertEqual(self.header(config), "X-Two")

    def test_reloads_one_at_a_time(self) -> None:
        """SIGHUPs during a reload make one more reload once it is done."""
        self.daemon.reload()
        self.daemon.reload()
        self.daemon.reload()
        self.assertEqual(len(self.server.reloads), 1)
        self.write("milter.toml", config_text("X-Three"))
        self.server.finish()
        self.assertEqual([self.header(config) for config in self.server.reloads], ["X-One", "X-Three"])
        self.server.finish()
        self.assertEqual(len(self.server.reloads), 2)


class InProcessTests(TempDirMixin):
    """In one process, a reload gives new connections the new chain and limits."""

    def test_reload(self) -> None:
        path = self.write("milter.toml", config_text("X-One"))
        source = ConfigSource(path).reread()
        server = InProcess(source.build(), Clock())
        old = server.factory.current
        self.write("milter.toml", config_text("X-Two").replace("drain_timeout = 5", "drain_timeout = 9"))
        new_source = source.reread()
        logs = LogCapture(self)
        self.successResultOf(server.reload(new_source, new_source.build()))
        self.assertIsNot(server.factory.current, old)
        self.assertEqual(server.drain.timeout, 9.0)
        self.assertEqual(len(logs.matching(f"reloaded {path}: new connections get the new configuration")), 1)
