"""The HTTP API (FastAPI): `create_app` builds it. No Ray here; `runtime.serve` wraps it for Ray Serve."""

from runtime.api.app import create_app

__all__ = ["create_app"]
