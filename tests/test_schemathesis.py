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
