"""Routed serving: an OpenAI-compatible HTTP API over a trained mixture or an expert library (docs/serving.md)."""

from mixroute.serve.app import create_app
from mixroute.serve.engine import Engine, Request, ServingEngine
from mixroute.serve.errors import APIError
from mixroute.serve.served import Limits, Served, load_library, load_served

__all__ = ["APIError", "Engine", "Limits", "Request", "Served", "ServingEngine", "create_app", "load_library",
           "load_served"]
