"""The worker's HTTP service: OpenAI-compatible inference, health, metrics and a bearer-token admin API."""

from residency_worker.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
