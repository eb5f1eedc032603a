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

mixroute serve lib --router task --route-cost-weight 0.05   (cost-aware routing; docs/library.md)

mixroute serve runs/demo/moa --engine vllm   (the router here, generation on vLLM; after `make vllm`)

mixroute serve lib --engine vllm --allow-library-updates   (a library on vLLM: one centroid decision per request
   from the frozen base; added experts are loaded into vLLM at run time)

mixroute serve runs/moa --engine vllm --vllm-url http://gpu-box:8001 --vllm-api-key K --vllm-adapter-dir /shared/a
   (an existing vLLM server, started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, that can
   read /shared/a: mixroute writes the experts' adapters there and loads them)"""


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
    router_scope: Optional[str] = typer.Option(None, "--router-scope", help="Library only: layer (a decision in "
                                                                            "every layer; the default with "
                                                                            "--engine local) or global (one "
                                                                            "decision per request from the frozen "
                                                                            "base; the default, and the only "
                                                                            "choice, with --engine vllm)."),
    route_cost_weight: float = typer.Option(0.0, "--route-cost-weight", help="Library only: default lambda of "
                                                                             "cost-aware routing (requests may set "
                                                                             "mixroute.route_cost_weight)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests that may wait for the engine; more are "
                                                           "answered 429 with Retry-After."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds a request may take in all "
                                                                           "before it fails with 504 (0 = none)."),
    engine: str = typer.Option("local", "--engine", help="local: mixroute's own decoding loop (every mixture); "
                                                         "vllm: the router here, generation on vLLM (one LoRA "
                                                         "per sequence: global routers; `make vllm` first)."),
    vllm_url: Optional[str] = typer.Option(None, "--vllm-url", help="--engine vllm: use this running vLLM "
                                                                    "server instead of starting one."),
    vllm_api_key: Optional[str] = typer.Option(None, "--vllm-api-key", help="The key of the --vllm-url server "
                                                                            "(default: env VLLM_API_KEY)."),
    vllm_python: Optional[str] = typer.Option(None, "--vllm-python", help="The python of the vLLM virtualenv "
                                                                          "(default: .venv-vllm, from `make "
                                                                          "vllm`)."),
    vllm_dtype: Optional[str] = typer.Option(None, "--vllm-dtype", help="vLLM's --dtype (auto, bfloat16, "
                                                                        "float32; default: the dtype the base "
                                                                        "is loaded in here, float32 unless "
                                                                        "model.dtype says otherwise)."),
    vllm_max_lora_rank: Optional[int] = typer.Option(None, "--vllm-max-lora-rank", help="vLLM's --max-lora-rank "
                                                                                        "(default: enough for a "
                                                                                        "mixture of every "
                                                                                        "expert)."),
    vllm_adapter_dir: Optional[str] = typer.Option(None, "--vllm-adapter-dir", help="Where adapters are written "
                                                                                    "for vLLM (default: a "
                                                                                    "temporary folder)."),
) -> None:
    """Serve a trained mixture or an expert library with an OpenAI-compatible API; the router picks the expert
    per request."""
    import uvicorn

    from mixroute.library.manifest import MANIFEST
    from mixroute.serve import Limits, create_app, load_library, load_served

    if max_batch < 1 or max_wait_ms < 0 or max_tokens < 1 or max_queue < 1 or request_timeout < 0:
        fail("--max-batch, --max-queue and --max-tokens-limit must be >= 1, --max-wait-ms and --request-timeout "
             ">= 0")
    if engine not in ("local", "vllm"):
        fail(f"--engine {engine!r}; valid: local, vllm")
    if engine == "local" and any(v is not None for v in (vllm_url, vllm_api_key, vllm_python, vllm_max_lora_rank,
                                                          vllm_adapter_dir, vllm_dtype)):
        fail("the --vllm-* options need --engine vllm")
    key = api_key if api_key is not None else os.environ.get("MIXROUTE_API_KEY") or None
    is_library = (Path(run_dir) / MANIFEST).is_file()
    if not is_library and (allow_updates or router or route_cost_weight or router_scope):
        fail(f"{run_dir} is not an expert library: --allow-library-updates, --router, --router-scope and "
             "--route-cost-weight apply to libraries only (mixroute library create)")
    if router_scope not in (None, "layer", "global"):
        fail(f"--router-scope {router_scope!r}; valid: layer, global")
    if is_library:   # a LibraryError is a ValueError: reported as a user error by the decorator
        scope = router_scope or ("global" if engine == "vllm" else "layer")
        served = load_library(run_dir, device=device, router=router, cost_weight=route_cost_weight, scope=scope)
    else:
        served = load_served(run_dir, device=device)
    settings = None
    if engine == "vllm":
        from mixroute.serve.vllm import VLLMSettings, check_servable, find_vllm_python

        check_servable(served.mix)   # before anything starts: the reason and --engine local
        if vllm_url is None:
            try:
                find_vllm_python(vllm_python)
            except FileNotFoundError as e:
                fail(str(e))
        settings = VLLMSettings(python=vllm_python, url=vllm_url,
                                api_key=vllm_api_key or os.environ.get("VLLM_API_KEY"), dtype=vllm_dtype,
                                max_lora_rank=vllm_max_lora_rank, adapter_dir=vllm_adapter_dir)
    app = create_app(served, api_key=key, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     limits=Limits(max_tokens=max_tokens, max_request_bytes=max_request_bytes, max_queue=max_queue,
                                   request_timeout=request_timeout or None),
                     allow_library_updates=allow_updates, precision=precision, engine=engine, vllm=settings)
    print(f"mixroute: http://{host}:{port}/v1  model={served.name}  experts={', '.join(served.expert_names)}"
          f"  engine={engine}{'  (auth on)' if key else ''}"
          + ("  (starting vLLM first: about a minute)" if engine == "vllm" and vllm_url is None else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
