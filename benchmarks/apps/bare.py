"""Bare FastAPI: the endpoint, no limiter."""

from __future__ import annotations

from .common import build_app

app = build_app()
