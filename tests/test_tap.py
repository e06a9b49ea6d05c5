"""Tests for txmilt.tap: ``twistd milter`` options, the service tree, draining on stop."""

from __future__ import annotations

import grp
import inspect
import io
import os
import shutil
import socket
import sys
import tempfile
from typing import ClassVar

from twisted.application.app import ServerOptions
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from examples.header_stamp import HeaderStamp
from examples.word_rejecter import WordRejecter
from tests.test_protocol import LogCapture
from txmilt.codec import encode
from txmilt.config import DEFAULT_LISTEN, SETTINGS, DaemonConfig, cores
from txmilt.daemon import Daemon, DrainService, InProcess, UnixSocketService
from txmilt.errors import ConfigurationError
from txmilt.messages import Accept, Continue, Negotiate, Reject, TempFail
from txmilt.protocol import MilterFactory, MilterProtocol, VerifiedFilters
from txmilt.tap import Options, makeService
from txmilt.workers import WorkerPool

STAMP = "examples.header_stamp:HeaderStamp"
COUNTED = "tests.test_tap:CountedStamp"
WORDS = "examples.word_rejecter:WordRejecter"
CONFIG = """
[daemon]
listen = ["inet:10025@127.0.0.1"]
metrics = "inet:9108@127.0.0.1"
frame_limit = 65536
idle_timeout = 60
max_connections = 10
drain_timeout = 5
progress_interval = 3
timeout = 7
fallback = "accept"

[[filter]]
name = "words"
class = "examples.word_rejecter:WordRejecter"

[[filter]]
name = "stamp"
class = "examples.header_stamp:HeaderStamp"
timeout = 2
fallback = "reject"
"""


class CountedStamp(HeaderStamp):
    """HeaderStamp that counts its instances."""

    made: ClassVar[int] = 0

    def __init__(self, header: str = "X-Filtered-By", name: str = "txmilt") -> None:
        CountedStamp.made += 1
        super().__init__(header, name)


def without_prometheus_client(case: SynchronousTestCase) -> None:
    """Make ``import prometheus_client`` fail for the rest of ``case``, as if it were not installed."""
    saved = sys.modules.get("prometheus_client")
    sys.modules["prometheus_client"] = None  # type: ignore[assignment]
    if saved is None:
        case.addCleanup(sys.modules.pop, "prometheus_client")
    else:
        case.addCleanup(sys.modules.__setitem__, "prometheus_client", saved)


class TempDirMixin(SynchronousTestCase):
    """A short temporary directory (unix socket paths are limited to about 100 bytes)."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="txm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w") as file:
            file.write(text)
        return path


def parsed(*arguments: str) -> DaemonConfig:
    """The DaemonConfig ``twistd milter ARGUMENTS`` runs with."""
    options = Options()
    options.parseOptions(list(arguments))
    assert options.config is not None
    return options.config


class OptionsTests(TempDirMixin):
    """Options turns the command line (and config file) into a checked DaemonConfig."""

    def test_one_filter(self) -> None:
        """--filter alone is enough; everything else has its default."""
        config = parsed("--filter", STAMP)
        (spec,) = config.filters
        self.assertEqual((spec.name, spec.timeout, spec.fallback, spec.dry_run), (STAMP, 25.0, TempFail(), False))
        self.assertIs(spec.factory, HeaderStamp)
        self.assertEqual(config.listen, (DEFAULT_LISTEN,))
        self.assertIsNone(config.metrics)
        self.assertEqual(config.drain_timeout, 30.0)

    def test_filters_in_order(self) -> None:
        """Repeated --filter (or -f) keeps the command line's order."""
        config = parsed("-f", WORDS, "--filter", STAMP, "--filter", WORDS)
        self.assertEqual([spec.factory for spec in config.filters], [WordRejecter, HeaderStamp, WordRejecter])

    def test_listen(self) -> None:
        """Repeated --listen (or -l) takes libmilter specs and strports, in order."""
        sock = os.path.join(self.directory, "milter.sock")
        config = parsed(
            "--listen", "inet:8891@127.0.0.1", "-l", f"unix:{sock}", "--listen", "tcp6:8892", "--filter", STAMP
        )
        self.assertEqual(config.listen, ("tcp:8891:interface=127.0.0.1", f"unix:{sock}:mode=660", "tcp6:8892"))

    def test_every_option(self) -> None:
        """Every option lands in the DaemonConfig."""
        group = grp.getgrgid(os.getgid()).gr_name
        config = parsed(
            "--filter", STAMP, "--metrics", "inet:9108@127.0.0.1", "--frame-limit", "4096", "--idle-timeout", "9.5",
            "--max-connections", "3", "--drain-timeout", "0", "--progress-interval", "2", "--timeout", "4",
            "--fallback", "continue", "--socket-group", group, "--negotiation-timeout", "1.5",
            "--max-headers", "10", "--max-header-bytes", "2000", "--max-body-size", "30000",
            "--body-spool-threshold", "500",
        )
        self.assertEqual(
            config,
            DaemonConfig(
                listen=(DEFAULT_LISTEN,), filters=config.filters, metrics="tcp:9108:interface=127.0.0.1",
                frame_limit=4096, idle_timeout=9.5, max_connections=3, drain_timeout=0.0, progress_interval=2.0,
                socket_group=group, default_timeout=4.0, default_fallback="continue", negotiation_timeout=1.5,
                max_headers=10, max_header_bytes=2000, max_body_size=30000, body_spool_threshold=500,
            ),
        )
        (spec,) = config.filters
        self.assertEqual((spec.timeout, spec.fallback), (4.0, Continue()))

    def test_config_file(self) -> None:
        """--config reads the file's daemon values and filters."""
        config = parsed("--config", self.write("milter.toml", CONFIG))
        self.assertEqual(config.listen, ("tcp:10025:interface=127.0.0.1",))
        self.assertEqual(config.metrics, "tcp:9108:interface=127.0.0.1")
        self.assertEqual(
            (config.frame_limit, config.idle_timeout, config.max_connections, config.drain_timeout),
            (65536, 60.0, 10, 5.0),
        )
        words, stamp = config.filters
        self.assertEqual((words.name, words.timeout, words.fallback), ("words", 7.0, Accept()))
        self.assertEqual((stamp.name, stamp.timeout, stamp.fallback), ("stamp", 2.0, Reject()))

    def test_command_line_overrides_config(self) -> None:
        """Command-line values beat the config file's."""
        config = parsed(
            "-c", self.write("milter.toml", CONFIG), "--listen", "inet:10026@127.0.0.1", "--metrics", "tcp:9109",
            "--frame-limit", "1024", "--idle-timeout", "1", "--max-connections", "2", "--drain-timeout", "3",
            "--progress-interval", "4",
        )
        self.assertEqual(config.listen, ("tcp:10026:interface=127.0.0.1",))
        self.assertEqual(config.metrics, "tcp:9109")
        self.assertEqual(
            (config.frame_limit, config.idle_timeout, config.max_connections, config.drain_timeout,
             config.progress_interval),
            (1024, 1.0, 2, 3.0, 4.0),
        )

    def test_command_line_timeout_and_fallback(self) -> None:
        """--timeout and --fallback replace [daemon]'s defaults, not a filter's own values."""
        config = parsed("-c", self.write("milter.toml", CONFIG), "--timeout", "11", "--fallback", "tempfail")
        words, stamp = config.filters
        self.assertEqual((words.timeout, words.fallback), (11.0, TempFail()))
        self.assertEqual((stamp.timeout, stamp.fallback), (2.0, Reject()))
        self.assertEqual((config.default_timeout, config.default_fallback), (11.0, "tempfail"))

    def test_filters_after_config(self) -> None:
        """--filter adds filters after the config file's, with the file's defaults."""
        config = parsed("--filter", STAMP, "-c", self.write("milter.toml", CONFIG))
        self.assertEqual([spec.name for spec in config.filters], ["words", "stamp", STAMP])
        self.assertEqual((config.filters[2].timeout, config.filters[2].fallback), (7.0, Accept()))

    def test_config_without_filters(self) -> None:
        """A config file may name no filters when --filter does."""
        path = self.write("milter.toml", '[daemon]\nlisten = ["inet:10025@127.0.0.1"]\n')
        config = parsed("--config", path, "--filter", STAMP)
        self.assertEqual((config.listen, len(config.filters)), (("tcp:10025:interface=127.0.0.1",), 1))

    def test_help(self) -> None:
        """The help text names every option."""
        text = str(Options())
        for option in (
            "--listen", "--filter", "--config", "--metrics", "--frame-limit", "--idle-timeout", "--max-connections",
            "--drain-timeout", "--progress-interval", "--timeout", "--fallback", "--socket-group",
        ):
            self.assertIn(option, text)


class OptionErrorTests(TempDirMixin):
    """Every mistake is a UsageError naming it, raised while parsing, before anything listens."""

    def assert_usage_error(self, arguments: list[str], *fragments: str) -> str:
        message = str(self.assertRaises(usage.UsageError, Options().parseOptions, arguments))
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_no_filters(self) -> None:
        """Without any filter the daemon refuses to start."""
        self.assert_usage_error([], "no filters configured; give --filter module:Class or [[filter]]")

    def test_bad_listen(self) -> None:
        """A listen address that is not understood is refused."""
        self.assert_usage_error(["--listen", "inet:8891@", "--filter", STAMP], "listen address 'inet:8891@'")

    def test_relative_socket(self) -> None:
        """A relative unix socket path is refused."""
        self.assert_usage_error(["--listen", "unix:milter.sock", "-f", STAMP], "the socket path must be absolute")

    def test_unparsable_strports(self) -> None:
        """A strports description Twisted cannot parse is refused."""
        self.assert_usage_error(["--listen", "tcp:8891:backlog=many", "-f", STAMP], "'tcp:8891:backlog=many' cannot be")

    def test_bad_metrics(self) -> None:
        """A bad --metrics address is refused."""
        self.assert_usage_error(["--metrics", "9108", "-f", STAMP], "listen address '9108' is not understood")

    def test_missing_filter_module(self) -> None:
        """A --filter whose module is missing is refused."""
        self.assert_usage_error(["--filter", "nosuch.module:Filter"], "cannot import module 'nosuch.module'")

    def test_missing_filter_class(self) -> None:
        """A --filter whose class is missing is refused."""
        self.assert_usage_error(
            ["--filter", "examples.header_stamp:Nope"], "module 'examples.header_stamp' has no 'Nope'"
        )

    def test_not_a_number(self) -> None:
        """A number option given something else is refused by the option parser."""
        self.assert_usage_error(["--frame-limit", "big", "-f", STAMP], "--frame-limit takes a whole number, not 'big'")
        self.assert_usage_error(["--max-connections", "1.5", "-f", STAMP], "--max-connections takes a whole number")
        self.assert_usage_error(["--drain-timeout", "soon", "-f", STAMP], "--drain-timeout takes a number of seconds")
        self.assert_usage_error(["--timeout", "nan", "-f", STAMP], "--timeout takes a number of seconds, not 'nan'")

    def test_frame_limit_zero(self) -> None:
        """--frame-limit 0 is refused."""
        self.assert_usage_error(["--frame-limit", "0", "-f", STAMP], "frame_limit 0 must be between 1 and")

    def test_negative_drain_timeout(self) -> None:
        """A negative --drain-timeout is refused."""
        self.assert_usage_error(["--drain-timeout", "-1", "-f", STAMP], "drain_timeout must not be negative")

    def test_negative_idle_timeout(self) -> None:
        """A negative --idle-timeout is refused."""
        self.assert_usage_error(["--idle-timeout", "-1", "-f", STAMP], "idle_timeout must not be negative")

    def test_zero_progress_interval(self) -> None:
        """--progress-interval 0 is refused."""
        self.assert_usage_error(["--progress-interval", "0", "-f", STAMP], "progress_interval must be positive")

    def test_zero_max_connections(self) -> None:
        """--max-connections 0 is refused."""
        self.assert_usage_error(["--max-connections", "0", "-f", STAMP], "max_connections must be at least 1")

    def test_bad_timeout(self) -> None:
        """A --timeout that is not positive is refused, also over a config file's."""
        self.assert_usage_error(["--timeout", "0", "-f", STAMP], "--timeout must be positive, not 0.0")
        path = self.write("milter.toml", CONFIG)
        self.assert_usage_error(["--timeout", "-3", "-c", path], "--timeout must be positive, not -3.0")

    def test_bad_fallback(self) -> None:
        """An unknown --fallback is refused, also over a config file's."""
        self.assert_usage_error(["--fallback", "drop", "-f", STAMP], "--fallback: fallback 'drop' is not one of")
        path = self.write("milter.toml", CONFIG)
        self.assert_usage_error(["--fallback", "drop", "-c", path], "--fallback: fallback 'drop'")

    def test_missing_socket_group(self) -> None:
        """A --socket-group that does not exist is refused."""
        self.assert_usage_error(["--socket-group", "no-such-group-txmilt", "-f", STAMP],
                              "socket group 'no-such-group-txmilt' does not exist")

    def test_missing_config(self) -> None:
        """A config file that cannot be read is refused."""
        path = os.path.join(self.directory, "absent.toml")
        self.assert_usage_error(["--config", path], f"cannot read config file {path}")

    def test_invalid_config(self) -> None:
        """A config file that is not TOML is refused."""
        self.assert_usage_error(["--config", self.write("milter.toml", "listen =\n")], "is not valid TOML")

    def test_config_error(self) -> None:
        """A mistake inside the config file is refused, naming the file."""
        path = self.write("milter.toml", CONFIG.replace("frame_limit", "frame_limt"))
        self.assert_usage_error(["--config", path], f"{path} [daemon]: unknown key 'frame_limt'")

    def test_socket_directory_missing(self) -> None:
        """A unix socket in a directory that does not exist is refused."""
        sock = os.path.join(self.directory, "absent", "milter.sock")
        self.assert_usage_error(["--listen", f"unix:{sock}", "-f", STAMP], "does not exist")

    def test_socket_path_is_a_file(self) -> None:
        """A unix socket path taken by a regular file is refused, and the file is kept."""
        path = self.write("milter.sock", "data")
        self.assert_usage_error(["--listen", f"unix:{path}", "-f", STAMP], f"{path} exists and is not a socket")
        self.assertTrue(os.path.isfile(path))

    def test_socket_in_use(self) -> None:
        """A unix socket another process listens on is refused."""
        path = os.path.join(self.directory, "milter.sock")
        server = socket.socket(socket.AF_UNIX)
        self.addCleanup(server.close)
        server.bind(path)
        server.listen(1)
        self.assert_usage_error(["--listen", f"unix:{path}", "-f", STAMP], "in use by another process")

    def test_world_writable_socket(self) -> None:
        """--listen with a world-writable mode is refused, and nothing is created."""
        path = os.path.join(self.directory, "milter.sock")
        for mode in ("666", "777", "0662"):
            self.assert_usage_error(
                ["--listen", f"unix:{path}:mode={mode}", "-f", STAMP], "world-writable", "socket_group"
            )
        self.assertFalse(os.path.exists(path))

    def test_bad_socket_mode(self) -> None:
        """A mode that is not octal is refused."""
        path = os.path.join(self.directory, "milter.sock")
        self.assert_usage_error(["--listen", f"local:{path}:mode=rw", "-f", STAMP], "not an octal file mode")

    def test_negative_limit(self) -> None:
        """A negative limit on the command line is refused."""
        self.assert_usage_error(["--max-headers", "-1", "-f", STAMP], "max_headers must not be negative")

    def test_unknown_option(self) -> None:
        """An unknown option is refused."""
        self.assert_usage_error(["--filters", STAMP], "filters")

    def test_under_twistd(self) -> None:
        """Under twistd, an error is one line on stderr and exit status 1, not twistd's help on stdout."""
        stderr, stdout = io.StringIO(), io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.patch(sys, "stdout", stdout)
        options = Options()
        options.parent = ServerOptions()
        exit = self.assertRaises(SystemExit, options.parseOptions, ["--filter", "nosuch.module:Filter"])
        self.assertEqual(exit.code, 1)
        self.assertTrue(stderr.getvalue().startswith("twistd milter: filter 'nosuch.module:Filter': cannot import"))
        self.assertEqual(stdout.getvalue(), "")

    def twistd_stderr(self, arguments: list[str]) -> str:
        """What ``twistd milter ARGUMENTS`` writes on stderr before exiting with status 1."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.patch(sys, "stdout", io.StringIO())
        options = Options()
        options.parent = ServerOptions()
        self.assertEqual(self.assertRaises(SystemExit, options.parseOptions, arguments).code, 1)
        return stderr.getvalue()

    def test_under_twistd_option_mistake(self) -> None:
        """Under twistd, a mistake in the option syntax adds one line pointing at --help."""
        self.assertEqual(
            self.twistd_stderr(["--frame-limit", "big", "-f", STAMP]),
            "twistd milter: Parameter type enforcement failed: --frame-limit takes a whole number, not 'big'\n"
            "(twistd milter --help lists the options)\n",
        )

    def test_metrics_without_prometheus_client(self) -> None:
        """--metrics without prometheus_client is one line on stderr saying what to install."""
        without_prometheus_client(self)
        self.assertEqual(
            self.twistd_stderr(["--metrics", "tcp:0", "-f", STAMP]),
            "twistd milter: metrics need the prometheus_client package, which is not installed:"
            " pip install prometheus_client (txmilt's 'metrics' extra)\n",
        )

    def test_no_metrics_without_prometheus_client(self) -> None:
        """Without --metrics, prometheus_client is not needed."""
        without_prometheus_client(self)
        self.assertIsNone(parsed("--filter", STAMP).metrics)


def serving(top: MultiService) -> MilterFactory:
    """The MilterFactory the daemon of ``top`` serves new connections with (in its own process)."""
    (daemon,) = [child for child in top if isinstance(child, Daemon)]
    assert isinstance(daemon.server, InProcess)
    return daemon.server.factory.current


class SettingsTests(SynchronousTestCase):
    """The options come from DaemonConfig's settings, and so does what makeService gives MilterFactory."""

    def test_every_setting_is_an_option(self) -> None:
        """Each setting is an option whose help shows the field's default where it has one."""
        text = str(Options())
        for setting in SETTINGS:
            self.assertIn(f"--{setting.option}=", text)
        helps = {setting.name: setting.help for setting in SETTINGS}
        self.assertIn("(default 3600; 0: never)", helps["idle_timeout"])
        self.assertIn("(default 25)", helps["default_timeout"])
        self.assertIn("(default tempfail)", helps["default_fallback"])
        self.assertIn("(default 1048576)", helps["frame_limit"])

    def test_factory_keywords_have_the_same_defaults(self) -> None:
        """Every setting MilterFactory takes is a keyword of it with the same default."""
        parameters = inspect.signature(MilterFactory).parameters
        keywords = DaemonConfig().factory_keywords()
        self.assertEqual(
            set(keywords),
            {"frame_limit", "idle_timeout", "negotiation_timeout", "max_connections", "progress_interval",
             "max_headers", "max_header_bytes", "max_body_size", "body_spool_threshold", "frame_timeout",
             "chain_order"},
        )
        for name, default in keywords.items():
            self.assertEqual(parameters[name].default, default, name)


class VerifyOnceTests(TempDirMixin):
    """Starting the daemon makes each configured filter once to check it, not more."""

    def test_each_filter_made_once(self) -> None:
        """From the options and config file to the MilterFactory, each filter's factory is called once."""
        self.patch(CountedStamp, "made", 0)
        path = self.write("milter.toml", f'[[filter]]\nclass = "{COUNTED}"\n')
        options = Options()
        options.parseOptions(["-c", path, "--filter", COUNTED, "--listen", "tcp:0:interface=127.0.0.1"])
        top = makeService(options)
        self.assertEqual(CountedStamp.made, 2)
        assert isinstance(top, MultiService) and options.config is not None
        self.assertIs(serving(top).filters, options.config.filters)

    def test_factory_checks_unverified_filters(self) -> None:
        """MilterFactory given plain filters makes each once to check it; given VerifiedFilters, none."""
        self.patch(CountedStamp, "made", 0)
        MilterFactory([CountedStamp], Clock())
        self.assertEqual(CountedStamp.made, 1)
        verified = VerifiedFilters.verify([CountedStamp])
        self.assertEqual(CountedStamp.made, 2)
        self.assertIs(MilterFactory(verified, Clock()).filters, verified)
        self.assertEqual(CountedStamp.made, 2)


class MakeServiceTests(TempDirMixin):
    """makeService builds the service tree without starting it."""

    def service(self, *arguments: str) -> MultiService:
        options = Options()
        options.parseOptions(list(arguments))
        top = makeService(options)
        assert isinstance(top, MultiService)
        self.assertFalse(top.running)
        return top

    def listeners(self, top: MultiService) -> list[StreamServerEndpointService]:
        return [child for child in top if isinstance(child, StreamServerEndpointService)]

    def test_listeners(self) -> None:
        """The daemon binds every --listen for one MilterFactory and drains with the deadline; unix groups after."""
        sock = os.path.join(self.directory, "milter.sock")
        top = self.service(
            "--listen", "tcp:0:interface=127.0.0.1", "--listen", f"unix:{sock}", "--filter", STAMP,
            "--drain-timeout", "7", "--frame-limit", "4096", "--idle-timeout", "30", "--max-connections", "5",
            "--progress-interval", "2", "--negotiation-timeout", "3", "--max-headers", "11",
            "--max-header-bytes", "999", "--max-body-size", "77", "--body-spool-threshold", "66",
        )
        (daemon,) = [child for child in top if isinstance(child, Daemon)]
        self.assertEqual(daemon.sockets.descriptions, ("tcp:0:interface=127.0.0.1", f"unix:{sock}:mode=660"))
        self.assertEqual(self.listeners(top), [])
        factory = serving(top)
        self.assertEqual(
            (factory.frame_limit, factory.idle_timeout, factory.max_connections, factory.progress_interval),
            (4096, 30.0, 5, 2.0),
        )
        self.assertEqual(
            (factory.negotiation_timeout, factory.max_headers, factory.max_header_bytes, factory.max_body_size,
             factory.body_spool_threshold),
            (3.0, 11, 999, 77, 66),
        )
        self.assertIsNone(factory.observer)
        assert isinstance(daemon.server, InProcess)
        self.assertEqual((daemon.server.drain.factory, daemon.server.drain.timeout), (daemon.server.factory, 7.0))
        (sockets,) = [child for child in top if isinstance(child, UnixSocketService)]
        self.assertEqual((sockets.path, sockets.group), (sock, None))
        children = list(top)
        self.assertLess(children.index(daemon), children.index(sockets))

    def test_metrics(self) -> None:
        """--metrics adds a web listener and gives the factory a metrics observer."""
        top = self.service("--filter", STAMP, "--metrics", "tcp:0:interface=127.0.0.1")
        (metrics,) = self.listeners(top)
        self.assertIsNotNone(serving(top).observer)
        self.assertIsInstance(metrics.factory, Site)

    def test_default_listen(self) -> None:
        """Without --listen the daemon binds the default address, and there are no metrics."""
        top = self.service("--filter", STAMP)
        (daemon,) = [child for child in top if isinstance(child, Daemon)]
        self.assertEqual(daemon.sockets.descriptions, (DEFAULT_LISTEN,))
        self.assertEqual(self.listeners(top), [])

    def test_workers(self) -> None:
        """--workers 2 serves in a pool of worker processes; auto means one per core; 1 serves in the daemon."""
        for given, count in (("2", 2), ("auto", cores()), ("AUTO", cores())):
            top = self.service("--filter", STAMP, "--workers", given)
            (daemon,) = [child for child in top if isinstance(child, Daemon)]
            self.assertEqual(daemon.config.workers, count)
            self.assertIsInstance(daemon.server, WorkerPool if count > 1 else InProcess)
        (daemon,) = [child for child in self.service("--filter", STAMP) if isinstance(child, Daemon)]
        self.assertIsInstance(daemon.server, InProcess)

    def test_stale_socket_removed(self) -> None:
        """A stale socket at a --listen path is removed before listening."""
        path = os.path.join(self.directory, "milter.sock")
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(path)
        self.service("--listen", f"unix:{path}", "--filter", STAMP)
        self.assertFalse(os.path.exists(path))


class UnixSocketServiceTests(TempDirMixin):
    """UnixSocketService gives a new socket its group."""

    def socket_file(self) -> str:
        path = os.path.join(self.directory, "milter.sock")
        sock = socket.socket(socket.AF_UNIX)
        self.addCleanup(sock.close)
        sock.bind(path)
        return path

    def test_group(self) -> None:
        """The socket's group is set before privileges are dropped."""
        others = [
            group for group in grp.getgrall()
            if group.gr_gid != os.getegid() and (os.geteuid() == 0 or group.gr_gid in os.getgroups())
        ]
        if not others:
            self.skipTest("no other group to give the socket to")
        path = self.socket_file()
        UnixSocketService(path, others[0].gr_name).privilegedStartService()
        self.assertEqual(os.stat(path).st_gid, others[0].gr_gid)

    def test_no_group(self) -> None:
        """Without a group the socket is left as it is."""
        path = self.socket_file()
        before = os.stat(path)
        service = UnixSocketService(path, None)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(os.stat(path).st_gid, before.st_gid)


class UnixSocketSafetyTests(TempDirMixin):
    """UnixSocketService never leaves a world-writable socket, and touches only sockets."""

    def test_world_writable_socket_tightened(self) -> None:
        """A socket that ended up world-writable loses the access of other users, with a warning."""
        path = os.path.join(self.directory, "milter.sock")
        sock = socket.socket(socket.AF_UNIX)
        self.addCleanup(sock.close)
        sock.bind(path)
        os.chmod(path, 0o666)
        logs = LogCapture(self)
        UnixSocketService(path, None).privilegedStartService()
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o660)
        self.assertEqual(len(logs.matching("was world-writable")), 1)

    def test_not_a_socket(self) -> None:
        """If the path is no longer a socket after listening, nothing is changed and startup fails."""
        path = self.write("milter.sock", "data")
        os.chmod(path, 0o644)
        self.assertRaises(ConfigurationError, UnixSocketService(path, "root").privilegedStartService)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)

    def test_symlink_not_followed(self) -> None:
        """A symbolic link put in the socket's place is not followed to its target."""
        target = self.write("target", "data")
        before = os.stat(target)
        path = os.path.join(self.directory, "milter.sock")
        os.symlink(target, path)
        self.assertRaises(ConfigurationError, UnixSocketService(path, "root").privilegedStartService)
        self.assertEqual(os.stat(target), before)


class DrainServiceTests(SynchronousTestCase):
    """DrainService lets open connections finish, up to a deadline, on stop."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = MilterFactory([HeaderStamp], self.clock)

    def connect(self) -> tuple[MilterProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        assert isinstance(protocol, MilterProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(encode(Negotiate()))  # an MTA negotiates at once
        return protocol, transport

    def drain(self, timeout: float) -> DrainService:
        service = DrainService(self.factory, timeout, self.clock)
        service.startService()
        return service

    def test_nothing_open(self) -> None:
        """Without connections, stopping is immediate."""
        service = self.drain(30)
        self.assertIsNone(service.stopService())
        self.assertFalse(service.running)

    def test_waits_for_connections(self) -> None:
        """Stopping waits while connections are open, and ends when the last one closes."""
        (first, first_transport), (second, second_transport) = self.connect(), self.connect()
        done = self.drain(30).stopService()
        assert done is not None
        self.assertNoResult(done)
        self.clock.advance(10)
        first.connectionLost(Failure(ConnectionError()))
        self.clock.advance(10)
        self.assertNoResult(done)
        second.connectionLost(Failure(ConnectionError()))
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(done))
        self.assertFalse(first_transport.disconnecting or second_transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closes_at_deadline(self) -> None:
        """Connections still open at the deadline are closed."""
        (_, first), (_, second) = self.connect(), self.connect()
        done = self.drain(5).stopService()
        assert done is not None
        self.clock.advance(4.9)
        self.assertNoResult(done)
        self.assertFalse(first.disconnecting or second.disconnecting)
        self.clock.pump([0.1] * 2)
        self.assertIsNone(self.successResultOf(done))
        self.assertTrue(first.disconnecting and second.disconnecting)

    def test_zero_deadline(self) -> None:
        """A zero deadline closes open connections at once."""
        _, transport = self.connect()
        done = self.drain(0).stopService()
        assert done is not None
        self.assertIsNone(self.successResultOf(done))
        self.assertTrue(transport.disconnecting)

    def test_stops_service(self) -> None:
        """The service is marked stopped while it drains."""
        self.connect()
        service = self.drain(1)
        service.stopService()
        self.assertFalse(service.running)
