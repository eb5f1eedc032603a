"""Routed serving: an OpenAI-compatible HTTP API over a trained mixture or an expert library (docs/serving.md)."""

from mixroute.serve.app import APIError, Limits, Served, create_app, load_library, load_served
from mixroute.serve.engine import Engine, Request

__all__ = ["APIError", "Engine", "Limits", "Request", "Served", "create_app", "load_library", "load_served"]
