"""README.rst's install lines, run into a fresh virtualenv: ``twistd milter`` then works from any directory.

These tests need pip and either PyPI or a pip cache holding every wheel the
test extra names; without them they skip, saying why. They take about a
minute, most of it pip installing the test tools.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_daemon import STARTUP_TIMEOUT, accepts, free_port, tcp_connect, wait_until

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.rst"
INSTALL_TIMEOUT = 900.0
#: What pip says when it cannot reach an index or find a wheel (rather than a broken build).
UNREACHABLE = re.compile(
    r"No matching distribution found|Could not find a version that satisfies|Failed to establish a new connection"
    r"|Temporary failure in name resolution|Network is unreachable|Max retries exceeded|Read timed out"
    r"|ProxyError|SSLError"
)


def readme_command(marker: str) -> str:
    """The command README.rst gives after ``.. marker`` (read as .ci/run reads the test command)."""
    match = re.search(rf"^\.\. {marker}\n\n::\n\n +(.+)$", README.read_text(), re.MULTILINE)
    assert match is not None, f"README.rst has no '.. {marker}' block"
    return match[1]


def clean_environment(virtualenv: Path) -> dict[str, str]:
    """The environment of a shell in ``virtualenv``, with no PYTHONPATH naming the checkout."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{virtualenv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(virtualenv)
    return env


def run_install(command: str, virtualenv: Path) -> None:
    """Run a README install command in ``virtualenv`` from the checkout; skip if pip cannot fetch packages."""
    result = subprocess.run(
        command, shell=True, cwd=ROOT, env=clean_environment(virtualenv), capture_output=True, text=True,
        timeout=INSTALL_TIMEOUT,
    )
    if result.returncode == 0:
        return
    output = result.stdout + result.stderr
    unreachable = UNREACHABLE.search(output)
    if unreachable is not None:
        pytest.skip(f"pip cannot fetch packages here (no network or wheel cache): {unreachable[0]}")
    pytest.fail(f"{command} failed with status {result.returncode}:\n{output}")


@pytest.fixture(scope="module")
def virtualenv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv into which README.rst's test-command install line has installed txmilt."""
    directory = tmp_path_factory.mktemp("venv")
    try:
        venv.create(directory, with_pip=True)
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot make a virtualenv with pip here: {e}")
    install = readme_command("test-command").split(" && ")[0]
    assert " install " in install and " -e " in install, install
    run_install(install, directory)
    return directory


def test_twistd_milter_after_editable_install(virtualenv: Path, tmp_path: Path) -> None:
    """After the README's editable install, ``twistd milter --help`` works from another directory."""
    result = subprocess.run(
        [str(virtualenv / "bin" / "twistd"), "milter", "--help"], cwd=tmp_path, env=clean_environment(virtualenv),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--listen" in result.stdout and "--filter" in result.stdout
    assert not (ROOT / "twistd.pid").exists()


@pytest.fixture
def example_daemon(virtualenv: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The README's quick-start command, with a free port and no pid file; its process and port."""
    install, start = readme_command("run-command").split(" && ")
    run_install(install, virtualenv)
    arguments = shlex.split(start)
    assert arguments[:2] == ["twistd", "-n"], start
    port = free_port()
    process = subprocess.Popen(
        [str(virtualenv / "bin" / "twistd"), "-n", "--pidfile=", *arguments[2:], "--listen", f"inet:{port}@127.0.0.1"],
        cwd=ROOT, env=clean_environment(virtualenv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        yield process, port
    finally:
        process.kill()
        process.wait(10)


def test_quick_start_needs_no_pythonpath(example_daemon: tuple[subprocess.Popen[bytes], int]) -> None:
    """The README's quick start finds the examples package and listens, with no PYTHONPATH."""
    process, port = example_daemon

    def listening() -> bool:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            pytest.fail(f"twistd exited with status {process.returncode}:\n{output}")
        return accepts(lambda: tcp_connect(port))

    wait_until(listening, STARTUP_TIMEOUT, "the example chain to listen")

