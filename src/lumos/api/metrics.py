"""Prometheus metrics of the API and the cluster's workers (system.md, "Operators see it").

`install(app)` gives a FastAPI app its own `Metrics` (a per-app `CollectorRegistry`, so several
apps in one process never collide), an ASGI middleware that counts HTTP requests and open
WebSocket streams, and `GET /metrics` in the Prometheus text format. This module is the one place
that names the metrics; `docs/DEPLOY.md` lists them and `deploy/grafana/lumos.json` charts them.

Two kinds of figures:
- observed in this API process: HTTP requests, open streams, frames sent to browsers, the
  commit-to-browser latency of each live frame (the API's clock when it sends the frame minus the
  worker's `committed_at`) and the time to first frame of each session (from its `created_at` to
  the worker's commit of its first generated frame, observed once per session when a browser is
  sent that frame within a minute of its commit). Commit-to-browser counts only frames committed
  while their WebSocket was open (a replay of stored frames measures nothing). The clocks are of
  different hosts, so hosts need synchronised clocks (NTP); negative differences count as 0.
- read from the cluster at scrape time: `LumosClient.workers()` (each worker's info and its last
  load, refreshed every few seconds by the client), `LumosClient.hosts()` (each session host's
  activated grains, subscribers, memory), the store's `active_count()` (sessions admitted:
  queued or generating) and `app.state.refusals` ({reason: count}, kept by the API's admission
  code). A source that fails or takes over SCRAPE_TIMEOUT_S is left out of that scrape and
  counted in lumos_metrics_source_errors_total. Counters of a worker restart from 0 when the
  worker does; Prometheus' rate() handles that. Every load key is read defensively: a figure a
  worker does not report is left out rather than reported as 0.

An operator may require `Authorization: Bearer <token>` on /metrics by setting
LUMOS_METRICS_TOKEN in the API's environment (Prometheus: `authorization.credentials_file`).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("lumos.metrics")

TOKEN_ENV = "LUMOS_METRICS_TOKEN"
SCRAPE_TIMEOUT_S = 5.0  # for each cluster figure read at scrape time
OPENED_AT = "lumos.opened_at"  # ASGI scope key: wall clock when a WebSocket connected
LOST_WORKER_TTL_S = 600.0  # a worker that vanished is reported down this long, then forgotten
RATE_WINDOW_S = 60.0  # frames/s is measured over the scrapes of the last minute
TTFF_MEMORY = 10_000  # sessions remembered so each one's first frame is observed once
TTFF_RECENT_S = 60.0  # a first frame sent later than this after its commit is not observed

COMMIT_TO_BROWSER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
TTFF_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def _num(load: dict[str, Any], *keys: str) -> float | None:
    """The first of keys that load holds as a number (bools excluded), else None."""
    for key in keys:
        value = load.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _get(record: Any, key: str) -> Any:
    return record.get(key) if isinstance(record, dict) else getattr(record, key, None)


class _ClusterCollector(Collector):
    """Worker and admission figures, built at scrape time from what `Metrics.scrape` was given."""

    def __init__(self) -> None:
        self.workers: list[dict[str, Any]] = []
        self.refusals: dict[str, Any] = {}
        self.hosts: list[dict[str, Any]] | None = None
        self.admitted: int | None = None
        self.last_seen: dict[str, float] = {}  # worker name -> wall clock last seen alive
        self.samples: deque[tuple[float, dict[str, float]]] = deque()  # (time, frames/worker)

    def describe(self) -> Iterable[Any]:
        return []  # the families depend on what the workers report

    def update(
        self,
        workers: list[dict[str, Any]],
        refusals: dict[str, Any],
        now: float,
        hosts: list[dict[str, Any]] | None = None,
        admitted: int | None = None,
    ) -> None:
        """What the next collect() reports: worker infos with their load, refusals by reason,
        the session hosts' stats and the store's count of admitted sessions (None: unknown)."""
        self.workers, self.refusals = workers, refusals
        self.hosts, self.admitted = hosts, admitted
        for w in workers:
            if w.get("alive", True):
                self.last_seen[str(w.get("name"))] = now
        for name, seen in list(self.last_seen.items()):
            if now - seen > LOST_WORKER_TTL_S:
                del self.last_seen[name]
        frames = {}
        for w in workers:
            value = _num(w.get("load") or {}, "frames")
            if value is not None:
                frames[str(w.get("name"))] = value
        self.samples.append((now, frames))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()

    def frames_per_second(self) -> float | None:
        """Frames generated per second by all workers between the oldest and newest sample."""
        if len(self.samples) < 2:
            return None
        (t0, old), (t1, new) = self.samples[0], self.samples[-1]
        if t1 - t0 <= 0:
            return None
        made = sum(v - old[k] if v >= old[k] else v for k, v in new.items() if k in old)
        return made / (t1 - t0)

    def collect(self) -> Iterator[Any]:
        alive = {str(w.get("name")): w for w in self.workers if w.get("alive", True)}
        up = GaugeMetricFamily(
            "lumos_worker_up", "1 if the worker answers, 0 if lost", labels=["worker"]
        )
        for name in sorted(set(self.last_seen) | set(alive)):
            up.add_metric([name], 1.0 if name in alive else 0.0)
        yield up
        count = GaugeMetricFamily("lumos_workers", "registered workers by state", labels=["state"])
        count.add_metric(["alive"], len(alive))
        count.add_metric(["lost"], len(set(self.last_seen) - set(alive)))
        yield count

        per_worker = {
            # metric name, help, load keys (first present wins), kind
            "lumos_worker_sessions": ("sessions generating on the worker", ("sessions",)),
            "lumos_worker_running": ("sessions in the worker's current batch", ("running",)),
            "lumos_worker_queue_depth": (
                "requests waiting for admission to the worker's engine",
                ("waiting", "queue_depth"),
            ),
            "lumos_worker_warm_sessions": (
                "sessions not generating whose KV cache the worker keeps",
                ("warm_sessions",),
            ),
            "lumos_worker_streams": ("open frame streams of the worker", ("streams",)),
            "lumos_worker_capacity": ("sessions the worker batches at most", ("capacity",)),
            "lumos_worker_kv_bytes": ("KV-cache bytes held by the worker", ("kv_bytes",)),
            "lumos_worker_kv_budget_bytes": (
                "the worker's KV-cache budget in bytes",
                ("kv_budget_bytes",),
            ),
        }
        totals: dict[str, float] = {}
        for metric, (text, keys) in per_worker.items():
            family = GaugeMetricFamily(metric, text, labels=["worker"])
            for name, w in sorted(alive.items()):
                load = w.get("load") or {}
                value = _num(load, *keys)
                if value is None and metric == "lumos_worker_warm_sessions":
                    cached, active = _num(load, "cached_sessions"), _num(load, "sessions")
                    if cached is not None:
                        value = max(0.0, cached - (active or 0.0))
                if value is not None:
                    family.add_metric([name], value)
                    totals[metric] = totals.get(metric, 0.0) + value
            yield family

        # active: admitted (queued or generating) by the store, else what the workers run;
        # idle: session grains activated on the hosts that are not active
        active = totals.get("lumos_worker_sessions", 0.0)
        if self.admitted is not None:
            active = float(self.admitted)
        sessions = GaugeMetricFamily(
            "lumos_sessions",
            "sessions: active = queued or generating, idle = activated on a host, not active",
            labels=["state"],
        )
        sessions.add_metric(["active"], active)
        grains = GaugeMetricFamily(
            "lumos_host_sessions", "session grains activated on the host", labels=["host"]
        )
        subscribed = GaugeMetricFamily(
            "lumos_host_subscribed",
            "sessions with waiting subscribers on the host",
            labels=["host"],
        )
        rss = GaugeMetricFamily("lumos_host_rss_bytes", "the host's memory", labels=["host"])
        activations = CounterMetricFamily(
            "lumos_host_activations", "session grain activations", labels=["host"]
        )
        deactivations = CounterMetricFamily(
            "lumos_host_deactivations", "session grain deactivations", labels=["host"]
        )
        if self.hosts is not None:
            held = 0.0
            for host in sorted(self.hosts, key=lambda h: str(h.get("name"))):
                name = str(host.get("name"))
                for family, key in (
                    (grains, "active"),
                    (subscribed, "subscribed"),
                    (rss, "rss_bytes"),
                    (activations, "activations"),
                    (deactivations, "deactivations"),
                ):
                    value = _num(host, key)
                    if value is not None:
                        family.add_metric([name], value)
                held += _num(host, "active") or 0.0
            sessions.add_metric(["idle"], max(0.0, held - active))
        yield sessions
        yield from (grains, subscribed, rss, activations, deactivations)
        yield GaugeMetricFamily(
            "lumos_queue_depth",
            "requests waiting for admission, all workers",
            value=totals.get("lumos_worker_queue_depth", 0.0),
        )
        yield GaugeMetricFamily(
            "lumos_kv_bytes",
            "KV-cache bytes, all workers",
            value=totals.get("lumos_worker_kv_bytes", 0.0),
        )

        frames = CounterMetricFamily(
            "lumos_frames_generated", "latent frames committed by the worker", labels=["worker"]
        )
        steps = CounterMetricFamily(
            "lumos_diffusion_steps",
            "diffusion steps (batched forwards) run by the worker",
            labels=["worker"],
        )
        latency = SummaryMetricFamily(
            "lumos_diffusion_step_seconds",
            "time in the worker's batched diffusion steps (mean: rate of _sum / rate of _count)",
            labels=["worker"],
        )
        for name, w in sorted(alive.items()):
            load = w.get("load") or {}
            n_frames, n_steps = _num(load, "frames"), _num(load, "steps")
            seconds = _num(load, "step_seconds")
            if n_frames is not None:
                frames.add_metric([name], n_frames)
            if n_steps is not None:
                steps.add_metric([name], n_steps)
                if seconds is not None:
                    latency.add_metric([name], count_value=n_steps, sum_value=seconds)
        yield frames
        yield steps
        yield latency
        rate = self.frames_per_second()
        if rate is not None:
            yield GaugeMetricFamily(
                "lumos_frames_per_second",
                f"frames committed per second by all workers over the last {RATE_WINDOW_S:.0f} s",
                value=rate,
            )

        refused = CounterMetricFamily(
            "lumos_refused_requests", "requests refused by admission control", labels=["reason"]
        )
        for reason, n in sorted(self.refusals.items()):
            if isinstance(n, int | float) and not isinstance(n, bool):
                refused.add_metric([str(reason)], float(n))
        yield refused


class Metrics:
    """The metrics of one app: its registry, the figures the API observes, the cluster collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "lumos_http_requests",
            "HTTP requests by method and status",
            ["method", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "lumos_http_request_seconds",
            "HTTP request latency",
            ["method"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.streams = Gauge("lumos_api_streams", "open WebSocket frame streams", registry=r)
        self.frames_sent = Counter(
            "lumos_api_frames_sent", "frames sent to browsers over WebSockets", registry=r
        )
        self.commit_to_browser = Histogram(
            "lumos_commit_to_browser_seconds",
            "from the engine step that committed a frame to the API sending it (live frames)",
            buckets=COMMIT_TO_BROWSER_BUCKETS,
            registry=r,
        )
        self.time_to_first_frame = Histogram(
            "lumos_time_to_first_frame_seconds",
            "from a session's creation to the commit of its first generated frame",
            buckets=TTFF_BUCKETS,
            registry=r,
        )
        self.scrape_errors = Counter(
            "lumos_metrics_source_errors",
            "cluster figures that could not be read for a scrape, by source",
            ["source"],
            registry=r,
        )
        self.cluster = _ClusterCollector()
        r.register(self.cluster)
        self._first_seen: OrderedDict[str, None] = OrderedDict()

    def frame_sent(self, record: Any, state: dict[str, Any], opened_at: float | None) -> None:
        """Count a frame sent on a WebSocket and observe its latencies (see the module doc)."""
        now = time.time()
        self.frames_sent.inc()
        meta = _get(record, "meta") or {}
        committed = meta.get("committed_at") if isinstance(meta, dict) else None
        if not isinstance(committed, int | float) or isinstance(committed, bool) or committed <= 0:
            return
        if opened_at is not None and committed >= opened_at:  # live, not a replay
            self.commit_to_browser.observe(max(0.0, now - committed))
        settings = state.get("settings") or {}
        first = 1 if settings.get("source") == "image" else 0
        sid, created = state.get("id") or state.get("session_id"), state.get("created_at")
        if _get(record, "seq") != first or not isinstance(created, int | float) or not sid:
            return
        if sid in self._first_seen or now - committed > TTFF_RECENT_S:
            return  # observed already, or a session reopened long after it started
        self._first_seen[sid] = None
        if len(self._first_seen) > TTFF_MEMORY:
            self._first_seen.popitem(last=False)
        self.time_to_first_frame.observe(max(0.0, committed - float(created)))

    async def scrape(self, app: FastAPI) -> bytes:
        """The Prometheus text of this app: its own figures and the cluster's, read now."""
        client = getattr(app.state, "client", None)
        workers: list[dict[str, Any]] = []
        if client is not None:
            found = client.workers()
            if inspect.isawaitable(found):
                found = await found
            workers = [dict(w) for w in found or []]
        hosts = await self._optional(client, "hosts")
        admitted = await self._optional(getattr(client, "store", None), "active_count")
        refusals = getattr(app.state, "refusals", None)
        self.cluster.update(
            workers,
            dict(refusals or {}),
            time.time(),
            hosts=[dict(h) for h in hosts] if isinstance(hosts, list) else None,
            admitted=admitted if isinstance(admitted, int) else None,
        )
        return generate_latest(self.registry)

    async def _optional(self, obj: Any, method: str) -> Any:
        """obj.method() if it exists, within SCRAPE_TIMEOUT_S; None (and a counted error) if it
        fails, so /metrics always answers."""
        fn = getattr(obj, method, None)
        if not callable(fn):
            return None
        try:
            result = fn()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, SCRAPE_TIMEOUT_S)
            return result
        except Exception as e:
            log.warning("metrics: %s() failed: %r", method, e)
            self.scrape_errors.labels(method).inc()
            return None


class _Middleware:
    """ASGI: count HTTP requests by status and time them; track open WebSocket streams."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            scope[OPENED_AT] = time.time()
            self.metrics.streams.inc()
            try:
                await self.app(scope, receive, send)
            finally:
                self.metrics.streams.dec()
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        method = scope.get("method", "GET")
        if method not in HTTP_METHODS:  # a label value from the client: keep the set bounded
            method = "other"
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.http_requests.labels(method, str(status)).inc()
            self.metrics.http_seconds.labels(method).observe(time.perf_counter() - start)


def observe_frame_sent(websocket: Any, record: Any, state: dict[str, Any]) -> None:
    """The stream handler's hook, called after each frame message is sent."""
    metrics = getattr(websocket.app.state, "metrics", None)
    if metrics is not None:
        metrics.frame_sent(record, state, websocket.scope.get(OPENED_AT))


def install(app: FastAPI) -> Metrics:
    """Give app its Metrics (app.state.metrics), the middleware and GET /metrics."""
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(_Middleware, metrics=metrics)
    token = os.environ.get(TOKEN_ENV) or None

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        if token is not None:
            scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), token.encode()
            ):
                return JSONResponse(
                    {"error": "metrics need Authorization: Bearer <LUMOS_METRICS_TOKEN>"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        body = await metrics.scrape(request.app)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return metrics
