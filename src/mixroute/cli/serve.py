"""``mixroute serve``: the OpenAI-compatible HTTP API over a run or an expert library, the router choosing the
expert."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from mixroute.cli.common import device_option, fail, precision_option, user_errors

EXAMPLES = """Examples:

mixroute serve runs/demo/moa   (http://127.0.0.1:8000/v1, model = the run's name; docs/serving.md)

MIXROUTE_API_KEY=secret mixroute serve runs/moa --port 8080 --max-batch 32 --max-wait-ms 5

mixroute serve lib --allow-library-updates   (an expert library: POST /v1/experts, DELETE /v1/experts/NAME)

mixroute serve lib --router task --route-cost-weight 0.05   (cost-aware routing; docs/library.md)"""


@user_errors(ValueError)
def serve_cmd(
    run_dir: str = typer.Argument(..., help="Run directory written by `mixroute train` (its final/ mixture), or an "
                                            "expert library (`mixroute library create`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require `Authorization: Bearer KEY` on /v1/* "
                                                                 "(default: env MIXROUTE_API_KEY; none = open)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Most requests run together in one batch."),
    max_wait_ms: float = typer.Option(10.0, "--max-wait-ms", help="How long the first request of a batch waits "
                                                                  "for others to join."),
    max_tokens: int = typer.Option(512, "--max-tokens-limit", help="Largest max_tokens a request may ask for."),
    max_request_bytes: int = typer.Option(1 << 20, "--max-request-bytes", help="Largest request body."),
    device: str = device_option(),
    precision: str = precision_option(),
    allow_updates: bool = typer.Option(False, "--allow-library-updates", help="Library only: allow POST "
                                                                             "/v1/experts and DELETE "
                                                                             "/v1/experts/NAME while serving."),
    router: Optional[str] = typer.Option(None, "--router", help="Library only: centroid, arrow or task "
                                                                "(default: the library's own)."),
    route_cost_weight: float = typer.Option(0.0, "--route-cost-weight", help="Library only: default lambda of "
                                                                             "cost-aware routing (requests may set "
                                                                             "mixroute.route_cost_weight)."),
) -> None:
    """Serve a trained mixture or an expert library with an OpenAI-compatible API; the router picks the expert
    per request."""
    import uvicorn

    from mixroute.serve import Limits, create_app, load_library, load_served

    if max_batch < 1 or max_wait_ms < 0 or max_tokens < 1:
        fail("--max-batch and --max-tokens-limit must be >= 1, --max-wait-ms >= 0")
    key = api_key if api_key is not None else os.environ.get("MIXROUTE_API_KEY") or None
    is_library = (Path(run_dir) / "manifest.json").is_file()
    if not is_library and (allow_updates or router or route_cost_weight):
        fail(f"{run_dir} is not an expert library: --allow-library-updates, --router and --route-cost-weight "
             "apply to libraries only (mixroute library create)")
    if is_library:   # a LibraryError is a ValueError: reported as a user error by the decorator
        served = load_library(run_dir, device=device, router=router, cost_weight=route_cost_weight)
    else:
        served = load_served(run_dir, device=device)
    app = create_app(served, api_key=key, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     limits=Limits(max_tokens=max_tokens, max_request_bytes=max_request_bytes),
                     allow_library_updates=allow_updates, precision=precision)
    print(f"mixroute: http://{host}:{port}/v1  model={served.name}  experts={', '.join(served.expert_names)}"
          f"{'  (auth on)' if key else ''}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
