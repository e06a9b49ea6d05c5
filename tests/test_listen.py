"""Tests for txmilt.listen: libmilter/Postfix socket specs as strports, and stale unix sockets."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from txmilt.errors import ConfigurationError
from txmilt.listen import check_strports, remove_stale_socket, stale_socket, to_strports, unix_socket_path


class ToStrportsTests(SynchronousTestCase):
    """to_strports() turns every spec an MTA admin types into a Twisted description."""

    def assert_converts(self, spec: str, expected: str) -> None:
        self.assertEqual(to_strports(spec), expected)
        check_strports(expected)

    def assert_refused(self, spec: str, *fragments: str) -> None:
        message = str(self.assertRaises(ConfigurationError, to_strports, spec))
        for fragment in (repr(spec), *fragments):
            self.assertIn(fragment, message)

    def test_inet_port_at_host(self) -> None:
        """libmilter's inet:PORT@HOST listens on that interface."""
        self.assert_converts("inet:8891@127.0.0.1", "tcp:8891:interface=127.0.0.1")

    def test_inet_host_colon_port(self) -> None:
        """Postfix's inet:HOST:PORT listens on that interface."""
        self.assert_converts("inet:127.0.0.1:8891", "tcp:8891:interface=127.0.0.1")

    def test_inet_host_name(self) -> None:
        """A host name is passed on as the interface."""
        self.assert_converts("inet:8891@localhost", "tcp:8891:interface=localhost")

    def test_inet_port_only(self) -> None:
        """inet:PORT listens on every IPv4 interface."""
        self.assert_converts("inet:8891", "tcp:8891")

    def test_kind_is_case_insensitive(self) -> None:
        """INET: is read like inet:."""
        self.assert_converts("INET:8891@127.0.0.1", "tcp:8891:interface=127.0.0.1")

    def test_inet6_bracketed(self) -> None:
        """inet6:PORT@[ADDRESS] drops the brackets and escapes the colons."""
        self.assert_converts("inet6:8891@[::1]", "tcp6:8891:interface=\\:\\:1")

    def test_inet6_bare(self) -> None:
        """inet6:PORT@ADDRESS escapes the colons."""
        self.assert_converts("inet6:8891@::1", "tcp6:8891:interface=\\:\\:1")

    def test_inet6_port_only(self) -> None:
        """inet6:PORT listens on every IPv6 interface."""
        self.assert_converts("inet6:8891", "tcp6:8891:interface=\\:\\:")

    def test_unix(self) -> None:
        """unix:/path gets the default mode 660."""
        self.assert_converts("unix:/run/txmilt/txmilt.sock", "unix:/run/txmilt/txmilt.sock:mode=660")

    def test_local(self) -> None:
        """local:/path is a unix socket too."""
        self.assert_converts("local:/run/txmilt/txmilt.sock", "unix:/run/txmilt/txmilt.sock:mode=660")

    def test_unix_keeps_mode(self) -> None:
        """A mode given in the description is kept."""
        self.assert_converts("unix:/run/txmilt.sock:mode=600", "unix:/run/txmilt.sock:mode=600")

    def test_unix_other_options_keep_default_mode(self) -> None:
        """Other strports options do not count as a mode."""
        self.assert_converts("unix:/run/txmilt.sock:lockfile=0", "unix:/run/txmilt.sock:lockfile=0:mode=660")

    def test_tcp_passes_through(self) -> None:
        """A tcp: strports description is used as it is."""
        self.assert_converts("tcp:8891:interface=127.0.0.1", "tcp:8891:interface=127.0.0.1")

    def test_tcp6_passes_through(self) -> None:
        """A tcp6: strports description is used as it is."""
        self.assert_converts("tcp6:8891:interface=\\:\\:1", "tcp6:8891:interface=\\:\\:1")

    def test_systemd_passes_through(self) -> None:
        """A systemd: description (socket activation) is used as it is."""
        self.assertEqual(to_strports("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    def test_strports_kind_lowercased(self) -> None:
        """TCP: becomes tcp:, which Twisted's parser needs."""
        self.assert_converts("TCP:8891", "tcp:8891")

    def test_relative_unix_path(self) -> None:
        """A relative socket path is refused."""
        self.assert_refused("unix:run/txmilt.sock", "must be absolute")

    def test_relative_local_path(self) -> None:
        """A relative local: path is refused."""
        self.assert_refused("local:txmilt.sock", "must be absolute")

    def test_port_out_of_range(self) -> None:
        """A port above 65535 is refused."""
        self.assert_refused("inet:70000@127.0.0.1", "port 70000 is out of range")

    def test_port_zero(self) -> None:
        """Port 0 is refused."""
        self.assert_refused("inet:0@127.0.0.1", "port 0 is out of range")

    def test_port_not_a_number(self) -> None:
        """A port that is no number is refused with the forms that work."""
        self.assert_refused("inet:smtp@127.0.0.1", "expected inet:PORT@HOST or inet:HOST:PORT")

    def test_inet6_host_colon_port(self) -> None:
        """inet6:[ADDRESS]:PORT (Postfix's order) listens on that interface."""
        self.assert_converts("inet6:[::1]:8891", "tcp6:8891:interface=\\:\\:1")

    def test_inet_ipv6_host_colon_port(self) -> None:
        """inet:[ADDRESS]:PORT with an IPv6 address listens on it too."""
        self.assert_converts("inet:[::1]:8891", "tcp:8891:interface=\\:\\:1")

    def test_unbracketed_ipv6_before_port(self) -> None:
        """An IPv6 address before a port needs brackets."""
        self.assert_refused("inet6:::1:8891", "put an IPv6 address in brackets")

    def test_unix_path_with_colon(self) -> None:
        """A colon in a socket path is escaped, so it stays part of the path."""
        self.assert_converts("unix:/run/a:b.sock", "unix:/run/a\\:b.sock:mode=660")
        self.assertEqual(unix_socket_path(to_strports("unix:/run/a:b.sock")), "/run/a:b.sock")

    def test_unknown_kind(self) -> None:
        """An unknown kind is refused, naming the kinds that work."""
        self.assert_refused("udp:8891", "unknown kind 'udp'", "inet")

    def test_no_kind(self) -> None:
        """A bare port or path is not understood."""
        self.assert_refused("8891", "is not understood")
        self.assert_refused("/run/txmilt.sock", "is not understood")

    def test_empty_address(self) -> None:
        """A kind with nothing after it is not understood."""
        self.assert_refused("inet:", "is not understood")


class CheckStrportsTests(SynchronousTestCase):
    """check_strports() parses a description without listening."""

    def test_good(self) -> None:
        """A usable description passes."""
        check_strports("tcp:8891:interface=127.0.0.1")

    def test_bad_port(self) -> None:
        """A description Twisted cannot parse is refused with Twisted's reason."""
        message = str(self.assertRaises(ConfigurationError, check_strports, "tcp:http"))
        self.assertIn("listen address 'tcp:http' cannot be used", message)
        self.assertIn("invalid literal", message)

    def test_bad_option(self) -> None:
        """An unknown option is refused."""
        message = str(self.assertRaises(ConfigurationError, check_strports, "tcp:8891:interfce=127.0.0.1"))
        self.assertIn("interfce", message)

    def test_systemd_without_sockets(self) -> None:
        """Socket activation without a socket from systemd says so."""
        self.patch(os, "environ", {})
        message = str(self.assertRaises(ConfigurationError, check_strports, "systemd:domain=INET:index=0"))
        self.assertIn("systemd passed no socket", message)


class UnixSocketPathTests(SynchronousTestCase):
    """unix_socket_path() finds the path in a unix: description."""

    def test_plain(self) -> None:
        """The path comes before the options."""
        self.assertEqual(unix_socket_path("unix:/run/txmilt.sock:mode=660"), "/run/txmilt.sock")

    def test_address_keyword(self) -> None:
        """address= names the path too."""
        self.assertEqual(unix_socket_path("unix:address=/run/txmilt.sock:mode=600"), "/run/txmilt.sock")

    def test_escaped_colon(self) -> None:
        """An escaped colon belongs to the path."""
        self.assertEqual(unix_socket_path("unix:/run/a\\:b.sock:mode=660"), "/run/a:b.sock")

    def test_not_unix(self) -> None:
        """Other kinds have no socket path."""
        self.assertIsNone(unix_socket_path("tcp:8891:interface=127.0.0.1"))
        self.assertIsNone(unix_socket_path("systemd:domain=UNIX:index=0"))


class RemoveStaleSocketTests(SynchronousTestCase):
    """remove_stale_socket() clears what a dead daemon left, and nothing else."""

    def setUp(self) -> None:
        # A short directory: unix socket paths are limited to about 100 bytes.
        self.directory = tempfile.mkdtemp(prefix="txm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "milter.sock")

    def bound(self) -> socket.socket:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(self.path)
        return server

    def test_stale_socket_removed(self) -> None:
        """A socket nobody listens on is removed."""
        self.bound().close()
        self.assertTrue(stale_socket(self.path))
        self.assertTrue(remove_stale_socket(self.path))
        self.assertFalse(os.path.exists(self.path))

    def test_bound_but_not_listening(self) -> None:
        """A socket bound by a process that does not accept counts as stale."""
        self.bound()
        self.assertTrue(remove_stale_socket(self.path))
        self.assertFalse(os.path.exists(self.path))

    def test_live_socket_refused(self) -> None:
        """A socket something listens on is left alone."""
        self.bound().listen(1)
        message = str(self.assertRaises(ConfigurationError, remove_stale_socket, self.path))
        self.assertIn(self.path, message)
        self.assertIn("in use by another process", message)
        self.assertTrue(os.path.exists(self.path))

    def test_regular_file_refused(self) -> None:
        """A regular file is never removed."""
        with open(self.path, "w") as file:
            file.write("important\n")
        message = str(self.assertRaises(ConfigurationError, remove_stale_socket, self.path))
        self.assertEqual(message, f"{self.path} exists and is not a socket; refusing to remove it")
        with open(self.path) as file:
            self.assertEqual(file.read(), "important\n")

    def test_directory_refused(self) -> None:
        """A directory is not a socket either."""
        os.mkdir(self.path)
        message = str(self.assertRaises(ConfigurationError, remove_stale_socket, self.path))
        self.assertIn("is not a socket", message)

    def test_symlink_refused(self) -> None:
        """A symbolic link, even to a socket, is not removed."""
        target = os.path.join(self.directory, "real.sock")
        self.bound().close()
        os.rename(self.path, target)
        os.symlink(target, self.path)
        message = str(self.assertRaises(ConfigurationError, remove_stale_socket, self.path))
        self.assertIn("is not a socket", message)
        self.assertTrue(os.path.islink(self.path))

    def test_missing_path(self) -> None:
        """Nothing at the path is fine."""
        self.assertFalse(stale_socket(self.path))
        self.assertFalse(remove_stale_socket(self.path))
