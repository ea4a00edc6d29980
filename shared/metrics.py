"""Prometheus exposition for the services: a stand-alone endpoint, or a route for FastAPI."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, start_http_server


def serve_metrics(port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> None:
    """Serve /metrics on its own port from a background thread (watcher, binding)."""
    start_http_server(port, addr=host, registry=registry)


def exposition(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """Body and content type for an explicit /metrics route (mounting the ASGI app redirects to /metrics/)."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
