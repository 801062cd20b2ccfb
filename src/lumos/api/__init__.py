"""The HTTP/WebSocket API of Lumos and its static viewer (system.md, "api/")."""

from lumos.api.app import create_app

__all__ = ["create_app"]
