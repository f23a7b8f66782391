"""What the cloud server tells an operator: Prometheus series at ``/metrics`` (prometheus-client).

prometheus-client is the Prometheus project's own Python library: it keeps
the counters and histograms and writes the text exposition format that every
scraper reads, so none of that is written here. Each app has its own
registry (several apps in one process, as in tests, do not mix their counts).

Series (all prefixed ``earlin_``): ``requests_total{route,status}``,
``request_seconds{route}`` (histogram), ``batch_inputs`` (inputs per run of
the cloud part, histogram), ``compute_seconds`` (per run, histogram),
``received_bytes_total{encoding}``, ``cloud_verdicts_total{verdict}`` (the
two-stage cloud detector's), ``queue_depth{route}`` (inputs waiting for a
batch); from the edge reports: ``reports_total``, ``report_inputs_total{kind}``
(seen, accepted), ``devices``, ``fleet_acceptance``,
``drift_alarms_total{scope}`` (report, device, fleet).

With several worker processes (``earlin serve-cloud --workers N``) the
library's multiprocess mode keeps each worker's values in files under
``$PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` sums them, whichever worker
answers: counters and histograms add up, ``queue_depth`` is the sum over
live workers, and ``devices`` and ``fleet_acceptance`` (each worker's own
drift monitor) come per worker (a ``pid`` label).
"""

import collections
import os
import time

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

class ServerMetrics:
    """The server's Prometheus series, in a registry of their own."""

    def __init__(self):
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.content_type = CONTENT_TYPE_LATEST
        r = self.registry
        self.requests = Counter("earlin_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_seconds = Histogram("earlin_request_seconds", "Time from request to response, by route",
                                         ["route"], registry=r,
                                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.batch_inputs = Histogram("earlin_batch_inputs", "Inputs per run of the cloud part (dynamic batching)",
                                      registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.compute_seconds = Histogram("earlin_compute_seconds", "Seconds per run of the cloud part", registry=r,
                                         buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        self.received_bytes = Counter("earlin_received_bytes", "Request body bytes by encoding", ["encoding"],
                                      registry=r)
        self.cloud_verdicts = Counter("earlin_cloud_verdicts", "The cloud-stage detector's verdicts", ["verdict"],
                                      registry=r)
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.queue_depth = Gauge("earlin_queue_depth", "Inputs waiting for a batch", ["route"], registry=r,
                                 multiprocess_mode="livesum")
        self.reports = Counter("earlin_reports", "Edge reports received", registry=r)
        self.report_inputs = Counter("earlin_report_inputs", "Inputs the edges saw and accepted (from their reports)",
                                     ["kind"], registry=r)
        self.devices = Gauge("earlin_devices", "Edge devices that have reported", registry=r,
                             multiprocess_mode="liveall")
        self.fleet_acceptance = Gauge("earlin_fleet_acceptance", "Acceptance rate over the fleet's last reports",
                                      registry=r, multiprocess_mode="liveall")
        self.drift_alarms = Counter("earlin_drift_alarms", "Drift alarms raised, by test", ["scope"], registry=r)

    def render(self):
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()  # every worker's files, summed (a fresh registry per scrape, as documented)
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


class RequestLog:
    """The last requests' times and latencies (a bounded ring), for the status page's throughput and latency plots.

    Prometheus keeps cumulative counts; a person looking at ``/status`` wants
    the last minutes binned in time, without running a Prometheus server.
    """

    def __init__(self, size=20000):
        self.entries = collections.deque(maxlen=int(size))  # (end time, route, seconds, status)

    def add(self, route, seconds, status, now=None):
        self.entries.append((time.time() if now is None else now, route, seconds, status))

    def binned(self, now=None, span=600.0, width=10.0, routes=None):
        """``[(end, requests/s, p50 ms, p99 ms)]`` per ``width``-second bin of the last ``span`` seconds, ``end``
        the bin's end in seconds from now (0: the current bin; latency NaN in a bin without requests); only
        ``routes`` when given."""
        import numpy as np

        now = time.time() if now is None else now
        n_bins = int(span // width)
        times = [[] for _ in range(n_bins)]
        for t, route, seconds, _ in list(self.entries):
            age = now - t
            if 0 <= age < n_bins * width and (routes is None or route in routes):
                times[n_bins - 1 - int(age // width)].append(seconds)
        out = []
        for i, bin_seconds in enumerate(times):
            end = -(n_bins - 1 - i) * width
            if bin_seconds:
                p50, p99 = np.percentile(bin_seconds, [50, 99])
                out.append((end, len(bin_seconds) / width, 1e3 * float(p50), 1e3 * float(p99)))
            else:
                out.append((end, 0.0, float("nan"), float("nan")))
        return out


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request by route and status, with its latency.

    ``routes``: the app's own paths, the only label values (any other path counts as ``other``).
    ``log``: a :class:`RequestLog` that also keeps each request, for the status page.
    """

    def __init__(self, app, metrics, routes, log=None):
        self.app, self.metrics, self.routes, self.log = app, metrics, frozenset(routes), log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        route = route if route in self.routes else "other"  # bounded label values, whatever paths clients try
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - t0
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.request_seconds.labels(route).observe(seconds)
            if self.log is not None:
                self.log.add(route, seconds, status["code"])
