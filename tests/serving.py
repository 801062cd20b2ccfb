"""Test helpers shared by the API and browser tests: uvicorn in a thread, a local Ray config,
Debian's Chromium under Playwright."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray
import uvicorn

from lumos.api import create_app
from lumos.cluster.runtime import ServeConfig


class Server:
    """uvicorn serving create_app(cfg) in a thread, on a given port (0: a free one).

    Its lifespan starts and closes the app's LumosClient, so stop() + a new Server on the same
    Ray and store is an API restart.
    """

    def __init__(self, cfg: ServeConfig, port: int = 0, **uvicorn_kw) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        config = uvicorn.Config(
            create_app(cfg), log_level="warning", timeout_graceful_shutdown=5, **uvicorn_kw
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 300
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the API server did not stop"
        self.sock.close()


def local_ray_config(namespace: str, db_path, **overrides) -> ServeConfig:
    """Start a local Ray (random ports, never Redis' 6379) and a config for the tiny model
    (overrides: other ServeConfig fields, e.g. limits)."""
    os.environ.pop("RAY_GCS_SERVER_PORT", None)
    ray.init(
        address="local",  # a new instance, even when another `ray start` cluster runs here
        num_cpus=2,
        include_dashboard=False,
        namespace=namespace,
        log_to_driver=False,
        configure_logging=False,
    )
    fields = {
        "namespace": namespace,
        "store_url": f"sqlite:///{db_path}",
        "model": "random:tiny",
        "workers": 1,
        "worker_resources": {"num_cpus": 1},
        "session_idle_s": 60.0,
    }
    return ServeConfig(**{**fields, **overrides})


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (headless); never a downloaded browser."""
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(
            f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install -y chromium); "
            "the browser tests never download a browser"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
