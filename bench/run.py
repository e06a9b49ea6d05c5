#!/usr/bin/env python3
"""Benchmark txmilt against peer milter libraries in one run.

    python3 bench/run.py [--quick] [--runs N] [--profile] [--only NAME ...]

Builds the C load driver, installs the peers into a virtualenv in the build
directory, starts every milter, drives them with the same Postfix-like
sessions and prints a table; the numbers also go to bench/results/latest.json.
See bench/README.md for what each workload and column means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PEERS = BENCH / "peers"
DEFAULT_BUILD = Path(os.environ.get("TXMILT_BENCH_BUILD", "/tmp/txmilt-bench"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
IDLE_CONNECTIONS = 10_000

#: pip package and import name of each peer library.
PEER_PACKAGES: dict[str, tuple[str, str]] = {
    "pymilter": ("pymilter", "Milter"),
    "purepythonmilter": ("purepythonmilter", "purepythonmilter"),
    "python-libmilter": ("python-libmilter", "libmilter"),
    "kilter": ("kilter.service", "kilter.service"),
}


# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """One message shape and concurrency, as driver options."""

    key: str
    title: str
    concurrency: int
    per_conn: int = 1
    headers: int = 10
    body: int = 2048
    rcpts: int = 1

    @property
    def round_trips(self) -> float:
        """Commands answered per message: MAIL, RCPT, DATA, headers, EOH, body chunks, EOB, and a share
        of the connection's OPTNEG, CONNECT and HELO."""
        chunks = -(-self.body // 65535)
        return 4 + self.rcpts + self.headers + chunks + 3 / self.per_conn

    def driver_args(self) -> list[str]:
        """The driver options for this workload."""
        return [
            "--concurrency", str(self.concurrency), "--per-conn", str(self.per_conn),
            "--headers", str(self.headers), "--body-size", str(self.body), "--rcpts", str(self.rcpts),
        ]


W1_C1 = Workload("W1 c=1", "2 KiB, 10 headers, 1 rcpt, one message per connection", 1)
W1_C32 = Workload("W1 c=32", "as W1, 32 connections at once", 32)
W2 = Workload("W2", "1 MiB bodies, 8 connections at once", 8, body=1 << 20)
W3 = Workload("W3", "as W1, 20 messages per connection, 32 at once", 32, per_conn=20)
W5 = Workload("W5", "as W1 c=32 through three filters", 32)
SINGLE_WORKLOADS = (W1_C1, W1_C32, W2, W3)


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    """A milter under test: one or more processes, driven as one chain in the given order."""

    key: str
    commands: list[list[str]]  # "{port}" is replaced by the process's port
    env: dict[str, str] | None = None
    expect_headers: int = 1
    unavailable: str | None = None
    workloads: tuple[Workload, ...] = SINGLE_WORKLOADS  # the single-filter workloads it runs (and W4 if all)
    #: The header the last filter of the chain adds (checked in the end-to-end run's deliveries).
    stamp: str = "X-Bench"


#: ACK modes of the synthetic workloads: ``quick`` answers every segment at once (no stall for
#: anyone: the efficiency view), ``delayed`` leaves delayed ACKs on, as Postfix does.
ACK_MODES = {"quick": ["--quickack"], "delayed": []}
ACK_TITLES = {"quick": "ACK at once (--quickack)", "delayed": "delayed ACK, as Postfix"}


def txmilt_command(*filters: str, reactor: str | None = None, options: Sequence[str] = ()) -> list[str]:
    """``twistd -n milter`` for ``filters`` with the interpreter running this script, on ``reactor`` if given."""
    command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
    command += [f"--reactor={reactor}"] if reactor else []
    command += ["milter", *options]
    for name in filters:
        command += ["--filter", f"bench.filters:{name}"]
    listen = ["--listen", "tcp:{port}:interface=127.0.0.1"]
    return [*command, *listen, "--max-connections", "30000", "--drain-timeout", "1"]


def txmilt_env() -> dict[str, str]:
    """The environment for txmilt: the repository first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def txmilt_options() -> str:
    """``twistd milter --help``, to see which options this checkout has."""
    command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "milter", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, env=txmilt_env(), timeout=60)
    return done.stdout


def chain_config(build: Path) -> Path:
    """A config file for the W5 chain with ``after_changes = true`` on the last filter."""
    path = build / "chain-after-changes.toml"
    tables = [
        f'[[filter]]\nclass = "bench.filters:ChainFilter{n}"\n' + ("after_changes = true\n" if n == 3 else "")
        for n in (1, 2, 3)
    ]
    path.write_text("\n".join(tables))
    return path


def peer_command(python: Path, script: str, header: str | None = None) -> list[str]:
    """The command running one peer filter script."""
    return [str(python), str(PEERS / script), "{port}", *([header] if header else [])]


def make_targets(
    python: Path, c_peer: Path | None, build: Path, unavailable: dict[str, str], workers: bool
) -> tuple[list[Target], list[Target]]:
    """The single-filter targets (txmilt first) and the W5 chain targets.

    ``workers``: whether ``twistd milter`` has ``--workers`` (then txmilt also runs with two).
    """
    env = txmilt_env()
    chain3 = ("ChainFilter1", "ChainFilter2", "ChainFilter3")
    workers_target = Target(
        "txmilt --workers 2", [txmilt_command("BenchFilter", options=["--workers", "2"])], env,
        workloads=(W1_C32,),
        unavailable=None if workers else "twistd milter has no --workers option in this checkout",
    )
    singles = [
        Target("txmilt", [txmilt_command("BenchFilter")], env),
        Target("txmilt-asyncio", [txmilt_command("BenchFilter", reactor="asyncio")], env, workloads=(W1_C32,)),
        workers_target,
        Target(
            "C libmilter", [[str(c_peer), "{port}"]] if c_peer else [],
            unavailable=unavailable.get("C libmilter") if c_peer else unavailable.get("C libmilter", "not built"),
        ),
        Target("pymilter", [peer_command(python, "pymilter_filter.py")], unavailable=unavailable.get("pymilter")),
        Target(
            "purepythonmilter", [peer_command(python, "purepythonmilter_filter.py")],
            unavailable=unavailable.get("purepythonmilter"),
        ),
        Target(
            "python-libmilter", [peer_command(python, "libmilter_filter.py")],
            unavailable=unavailable.get("python-libmilter"),
        ),
        Target("kilter", [peer_command(python, "kilter_filter.py")], unavailable=unavailable.get("kilter")),
    ]
    chains = [
        Target("txmilt chainx1", [txmilt_command("BenchFilter")], env),
        Target("txmilt chainx3", [txmilt_command(*chain3)], env, 3, stamp="X-Bench-3"),
        Target(
            "txmilt chainx3 after_changes",
            [txmilt_command(options=["--config", str(chain_config(build))])], env, 3, stamp="X-Bench-3",
        ),
        Target(
            "txmilt chainx3 sequential",
            [txmilt_command(*chain3, options=["--chain-order", "sequential"])], env, 3, stamp="X-Bench-3",
        ),
        Target(
            "pymilterx3 serial",
            [peer_command(python, "pymilter_filter.py", f"X-Bench-{i}") for i in (1, 2, 3)],
            expect_headers=3, unavailable=unavailable.get("pymilter"), stamp="X-Bench-3",
        ),
    ]
    return singles, chains


#: The milters of the end-to-end run, by the key of the target that runs them ("" for none).
E2E_TARGETS = ("no milter", "C libmilter", "pymilter", "txmilt", "txmilt chainx3", "txmilt --workers 2")


# ---------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (read from /proc, without connecting)."""
    wanted = f"0100007F:{port:04X}"
    with contextlib.suppress(OSError), open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":
                return True
    return False


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3, the state, comes first)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (txmilt's workers, a supervised milter)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat_fields(int(entry))[1]) == pid:
                    found.append(int(entry))
    return found


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of a process, of its waited-for children, and of its live descendants, in clock ticks."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0
    own = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return own + sum(proc_cpu_ticks(child) for child in _children(pid))


def proc_status(pid: int, key: str) -> int:
    """A numeric field of /proc/PID/status (VmRSS in kB, Threads)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def system_busy_ticks() -> int:
    """CPU ticks spent busy on the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]  # minus idle and iowait


def log_tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class Running:
    """The processes of one target, started and listening."""

    def __init__(self, target: Target, logs: Path) -> None:
        self.target = target
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        for number, template in enumerate(target.commands):
            port = free_port()
            log = logs / f"{target.key.replace(' ', '_').replace('x', 'x')}-{number}-{port}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [part.replace("{port}", str(port)) for part in template],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=target.env, cwd=logs, start_new_session=True,
                )
            self.ports.append(port)
            self.procs.append(proc)
            self.logs.append(log)
        deadline = time.monotonic() + 30
        for proc, port, log in zip(self.procs, self.ports, self.logs, strict=True):
            while not listening(port):
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"exited with status {proc.returncode}: {log_tail(log)}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"not listening on port {port} after 30 s: {log_tail(log)}")
                time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        """The process ids, in chain order."""
        return [proc.pid for proc in self.procs]

    def cpu_ticks(self) -> int:
        """CPU ticks used by all processes so far."""
        return sum(proc_cpu_ticks(pid) for pid in self.pids)

    def rss_kb(self) -> int:
        """Resident memory of all processes, in kB."""
        return sum(proc_status(pid, "VmRSS") for pid in self.pids)

    def threads(self) -> int:
        """Threads of all processes."""
        return sum(proc_status(pid, "Threads") for pid in self.pids)

    def dead(self) -> str | None:
        """Why the target stopped, if it did."""
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                return f"exited with status {proc.returncode}: {log_tail(log)}"
        return None

    def stop(self) -> None:
        """Terminate the processes (each in the session it was started in)."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ---------------------------------------------------------------- building


def say(message: str) -> None:
    """Progress on stderr, so stdout is just the report."""
    print(message, file=sys.stderr, flush=True)


def build_driver(build: Path) -> Path:
    """Compile bench/driver.c (when it changed) and return the binary."""
    source = BENCH / "driver.c"
    binary = build / "driver"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        say(f"building {binary}")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


def build_c_peer(build: Path) -> tuple[Path | None, str | None]:
    """Compile the C libmilter filter (peers/c_libmilter_filter.c); the binary, or why not."""
    reason = ensure_libmilter_dev()
    if reason:
        return None, reason
    source = PEERS / "c_libmilter_filter.c"
    binary = build / "c_libmilter_filter"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        say(f"building {binary}")
        done = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source), "-lmilter", "-lpthread"],
                              capture_output=True, text=True)
        if done.returncode:
            return None, "gcc failed: " + done.stderr.strip()[-300:]
    return binary, None


def ensure_libmilter_dev() -> str | None:
    """Install libmilter-dev (pymilter builds against it); the reason if that is impossible."""
    if Path("/usr/include/libmilter/mfapi.h").exists():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "libmilter-dev is not installed (needs root and apt-get)"
    say("installing libmilter-dev")

    def apt_get(*args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        return subprocess.run(["apt-get", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    install = apt_get("install", "-y", "-q", "libmilter-dev")
    if install.returncode:
        apt_get("update", "-q")
        install = apt_get("install", "-y", "-q", "libmilter-dev")
    if install.returncode:
        return "apt-get install libmilter-dev failed: " + install.stderr.strip()[-200:]
    return None


def ensure_venv(build: Path, with_profiler: bool) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The peers' virtualenv python, each unavailable peer with its reason, and installed versions."""
    venv = build / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        say(f"creating virtualenv {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    unavailable: dict[str, str] = {}
    wanted = dict(PEER_PACKAGES)
    if with_profiler:
        wanted["py-spy"] = ("py-spy", "")
    for name, (package, module) in wanted.items():
        if module and subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0:
            continue
        if not module and (venv / "bin" / "py-spy").exists():
            continue
        if name == "pymilter":
            reason = ensure_libmilter_dev()
            if reason:
                unavailable[name] = reason
                continue
        say(f"installing {package} into {venv}")
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", package],
            capture_output=True, text=True,
        )
        if install.returncode:
            errors = [line for line in install.stderr.splitlines() if "error" in line.lower()]
            unavailable[name] = f"pip install {package} failed: " + " / ".join(errors[-3:])[-300:]
            continue
        if module:
            check = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
            if check.returncode:
                unavailable[name] = f"import {module} fails: {check.stderr.strip().splitlines()[-1][-200:]}"
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    versions = dict(line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    return python, unavailable, versions


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE to its hard limit (inherited by everything started); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------- measuring


@dataclass
class Sample:
    """One measurement of one workload against one target."""

    workload: str
    ack: str
    target: str
    run: int
    messages: int
    errors: int
    elapsed_s: float
    msg_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_msg: float
    cpu_us_per_command: float
    milter_cpu_pct: float
    driver_cpu_pct: float
    other_cpu_pct: float
    protocol: list[str] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def run_driver(driver: Path, ports: Sequence[int], args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run the driver against ``ports`` (a chain, in order) and return its JSON result."""
    command = [str(driver), *(f"--port={port}" for port in ports), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(f"driver failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def measure(
    driver: Path, target: Target, running: Running, workload: Workload, run: int, duration: float, ack: str,
) -> Sample:
    """Drive ``running`` with ``workload`` for ``duration`` seconds; throughput, latency and CPU."""
    args = [*workload.driver_args(), "--duration", str(duration),
            "--expect-headers", str(target.expect_headers), *ACK_MODES[ack]]
    cpu0, busy0 = running.cpu_ticks(), system_busy_ticks()
    result = run_driver(driver, running.ports, args, timeout=duration + 120)
    cpu1, busy1 = running.cpu_ticks(), system_busy_ticks()
    elapsed = result["elapsed_s"] or 1e-9
    milter_ticks = cpu1 - cpu0
    driver_ticks = result["driver_cpu_s"] * CLK_TCK
    other = max(0.0, busy1 - busy0 - milter_ticks - driver_ticks)
    messages = result["messages"]
    cpu_ms = 1000.0 * milter_ticks / CLK_TCK / messages if messages else 0.0
    return Sample(
        workload=workload.key, ack=ack, target=target.key, run=run, messages=messages, errors=result["errors"],
        elapsed_s=elapsed, msg_per_s=result["msg_per_s"], p50_ms=result["p50_ms"], p99_ms=result["p99_ms"],
        cpu_ms_per_msg=cpu_ms, cpu_us_per_command=1000.0 * cpu_ms / workload.round_trips,
        milter_cpu_pct=100.0 * milter_ticks / CLK_TCK / elapsed,
        driver_cpu_pct=result["driver_cpu_pct"],
        other_cpu_pct=100.0 * other / CLK_TCK / elapsed,
        protocol=result.get("protocol", []), error_samples=result.get("error_samples", []),
    )


def warm_up(driver: Path, running: Running, seconds: float, extra: Sequence[str]) -> None:
    """Exercise every code path once before measuring (imports, caches, first allocations)."""
    expect = ["--expect-headers", str(running.target.expect_headers), *extra]
    for workload in (W1_C1, W2, W3):
        run_driver(driver, running.ports, [*workload.driver_args(), "--duration", str(seconds / 3), *expect], 120)


@dataclass
class IdleResult:
    """W4: memory held by idle connections."""

    target: str
    run: int
    held: int
    wanted: int
    seconds_to_establish: float
    rss_before_kb: int
    rss_after_kb: int
    kb_per_conn: float
    threads_after: int
    errors: int
    error_samples: list[str] = field(default_factory=list)


def measure_idle(driver: Path, target: Target, logs: Path, connections: int, run: int, within: float) -> IdleResult:
    """Start ``target`` afresh, hold ``connections`` idle sessions on it and read its RSS before and after."""
    running = Running(target, logs)
    try:
        run_driver(driver, running.ports, [*W1_C1.driver_args(), "--messages", "50"], 60)
        time.sleep(0.5)
        before = running.rss_kb()
        command = [str(driver), *(f"--port={p}" for p in running.ports), "--idle", str(connections),
                   "--ready-within", str(within), "--timeout", "30"]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or "{}")
        time.sleep(1.0)  # let lazily made per-connection state appear
        after, threads = running.rss_kb(), running.threads()
        proc.stdin.close()
        final = json.loads(proc.stdout.read().strip().splitlines()[-1])
        proc.wait(timeout=60)
        held = int(ready.get("ready", 0))
        return IdleResult(
            target=target.key, run=run, held=held, wanted=connections,
            seconds_to_establish=float(ready.get("seconds", 0.0)), rss_before_kb=before, rss_after_kb=after,
            kb_per_conn=(after - before) / held if held else 0.0, threads_after=threads,
            errors=int(final.get("errors", 0)), error_samples=final.get("error_samples", []),
        )
    finally:
        running.stop()


@dataclass
class E2EFigures:
    """What one end-to-end setting measures: one sample, or the medians of several."""

    target: str
    sessions: int
    ms_per_msg: float
    msg_per_s: float
    milter_cpu_ms_per_msg: float | None
    milter_cpu_pct: float
    rest_cpu_pct: float
    errors: int


@dataclass
class E2ESample(E2EFigures):
    """One end-to-end measurement: smtp-source through Postfix, with one milter (or none)."""

    run: int = 0
    messages: int = 0
    seconds: float = 0.0
    complaint: str = ""


def measure_e2e(
    rig: Any, target: str, running: Running | None, stamp: str, run: int, sessions: int, messages: int
) -> E2ESample:
    """Send ``messages`` over ``sessions`` SMTP sessions through Postfix; check every delivery."""
    rig.idle()
    cpu0, busy0 = (running.cpu_ticks() if running else 0), system_busy_ticks()
    seconds, status, complaint = rig.source(sessions, messages)
    cpu1, busy1 = (running.cpu_ticks() if running else 0), system_busy_ticks()
    delivered, stamped = rig.collect(messages if status == 0 else None, stamp if running else None)
    milter_ticks = cpu1 - cpu0
    errors = messages - min(delivered, stamped)
    if status and not complaint:
        complaint = f"smtp-source exited with status {status}"
    return E2ESample(
        target=target, run=run, sessions=sessions, messages=messages, seconds=seconds,
        ms_per_msg=1000.0 * seconds / messages, msg_per_s=messages / seconds if seconds else 0.0,
        milter_cpu_ms_per_msg=1000.0 * milter_ticks / CLK_TCK / messages if running else None,
        milter_cpu_pct=100.0 * milter_ticks / CLK_TCK / seconds if seconds else 0.0,
        rest_cpu_pct=100.0 * max(0, busy1 - busy0 - milter_ticks) / CLK_TCK / seconds if seconds else 0.0,
        errors=errors, complaint=complaint if errors or status else "",
    )


@dataclass
class E2ESummary(E2EFigures):
    """Medians over the runs of one end-to-end setting (errors summed)."""

    runs: int = 0


def summarise_e2e(samples: Sequence[E2ESample]) -> list[E2ESummary]:
    """Medians per (target, sessions), in the order first measured."""
    groups: dict[tuple[str, int], list[E2ESample]] = defaultdict(list)
    for sample in samples:
        groups[sample.target, sample.sessions].append(sample)
    out = []
    for (target, sessions), group in groups.items():
        cpu = [s.milter_cpu_ms_per_msg for s in group if s.milter_cpu_ms_per_msg is not None]
        out.append(E2ESummary(
            target=target, sessions=sessions, runs=len(group), ms_per_msg=median([s.ms_per_msg for s in group]),
            msg_per_s=median([s.msg_per_s for s in group]), milter_cpu_ms_per_msg=median(cpu) if cpu else None,
            milter_cpu_pct=median([s.milter_cpu_pct for s in group]),
            rest_cpu_pct=median([s.rest_cpu_pct for s in group]), errors=sum(s.errors for s in group),
        ))
    return out


# ---------------------------------------------------------------- reporting


def median(values: Sequence[float]) -> float:
    """The median, 0 for no values."""
    return statistics.median(values) if values else 0.0


@dataclass
class Summary:
    """Medians over the runs of one workload and target."""

    workload: str
    ack: str
    target: str
    runs: int
    msg_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_msg: float
    cpu_us_per_command: float
    milter_cpu_pct: float
    driver_cpu_pct: float
    other_cpu_pct: float
    errors: int
    protocol: list[str]


def summarise(samples: Sequence[Sample]) -> list[Summary]:
    """Medians per (workload, ACK mode, target), in the order first measured."""
    groups: dict[tuple[str, str, str], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.workload, sample.ack, sample.target].append(sample)
    out = []
    for (workload, ack, target), group in groups.items():
        out.append(Summary(
            workload=workload, ack=ack, target=target, runs=len(group),
            msg_per_s=median([s.msg_per_s for s in group]), p50_ms=median([s.p50_ms for s in group]),
            p99_ms=median([s.p99_ms for s in group]), cpu_ms_per_msg=median([s.cpu_ms_per_msg for s in group]),
            cpu_us_per_command=median([s.cpu_us_per_command for s in group]),
            milter_cpu_pct=median([s.milter_cpu_pct for s in group]),
            driver_cpu_pct=median([s.driver_cpu_pct for s in group]),
            other_cpu_pct=median([s.other_cpu_pct for s in group]),
            errors=sum(s.errors for s in group), protocol=group[0].protocol,
        ))
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    if a is None or b is None or not b:
        return None
    return a / b


def fmt_ratio(value: float | None) -> str:
    """A ratio as ``1.23x``, or ``n/a``."""
    return "n/a" if value is None else f"{value:.2f}x"


@dataclass
class Check:
    """One target from the issue, with the measured value."""

    name: str
    value: float | None
    goal: float
    unit: str
    at_most: bool = False

    @property
    def met(self) -> bool | None:
        """Whether the goal is met (None when it could not be measured)."""
        if self.value is None:
            return None
        return self.value <= self.goal if self.at_most else self.value >= self.goal

    def line(self) -> str:
        """One report line."""
        value = "n/a" if self.value is None else f"{self.value:.2f}{self.unit}"
        goal = f"{'≤' if self.at_most else '≥'} {self.goal:g}{self.unit}"
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[self.met]
        return f"  {self.name:<44} {value:>10}   goal {goal:<10} {verdict}"


def report(
    summaries: Sequence[Summary], e2e: Sequence[E2ESummary], idle: Sequence[IdleResult],
    unavailable: dict[str, str], out: TextIO, runs: int, duration: float, hot_path: dict[str, float],
) -> tuple[dict[str, float | None], list[Check]]:
    """Print the tables, ratios and targets; the ratios and checks for the JSON file."""
    by_key = {(s.workload, s.ack, s.target): s for s in summaries}
    e2e_by_key = {(s.target, s.sessions): s for s in e2e}

    def value(workload: str, target: str, attribute: str = "msg_per_s", ack: str = "quick") -> float | None:
        summary = by_key.get((workload, ack, target))
        if summary is None or summary.msg_per_s == 0:
            return None
        result: float = getattr(summary, attribute)
        return result

    def e2e_value(target: str, sessions: int, attribute: str) -> float | None:
        summary = e2e_by_key.get((target, sessions))
        if summary is None or summary.errors or not summary.msg_per_s:
            return None
        result: float | None = getattr(summary, attribute)
        return result

    if e2e:
        single = {s.sessions for s in e2e}
        print(f"\nEnd to end: smtp-source -> Postfix {E2E_POSTFIX_VERSION[0]} -> smtp-sink, smtpd_milters = the milter"
              f" (median of {runs} run(s); W1 message, one per SMTP session)\n", file=out)
        header = (f"{'milter':<19} {'ms/msg @1':>9} {'added ms':>8} {'msg/s @16':>9} {'milter CPU ms/msg @16':>21}"
                  f" {'milter CPU% @16':>15} {'rest CPU% @16':>13} {'errors':>6}")
        print(header, file=out)
        print("-" * len(header), file=out)
        base = e2e_value("no milter", 1, "ms_per_msg")
        for target in E2E_TARGETS:
            one, many = e2e_by_key.get((target, 1)), e2e_by_key.get((target, 16))
            if one is None and many is None:
                continue
            added = "" if one is None or base is None or target == "no milter" else f"{one.ms_per_msg - base:+.1f}"
            cpu = "-" if many is None or many.milter_cpu_ms_per_msg is None else f"{many.milter_cpu_ms_per_msg:.2f}"
            print(f"{target:<19} {one.ms_per_msg if one else 0:>9.1f} {added:>8} {many.msg_per_s if many else 0:>9.0f}"
                  f" {cpu:>21} {many.milter_cpu_pct if many else 0:>15.0f} {many.rest_cpu_pct if many else 0:>13.0f}"
                  f" {(one.errors if one else 0) + (many.errors if many else 0):>6}", file=out)
        del single

    for ack in ACK_MODES:
        rows = [s for s in summaries if s.ack == ack]
        if not rows:
            continue
        print(f"\nSynthetic MTA (bench/driver.c), {ACK_TITLES[ack]}: median of {runs} run(s) of {duration:g} s\n",
              file=out)
        header = (f"{'workload':<9} {'milter':<28} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/msg':>10}"
                  f" {'us/cmd':>7} {'milter CPU%':>11} {'drv CPU%':>8} {'other CPU%':>10} {'errors':>6}")
        print(header, file=out)
        print("-" * len(header), file=out)
        previous = ""
        for s in rows:
            if previous and s.workload != previous:
                print(file=out)
            previous = s.workload
            print(f"{s.workload:<9} {s.target:<28} {s.msg_per_s:>8.1f} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f}"
                  f" {s.cpu_ms_per_msg:>10.3f} {s.cpu_us_per_command:>7.1f} {s.milter_cpu_pct:>11.0f}"
                  f" {s.driver_cpu_pct:>8.0f} {s.other_cpu_pct:>10.0f} {s.errors:>6}", file=out)
    if hot_path:
        print("\ntxmilt's own work per command, in process (bench/hotpath.py: no sockets, no reactor):"
              + "".join(f"  {name} {micros:.1f} us" for name, micros in hot_path.items()), file=out)
    if idle:
        w4_runs = max(i.run for i in idle) + 1
        print(f"\nW4: idle connections (OPTNEG + CONNECT + HELO, then held; {w4_runs} run(s) each)\n", file=out)
        header = (f"{'milter':<19} {'held':>12} {'seconds':>8} {'RSS before':>11} {'RSS after':>10}"
                  f" {'kB/conn':>8} {'threads':>8} {'errors':>6}")
        print(header, file=out)
        print("-" * len(header), file=out)
        for i in idle:
            print(f"{i.target:<19} {f'{i.held}/{i.wanted}':>12} {i.seconds_to_establish:>8.1f}"
                  f" {i.rss_before_kb / 1024:>8.1f} MB {i.rss_after_kb / 1024:>7.1f} MB {i.kb_per_conn:>8.2f}"
                  f" {i.threads_after:>8} {i.errors:>6}", file=out)
    if unavailable:
        print("\nNot measured", file=out)
        for name, reason in unavailable.items():
            print(f"  {name}: {reason}", file=out)

    idle_txmilt = [i for i in idle if i.target == "txmilt" and i.held]
    rss_per_conn = median([i.kb_per_conn for i in idle_txmilt]) if idle_txmilt else None
    held = min((i.held for i in idle_txmilt), default=0)
    base_ms = e2e_value("no milter", 1, "ms_per_msg")
    txmilt_ms = e2e_value("txmilt", 1, "ms_per_msg")
    ratios: dict[str, float | None] = {
        "W1 c=32 txmilt/pymilter msg/s": ratio(value("W1 c=32", "txmilt"), value("W1 c=32", "pymilter")),
        "W1 c=32 txmilt/pymilter CPU ms/msg": ratio(
            value("W1 c=32", "txmilt", "cpu_ms_per_msg"), value("W1 c=32", "pymilter", "cpu_ms_per_msg")),
        "W1 c=32 workers2/pymilter msg/s": ratio(
            value("W1 c=32", "txmilt --workers 2"), value("W1 c=32", "pymilter")),
        "W1 c=32 asyncio/default reactor msg/s": ratio(value("W1 c=32", "txmilt-asyncio"), value("W1 c=32", "txmilt")),
        "W1 c=1 txmilt/pymilter p50": ratio(value("W1 c=1", "txmilt", "p50_ms"), value("W1 c=1", "pymilter", "p50_ms")),
        "W2 txmilt/pymilter msg/s": ratio(value("W2", "txmilt"), value("W2", "pymilter")),
        "W3 txmilt/pymilter msg/s": ratio(value("W3", "txmilt"), value("W3", "pymilter")),
        "W5 chain3/chain1 msg/s": ratio(value("W5", "txmilt chainx3"), value("W5", "txmilt chainx1")),
        "W5 after_changes/chain1 msg/s": ratio(
            value("W5", "txmilt chainx3 after_changes"), value("W5", "txmilt chainx1")),
        "W5 sequential/chain1 msg/s": ratio(value("W5", "txmilt chainx3 sequential"), value("W5", "txmilt chainx1")),
        "W5 chain3/pymilterx3 msg/s": ratio(value("W5", "txmilt chainx3"), value("W5", "pymilterx3 serial")),
        "W1 c=32 txmilt CPU ms/msg": value("W1 c=32", "txmilt", "cpu_ms_per_msg"),
        "W1 c=32 pymilter CPU ms/msg": value("W1 c=32", "pymilter", "cpu_ms_per_msg"),
        "W1 c=32 txmilt us per command": value("W1 c=32", "txmilt", "cpu_us_per_command"),
        "E2E txmilt added ms per message, 1 session": None if base_ms is None or txmilt_ms is None
        else txmilt_ms - base_ms,
        "E2E txmilt milter CPU ms/msg, 16 sessions": e2e_value("txmilt", 16, "milter_cpu_ms_per_msg"),
        "E2E pymilter milter CPU ms/msg, 16 sessions": e2e_value("pymilter", 16, "milter_cpu_ms_per_msg"),
        "E2E txmilt/pymilter milter CPU per message, 16 sessions": ratio(
            e2e_value("txmilt", 16, "milter_cpu_ms_per_msg"), e2e_value("pymilter", 16, "milter_cpu_ms_per_msg")),
        "E2E workers2/C libmilter msg/s, 16 sessions": ratio(
            e2e_value("txmilt --workers 2", 16, "msg_per_s"), e2e_value("C libmilter", 16, "msg_per_s")),
        "W4 txmilt kB RSS per idle connection": rss_per_conn,
    }
    print("\nRatios and figures (synthetic ones: ACK at once)", file=out)
    for name, number in ratios.items():
        unit = "" if name in FIGURES else "x"
        shown = "n/a" if number is None else f"{number:.2f}{unit}"
        print(f"  {name:<58} {shown}", file=out)

    checks = [
        Check("E2E 1 session: txmilt ms added per message", ratios["E2E txmilt added ms per message, 1 session"],
              2.0, " ms", at_most=True),
        Check("E2E 16 sessions: txmilt/pymilter milter CPU per msg",
              ratios["E2E txmilt/pymilter milter CPU per message, 16 sessions"], 1.0, "x", at_most=True),
        Check("E2E 16 sessions: --workers 2/C libmilter msg/s", ratios["E2E workers2/C libmilter msg/s, 16 sessions"],
              1.0, "x"),
        Check("W1 c=32 txmilt/pymilter CPU per message", ratios["W1 c=32 txmilt/pymilter CPU ms/msg"], 1.0, "x",
              at_most=True),
        Check("W2 txmilt/pymilter msg/s", ratios["W2 txmilt/pymilter msg/s"], 0.6, "x"),
        Check("W1 c=1 txmilt/pymilter p50", ratios["W1 c=1 txmilt/pymilter p50"], 1.5, "x", at_most=True),
        Check("W1 c=32 --workers 2/pymilter msg/s", ratios["W1 c=32 workers2/pymilter msg/s"], 1.2, "x"),
        Check(f"W4 txmilt RSS per idle connection ({held} held)",
              rss_per_conn if held >= IDLE_CONNECTIONS else None, 4.0, " kB", at_most=True),
        Check("W5 concurrent chainx3/chainx1 msg/s", ratios["W5 chain3/chain1 msg/s"], 0.8, "x"),
    ]
    print("\nTargets (issue 12; synthetic ones with ACK at once)", file=out)
    for check in checks:
        print(check.line(), file=out)
    if held and held < IDLE_CONNECTIONS:
        print(f"  (W4: only {held} of {IDLE_CONNECTIONS} idle connections were held; the W4 goal needs"
              f" {IDLE_CONNECTIONS})", file=out)
    notes = ["With delayed ACKs (as Postfix), libmilter-based milters write ADDHEADER and the final CONTINUE in two"
             " writes without TCP_NODELAY, and each message waits ~40 ms for the MTA's ACK; txmilt writes them in"
             " one segment (see bench/README.md)."]
    busiest = max([s.other_cpu_pct for s in summaries], default=0.0)
    if busiest > 25:
        notes.append(f"Other work used up to {busiest:.0f}% of a core during the synthetic measurements"
                     f" ({NCPU} cores here): absolute numbers are noisy.")
    print("\nNotes", file=out)
    for note in notes:
        print(f"  - {note}", file=out)
    return ratios, checks


#: Entries of the ratios table that are figures (ms, µs, kB), not ratios.
FIGURES = frozenset({
    "W1 c=32 txmilt CPU ms/msg", "W1 c=32 pymilter CPU ms/msg", "W1 c=32 txmilt us per command",
    "E2E txmilt added ms per message, 1 session", "E2E txmilt milter CPU ms/msg, 16 sessions",
    "E2E pymilter milter CPU ms/msg, 16 sessions", "W4 txmilt kB RSS per idle connection",
})

#: The Postfix version of the end-to-end run, once known.
E2E_POSTFIX_VERSION = ["?"]


# ---------------------------------------------------------------- profiling


#: Where the time goes, by the frame that stands for each part (inclusive time).
BREAKDOWN = (
    ("txmilt handling commands (MilterProtocol.dataReceived)", "MilterProtocol.dataReceived "),
    ("  of which the sans-IO session (MilterSession.next_event)", "MilterSession.next_event "),
    ("  of which the chain and filter (Chain.handle)", "Chain.handle "),
    ("queueing writes (transport.write: epoll_ctl to watch for writability)", "FileDescriptor.write "),
    ("sending (FileDescriptor.doWrite: send(), then epoll_ctl to stop watching)", "FileDescriptor.doWrite "),
    ("accepting connections (Port.doRead)", "Port.doRead "),
    ("closing connections (Connection.connectionLost)", "Connection.connectionLost "),
    ("logging (Logger.emit)", "Logger.emit "),
)


def folded_summary(path: Path, top: int) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's raw (folded) output."""
    own: dict[str, int] = defaultdict(int)
    inclusive: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if not frame.startswith("process ")]
        if not frames or frames[-1].startswith("EPollReactor.doPoll "):
            continue  # waiting in epoll: idle, not work
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def ranked(table: dict[str, int]) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda item: -item[1])[:top]
        return [{"function": name, "samples": n, "percent": 100.0 * n / total if total else 0.0} for name, n in rows]

    groups: dict[str, int] = defaultdict(int)
    for frame, count in own.items():
        location = frame.rpartition("(")[2]
        group = ("txmilt" if "txmilt/" in location else "twisted" if "twisted/" in location
                 else "bench filter" if "bench/" in location else "other (stdlib, zope, ...)")
        groups[group] += count
    ours = {frame: n for frame, n in inclusive.items() if "txmilt/" in frame or "bench/" in frame}
    breakdown = {}
    for label, prefix in BREAKDOWN:
        n = max((count for frame, count in inclusive.items() if frame.startswith(prefix)), default=0)
        breakdown[label] = 100.0 * n / total if total else 0.0
    return {
        "samples": total,
        "self": ranked(own),
        "inclusive": ranked(ours),
        "breakdown": breakdown,
        "self_by_package": {
            g: 100.0 * n / total if total else 0.0 for g, n in sorted(groups.items(), key=lambda i: -i[1])
        },
    }


def profile(driver: Path, build: Path, python: Path, seconds: float, extra: Sequence[str]) -> int:
    """Profile txmilt under W1 c=32 with py-spy; write the flame graph and print the hottest functions."""
    py_spy = python.parent / "py-spy"
    logs = build / "logs"
    logs.mkdir(exist_ok=True)
    target = Target("txmilt", [txmilt_command("BenchFilter")], txmilt_env())
    running = Running(target, logs)
    raw = RESULTS / "profile.txt"
    svg = RESULTS / "profile.svg"
    try:
        warm_up(driver, running, 1.5, extra)
        svg_seconds = max(3.0, seconds / 2)
        command = [str(driver), *(f"--port={p}" for p in running.ports), *W1_C32.driver_args(),
                   "--duration", str(seconds + svg_seconds + 3), *extra]
        load = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        time.sleep(1)
        pid = str(running.pids[0])
        say(f"py-spy: sampling txmilt (pid {pid}) for {seconds:g} s")
        subprocess.run([str(py_spy), "record", "--pid", pid, "--duration", str(int(seconds)), "--format", "raw",
                        "--function", "--output", str(raw)], check=True, capture_output=True)
        say(f"py-spy: flame graph for {svg_seconds:g} s")
        subprocess.run([str(py_spy), "record", "--pid", pid, "--duration", str(int(svg_seconds)),
                        "--function", "--output", str(svg)], check=True, capture_output=True)
        out, _ = load.communicate(timeout=seconds + svg_seconds + 120)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        running.stop()
    summary = folded_summary(raw, 25)
    summary["load"] = result
    (RESULTS / "profile.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"\ntxmilt under W1 c=32 with py-spy: {result['msg_per_s']:.0f} msg/s while sampled,"
          f" {summary['samples']} samples (idle time in epoll excluded)\n")
    print("self time by package: " + ", ".join(f"{g} {p:.0f}%" for g, p in summary["self_by_package"].items()))
    print("\nwhere the time goes (inclusive)")
    for label, percent in summary["breakdown"].items():
        print(f"  {percent:5.1f}%  {label}")
    for title, key in (("self time", "self"), ("inclusive time, txmilt and the filter", "inclusive")):
        print(f"\ntop functions by {title}")
        for row in summary[key][:20]:
            print(f"  {row['percent']:5.1f}%  {row['function']}")
    written = ", ".join(str(p.relative_to(ROOT)) for p in (svg, raw, RESULTS / "profile.json"))
    print(f"\nwrote {written}")
    return 0


# ---------------------------------------------------------------- main


def interleaved(
    runs: int, acks: Sequence[str], singles: Sequence[Target], chains: Sequence[Target]
) -> Iterator[tuple[int, str, Workload, Target]]:
    """Run r of every workload against every target in each ACK mode, then run r + 1: noise hits all alike."""
    for run in range(runs):
        for ack in acks:
            for workload in SINGLE_WORKLOADS:
                for target in singles:
                    if workload in target.workloads:
                        yield run, ack, workload, target
            for target in chains:
                yield run, ack, W5, target


def hot_path_figures(seconds: float) -> dict[str, float]:
    """µs of txmilt's own CPU per answered command, in process (bench/hotpath.py), W1 and W2."""
    done = subprocess.run([sys.executable, str(BENCH / "hotpath.py"), "--seconds", str(seconds), "--per-command"],
                          capture_output=True, text=True, env=txmilt_env(), timeout=600)
    figures = {}
    for line in done.stdout.splitlines():
        name, _, rest = line.partition(":")
        if rest.strip():
            figures[name.strip()] = float(rest.split()[0])
    return figures


def run_e2e(
    rig: Any, running: dict[str, Running], keys: Sequence[str], stamps: dict[str, str], runs: int, quick: bool,
    samples: list[E2ESample],
) -> None:
    """The end-to-end workload: each milter in turn behind Postfix, 1 and 16 SMTP sessions, interleaved runs.

    The measurements are appended to ``samples`` as they are made.
    """
    single, parallel = (30, 320) if quick else (100, 800)
    for run in range(runs):
        for key in keys:
            instance = running.get(key)
            if key != "no milter" and (instance is None or instance.dead()):
                continue
            rig.use(instance.ports if instance else [])
            rig.send(16, 32, None)  # warm up Postfix's new smtpd processes and the milter
            for sessions, messages in ((1, single), (16, parallel)):
                say(f"[e2e] run {run + 1}: {key}, {sessions} session(s), {messages} messages")
                sample = measure_e2e(rig, key, instance, stamps.get(key, "X-Bench"), run, sessions, messages)
                if sample.errors:
                    say(f"    {sample.errors} messages lost or unstamped: {sample.complaint}")
                samples.append(sample)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short run of everything")
    parser.add_argument("--runs", type=int, help="runs per measurement, medians reported (default 3, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per synthetic measurement (default 5, quick 2)")
    parser.add_argument("--idle-connections", type=int, default=IDLE_CONNECTIONS, help="W4 connections")
    parser.add_argument("--w4-runs", type=int, default=1, help="W4 repetitions per milter (default 1)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="milters to run (txmilt is always run)")
    parser.add_argument("--skip-w4", action="store_true", help="leave out the idle-connection workload")
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the real-Postfix workload")
    parser.add_argument("--ack", choices=("both", *ACK_MODES), default="both",
                        help="synthetic ACK modes: quick (--quickack), delayed (as Postfix) or both (default)")
    parser.add_argument("--quickack", action="store_true", help="the same as --ack quick")
    parser.add_argument("--profile", action="store_true", help="only profile txmilt at W1 c=32 with py-spy")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD, help=f"default {DEFAULT_BUILD}")
    options = parser.parse_args(argv)
    runs = options.runs or (1 if options.quick else 3)
    duration = options.duration or (2.0 if options.quick else 5.0)
    acks = ["quick"] if options.quickack else list(ACK_MODES) if options.ack == "both" else [options.ack]
    started = time.monotonic()

    build: Path = options.build_dir
    logs = build / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    fd_limit = raise_fd_limit(2 * options.idle_connections + 200)
    driver = build_driver(build)
    python, unavailable, versions = ensure_venv(build, with_profiler=options.profile)
    if options.profile:
        return profile(driver, build, python, 10.0 if options.quick else 20.0, ACK_MODES[acks[0]])

    c_peer, reason = build_c_peer(build)
    if reason:
        unavailable["C libmilter"] = reason
    workers = "--workers" in txmilt_options()
    singles, chains = make_targets(python, c_peer, build, unavailable, workers)
    if options.only:
        keep = {"txmilt", "txmilt-asyncio", "txmilt --workers 2", *options.only}
        singles = [t for t in singles if t.key in keep]
        chains = [t for t in chains if "txmilt" in t.key or "pymilter" in keep]
    for target in (*singles, *chains):
        if target.unavailable:
            unavailable.setdefault(target.key, target.unavailable)
    e2e_reason = None
    if not options.skip_e2e:
        import e2e

        e2e_reason = e2e.unavailable()
        if e2e_reason:
            unavailable["end-to-end workload"] = e2e_reason

    running: dict[str, Running] = {}
    samples: list[Sample] = []
    e2e_samples: list[E2ESample] = []
    hot_path: dict[str, float] = {}
    try:
        for target in (*singles, *chains):
            if target.unavailable:
                continue
            key = "txmilt" if target.key == "txmilt chainx1" else target.key
            if key in running:
                running[target.key] = running[key]
                continue
            say(f"starting {target.key}")
            try:
                running[target.key] = Running(target, logs)
                warm_up(driver, running[target.key], 1.0 if options.quick else 3.0, ACK_MODES["quick"])
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                unavailable[target.key] = str(e)
                running.pop(target.key, None)
        plan = [(r, a, w, t) for r, a, w, t in interleaved(runs, acks, singles, chains) if t.key in running]
        for number, (run, ack, workload, target) in enumerate(plan, 1):
            instance = running[target.key]
            reason = instance.dead()
            if reason:
                unavailable.setdefault(target.key, reason)
                continue
            say(f"[{number}/{len(plan)}] run {run + 1}, {ack} ACK: {workload.key} {target.key}")
            try:
                sample = measure(driver, target, instance, workload, run, duration, ack)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                unavailable.setdefault(target.key, f"{workload.key}: {e}")
                continue
            if sample.errors:
                say(f"    {sample.errors} errors, e.g. {sample.error_samples[:2]}")
            samples.append(sample)
        if not options.skip_e2e and not e2e_reason:
            import e2e

            say("starting Postfix and smtp-sink for the end-to-end workload")
            try:
                rig = e2e.PostfixRig(build / "e2e")
                try:
                    E2E_POSTFIX_VERSION[0] = rig.version
                    stamps = {t.key: t.stamp for t in (*singles, *chains)}
                    run_e2e(rig, running, E2E_TARGETS, stamps, runs, options.quick, e2e_samples)
                finally:
                    rig.stop()
            except Exception as e:  # the synthetic results are still worth reporting
                say(f"end-to-end workload failed: {e!r}")
                unavailable["end-to-end workload"] = f"failed after {len(e2e_samples)} measurements: {e!r}"
    finally:
        for instance in {id(r): r for r in running.values()}.values():
            instance.stop()

    say("timing txmilt's hot path in process (bench/hotpath.py)")
    hot_path = hot_path_figures(2.0 if options.quick else 5.0)

    idle: list[IdleResult] = []
    if not options.skip_w4:
        connections = min(options.idle_connections, max(0, fd_limit - 200))
        within = 45.0 if options.quick else 120.0
        for run in range(options.w4_runs):
            for target in singles:
                if target.key not in running or target.key in unavailable or target.workloads != SINGLE_WORKLOADS:
                    continue
                say(f"W4 run {run + 1}: {connections} idle connections on {target.key}")
                try:
                    idle.append(measure_idle(driver, target, logs, connections, run, within))
                except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
                    say(f"    W4 failed on {target.key}: {e}")

    summaries = summarise(samples)
    e2e_summaries = summarise_e2e(e2e_samples)
    ratios, checks = report(summaries, e2e_summaries, idle, unavailable, sys.stdout, runs, duration, hot_path)
    wall = time.monotonic() - started
    command = "python3 bench/run.py" + ("" if argv is None and len(sys.argv) < 2 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    print(f"\n{command}: wall time {wall / 60:.1f} min; results in {(RESULTS / 'latest.json').relative_to(ROOT)}")
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "options": {"runs": runs, "duration_s": duration, "quick": options.quick, "acks": acks,
                    "idle_connections": options.idle_connections, "e2e": not options.skip_e2e},
        "machine": {"python": platform.python_version(), "kernel": platform.release(), "cpus": NCPU,
                    "fd_limit": fd_limit, "peer_versions": versions, "postfix": E2E_POSTFIX_VERSION[0]},
        "workloads": {w.key: {**asdict(w), "round_trips": w.round_trips} for w in (*SINGLE_WORKLOADS, W5)},
        "summary": [asdict(s) for s in summaries],
        "e2e": [asdict(s) for s in e2e_summaries],
        "hot_path_us_per_command": hot_path,
        "idle": [asdict(i) for i in idle],
        "ratios": ratios,
        "targets": [{"name": c.name, "value": c.value, "goal": c.goal, "at_most": c.at_most, "met": c.met}
                    for c in checks],
        "unavailable": unavailable,
        "samples": [asdict(s) for s in samples],
        "e2e_samples": [asdict(s) for s in e2e_samples],
        "wall_time_s": wall,
    }
    (RESULTS / "latest.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
