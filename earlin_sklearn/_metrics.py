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
"""

import time

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
        self.queue_depth = Gauge("earlin_queue_depth", "Inputs waiting for a batch", ["route"], registry=r)
        self.reports = Counter("earlin_reports", "Edge reports received", registry=r)
        self.report_inputs = Counter("earlin_report_inputs", "Inputs the edges saw and accepted (from their reports)",
                                     ["kind"], registry=r)
        self.devices = Gauge("earlin_devices", "Edge devices that have reported", registry=r)
        self.fleet_acceptance = Gauge("earlin_fleet_acceptance", "Acceptance rate over the fleet's last reports",
                                      registry=r)
        self.drift_alarms = Counter("earlin_drift_alarms", "Drift alarms raised, by test", ["scope"], registry=r)

    def render(self):
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request by route and status, with its latency.

    ``routes``: the app's own paths, the only label values (any other path counts as ``other``).
    """

    def __init__(self, app, metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, frozenset(routes)

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
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - t0)
