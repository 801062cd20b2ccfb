"""Lumos: interactive, distributed autoregressive video generation (the Lumos-1 method)."""

__version__ = "0.1.0"
