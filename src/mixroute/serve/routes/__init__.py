"""The endpoint groups of the OpenAI-compatible app: completions (chat and text), the expert library, and
operations (health, metrics, models)."""
