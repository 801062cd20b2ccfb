"""`lumos serve`: the API over a local or remote Ray cluster (config: lumos.cluster.serve)."""

from __future__ import annotations

from lumos.api.app import create_app
from lumos.cluster.serve import build_config


def main(argv: list[str] | None = None) -> int:
    """Build the ServeConfig from the command line, then run the FastAPI app under uvicorn."""
    cfg = build_config(argv)
    import uvicorn

    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port)
    return 0
