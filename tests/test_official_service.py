"""An official release served as `lumos serve --model DIR --resolution 64x64` would serve it.

The tiny release of `official_fixture` behind the real stack (uvicorn + create_app + local Ray +
SQLite): text-to-image (a one-frame session), text-to-video, image-to-video and continuation
with a new prompt, each through the HTTP API, frames read back with the session's token.
"""

from __future__ import annotations

import base64
import io
import time
import uuid

import httpx
import numpy as np
import pytest
import ray
from PIL import Image

import serving
from lumos.cluster.serve import build_config
from lumos.video import decode_image
from official_fixture import make_release

OWNER = "owner-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    model, _ = make_release(tmp_path_factory.mktemp("release"))
    db = tmp_path_factory.mktemp("official") / "lumos.db"
    flags = build_config(["--model", str(model), "--resolution", "64x64", "--dtype", "float32"])
    cfg = serving.local_ray_config(
        f"lumos-official-{uuid.uuid4().hex[:8]}",
        db,
        model=flags.model,
        resolution=flags.resolution,
        dtype=flags.dtype,
    )
    server = serving.Server(cfg)
    client = httpx.Client(base_url=server.url.rstrip("/"), timeout=120)
    yield client
    client.close()
    server.stop()
    ray.shutdown()


def _create(api, **body) -> tuple[str, dict]:
    body = {"prompt": "a red sneaker moves left", "steps": 2, "seed": 0, **body}
    r = api.post("/api/sessions", json=body, headers={"X-Lumos-Owner": OWNER})
    assert r.status_code == 201, r.text
    out = r.json()
    return out["id"], {"Authorization": f"Bearer {out['token']}"}


def _wait(api, sid: str, auth: dict, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = api.get(f"/api/sessions/{sid}", headers=auth).json()
        if state["status"] not in ("queued", "running"):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def _frame(api, sid: str, auth: dict, seq: int) -> np.ndarray:
    r = api.get(f"/api/sessions/{sid}/frames/{seq}.png", headers=auth)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def test_the_service_reports_the_official_model(api):
    cfg = api.get("/api/config").json()
    assert cfg["random_weights"] is False and "Lumos-1-tiny" in cfg["model_name"]


def test_text_to_image_and_text_to_video(api):
    sid, auth = _create(api, frames=1)  # one RGB frame: an image (duration = fps = 1, CFG 16)
    state = _wait(api, sid, auth)
    assert state["status"] == "done" and state["n_frames"] == 1
    assert _frame(api, sid, auth, 0).shape == (64, 64, 3)
    sid, auth = _create(api, frames=2)  # 2 latent frames = 1 + 4 RGB frames
    state = _wait(api, sid, auth)
    assert state["status"] == "done" and state["n_frames"] == 2
    assert _frame(api, sid, auth, 1).shape == (64, 4 * 64, 3)  # a latent's 4 RGB frames
    r = api.get(f"/api/sessions/{sid}/video.mp4", headers=auth)
    assert r.status_code == 200 and r.content[4:8] == b"ftyp"


def test_image_to_video_and_continuation_with_a_new_prompt(api):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    sid, auth = _create(api, frames=1, image=image)
    state = _wait(api, sid, auth)
    assert state["status"] == "done" and state["n_frames"] == 2  # the image + 1 generated
    # frame 0 is the picture resized by the CLI's rule (same pixels -> same codes everywhere)
    assert np.array_equal(_frame(api, sid, auth, 0), decode_image(buf.getvalue(), (64, 64)))
    more = {"frames": 1, "prompt": "a blue bag falls"}
    r = api.post(f"/api/sessions/{sid}/extend", json=more, headers=auth)
    assert r.status_code == 202, r.text
    state = _wait(api, sid, auth)
    assert state["status"] == "done" and state["n_frames"] == 3
    assert [p[1] for p in state["prompts"]][-1] == "a blue bag falls"
