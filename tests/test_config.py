"""Tests for txmilt.config: the TOML file, every error it can name, and the example config."""

from __future__ import annotations

import os
import shutil
import tempfile
import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from examples.alias_rewriter import AliasRewriter
from examples.disclaimer import Disclaimer
from examples.header_stamp import HeaderStamp
from examples.quarantine_sender import QuarantineSender
from examples.word_rejecter import WordRejecter
from tests.test_tap import without_prometheus_client
from txmilt.codec import ABSOLUTE_FRAME_LIMIT, DEFAULT_FRAME_LIMIT
from txmilt.config import (
    DEFAULT_LISTEN,
    ConfigSource,
    DaemonConfig,
    SupervisedCommand,
    check_config,
    cores,
    fallback_verdict,
    filter_spec,
    load_factory,
    parse_config,
    read_config,
)
from txmilt.errors import ConfigurationError
from txmilt.messages import Accept, Continue, Reject, TempFail
from txmilt.protocol import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "milter.toml"
STAMP = '[[filter]]\nclass = "examples.header_stamp:HeaderStamp"\n'


def parse(text: str) -> DaemonConfig:
    """The config a TOML text describes."""
    return parse_config(tomllib.loads(text))


class ConfigTestCase(SynchronousTestCase):
    """Helpers for config errors."""

    def assert_refused(self, text: str, *fragments: str) -> str:
        """``text`` is refused with a message containing every fragment; the message."""
        message = str(self.assertRaises(ConfigurationError, lambda: check_config(parse(text))))
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class ExampleConfigTests(SynchronousTestCase):
    """examples/milter.toml reads as documented."""

    def setUp(self) -> None:
        self.config = check_config(read_config(str(EXAMPLE)))

    def test_filters_in_order(self) -> None:
        """The filters keep the file's order and names."""
        self.assertEqual(
            [spec.name for spec in self.config.filters], ["words", "quarantine", "aliases", "disclaimer", "stamp"]
        )
        self.assertEqual(
            [type(spec.factory()) for spec in self.config.filters],
            [WordRejecter, QuarantineSender, AliasRewriter, Disclaimer, HeaderStamp],
        )

    def test_options(self) -> None:
        """Each filter is made with its options table."""
        words, quarantine, aliases, disclaimer, _ = (spec.factory() for spec in self.config.filters)
        assert isinstance(words, WordRejecter)
        self.assertEqual(words.pattern.pattern, "(?:viagra)|(?:\\bcasino\\b)")
        assert isinstance(quarantine, QuarantineSender)
        self.assertEqual(quarantine.domains, {"suspicious.example"})
        assert isinstance(aliases, AliasRewriter)
        self.assertEqual(aliases.aliases, {"sales@example.com": ("alice@example.com", "bob@example.com")})
        assert isinstance(disclaimer, Disclaimer)
        self.assertEqual(disclaimer.footer, "This message was checked by txmilt.")

    def test_fresh_instances(self) -> None:
        """Every call of a factory makes a new filter (one per connection)."""
        spec = self.config.filters[0]
        self.assertIsNot(spec.factory(), spec.factory())

    def test_timeouts_and_fallbacks(self) -> None:
        """[daemon]'s timeout and fallback apply to every filter; none is a dry run."""
        for spec in self.config.filters:
            self.assertEqual((spec.timeout, spec.fallback, spec.dry_run), (20.0, TempFail(), False))

    def test_daemon(self) -> None:
        """[daemon] values are read, listen specs turned into strports, the rest defaulted."""
        self.assertEqual(self.config.listen, ("tcp:8891:interface=127.0.0.1",))
        self.assertEqual(self.config.drain_timeout, 30.0)
        self.assertEqual(self.config.default_timeout, 20.0)
        self.assertEqual(self.config.default_fallback, "tempfail")
        self.assertIsNone(self.config.metrics)
        self.assertIsNone(self.config.socket_group)
        self.assertEqual(self.config.frame_limit, DEFAULT_FRAME_LIMIT)
        self.assertEqual(self.config.idle_timeout, DEFAULT_IDLE_TIMEOUT)
        self.assertEqual(self.config.max_connections, DEFAULT_MAX_CONNECTIONS)


class ParseConfigTests(ConfigTestCase):
    """parse_config() reads every key."""

    def test_every_daemon_key(self) -> None:
        """Every [daemon] key lands in DaemonConfig."""
        config = parse(
            """
            [daemon]
            listen = ["inet:10025@127.0.0.1", "unix:/run/txmilt.sock:mode=600"]
            metrics = "inet:9108@127.0.0.1"
            frame_limit = 65536
            idle_timeout = 60
            negotiation_timeout = 4
            max_connections = 10
            max_headers = 100
            max_header_bytes = 20000
            max_body_size = 1000000
            body_spool_threshold = 0
            drain_timeout = 2.5
            progress_interval = 5
            socket_group = "postfix"
            timeout = 3
            fallback = "accept"
            """
            + STAMP
        )
        self.assertEqual(
            config,
            DaemonConfig(
                listen=("tcp:10025:interface=127.0.0.1", "unix:/run/txmilt.sock:mode=600"),
                filters=config.filters,
                metrics="tcp:9108:interface=127.0.0.1",
                frame_limit=65536,
                idle_timeout=60.0,
                negotiation_timeout=4.0,
                max_connections=10,
                max_headers=100,
                max_header_bytes=20000,
                max_body_size=1000000,
                body_spool_threshold=0,
                drain_timeout=2.5,
                progress_interval=5.0,
                socket_group="postfix",
                default_timeout=3.0,
                default_fallback="accept",
            ),
        )
        (spec,) = config.filters
        self.assertEqual((spec.timeout, spec.fallback), (3.0, Accept()))

    def test_every_filter_key(self) -> None:
        """Every [[filter]] key lands in the FilterSpec."""
        (spec,) = parse(
            """
            [[filter]]
            class = "examples.header_stamp:HeaderStamp"
            name = "stamp"
            timeout = 1.5
            fallback = "Continue"
            dry_run = true
            options = { header = "X-Checked", name = "edge" }
            """
        ).filters
        self.assertEqual((spec.name, spec.timeout, spec.fallback, spec.dry_run), ("stamp", 1.5, Continue(), True))
        milter = spec.factory()
        assert isinstance(milter, HeaderStamp)
        self.assertEqual((milter.header_name, milter.name), ("X-Checked", "edge"))

    def test_filter_defaults(self) -> None:
        """A filter without a name is named for its class; the defaults are 25 s and TempFail."""
        (spec,) = parse(STAMP).filters
        self.assertEqual(
            (spec.name, spec.timeout, spec.fallback, spec.dry_run),
            ("examples.header_stamp:HeaderStamp", 25.0, TempFail(), False),
        )
        self.assertIs(spec.factory, HeaderStamp)

    def test_filter_overrides_daemon(self) -> None:
        """A filter's own timeout and fallback beat [daemon]'s."""
        first, second = parse(
            '[daemon]\ntimeout = 5\nfallback = "accept"\n'
            + STAMP
            + '[[filter]]\nclass = "examples.header_stamp:HeaderStamp"\ntimeout = 9\nfallback = "reject"\n'
        ).filters
        self.assertEqual((first.timeout, first.fallback), (5.0, Accept()))
        self.assertEqual((second.timeout, second.fallback), (9.0, Reject()))

    def test_command_line_defaults(self) -> None:
        """default_timeout and default_fallback replace [daemon]'s, not a filter's own."""
        data = tomllib.loads(
            '[daemon]\ntimeout = 5\nfallback = "accept"\n'
            + STAMP
            + '[[filter]]\nclass = "examples.header_stamp:HeaderStamp"\ntimeout = 9\n'
        )
        config = parse_config(data, default_timeout=2, default_fallback="continue")
        first, second = config.filters
        self.assertEqual((first.timeout, first.fallback), (2.0, Continue()))
        self.assertEqual((second.timeout, second.fallback), (9.0, Continue()))
        self.assertEqual((config.default_timeout, config.default_fallback), (2, "continue"))

    def test_listen_string(self) -> None:
        """listen may be one string instead of a list."""
        self.assertEqual(parse('[daemon]\nlisten = "inet:8891"\n' + STAMP).listen, ("tcp:8891",))

    def test_default_listen(self) -> None:
        """Without listen, the daemon listens on the default address."""
        self.assertEqual(parse(STAMP).listen, (DEFAULT_LISTEN,))

    def test_dotted_class_name(self) -> None:
        """package.module.Class works like package.module:Class."""
        (spec,) = parse('[[filter]]\nclass = "examples.header_stamp.HeaderStamp"\n').filters
        self.assertIs(spec.factory, HeaderStamp)

    def test_no_filters_parse(self) -> None:
        """A file may leave the filters to the command line."""
        self.assertEqual(parse('[daemon]\nlisten = ["inet:8891"]\n').filters, ())

    def test_empty_file(self) -> None:
        """An empty file is all defaults."""
        self.assertEqual(parse(""), DaemonConfig(listen=(DEFAULT_LISTEN,)))


class ConfigErrorTests(ConfigTestCase):
    """Every mistake in a config file is refused with a message naming it."""

    def test_unknown_table(self) -> None:
        """A table other than [daemon] and [[filter]] is refused."""
        self.assert_refused("[demon]\nlisten = []\n" + STAMP, "unknown table 'demon'", "use [daemon] and [[filter]]")

    def test_unknown_daemon_key(self) -> None:
        """A misspelt [daemon] key is refused, listing the known keys."""
        self.assert_refused(
            '[daemon]\nlisten_on = ["inet:8891"]\n' + STAMP,
            "config [daemon]: unknown key 'listen_on'",
            "known keys are body_spool_threshold, chain_order, drain_timeout, fallback, frame_limit",
        )

    def test_unknown_filter_key(self) -> None:
        """A misspelt [[filter]] key is refused, naming the filter's number."""
        self.assert_refused(
            STAMP + '[[filter]]\nklass = "examples.header_stamp:HeaderStamp"\n',
            "config [[filter]] #2: unknown key 'klass'", "known keys are after_changes, class, command, dry_run",
        )

    def test_wrong_type_daemon(self) -> None:
        """A [daemon] value of the wrong type is refused."""
        self.assert_refused('[daemon]\nframe_limit = "1M"\n' + STAMP, "[daemon]: frame_limit = '1M' has the wrong type")

    def test_wrong_type_filter(self) -> None:
        """A [[filter]] value of the wrong type is refused."""
        self.assert_refused(STAMP + 'dry_run = "yes"\n', "#1: dry_run = 'yes' has the wrong type")

    def test_bool_is_not_a_number(self) -> None:
        """true is not a number of seconds."""
        self.assert_refused("[daemon]\ndrain_timeout = true\n" + STAMP, "drain_timeout = True has the wrong type")
        self.assert_refused(STAMP + "timeout = true\n", "timeout = True has the wrong type")

    def test_float_is_not_an_int(self) -> None:
        """max_connections must be a whole number."""
        self.assert_refused("[daemon]\nmax_connections = 1.5\n" + STAMP, "max_connections = 1.5 has the wrong type")

    def test_daemon_not_a_table(self) -> None:
        """daemon must be a table."""
        self.assert_refused('daemon = "yes"\n' + STAMP, "[daemon] must be a table")

    def test_filter_not_an_array_of_tables(self) -> None:
        """[filter] (one table) instead of [[filter]] is refused."""
        self.assert_refused('[filter]\nclass = "examples.header_stamp:HeaderStamp"\n', "filters are [[filter]] tables")

    def test_filter_not_tables(self) -> None:
        """filter = ["..."] is refused."""
        self.assert_refused('filter = ["examples.header_stamp:HeaderStamp"]\n', "filters are [[filter]] tables")

    def test_listen_not_strings(self) -> None:
        """listen entries must be strings."""
        self.assert_refused("[daemon]\nlisten = [8891]\n" + STAMP, "listen = [8891] must be a list of strings")

    def test_bad_listen(self) -> None:
        """A listen address that is not understood is refused."""
        self.assert_refused('[daemon]\nlisten = ["inet:99999@127.0.0.1"]\n' + STAMP, "port 99999 is out of range")

    def test_bad_strports(self) -> None:
        """A strports description Twisted cannot parse is refused."""
        self.assert_refused('[daemon]\nlisten = ["tcp:8891:bogus=1"]\n' + STAMP, "'tcp:8891:bogus=1' cannot be used")

    def test_bad_metrics(self) -> None:
        """A bad metrics address is refused."""
        self.assert_refused('[daemon]\nmetrics = "udp:9108"\n' + STAMP, "unknown kind 'udp'")

    def test_missing_module(self) -> None:
        """A filter class in a module that does not exist is refused."""
        self.assert_refused(
            '[[filter]]\nclass = "examples.no_such_module:Filter"\n',
            "filter 'examples.no_such_module:Filter': cannot import module 'examples.no_such_module'",
            "No module named",
        )

    def test_missing_attribute(self) -> None:
        """A class a module does not have is refused."""
        self.assert_refused(
            '[[filter]]\nclass = "examples.header_stamp:NoSuchStamp"\n',
            "filter 'examples.header_stamp:NoSuchStamp': module 'examples.header_stamp' has no 'NoSuchStamp'",
        )

    def test_no_module(self) -> None:
        """A bare class name is refused, showing the form that works."""
        self.assert_refused('[[filter]]\nclass = "HeaderStamp"\n', "name it as package.module:ClassName")

    def test_not_callable(self) -> None:
        """Something that is not a class or factory is refused."""
        self.assert_refused(
            '[[filter]]\nclass = "txmilt.config:DEFAULT_LISTEN"\n', "'DEFAULT_LISTEN' is not a class or factory"
        )

    def test_not_a_milter(self) -> None:
        """A class that does not provide IMilter is refused."""
        self.assert_refused(
            '[[filter]]\nname = "dict"\nclass = "builtins:dict"\n', "filter dict does not provide IMilter"
        )

    def test_class_and_remote(self) -> None:
        """A filter with both class and remote is refused."""
        self.assert_refused(
            STAMP + 'remote = "inet:8892@127.0.0.1"\n', "#1: give exactly one of class", "or remote ="
        )

    def test_neither_class_nor_remote(self) -> None:
        """A filter with neither class nor remote is refused."""
        self.assert_refused('[[filter]]\nname = "nothing"\n', "#1: give exactly one of class")

    def test_bad_daemon_fallback(self) -> None:
        """An unknown [daemon] fallback is refused, listing the good ones."""
        self.assert_refused(
            '[daemon]\nfallback = "discard"\n' + STAMP,
            "[daemon]: fallback 'discard' is not one of tempfail, accept, continue, reject",
        )

    def test_bad_filter_fallback(self) -> None:
        """An unknown filter fallback is refused."""
        self.assert_refused(STAMP + 'fallback = "bounce"\n', "#1: fallback 'bounce' is not one of")

    def test_bad_option(self) -> None:
        """An option the filter class does not take is refused when the filter is made."""
        self.assert_refused(
            STAMP + 'name = "stamp"\noptions = { colour = "red" }\n',
            "filter stamp cannot be created", "unexpected keyword argument 'colour'",
        )

    def test_bad_option_value(self) -> None:
        """A constructor that raises on an option value is refused."""
        self.assert_refused(
            '[[filter]]\nname = "words"\nclass = "examples.word_rejecter:WordRejecter"\n'
            'options = { patterns = ["("] }\n',
            "filter words cannot be created",
        )

    def test_no_filters(self) -> None:
        """A configuration without any filter is refused by check_config."""
        self.assert_refused('[daemon]\nlisten = ["inet:8891"]\n', "no filters configured")

    def test_frame_limit_zero(self) -> None:
        """frame_limit 0 is refused."""
        self.assert_refused("[daemon]\nframe_limit = 0\n" + STAMP, "frame_limit 0 must be between 1 and")

    def test_frame_limit_too_large(self) -> None:
        """frame_limit beyond what the protocol can carry is refused."""
        self.assert_refused(
            f"[daemon]\nframe_limit = {ABSOLUTE_FRAME_LIMIT + 1}\n" + STAMP, f"between 1 and {ABSOLUTE_FRAME_LIMIT}"
        )

    def test_negative_daemon_timeout(self) -> None:
        """A negative [daemon] timeout is refused."""
        self.assert_refused("[daemon]\ntimeout = -1\n" + STAMP, "[daemon]: timeout must be positive, not -1.0")

    def test_zero_daemon_timeout(self) -> None:
        """A zero [daemon] timeout is refused."""
        self.assert_refused("[daemon]\ntimeout = 0\n" + STAMP, "timeout must be positive")

    def test_negative_filter_timeout(self) -> None:
        """A negative filter timeout is refused."""
        self.assert_refused(STAMP + "timeout = -5\n", "#1: timeout must be positive, not -5.0")

    def test_negative_drain_timeout(self) -> None:
        """A negative drain_timeout is refused."""
        self.assert_refused("[daemon]\ndrain_timeout = -1\n" + STAMP, "drain_timeout must not be negative")

    def test_negative_idle_timeout(self) -> None:
        """A negative idle_timeout is refused."""
        self.assert_refused("[daemon]\nidle_timeout = -0.5\n" + STAMP, "idle_timeout must not be negative")

    def test_zero_progress_interval(self) -> None:
        """A zero progress_interval (keep-alives without pause) is refused."""
        self.assert_refused("[daemon]\nprogress_interval = 0\n" + STAMP, "progress_interval must be positive")

    def test_zero_max_connections(self) -> None:
        """max_connections 0 is refused."""
        self.assert_refused("[daemon]\nmax_connections = 0\n" + STAMP, "max_connections must be at least 1")

    def test_negative_limits(self) -> None:
        """The per-message limits and the negotiation timeout may be 0 (off), never negative."""
        for key in ("negotiation_timeout", "max_headers", "max_header_bytes", "max_body_size",
                    "body_spool_threshold"):
            self.assert_refused(f"[daemon]\n{key} = -1\n" + STAMP, f"{key} must not be negative")
            self.assertEqual(getattr(check_config(parse(f"[daemon]\n{key} = 0\n" + STAMP)), key), 0)

    def test_limits_are_whole_numbers(self) -> None:
        """Byte and count limits take integers."""
        self.assert_refused("[daemon]\nmax_headers = 1.5\n" + STAMP, "max_headers = 1.5 has the wrong type")

    def test_range_errors_name_the_file(self) -> None:
        """A [daemon] value out of range is refused naming the file and the key."""
        self.assert_refused(
            "[daemon]\ndrain_timeout = -1\n" + STAMP, "config [daemon]: drain_timeout must not be negative"
        )
        self.assert_refused("[daemon]\nmax_connections = 0\n" + STAMP, "config [daemon]: max_connections must be")

    def test_remote_without_host(self) -> None:
        """A remote address without a host is refused naming the filter and saying a host is needed."""
        self.assert_refused(
            '[[filter]]\nremote = "inet:8892"\n', "config [[filter]] #1: milter address 'inet:8892' names no host"
        )

    def test_remote_relative_socket(self) -> None:
        """A remote unix socket must be given by its absolute path."""
        self.assert_refused('[[filter]]\nremote = "unix:milter.sock"\n', "#1: milter address", "must be absolute")

    def test_metrics_without_prometheus_client(self) -> None:
        """metrics = ... without prometheus_client installed says what to install."""
        without_prometheus_client(self)
        message = self.assert_refused(
            '[daemon]\nmetrics = "inet:9108@127.0.0.1"\n' + STAMP,
            "pip install prometheus_client (txmilt's 'metrics' extra)",
        )
        self.assertNotIn("\n", message)

    def test_world_writable_socket(self) -> None:
        """A unix socket mode that lets every user connect is refused."""
        self.assert_refused(
            '[daemon]\nlisten = ["unix:/run/txmilt.sock:mode=666"]\n' + STAMP,
            "mode 666 makes the socket world-writable",
        )


class ReadConfigTests(SynchronousTestCase):
    """read_config() reports files it cannot read or parse."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)

    def write(self, text: str) -> str:
        path = os.path.join(self.directory, "milter.toml")
        with open(path, "w") as file:
            file.write(text)
        return path

    def test_reads(self) -> None:
        """A good file is read, and its path names it in messages."""
        path = self.write(STAMP + "fallback = 'nope'\n")
        message = str(self.assertRaises(ConfigurationError, read_config, path))
        self.assertIn(f"{path} [[filter]] #1: fallback 'nope'", message)

    def test_invalid_toml(self) -> None:
        """Invalid TOML is refused with the parser's reason."""
        path = self.write("[daemon\nlisten = 1\n")
        message = str(self.assertRaises(ConfigurationError, read_config, path))
        self.assertIn(f"config file {path} is not valid TOML", message)
        self.assertIn("line 1", message)

    def test_missing_file(self) -> None:
        """A missing file is refused with the system's reason."""
        path = os.path.join(self.directory, "absent.toml")
        message = str(self.assertRaises(ConfigurationError, read_config, path))
        self.assertEqual(message, f"cannot read config file {path}: No such file or directory")

    def test_directory(self) -> None:
        """A directory is not a config file."""
        message = str(self.assertRaises(ConfigurationError, read_config, self.directory))
        self.assertIn(f"cannot read config file {self.directory}", message)

    def test_command_line_defaults(self) -> None:
        """read_config passes the command line's timeout and fallback on."""
        config = read_config(self.write(STAMP), default_timeout=7, default_fallback="reject")
        (spec,) = config.filters
        self.assertEqual((spec.timeout, spec.fallback), (7, Reject()))


class HelperTests(SynchronousTestCase):
    """load_factory, fallback_verdict and filter_spec on their own."""

    def test_load_factory(self) -> None:
        """A class is found by module:Name or module.Name."""
        self.assertIs(load_factory("examples.word_rejecter:SubjectOnlyRejecter"), load_factory(
            "examples.word_rejecter.SubjectOnlyRejecter"
        ))

    def test_fallback_verdicts(self) -> None:
        """Every fallback name stands for its verdict, whatever its case."""
        self.assertEqual(
            [fallback_verdict(name, "x") for name in ("tempfail", "ACCEPT", "Continue", "reject")],
            [TempFail(), Accept(), Continue(), Reject()],
        )

    def test_filter_spec_where(self) -> None:
        """filter_spec's messages start with where the table came from."""
        message = str(self.assertRaises(ConfigurationError, filter_spec, {"class": "x:Y", "bogus": 1}, "--filter x:Y",
                                        25.0, "tempfail"))
        self.assertTrue(message.startswith("--filter x:Y: unknown key 'bogus'"), message)

    def test_remote_filter(self) -> None:
        """remote = "inet:PORT@HOST" makes a remote filter spec named for its address."""
        try:
            import txmilt.remote  # noqa: F401
        except ImportError as e:
            self.skipTest(f"txmilt.remote cannot be imported: {e}")
        spec = filter_spec({"remote": "inet:8892@127.0.0.1", "timeout": 4}, "test", 25.0, "tempfail")
        self.assertEqual((spec.name, spec.timeout), ("inet:8892@127.0.0.1", 4.0))


REMOTE = '[[filter]]\nname = "dkim"\nremote = "inet:8892@127.0.0.1"\n'


class WorkersSettingTests(ConfigTestCase):
    """``workers``: a whole number of at least 1, or "auto" for one per core."""

    def test_values(self) -> None:
        self.assertEqual(check_config(parse(STAMP)).workers, 1)
        self.assertEqual(check_config(parse("[daemon]\nworkers = 3\n" + STAMP)).workers, 3)
        self.assertEqual(check_config(parse('[daemon]\nworkers = "auto"\n' + STAMP)).workers, cores())

    def test_refused(self) -> None:
        for value in ("0", '"many"', "true", "1.5"):
            self.assert_refused(f"[daemon]\nworkers = {value}\n" + STAMP, "workers")
        self.assert_refused("[daemon]\nworkers = 0\n" + STAMP, 'must be a whole number of at least 1 or "auto"')

    def test_workers_need_handed_sockets(self) -> None:
        """Only tcp, tcp6, unix and systemd sockets can be handed to workers."""
        self.assert_refused(
            '[daemon]\nworkers = 2\nlisten = ["ssl:8891:privateKey=key.pem"]\n' + STAMP,
            "listen address 'ssl:8891:privateKey=key.pem' cannot be handed to worker processes",
        )


class SupervisedConfigTests(ConfigTestCase):
    """``command``, ``env``, ``restart_delay`` and ``start_timeout`` on a remote filter."""

    def test_command(self) -> None:
        config = check_config(parse(
            REMOTE + 'command = ["true", "-x"]\nenv = { TZ = "UTC" }\nrestart_delay = 3\nstart_timeout = 60\n'
        ))
        self.assertEqual(config.supervised, (
            SupervisedCommand("dkim", "inet:8892@127.0.0.1", ("true", "-x"), (("TZ", "UTC"),), 3.0, 60.0),
        ))
        self.assertEqual([spec.name for spec in config.filters], ["dkim"])

    def test_defaults(self) -> None:
        (command,) = check_config(parse(REMOTE + 'command = ["true"]\n')).supervised
        self.assertEqual((command.env, command.restart_delay, command.start_timeout), ((), 1.0, 30.0))
        self.assertEqual(check_config(parse(REMOTE)).supervised, ())

    def test_refused(self) -> None:
        self.assert_refused(STAMP + 'command = ["true"]\n', "#1: command needs remote =")
        self.assert_refused(REMOTE + "restart_delay = 2\n", "#1: restart_delay needs command = [...]")
        self.assert_refused(REMOTE + "command = []\n", "#1: command must be a list of words")
        self.assert_refused(REMOTE + 'command = ["true", 1]\n', "#1: command must be a list of words")
        self.assert_refused(REMOTE + 'command = "true"\n', "#1: command = 'true' has the wrong type")
        self.assert_refused(REMOTE + 'command = ["true"]\nenv = { N = 1 }\n', "#1: env values must be strings")
        self.assert_refused(REMOTE + 'command = ["true"]\nrestart_delay = 0\n', "restart_delay must be positive")
        self.assert_refused(REMOTE + 'command = ["true"]\nstart_timeout = -1\n', "start_timeout must be positive")

    def test_program_must_exist(self) -> None:
        """The program is looked up before anything listens, in the PATH its env gives."""
        self.assert_refused(
            REMOTE + 'command = ["no-such-milter"]\n',
            "filter dkim: command 'no-such-milter' is not an executable in PATH",
        )
        self.assert_refused(
            REMOTE + 'command = ["/nonexistent/milter"]\n', "command '/nonexistent/milter' is not an executable file"
        )
        self.assert_refused(REMOTE + 'command = ["true"]\nenv = { PATH = "/nonexistent" }\n', "(/nonexistent)")

    def test_one_command_per_address(self) -> None:
        self.assert_refused(
            REMOTE + 'command = ["true"]\n' + REMOTE.replace("dkim", "other") + 'command = ["true"]\n',
            "filters dkim and other both run a command for inet:8892@127.0.0.1",
        )

    def test_one_command_per_address_however_written(self) -> None:
        """inet:PORT@HOST and inet:HOST:PORT name one address."""
        other = REMOTE.replace("dkim", "other").replace("inet:8892@127.0.0.1", "inet:127.0.0.1:8892")
        self.assert_refused(
            REMOTE + 'command = ["true"]\n' + other + 'command = ["true"]\n',
            "filters dkim and other both run a command for inet:127.0.0.1:8892",
        )


class ConfigSourceTests(SynchronousTestCase):
    """ConfigSource: the file's text and the command line, built the same way anywhere."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "milter.toml")
        Path(self.path).write_text('[daemon]\ntimeout = 4\n' + STAMP)

    def test_build(self) -> None:
        """Command-line values win over the file's; --filter adds filters; --listen replaces the file's."""
        source = ConfigSource(self.path, None, {"idle_timeout": 9.0, "default_timeout": 2.0},
                              ("examples.word_rejecter:WordRejecter",), ("tcp:1:interface=127.0.0.1",)).reread()
        config = source.build()
        self.assertEqual((config.idle_timeout, config.listen), (9.0, ("tcp:1:interface=127.0.0.1",)))
        self.assertEqual([spec.timeout for spec in config.filters], [2.0, 2.0])

    def test_json_and_text(self) -> None:
        """A source travels as JSON with the text it read: a later change of the file does not affect it."""
        source = ConfigSource(self.path, None, {"workers": "auto"}).reread()
        Path(self.path).write_text("[daemon\n")
        copy = ConfigSource.from_json(source.to_json())
        self.assertEqual(copy, source)
        self.assertEqual(copy.build().default_timeout, 4.0)
        self.assertRaises(ConfigurationError, copy.reread().build)

    def test_unreadable(self) -> None:
        Path(self.path).write_bytes(b"\xff\xfe")
        source = ConfigSource(self.path)
        self.assertIn("is not UTF-8 text", str(self.assertRaises(ConfigurationError, source.reread)))
        os.remove(self.path)
        self.assertIn("cannot read config file", str(self.assertRaises(ConfigurationError, source.reread)))

    def test_listen_not_checked_in_a_worker(self) -> None:
        """A worker, handed bound sockets, does not look at the listen addresses (systemd's are the daemon's)."""
        source = ConfigSource(None, None, {}, (STAMP_CLASS,), ("systemd:domain=INET:index=0",))
        self.assertRaises(ConfigurationError, source.build)
        self.assertEqual(source.build(check_listen=False).listen, ("systemd:domain=INET:index=0",))


STAMP_CLASS = "examples.header_stamp:HeaderStamp"
