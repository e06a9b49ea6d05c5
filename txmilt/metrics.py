"""Prometheus metrics: per-filter verdicts, changes, latencies and failures, open connections."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MetricsObserver:
    """A chain observer that keeps Prometheus metrics in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.verdict_total = Counter(
            "txmilt_filter_verdicts", "Verdicts given by each filter, per stage.",
            ["filter", "stage", "verdict", "dry_run"], registry=self.registry,
        )
        self.change_total = Counter(
            "txmilt_filter_changes", "Changes made by each filter at end of message.",
            ["filter", "kind", "dry_run"], registry=self.registry,
        )
        self.filter_latency = Histogram(
            "txmilt_filter_latency_seconds", "Time each filter took to answer, per stage.",
            ["filter", "stage"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.failure_total = Counter(
            "txmilt_filter_failures", "Filter timeouts, errors and bad verdicts, per stage.",
            ["filter", "stage", "kind"], registry=self.registry,
        )
        self.skipped_total = Counter(
            "txmilt_filter_skipped", "Connections and messages a filter's when conditions left it out of.",
            ["filter", "reason"], registry=self.registry,
        )
        self.command_latency = Histogram(
            "txmilt_command_latency_seconds", "Time from an MTA command to the chain's reply, per stage.",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.open_connections = Gauge(
            "txmilt_connections_open", "MTA connections open now.", registry=self.registry,
            multiprocess_mode="livesum",  # with workers: the sum over the live ones
        )
        self.connection_total = Counter(
            "txmilt_connections", "MTA connections accepted.", registry=self.registry,
        )
        self.protocol_error_total = Counter(
            "txmilt_protocol_errors", "Connections dropped for breaking the protocol.", registry=self.registry,
        )

    def track_connections(self, count: Callable[[], int]) -> None:
        """Report ``count()`` as the number of open connections at every scrape."""
        self.open_connections.set_function(lambda: float(count()))

    def verdict(self, filter_name: str, stage: str, verdict: str, dry_run: bool) -> None:
        """Count one verdict."""
        self.verdict_total.labels(filter_name, stage, verdict, str(dry_run).lower()).inc()

    def change(self, filter_name: str, kind: str, dry_run: bool) -> None:
        """Count one change."""
        self.change_total.labels(filter_name, kind, str(dry_run).lower()).inc()

    def latency(self, filter_name: str, stage: str, seconds: float) -> None:
        """Record how long a filter took."""
        self.filter_latency.labels(filter_name, stage).observe(seconds)

    def failure(self, filter_name: str, stage: str, kind: str) -> None:
        """Count one filter failure."""
        self.failure_total.labels(filter_name, stage, kind).inc()

    def skipped(self, filter_name: str, reason: str) -> None:
        """Count one connection or message a filter sat out, by the when key that failed."""
        self.skipped_total.labels(filter_name, reason).inc()

    def command(self, stage: str, seconds: float) -> None:
        """Record how long the chain took to answer one command."""
        self.command_latency.labels(stage).observe(seconds)

    def connection_opened(self) -> None:
        """Count an accepted connection."""
        self.connection_total.inc()

    def protocol_error(self) -> None:
        """Count a connection dropped for a protocol error."""
        self.protocol_error_total.inc()

    def resource(self) -> Resource:
        """A twisted.web resource serving the metrics in Prometheus' text format."""
        return serve_registry(Resource(), self.registry)


def serve_registry(root: Resource, registry: CollectorRegistry) -> Resource:
    """Serve ``registry`` in Prometheus' text format at ``root`` and ``root``'s ``/metrics``; returns ``root``."""
    metrics = MetricsResource(registry=registry)  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", metrics)
    root.putChild(b"", metrics)
    return root


def workers_registry(directory: str) -> CollectorRegistry:
    """The metrics of every worker process, summed from the files they keep in ``directory``.

    Workers started with ``PROMETHEUS_MULTIPROC_DIR`` set to ``directory`` keep
    their values there (prometheus_client's multiprocess mode); the counts of a
    worker that has exited stay in the sums, its open connections do not.
    """
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def forget_worker(pid: int, directory: str) -> None:
    """Drop the gauges of an exited worker from the sums (its counts stay)."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
