"""The HTTP/WebSocket API on the real stack: uvicorn + `create_app` + LumosClient + local Ray.

One Ray per module (random ports, never 6379, which is the Redis server), SQLite in a temporary
file, the random tiny model with 1-2 sampling steps. The API runs under uvicorn in a background
thread and is spoken to over real sockets (httpx, websockets), so "restart the API" is: stop the
server (its lifespan closes its LumosClient), start a new one on the same Ray and store, and
reconnect with from=k.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
import uuid

import av
import httpx
import numpy as np
import pytest
import ray
import torch
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

import serving
from lumos.cluster.limits import Limits

torch.set_num_threads(1)

NAMESPACE = f"lumos-api-test-{uuid.uuid4().hex[:10]}"
OWNER = "owner-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
NOT_FOUND = "session not found"


class Server(serving.Server):
    """The shared server harness plus an HTTP client and WebSocket URLs."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg, ws_ping_interval=None)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def ws_url(self, sid: str, start: int | str = 0) -> str:
        return f"ws://127.0.0.1:{self.port}/api/sessions/{sid}/stream?from={start}"

    def ws(self, sid: str, token: str | None, start: int | str = 0):
        """A connected stream, its auth message sent (token None: nothing sent)."""
        ws = ws_connect(self.ws_url(sid, start), open_timeout=30)
        if token is not None:
            ws.send(json.dumps({"type": "auth", "token": token}))
        return ws

    def stop(self) -> None:
        self.http.close()
        super().stop()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    db = tmp_path_factory.mktemp("api") / "lumos.db"
    # generous rates: this module sends many requests from one address (test_admission tests them)
    rates = Limits(rate_per_s=50, rate_burst=500, owner_rate_per_s=50, owner_rate_burst=500)
    yield serving.local_ray_config(NAMESPACE, db, admin_token=ADMIN_TOKEN, limits=rates)
    ray.shutdown()


@pytest.fixture(scope="module")
def api(cfg):
    server = Server(cfg)
    yield server
    server.stop()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create(api: Server, owner: str | None = OWNER, **body) -> dict:
    body = {"prompt": "a red sneaker moves left", "frames": 2, "steps": 1, "seed": 0, **body}
    headers = {"X-Lumos-Owner": owner} if owner else {}
    r = api.http.post("/api/sessions", json=body, headers=headers)
    assert r.status_code == 201, r.text
    out = r.json()
    assert set(out) == {"id", "token", "state"}
    assert out["state"]["id"] == out["id"] and "owner" not in out["state"]
    return out


def wait_idle(api: Server, sid: str, token: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = api.http.get(f"/api/sessions/{sid}", headers=auth(token)).json()
        if state["status"] not in ("queued", "running"):
            return state
        assert time.monotonic() < deadline, f"session still running: {state}"
        time.sleep(0.1)


def read_frames(ws, n: int, timeout_s: float = 120, frames: list | None = None) -> list[dict]:
    """Frame messages until n of them, checking each PNG; state messages are skipped."""
    frames = [] if frames is None else frames
    deadline = time.monotonic() + timeout_s
    while len(frames) < n:
        msg = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        assert msg["type"] in ("frame", "state"), msg
        if msg["type"] == "frame":
            png = base64.b64decode(msg["png"])
            assert Image.open(io.BytesIO(png)).format == "PNG"
            frames.append(msg)
    return frames


def assert_quiet(ws, seconds: float = 1.0) -> None:
    """No further frame arrives (state messages may)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = json.loads(ws.recv(timeout=left))
        except TimeoutError:
            return
        assert msg["type"] != "frame", f"unexpected extra frame {msg['seq']}"


def seqs(frames: list[dict]) -> list[int]:
    return [f["seq"] for f in frames]


def png_b64(h: int = 40, w: int = 48) -> str:
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def done_session(api):
    """A finished 5-frame session."""
    s = create(api, frames=5)
    wait_idle(api, s["id"], s["token"])
    return s


def test_create_stream_extend_with_new_prompt(api):
    s = create(api, frames=4, steps=2)
    sid, token = s["id"], s["token"]
    with api.ws(sid, token, 0) as ws:
        first = json.loads(ws.recv(timeout=30))
        assert first["type"] == "state" and first["id"] == sid
        frames = read_frames(ws, 4)
        assert seqs(frames) == [0, 1, 2, 3]
        state = wait_idle(api, sid, token)
        assert state["status"] == "done" and state["n_frames"] == 4

        r = api.http.post(
            f"/api/sessions/{sid}/extend",
            json={"frames": 3, "prompt": "a red sneaker moves up"},
            headers=auth(token),
        )
        assert r.status_code == 202, r.text
        assert [4, "a red sneaker moves up"] in r.json()["prompts"]
        read_frames(ws, 7, frames=frames)  # the same socket follows the extension
        assert seqs(frames) == list(range(7))
        assert_quiet(ws, 0.5)
    state = wait_idle(api, sid, token)
    assert state["n_frames"] == 7
    assert state["prompts"] == [[0, "a red sneaker moves left"], [4, "a red sneaker moves up"]]
    # the stream carried the stored frames, byte for byte
    for f in (frames[0], frames[6]):
        r = api.http.get(f"/api/sessions/{sid}/frames/{f['seq']}.png", headers=auth(token))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == base64.b64decode(f["png"])
    r = api.http.get(f"/api/sessions/{sid}/frames/7.png", headers=auth(token))
    assert r.status_code == 404 and "frame 7" in r.json()["error"]


def test_reconnect_from_k_gets_k_on_exactly_once(api, done_session):
    sid, token = done_session["id"], done_session["token"]
    with api.ws(sid, token, 2) as ws:
        assert seqs(read_frames(ws, 3)) == [2, 3, 4]
        assert_quiet(ws, 1.0)
    with api.ws(sid, token, 5) as ws:
        assert_quiet(ws, 0.5)  # from = n_frames: nothing yet, the socket stays open
        r = api.http.post(f"/api/sessions/{sid}/extend", json={"frames": 1}, headers=auth(token))
        assert r.status_code == 202, r.text
        assert seqs(read_frames(ws, 1)) == [5]
    wait_idle(api, sid, token)


def test_stream_survives_an_api_restart(cfg):
    n = 12
    first = Server(cfg)
    try:
        s = create(first, frames=n, steps=8)
        sid, token = s["id"], s["token"]
        ws = first.ws(sid, token, 0)
        frames = read_frames(ws, 2)
    finally:
        first.stop()  # closes the open socket and that API's LumosClient
    with pytest.raises(ConnectionClosed):  # frames already in flight may still arrive
        read_frames(ws, n, frames=frames)
    ws.close()
    second = Server(cfg)  # a new API on the same Ray and store
    try:
        at_restart = second.http.get(f"/api/sessions/{sid}", headers=auth(token)).json()
        assert at_restart["status"] == "running" and at_restart["n_frames"] < n
        with second.ws(sid, token, frames[-1]["seq"] + 1) as ws:
            read_frames(ws, n, frames=frames)  # stored frames, then live ones
            assert_quiet(ws, 0.5)
        assert seqs(frames) == list(range(n))
        assert wait_idle(second, sid, token)["n_frames"] == n
        stored = second.http.get(f"/api/sessions/{sid}/frames/{n - 1}.png", headers=auth(token))
        assert stored.content == base64.b64decode(frames[-1]["png"])
    finally:
        second.stop()


def test_a_session_is_unreachable_without_its_token(api, done_session):
    other = create(api, frames=1)
    sid, token = done_session["id"], done_session["token"]
    paths = [
        ("GET", f"/api/sessions/{sid}", None),
        ("POST", f"/api/sessions/{sid}/extend", {"frames": 1}),
        ("GET", f"/api/sessions/{sid}/frames/0.png", None),
        ("GET", f"/api/sessions/{sid}/video.mp4", None),
        ("DELETE", f"/api/sessions/{sid}", None),
    ]
    for method, path, body in paths:
        r = api.http.request(method, path, json=body)
        assert r.status_code == 401, (path, r.text)
        assert "token" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        for bad in (other["token"], "x" * 43, token + "x"):
            r = api.http.request(method, path, json=body, headers=auth(bad))
            assert r.status_code == 404, (path, r.text)
            assert NOT_FOUND in r.json()["error"]
        # no route takes a token in its URL (tokens stay out of URLs, logs and histories)
        r = api.http.request(method, path + "?token=" + token, json=body)
        assert r.status_code == 401, (path, r.text)
    # an unknown id answers exactly like a wrong token
    unknown = api.http.get(f"/api/sessions/{uuid.uuid4().hex}", headers=auth(token))
    wrong = api.http.get(f"/api/sessions/{sid}", headers=auth(other["token"]))
    assert unknown.status_code == wrong.status_code == 404 and unknown.json() == wrong.json()
    # the stream: the token comes in the first message, never in the URL
    closes = {}
    for name, (target, first, start) in {
        "wrong token": (sid, {"type": "auth", "token": other["token"]}, 0),
        "unknown id": (uuid.uuid4().hex, {"type": "auth", "token": token}, 0),
        "not an auth message": (sid, {"type": "hello", "token": token}, 0),
        "not JSON": (sid, "token " + token, 0),
        "bytes": (sid, token.encode(), 0),
        "from=-1": (sid, {"type": "auth", "token": token}, "-1"),
        "from=² (a non-ASCII digit)": (sid, {"type": "auth", "token": token}, "²"),
        "from=1e3": (sid, {"type": "auth", "token": token}, "1e3"),
    }.items():
        with ws_connect(api.ws_url(target, start), open_timeout=30) as ws:
            with contextlib.suppress(ConnectionClosed):  # a bad from= closes before auth
                ws.send(json.dumps(first) if isinstance(first, dict) else first)
            msg = json.loads(ws.recv(timeout=30))
            assert msg["type"] == "error" and msg["error"], (name, msg)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            closes[name] = (closed.value.rcvd.code, closed.value.rcvd.reason)
    assert closes["wrong token"] == closes["unknown id"] == (4401, "session not found")
    for name in ("not an auth message", "not JSON", "bytes"):
        assert closes[name][0] == 4401 and "auth" in closes[name][1], closes
    for name in ("from=-1", "from=² (a non-ASCII digit)", "from=1e3"):
        assert closes[name][0] == 4400 and "ASCII digits" in closes[name][1], closes
    # the session is untouched and its own token still works
    r = api.http.get(f"/api/sessions/{sid}", headers=auth(token))
    assert r.status_code == 200 and r.json()["n_frames"] >= 5


def _huge_png_b64(limit: int) -> str:
    data = b"\x89PNG\r\n\x1a\n" + bytes(limit)
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"prompt": "x" * 501, "frames": 1}, 422, "501 characters"),
        ({"prompt": "   ", "frames": 1}, 422, "empty"),
        ({"prompt": "x", "frames": 0}, 422, "frames"),
        ({"prompt": "x", "frames": 10**6}, 422, "between 1 and 64"),
        ({"prompt": "x", "frames": "3"}, 422, "frames"),
        ({"prompt": "x", "frames": 2.5}, 422, "frames"),
        ({"prompt": "x", "frames": True}, 422, "frames"),
        ({"prompt": 7, "frames": 1}, 422, "prompt"),
        ({"frames": 1}, 422, "prompt: Field required"),
        ({"prompt": "x", "frames": 1, "steps": 1000}, 422, "steps"),
        ({"prompt": "x", "frames": 1, "cfg": 99.0}, 422, "cfg"),
        ({"prompt": "x", "frames": 1, "seed": -1}, 422, "seed"),
        ({"prompt": "x", "frames": 1, "admin": True}, 422, "admin"),
        ({"prompt": "x", "frames": 1, "image": "not base64!"}, 422, "base64"),
        ({"prompt": "x", "frames": 1, "image": "aGVsbG8gd29ybGQ="}, 422, "PNG or JPEG"),
        (
            {
                "prompt": "x",
                "frames": 1,
                "image": base64.b64encode(b"\x89PNG\r\n\x1a\nxx").decode(),
            },
            422,
            "decodable",
        ),
        ({"prompt": "x", "frames": 1, "image": _huge_png_b64(4 << 20)}, 413, "image"),
        ({"prompt": "x", "frames": 1, "image": "A" * (8 << 20)}, 413, "larger"),
        ([1, 2, 3], 422, "dictionary"),
    ],
)
def test_bad_create_requests_get_4xx_with_a_message(api, body, status, words):
    r = api.http.post("/api/sessions", json=body, headers={"X-Lumos-Owner": OWNER})
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"].lower(), r.text


def test_text_that_is_not_utf8_is_refused_and_nothing_is_stored(api):
    owner = "surrogate-" + uuid.uuid4().hex
    headers = {"X-Lumos-Owner": owner, "Content-Type": "application/json"}
    for body in (
        b'{"prompt": "a \\ud800 cat", "frames": 1}',  # a lone surrogate, JSON-escaped
        b'{"prompt": "\\udfff", "frames": 1, "steps": 1}',
    ):
        r = api.http.post("/api/sessions", content=body, headers=headers)
        assert r.status_code == 422 and "not valid Unicode" in r.json()["error"], r.text
    r = api.http.post(
        "/api/sessions", content=b'{"prompt": "\xff\xfe", "frames": 1}', headers=headers
    )  # bytes that are not UTF-8 at all
    assert r.status_code in (400, 422), r.text
    r = api.http.get("/api/sessions", headers={"X-Lumos-Owner": owner})
    assert r.status_code == 200 and r.json()["sessions"] == []  # nothing stored, list still works
    s = create(api, owner=owner, frames=1)
    r = api.http.post(
        f"/api/sessions/{s['id']}/extend",
        content=b'{"frames": 1, "prompt": "\\ud83d"}',
        headers={**auth(s["token"]), "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and "not valid Unicode" in r.json()["error"], r.text
    wait_idle(api, s["id"], s["token"])
    listed = api.http.get("/api/sessions", headers={"X-Lumos-Owner": owner}).json()["sessions"]
    assert [x["id"] for x in listed] == [s["id"]]
    r = api.http.delete(f"/api/sessions/{s['id']}", headers=auth(s["token"]))
    assert r.status_code == 204


def test_malformed_requests_get_4xx_with_a_message(api, done_session):
    sid, token = done_session["id"], done_session["token"]
    r = api.http.post(
        "/api/sessions",
        content=b'{"prompt": "x", "frames":',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    for body, words in (
        ({"frames": 0}, "frames"),
        ({"frames": 65}, "between 1 and 64"),
        ({"frames": 1, "prompt": "y" * 600}, "600 characters"),
        ({"frames": 1, "extra": 1}, "extra"),
    ):
        r = api.http.post(f"/api/sessions/{sid}/extend", json=body, headers=auth(token))
        assert r.status_code == 422 and words in r.json()["error"], r.text
    r = api.http.get(f"/api/sessions/{sid}/frames/abc.png", headers=auth(token))
    assert r.status_code == 422 and "seq" in r.json()["error"]
    r = api.http.get("/api/nothing-here")
    assert r.status_code == 404 and r.json()["error"]
    r = api.http.get("/api/sessions", headers={"X-Lumos-Owner": "short"})
    assert r.status_code == 400 and "X-Lumos-Owner" in r.json()["error"]


def test_running_session_refuses_a_second_extend(api):
    s = create(api, frames=6, steps=8)
    r = api.http.post(
        f"/api/sessions/{s['id']}/extend", json={"frames": 1}, headers=auth(s["token"])
    )
    assert r.status_code == 409 and "generating" in r.json()["error"], r.text
    wait_idle(api, s["id"], s["token"])


def test_image_to_video(api):
    s = create(api, frames=2, image="data:image/png;base64," + png_b64())
    state = wait_idle(api, s["id"], s["token"])
    assert state["status"] == "done" and state["n_frames"] == 3  # image + 2 frames
    assert state["settings"]["source"] == "image"


def test_sessions_are_listed_by_owner(api):
    mine, theirs = "mine-" + uuid.uuid4().hex, "theirs-" + uuid.uuid4().hex
    a = create(api, owner=mine, frames=1, prompt="first of mine")
    b = create(api, owner=mine, frames=1, prompt="second of mine")
    c = create(api, owner=theirs, frames=1)
    listed = api.http.get("/api/sessions", headers={"X-Lumos-Owner": mine}).json()["sessions"]
    assert [s["id"] for s in listed] == [b["id"], a["id"]]  # newest first
    assert listed[1]["prompt"] == "first of mine"
    assert set(listed[0]) == {"id", "prompt", "n_frames", "status", "created", "updated"}
    assert "token" not in json.dumps(listed)
    others = api.http.get("/api/sessions", headers={"X-Lumos-Owner": theirs}).json()["sessions"]
    assert [s["id"] for s in others] == [c["id"]]
    r = api.http.get("/api/sessions")
    assert r.status_code == 400 and "X-Lumos-Owner" in r.json()["error"]
    for s in (a, b, c):
        wait_idle(api, s["id"], s["token"])


def test_mp4_download_is_a_valid_video(api, done_session):
    sid, token = done_session["id"], done_session["token"]
    n = api.http.get(f"/api/sessions/{sid}", headers=auth(token)).json()["n_frames"]
    assert api.http.get(f"/api/sessions/{sid}/video.mp4?token={token}").status_code == 401
    r = api.http.get(f"/api/sessions/{sid}/video.mp4", headers=auth(token))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    assert "attachment" in r.headers["content-disposition"]
    assert r.headers.get("transfer-encoding") == "chunked"  # streamed, not built whole first
    with av.open(io.BytesIO(r.content)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == n and decoded[0].ndim == 3


def test_delete_health_page_and_docs(api):
    s = create(api, frames=1)
    wait_idle(api, s["id"], s["token"])
    with api.ws(s["id"], s["token"], 1) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "state"
        r = api.http.delete(f"/api/sessions/{s['id']}", headers=auth(s["token"]))
        assert r.status_code == 204
        with pytest.raises(ConnectionClosed):  # the stream of a deleted session ends
            while True:
                assert json.loads(ws.recv(timeout=30))["type"] != "frame"
    r = api.http.get(f"/api/sessions/{s['id']}", headers=auth(s["token"]))
    assert r.status_code == 404
    r = api.http.get("/api/health")  # public: ok/degraded and counts, no names, pids or hosts
    health = r.json()
    assert r.status_code == 200 and set(health) == {"status", "workers", "sessions"}, health
    assert health["status"] == "ok" and health["workers"] == 1
    assert set(health["sessions"]) == {"active", "limit"} and health["sessions"]["limit"] == 32
    assert api.http.get("/api/admin/health").status_code == 401
    r = api.http.get("/api/admin/health", headers=auth("y" * len(ADMIN_TOKEN)))
    assert r.status_code == 403 and "wrong admin token" in r.json()["error"]
    r = api.http.get("/api/admin/health", headers=auth(ADMIN_TOKEN))
    admin = r.json()
    assert r.status_code == 200 and admin["status"] == "ok", admin
    assert admin["workers"][0]["dtype"] == "float32"  # random weights: float32 unless named
    assert admin["workers"][0]["name"].startswith("worker-")
    assert set(admin["refusals"]) == {"sessions_cap", "owner_cap", "rate_limit"}
    assert admin["limits"]["max_sessions"] == 32
    limits = api.http.get("/api/config").json()["limits"]
    assert limits["max_frames_per_request"] == 64 and limits["max_steps"] == 100
    page = api.http.get("/")
    assert page.status_code == 200 and '<img id="frame"' in page.text
    assert "content-security-policy" in page.headers
    assert api.http.get("/static/app.js").status_code == 200
    assert api.http.get("/docs").status_code == 200
    schema = api.http.get("/openapi.json").json()
    assert "/api/sessions/{session_id}/extend" in schema["paths"]
    # the schema states the limits this server enforces
    create_body = schema["components"]["schemas"]["CreateSessionRequest"]["properties"]
    assert create_body["prompt"]["maxLength"] == 500 and create_body["frames"]["maximum"] == 64
    assert create_body["steps"]["anyOf"][0]["maximum"] == 100
    refusal = schema["paths"]["/api/sessions"]["post"]["responses"]["429"]
    assert "Retry-After" in refusal["headers"]
    for words in ("at most 32 queued or generating", "bursts of 500", "429 owner_cap"):
        assert words in schema["info"]["description"], words
    for path, ops in schema["paths"].items():  # no token in any URL
        for op in ops.values():
            assert "token" not in [p["name"] for p in op.get("parameters", [])], path


def test_cancel_stops_a_generation_and_keeps_its_frames(api):
    s = create(api, frames=30, steps=20)
    sid, token = s["id"], s["token"]
    assert s["state"]["status"] in ("queued", "running")
    with api.ws(sid, token) as ws:
        read_frames(ws, 1)  # at least one frame is committed
        assert api.http.post(f"/api/sessions/{sid}/cancel").status_code == 401
        assert (
            api.http.post(f"/api/sessions/{sid}/cancel", headers=auth("x" * 20)).status_code == 404
        )
        r = api.http.post(f"/api/sessions/{sid}/cancel", headers=auth(token))
        assert r.status_code == 200, r.text
        state = r.json()
        assert state["status"] == "done" and 1 <= state["n_frames"] < 30, state
    again = wait_idle(api, sid, token)
    assert again["status"] == "done" and again["n_frames"] == state["n_frames"]
    for seq in range(state["n_frames"]):
        r = api.http.get(f"/api/sessions/{sid}/frames/{seq}.png", headers=auth(token))
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    # a done session can be extended again; cancelling a finished one is harmless
    r = api.http.post(f"/api/sessions/{sid}/cancel", headers=auth(token))
    assert r.status_code == 200 and r.json()["status"] == "done"


def test_a_stream_without_an_auth_message_is_closed(api, done_session, monkeypatch):
    import lumos.api.stream

    monkeypatch.setattr(lumos.api.stream, "AUTH_TIMEOUT_S", 0.5)  # the server runs in-process
    started = time.monotonic()
    with ws_connect(api.ws_url(done_session["id"]), open_timeout=30) as ws:  # sends nothing
        msg = json.loads(ws.recv(timeout=30))
        assert msg["type"] == "error" and "auth" in msg["error"], msg
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 4401 and time.monotonic() - started < 10
