"""A bounded schemathesis run against the real app (uvicorn + LumosClient + local Ray, SQLite,
the random tiny model): every operation of /openapi.json, positive and negative cases, no 5xx,
every status and body as the schema says (tests/fuzzing.py; scripts/schemathesis runs longer).
"""

from __future__ import annotations

import uuid

import pytest
import ray
import torch

import fuzzing
import serving

torch.set_num_threads(1)

MAX_EXAMPLES = 15  # per operation and mode: about 260 requests, well under a minute


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = serving.local_ray_config(
        f"lumos-fuzz-test-{uuid.uuid4().hex[:10]}",
        tmp_path_factory.mktemp("fuzz") / "lumos.db",
        limits=fuzzing.fuzz_limits(),
        admin_token="admin-" + uuid.uuid4().hex,
    )
    served = serving.Server(cfg)
    yield served
    served.stop()
    ray.shutdown()


def test_schemathesis_finds_no_failure(server):
    report = fuzzing.run(server.url.rstrip("/"), MAX_EXAMPLES)
    out = report.as_dict()
    assert out["operations"] >= 9, out["cases_by_operation"]  # every operation was reached
    assert out["cases"] >= 9 * 2 * 3, out["cases_by_operation"]
    assert any(int(code) < 300 for code in out["statuses"]), out["statuses"]  # real successes
    assert not [code for code in out["statuses"] if int(code) >= 500], out["statuses"]
    assert out["failures"] == [], "\n\n".join(
        f"{f['operation']} [{f['mode']}] {f['kind']} x{f['count']}\n{f['message']}\n"
        f"{f.get('reproduce', '')}"
        for f in out["failures"]
    )


def test_the_harness_reports_a_server_error_and_a_wrong_schema():
    """fuzzing.run on a tiny app with a 500 and an undocumented reply: both are reported."""
    import threading

    import uvicorn
    from fastapi import FastAPI, HTTPException

    app = FastAPI()

    @app.get("/api/boom")
    async def boom(x: int) -> dict:
        if x > 5:
            raise RuntimeError("boom")  # a 500
        if x < -5:
            raise HTTPException(418, "teapot")  # not in the schema
        return {"x": x}

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        out = fuzzing.run(f"http://127.0.0.1:{port}", 15).as_dict()
    finally:
        server.should_exit = True
        thread.join(10)
    kinds = {f["kind"] for f in out["failures"]}
    assert "ServerError" in kinds and "UndefinedStatusCode" in kinds, out["failures"]


def test_stream_answers_any_from_and_first_message_with_a_defined_close(server):
    """The WebSocket is outside the OpenAPI schema: random `from` values and first messages get
    4400 / 4401 with an error message first, never a crashed handler (1011) or a stream."""
    import json
    from urllib.parse import quote

    import httpx
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    r = httpx.post(
        server.url + "api/sessions", json={"prompt": "a red sneaker", "frames": 1}, timeout=60
    )
    assert r.status_code == 201, r.text
    sid, token = r.json()["id"], r.json()["token"]
    base = server.url.replace("http://", "ws://") + f"api/sessions/{sid}/stream"
    garbage = st.one_of(
        st.text(max_size=50),
        st.binary(max_size=50),
        st.builds(json.dumps, st.dictionaries(st.text(max_size=8), st.text(max_size=8))),
        st.just(json.dumps({"type": "auth", "token": token + "x"})),
        st.just(json.dumps({"type": "auth", "token": 7})),
    )
    codes = []

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(start=st.one_of(st.none(), st.text(max_size=12)), first=garbage)
    @example(start="²", first="{}")  # isdigit() but int() fails: crashed the handler before
    @example(start="１２", first=b"\x00")  # full-width digits: int() reads them as 12
    @example(start="0", first=b"binary first message")
    def one(start, first) -> None:
        valid_from = start is None or (start.isascii() and start.isdigit() and len(start) <= 9)
        url = base if start is None else f"{base}?from={quote(start, safe='')}"
        with connect(url, open_timeout=30) as ws:
            try:
                ws.send(first)
            except ConnectionClosed:
                pass
            msg = json.loads(ws.recv(timeout=30))
            assert msg["type"] == "error" and msg["error"], msg
            try:
                ws.recv(timeout=30)
                raise AssertionError("the stream stayed open")
            except ConnectionClosed as closed:
                code = closed.rcvd.code
        assert code == (4401 if valid_from else 4400), (start, first, code)
        codes.append(code)

    one()
    assert 4400 in codes and 4401 in codes
