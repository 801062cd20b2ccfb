"""Long videos (issue 14): no frame cap by default, the rolling window's settings, and a session
of 1,024 latent frames through the real API, its WebSocket and the mp4 export."""

from __future__ import annotations

import io
import json
import time
import uuid

import av
import httpx
import pytest
import ray
import torch
from websockets.sync.client import connect as ws_connect

import serving
from lumos.cluster.limits import InvalidRequest, Limits
from lumos.pipeline import Pipeline
from lumos.settings import PipelineSettings

torch.set_num_threads(1)


def test_no_frame_cap_by_default_and_a_quota_still_works():
    lim = Limits()
    assert lim.max_frames_per_session is None and lim.as_dict()["max_frames_per_session"] is None
    assert lim.check_frames(64, have=100_000) == 64
    quota = Limits(max_frames_per_session=100)
    assert quota.check_frames(36, have=64) == 36
    with pytest.raises(InvalidRequest, match="at most 100 frames"):
        quota.check_frames(37, have=64)
    assert PipelineSettings().max_frames is None and PipelineSettings.official().max_frames is None


def test_pipeline_window_settings():
    pipe = Pipeline.from_folder("random:tiny")
    assert pipe.latent_frames(5000) == 5000  # no cap (this tokenizer: 1 latent per RGB frame)
    sc = pipe.sampler_config()
    assert (sc.window, sc.window_stride) == (15, 8)  # 16-frame clips; stride: docs/LOG.md
    pipe.set_sampling(window=4, window_stride=2)
    assert (pipe.sampler_config().window, pipe.sampler_config().window_stride) == (4, 2)
    with pytest.raises(ValueError, match="window_stride"):
        pipe.set_sampling(window_stride=5)
    assert pipe.sampler_config().window_stride == 2  # a refused value changes nothing
    with pytest.raises(ValueError, match="window must be a positive integer"):
        PipelineSettings.from_dict({"window": 0})
    capped = PipelineSettings(max_frames=8)
    pipe.settings = capped
    with pytest.raises(ValueError, match=r"frames must be in \[1, 8\]"):
        pipe.latent_frames(9)


def test_long_pipeline_extend_keeps_a_flat_cache():
    """extend() past the window: the prompt's length token and the cache stay bounded."""
    pipe = Pipeline.from_folder("random:tiny")
    pipe.set_sampling(window=3)
    codes = pipe.generate_codes("a red bag moves left", 4, steps=1, seed=0)
    more = pipe.extend(codes, "a blue bag moves left", frames=3, steps=1, seed=1)
    assert more.shape[0] == 7 and torch.equal(more[:4], codes)


@pytest.mark.parametrize("seed,window", [(0, None), (1, None), (3, 4)])
def test_a_new_prompt_governs_the_next_frames(seed, window):
    """The bundled model: 8 frames of "a red bag", then extend() with "a blue bag": the colour
    tracker sees blue within 2 frames (window 4: the switch comes after the window slid)."""
    from lumos.evaluate.tracker import track_items

    pipe = Pipeline.from_folder()
    pipe.set_sampling(window=window, window_stride=2 if window else None)
    red = pipe.generate_codes("a red bag moves left", 8, seed=seed, rgb_frames=16)
    both = pipe.extend(red, "a blue bag moves left", frames=2, seed=seed + 100)
    assert torch.equal(both[:8], red)
    tracks = track_items(pipe.decode(both).numpy(), colours=["red", "blue"])
    assert tracks["red"].present[:8].mean() >= 0.75  # it was red before the switch
    assert tracks["blue"].present[8:10].any(), tracks["blue"].present


def test_eval_scores_a_late_window_of_a_long_clip():
    """lumos eval --frames N --window-from K scores frames [K, N) only (against real clips of
    that length); a K outside the clip is refused."""
    from lumos.evaluate import evaluate

    pipe = Pipeline.from_folder("random:tiny")
    pipe.set_sampling(window=2)
    r = evaluate(pipe, "heldout", 1, 1, frames=6, steps=1, window_from=4)
    assert r["n_prompts"] == 1 and len(r["per_frame"]["present"]) == 2
    with pytest.raises(ValueError, match="window_from"):
        evaluate(pipe, "heldout", 1, 1, frames=6, steps=1, window_from=6)


# -- the real stack ------------------------------------------------------------------------------

NAMESPACE = f"lumos-long-test-{uuid.uuid4().hex[:10]}"
LONG = 1024  # latent frames of the session
CHUNK = 64  # frames per request (the default per-request limit)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    db = tmp_path_factory.mktemp("long") / "lumos.db"
    rates = Limits(rate_per_s=50, rate_burst=500, owner_rate_per_s=50, owner_rate_burst=500)
    cfg = serving.local_ray_config(NAMESPACE, db, limits=rates)
    server = serving.Server(cfg, ws_ping_interval=None)
    yield server
    server.stop()
    ray.shutdown()


def test_a_1024_frame_session_through_api_websocket_and_mp4(api):
    http = httpx.Client(base_url=api.url.rstrip("/"), timeout=120)
    body = {"prompt": "a red bag moves left", "frames": CHUNK, "steps": 1, "seed": 0}
    r = http.post("/api/sessions", json=body, headers={"X-Lumos-Owner": "o-" + uuid.uuid4().hex})
    assert r.status_code == 201, r.text
    sid, token = r.json()["id"], r.json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    url = f"ws://127.0.0.1:{api.port}/api/sessions/{sid}/stream?from=0"
    seen: list[int] = []
    deadline = time.monotonic() + 600
    with ws_connect(url, max_size=None) as ws:
        ws.send(json.dumps({"type": "auth", "token": token}))
        while len(seen) < LONG:
            msg = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            assert msg["type"] != "error", msg
            if msg["type"] != "frame":
                continue
            seen.append(msg["seq"])
            if len(seen) % CHUNK == 0 and len(seen) < LONG:  # the request is done: extend
                while http.get(f"/api/sessions/{sid}", headers=auth).json()["status"] in (
                    "queued",
                    "running",
                ):
                    time.sleep(0.02)
                prompt = "a blue bag moves left" if len(seen) == 512 else None  # a switch
                ext = {"frames": CHUNK} | ({"prompt": prompt} if prompt else {})
                r = http.post(f"/api/sessions/{sid}/extend", json=ext, headers=auth)
                assert r.status_code == 202, r.text
    assert seen == list(range(LONG))  # every frame once, in order, over one socket
    state = http.get(f"/api/sessions/{sid}", headers=auth).json()
    assert state["n_frames"] == LONG and state["prompts"][-1][0] == 512, state
    health = http.get("/api/health").json()
    assert health["workers"], health
    mp4 = http.get(f"/api/sessions/{sid}/video.mp4", headers=auth)
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(mp4.content)) as container:
        n = sum(1 for _ in container.decode(video=0))
    assert n == LONG  # the bundled-style tokenizer: one RGB frame per latent frame
    http.close()
