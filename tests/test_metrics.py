"""Prometheus metrics: /metrics on the real stack (local Ray, the random tiny model, SQLite, a
real WebSocket), per-app registries, the cluster collector's arithmetic, the optional token.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
import ray
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

import serving
from lumos.api import create_app
from lumos.api.metrics import TOKEN_ENV, _ClusterCollector
from lumos.cluster.runtime import ServeConfig

torch.set_num_threads(1)

NAMESPACE = f"lumos-metrics-test-{uuid.uuid4().hex[:10]}"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page (parsed strictly)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(page: dict, name: str, **labels) -> float | None:
    return page.get((name, tuple(sorted(labels.items()))))


def offline_app() -> FastAPI:
    return create_app(ServeConfig(model="random:tiny", workers=0))


def test_each_app_has_its_own_registry():
    a, b = TestClient(offline_app()), TestClient(offline_app())  # no lifespan: no cluster
    for _ in range(3):
        assert a.get("/api/config").status_code == 200
    assert b.get("/nothing-here").status_code == 404
    page_a, page_b = samples(a.get("/metrics").text), samples(b.get("/metrics").text)
    assert value(page_a, "lumos_http_requests_total", method="GET", status="200") == 3
    assert value(page_a, "lumos_http_requests_total", method="GET", status="404") is None
    assert value(page_b, "lumos_http_requests_total", method="GET", status="404") == 1
    assert value(page_b, "lumos_http_requests_total", method="GET", status="200") is None
    assert value(page_a, "lumos_workers", state="alive") == 0  # no client: no workers
    assert a.get("/metrics").headers["content-type"].startswith("text/plain")
    for i in range(5):  # made-up methods share one label value (no unbounded series)
        a.request(f"BREW{i}", "/api/config")
    page_a = samples(a.get("/metrics").text)
    methods = {dict(k[1])["method"] for k in page_a if k[0] == "lumos_http_requests_total"}
    assert methods == {"GET", "other"}


def test_refusals_are_exported_by_reason():
    app = offline_app()
    client = TestClient(app)
    page = samples(client.get("/metrics").text)
    for reason in app.state.refusals:  # every reason the admission code knows, from 0
        assert value(page, "lumos_refused_requests_total", reason=reason) == 0
    app.state.refusals.update({"sessions_cap": 3, "owner_cap": 0, "rate_limit": 7})
    page = samples(client.get("/metrics").text)
    assert value(page, "lumos_refused_requests_total", reason="sessions_cap") == 3
    assert value(page, "lumos_refused_requests_total", reason="owner_cap") == 0
    assert value(page, "lumos_refused_requests_total", reason="rate_limit") == 7


def test_metrics_token(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret-metrics-token")
    client = TestClient(offline_app())
    r = client.get("/metrics")
    assert r.status_code == 401 and "LUMOS_METRICS_TOKEN" in r.json()["error"]
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics-token"})
    assert ok.status_code == 200 and "lumos_http_requests_total" in ok.text


def worker(name: str, **load) -> dict:
    return {"name": name, "alive": True, "load": load}


def test_collector_rates_liveness_and_missing_figures():
    c = _ClusterCollector()
    c.update([worker("w0", frames=10, steps=100), worker("w1", frames=4)], {}, now=1000.0)
    assert c.frames_per_second() is None  # one sample: no rate yet
    c.update([worker("w0", frames=30, steps=300), worker("w1", frames=4)], {}, now=1010.0)
    assert c.frames_per_second() == pytest.approx(2.0)  # 20 frames in 10 s
    c.update([worker("w0", frames=5, steps=50)], {}, now=1020.0)  # w0 restarted, w1 lost
    assert c.frames_per_second() == pytest.approx(5 / 20)  # a reset counts from 0
    text = samples(generate(c))
    assert value(text, "lumos_worker_up", worker="w0") == 1
    assert value(text, "lumos_worker_up", worker="w1") == 0
    assert value(text, "lumos_workers", state="lost") == 1
    # w0 reports no step_seconds and no KV figures: they are left out, not reported as 0
    assert value(text, "lumos_diffusion_step_seconds_count", worker="w0") is None
    assert value(text, "lumos_worker_kv_bytes", worker="w0") is None
    assert value(text, "lumos_diffusion_steps_total", worker="w0") == 50
    c.update([worker("w0", frames=6)], {}, now=1020.0 + 601)
    assert value(samples(generate(c)), "lumos_worker_up", worker="w1") is None  # forgotten


def generate(collector: _ClusterCollector) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


# -- the real stack ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    cfg = serving.local_ray_config(NAMESPACE, tmp_path_factory.mktemp("metrics") / "lumos.db")
    server = serving.Server(cfg, ws_ping_interval=None)
    try:
        yield server
    finally:
        server.stop()
        ray.shutdown()


def scrape(api) -> dict:
    r = httpx.get(api.url + "metrics", timeout=30)
    assert r.status_code == 200
    return samples(r.text)


def read_frames(ws, n: int, timeout_s: float = 120) -> list[int]:
    seqs, deadline = [], time.monotonic() + timeout_s
    while len(seqs) < n:
        msg = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if msg["type"] == "frame":
            seqs.append(msg["seq"])
    return seqs


def test_metrics_of_a_session_streamed_live(api):
    http = httpx.Client(base_url=api.url, timeout=60)
    before = scrape(api)
    (name,) = [k[1][0][1] for k in before if k[0] == "lumos_worker_up"]
    assert value(before, "lumos_worker_up", worker=name) == 1
    assert value(before, "lumos_workers", state="alive") == 1
    assert value(before, "lumos_worker_kv_budget_bytes", worker=name) > 0
    assert value(before, "lumos_commit_to_browser_seconds_count") == 0
    assert value(before, "lumos_time_to_first_frame_seconds_count") == 0

    body = {"prompt": "a red sneaker moves left", "frames": 2, "steps": 2, "seed": 1}
    s = http.post("/api/sessions", json=body).json()
    url = f"ws://127.0.0.1:{api.port}/api/sessions/{s['id']}/stream?from=0"
    with ws_connect(url, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "auth", "token": s["token"]}))
        assert read_frames(ws, 2) == [0, 1]
        while http.get(f"/api/sessions/{s['id']}", headers=auth(s)).json()["status"] in (
            "queued",
            "running",
        ):
            time.sleep(0.1)
        r = http.post(f"/api/sessions/{s['id']}/extend", json={"frames": 2}, headers=auth(s))
        assert r.status_code == 202, r.text
        assert read_frames(ws, 2) == [2, 3]  # committed while the socket is open: live
        during = scrape(api)
        assert value(during, "lumos_api_streams") == 1
    assert value(during, "lumos_api_frames_sent_total") == 4
    assert value(during, "lumos_commit_to_browser_seconds_count") >= 2
    assert 0 <= value(during, "lumos_commit_to_browser_seconds_sum") < 60
    assert value(during, "lumos_time_to_first_frame_seconds_count") == 1
    assert 0 < value(during, "lumos_time_to_first_frame_seconds_sum") < 120

    deadline = time.monotonic() + 60  # the client refreshes the workers' load every 5 s
    while True:
        page = scrape(api)
        if (value(page, "lumos_frames_generated_total", worker=name) or 0) >= 4:
            break
        assert time.monotonic() < deadline, "the worker's frame count never reached 4"
        time.sleep(0.5)
    steps = value(page, "lumos_diffusion_steps_total", worker=name)
    assert steps >= 4 * 2  # 4 frames x 2 steps (batched forwards)
    assert value(page, "lumos_diffusion_step_seconds_count", worker=name) == steps
    assert value(page, "lumos_diffusion_step_seconds_sum", worker=name) > 0
    assert value(page, "lumos_sessions", state="active") == 0  # done: no admission held
    grains = sum(v for k, v in page.items() if k[0] == "lumos_host_sessions")
    assert grains >= 1  # still activated on its host (idle_s is 60 s here)
    assert value(page, "lumos_sessions", state="idle") == grains
    assert value(page, "lumos_metrics_source_errors_total", source="hosts") is None
    assert value(page, "lumos_queue_depth") == 0
    assert value(page, "lumos_kv_bytes") >= 0
    assert value(page, "lumos_frames_per_second") >= 0
    deadline = time.monotonic() + 30
    while value(scrape(api), "lumos_api_streams") != 0:  # the server saw the socket close
        assert time.monotonic() < deadline, "the closed stream is still counted"
        time.sleep(0.2)
    created = value(page, "lumos_http_requests_total", method="POST", status="201")
    assert created == 1
    http.close()


def auth(session: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {session['token']}"}
