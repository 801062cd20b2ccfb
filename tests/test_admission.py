"""Admission and rate limits on the real stack: uvicorn + `create_app` + LumosClient + local Ray,
with the session store in SQLite and in the real Redis (127.0.0.1:6379, a unique key prefix).

Capacity: parallel creates against a small cap get exactly `max_sessions` 201s and 429s (reason
sessions_cap, Retry-After) for the rest, per-owner caps likewise (owner_cap), and a refused
request stores nothing and changes nothing already stored. Rate: a second API process on the
same cluster with tight token buckets refuses with reason rate_limit. (50 parallel creates
against a cap of 32 are measured by benchmarks/admission.py and at store level in test_store.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import httpx
import pytest
import ray
import redis
import torch

import serving
from lumos.api.ratelimit import RateLimiter, retry_after
from lumos.cluster.limits import InvalidRequest, Limits, TooLarge

torch.set_num_threads(1)

NAMESPACE = f"lumos-admission-test-{uuid.uuid4().hex[:10]}"
REDIS_URL = "redis://127.0.0.1:6379/0"
PREFIX = f"lumos-admission-{uuid.uuid4().hex[:10]}"
CAP, PER_OWNER = 4, 2
# long enough that no admitted session finishes while the parallel creates are admitted
SLOW = {"prompt": "a red sneaker moves left", "frames": 48, "steps": 40, "seed": 0}
ROOMY_RATES = dict(rate_per_s=100, rate_burst=1000, owner_rate_per_s=100, owner_rate_burst=1000)


def owner() -> str:
    return "owner-" + uuid.uuid4().hex


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    limits = Limits(max_sessions=CAP, max_sessions_per_owner=PER_OWNER, **ROOMY_RATES)
    cfg = serving.local_ray_config(
        NAMESPACE, tmp_path_factory.mktemp("admission") / "lumos.db", limits=limits
    )
    yield cfg
    ray.shutdown()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{PREFIX}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def served(request, base_cfg):
    """(server, cfg) for one store backend; the same Ray and worker for both."""
    cfg = base_cfg
    if request.param == "redis":
        cfg = dataclasses.replace(base_cfg, store_url=f"{REDIS_URL}?prefix={PREFIX}")
    server = serving.Server(cfg)
    yield server, cfg
    server.stop()


# -- the parts, without a server -----------------------------------------------------------


def test_token_bucket_burst_refill_and_memory_bound():
    now = [100.0]
    limiter = RateLimiter(2.0, 3, max_keys=2, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert limiter.take("a") == pytest.approx(0.5)  # empty: one token in 1 / rate seconds
    assert retry_after(0.5) == 1 and retry_after(2.01) == 3
    assert limiter.take("b") == 0.0  # another key has its own bucket
    now[0] += 0.5
    assert limiter.take("a") == 0.0  # refilled one token
    assert limiter.take("a") > 0
    now[0] += 60
    assert [limiter.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refills to burst only
    limiter.take("c")
    assert len(limiter) == 2  # least recently used bucket dropped
    off = RateLimiter(0, 1)
    assert all(off.take("x") == 0.0 for _ in range(100))
    with pytest.raises(ValueError):
        RateLimiter(-1, 1)


def test_limits_are_validated_and_give_one_message_per_field():
    for bad in (
        dict(max_sessions=0),
        dict(rate_burst=0),
        dict(rate_per_s=-1.0),
        dict(steps=(0, 5)),
        dict(cfg=(3.0, 1.0)),
        dict(max_sessions_per_owner=True),
    ):
        with pytest.raises(ValueError, match="limits\\."):
            Limits(**bad)
    limits = Limits(max_prompt_chars=10, max_frames_per_session=8, max_image_bytes=100)
    assert limits.check_prompt("  a cat  ") == "a cat"
    assert limits.check_prompt("   ", required=False) is None
    for call, words in (
        (lambda: limits.check_prompt("x" * 11), "11 characters long; the limit is 10"),
        (lambda: limits.check_prompt("a \ud800"), "not valid Unicode"),
        (lambda: limits.check_prompt("a\x00b"), "NUL"),
        (lambda: limits.check_prompt(" "), "must not be empty"),
        (lambda: limits.check_frames(0), "between 1 and 64"),
        (lambda: limits.check_frames(True), "must be an integer"),
        (lambda: limits.check_frames(5, have=4), "at most 8 frames; it has 4"),
        (lambda: limits.check_sampler(0, None, None), "steps must be an integer between 1"),
        (lambda: limits.check_sampler(None, float("nan"), None), "cfg_scale"),
        (lambda: limits.check_sampler(None, None, 2**63), "seed"),
        (lambda: limits.check_image(b"GIF89a"), "not a decodable PNG or JPEG"),
    ):
        with pytest.raises(InvalidRequest, match=words):
            call()
    with pytest.raises(TooLarge, match="the limit is 100 bytes"):
        limits.check_image(b"\x89PNG\r\n\x1a\n" + bytes(100))
    admission = limits.admission()
    assert (admission.max_active, admission.max_active_per_owner) == (32, 8)
    published = limits.as_dict()
    assert published["max_steps"] == 100 and "steps" not in published


# -- the real stack -------------------------------------------------------------------------


async def _post_all(url: str, bodies: list[tuple[dict, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        return await asyncio.gather(
            *(http.post("/api/sessions", json=body, headers=headers) for body, headers in bodies)
        )


def _delete_all(http: httpx.Client, created: list[httpx.Response]) -> None:
    for r in created:
        out = r.json()
        assert (
            http.delete(f"/api/sessions/{out['id']}", headers=auth(out["token"])).status_code == 204
        )


def _active(http: httpx.Client) -> int:
    return http.get("/api/health").json()["sessions"]["active"]


def _wait_active(http: httpx.Client, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _active(http) != n:
        assert time.monotonic() < deadline, f"active sessions stay {_active(http)}, not {n}"
        time.sleep(0.1)


def test_parallel_creates_get_exactly_the_cap(served):
    server, cfg = served
    http = httpx.Client(base_url=server.url, timeout=60)
    try:
        _wait_active(http, 0)
        owners = [owner() for _ in range(10)]
        replies = asyncio.run(_post_all(server.url, [(SLOW, {"X-Lumos-Owner": o}) for o in owners]))
        codes = sorted(r.status_code for r in replies)
        assert codes == [201] * CAP + [429] * (10 - CAP), [r.text for r in replies]
        assert _active(http) == CAP
        for r in replies:
            if r.status_code == 429:
                assert r.json()["reason"] == "sessions_cap", r.text
                assert "too many sessions" in r.json()["error"]
                assert r.headers["retry-after"] == str(cfg.limits.retry_after_s)
        # a refused create stored nothing: its owner has no session
        for o, r in zip(owners, replies):
            listed = http.get("/api/sessions", headers={"X-Lumos-Owner": o}).json()["sessions"]
            assert len(listed) == (1 if r.status_code == 201 else 0)
        created = [r for r in replies if r.status_code == 201]
        # an extend beyond the cap is refused the same way and changes nothing
        done = created[0].json()
        r = http.post(f"/api/sessions/{done['id']}/cancel", headers=auth(done["token"]))
        assert r.status_code == 200 and r.json()["status"] == "done"
        _wait_active(http, CAP - 1)
        filler = http.post("/api/sessions", json=SLOW, headers={"X-Lumos-Owner": owner()})
        assert filler.status_code == 201, filler.text
        before = http.get(f"/api/sessions/{done['id']}", headers=auth(done["token"])).json()
        r = http.post(
            f"/api/sessions/{done['id']}/extend",
            json={"frames": 1, "prompt": "a blue sneaker"},
            headers=auth(done["token"]),
        )
        assert r.status_code == 429 and r.json()["reason"] == "sessions_cap", r.text
        assert "retry-after" in r.headers
        after = http.get(f"/api/sessions/{done['id']}", headers=auth(done["token"])).json()
        assert after == before
        # deleting frees the places
        _delete_all(http, [*created, filler])
        _wait_active(http, 0)
        admin_404 = http.get("/api/admin/health", headers=auth("z" * 32))
        assert admin_404.status_code == 404  # no admin token configured in this module
    finally:
        http.close()


def test_per_owner_cap(served):
    server, _ = served
    http = httpx.Client(base_url=server.url, timeout=60)
    try:
        _wait_active(http, 0)
        greedy = owner()
        replies = asyncio.run(_post_all(server.url, [(SLOW, {"X-Lumos-Owner": greedy})] * 5))
        codes = sorted(r.status_code for r in replies)
        assert codes == [201] * PER_OWNER + [429] * (5 - PER_OWNER), [r.text for r in replies]
        refused = [r.json() for r in replies if r.status_code == 429]
        assert {body["reason"] for body in refused} == {"owner_cap"}
        listed = http.get("/api/sessions", headers={"X-Lumos-Owner": greedy}).json()["sessions"]
        assert len(listed) == PER_OWNER
        other = http.post("/api/sessions", json=SLOW, headers={"X-Lumos-Owner": owner()})
        assert other.status_code == 201, other.text  # other owners still get places
        _delete_all(http, [r for r in replies if r.status_code == 201] + [other])
        _wait_active(http, 0)
    finally:
        http.close()


def test_rate_limits_per_address_and_per_owner(served):
    _, cfg = served
    tight = dataclasses.replace(
        cfg,
        limits=dataclasses.replace(
            cfg.limits, rate_per_s=0.01, rate_burst=4, owner_rate_per_s=0.01, owner_rate_burst=2
        ),
        admin_token="admin-" + uuid.uuid4().hex,
    )
    second = serving.Server(tight)  # another API process on the same cluster and store
    http = httpx.Client(base_url=second.url, timeout=60)
    try:
        key = owner()
        body = {**SLOW, "frames": 1, "steps": 1}
        made = [http.post("/api/sessions", json=body, headers={"X-Lumos-Owner": key})]
        assert made[0].status_code == 201, made[0].text
        sid, token = made[0].json()["id"], made[0].json()["token"]
        # extend counts too: the owner's bucket (burst 2) is empty after it
        deadline = time.monotonic() + 60
        while http.get(f"/api/sessions/{sid}", headers=auth(token)).json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = http.post(f"/api/sessions/{sid}/extend", json={"frames": 1}, headers=auth(token))
        assert r.status_code == 202, r.text
        r = http.post("/api/sessions", json=body, headers={"X-Lumos-Owner": key})
        assert r.status_code == 429 and r.json()["reason"] == "rate_limit", r.text
        assert "for this owner" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
        assert (
            len(http.get("/api/sessions", headers={"X-Lumos-Owner": key}).json()["sessions"]) == 1
        )
        # the address bucket (burst 4): 2 taken above (create, extend), 1 by the refused create
        r = http.post("/api/sessions", json=body)  # no owner key: only the address counts
        assert r.status_code == 201, r.text
        made.append(r)
        r = http.post("/api/sessions", json=body)
        assert r.status_code == 429 and "from this address" in r.json()["error"], r.text
        # refusals are counted by reason for the operator (and /metrics)
        admin = http.get("/api/admin/health", headers=auth(tight.admin_token)).json()
        assert admin["refusals"]["rate_limit"] == 2 and admin["refusals"]["sessions_cap"] == 0
        for r in made:
            out = r.json()
            http.delete(f"/api/sessions/{out['id']}", headers=auth(out["token"]))
    finally:
        http.close()
        second.stop()
