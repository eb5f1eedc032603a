"""Serving on vLLM: mixroute's router in front, a vLLM OpenAI server behind it.

vLLM (like SGLang, LoRAX and llama.cpp) serves LoRA adapters only when the client names one. Here the client
names the run, mixroute decides: for each request the routing pre-pass (the frozen base up to the router's
layer, the prompt only, batched across requests that arrive together) gives the weights over experts, exactly
as mixroute's own engine computes them (``Mixture.route_prompts`` runs the same code), and the request goes to
vLLM as a completion of the same prompt token ids with ``model`` set to the chosen expert's adapter.

A soft or top-k decision is itself a LoRA: for weights w over experts with (A_e, B_e) and scaling s, the
mixture's update sum_e w_e s B_e A_e x equals one adapter whose A stacks the A_e and whose B stacks the
w_e s B_e (rank = the experts' ranks added up, scaling 1). Each distinct mixture is written as such an
adapter, loaded into vLLM at run time (``/v1/load_lora_adapter``) and kept in an LRU.

vLLM cannot serve what is not one LoRA per sequence decided before the first layer: prompt experts (MoP),
token- and rank-level routers, Poly/MHR and one router per layer are refused at start-up (``unsupported``);
``--engine local`` serves them.

vLLM pins transformers and fastapi below mixroute's, so it runs from its own virtualenv (``make vllm``) as a
child process on 127.0.0.1 with a random API key, or is reached at a URL (``--vllm-url``). The child is
health-checked and restarted if it dies: requests in flight then fail with 503 (``Unavailable``), never hang.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mixroute.devices import autocast, check_precision
from mixroute.serve.engine import (Admission, Control, Request, RequestTimeout, Unavailable, ended_error, finish,
                                   left_padded, record_routing, routing_inputs)

log = logging.getLogger("uvicorn.error")

# vLLM accepts these values of --max-lora-rank (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
BASE_NAME = "mixroute-base"      # vLLM's name for the base model (no adapter)


class VLLMError(RuntimeError):
    """vLLM refused a request (4xx): ``status`` and vLLM's message are passed on to the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def unsupported(mix: Any) -> Optional[str]:
    """Why vLLM cannot serve ``mix`` (None: it can)."""
    if mix is None:
        return None
    if mix.cfg.expert == "prompt":
        return "its experts are soft prompts (MoP); vLLM applies LoRA adapters only"
    if mix.cfg.expert != "lora":
        return (f"its experts are {mix.cfg.expert} experts; vLLM loads plain LoRA adapters only (its PEFT check: "
                "'vLLM does not yet support DoRA'); serve it with --engine local")
    levels = {r.level for r in mix.routers.values()}
    if levels - {"sequence"}:
        what = {"token": "a token-level router (MoE-LoRA's top-k, Arrow)", "rank": "a rank-level router (SMoRA)",
                "task": "Poly/MHR's per-task skill mixing"}
        why = ", ".join(what.get(lv, lv) for lv in sorted(levels - {"sequence"}))
        return f"it routes below the sequence level ({why}); vLLM applies one adapter per sequence"
    if not mix.decides_before_layers():
        return (f"it has one router per layer ({len(mix.routers)} routers, mixture.router_scope='layer'): their "
                "decisions exist only inside a full forward, and vLLM applies one adapter to every layer; train "
                "with mixture.router_scope=global to serve it on vLLM")
    return None


def check_servable(mix: Any) -> None:
    """Raise ValueError naming ``--engine local`` when vLLM cannot serve ``mix``."""
    why = unsupported(mix)
    if why is not None:
        raise ValueError(f"--engine vllm cannot serve this mixture: {why}. Serve it with --engine local "
                         "(mixroute's own engine serves every mixture).")


def find_vllm_python(given: Optional[str] = None) -> Path:
    """The Python of the vLLM virtualenv: ``given``, ``$MIXROUTE_VLLM_PYTHON``, or ``.venv-vllm`` in the
    current directory or the mixroute checkout (where ``make vllm`` puts it)."""
    candidates = [given, os.environ.get("MIXROUTE_VLLM_PYTHON")] if given or os.environ.get(
        "MIXROUTE_VLLM_PYTHON") else [Path.cwd() / ".venv-vllm" / "bin" / "python",
                                      Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError("no vLLM virtualenv: run `make vllm` in the mixroute checkout (it builds .venv-vllm), "
                            "pass --vllm-python PATH (or set MIXROUTE_VLLM_PYTHON), or point --vllm-url at a "
                            f"running vLLM server; looked for {', '.join(str(c) for c in candidates if c)}")


def lora_rank_for(needed: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of rank ``needed``."""
    for r in VLLM_LORA_RANKS:
        if r >= needed:
            return r
    return VLLM_LORA_RANKS[-1]


def write_mixture_adapter(mix: Any, weights: list[float], out_dir: Path) -> int:
    """Write the experts mixed by ``weights`` (>= 0, as the mixture applies them) as one PEFT LoRA adapter;
    returns its rank. Experts with weight 0 are left out."""
    from mixroute.experts.lora import LoraExpertConfig, write_peft_adapter

    chosen = [e for e, w in enumerate(weights) if w > 0]
    tensors = {}
    rank = 0
    for key, bank in mix.experts.items():
        parts = [bank.expert(e) for e in chosen]
        a = torch.cat([p[0] for p in parts])
        b = torch.cat([p[1] * (weights[e] * bank.scaling) for e, p in zip(chosen, parts)], dim=1)
        tensors[mix.module_names[key]] = (a.float(), b.float())
        rank = a.shape[0]
    # alpha = rank: PEFT's and vLLM's scaling alpha / r is 1, the experts' own scaling is folded into B
    write_peft_adapter(tensors, LoraExpertConfig(rank=rank, alpha=float(rank)),
                       getattr(mix.model.config, "name_or_path", None), str(out_dir),
                       targets=_peft_targets(mix))
    return rank


def _peft_targets(mix: Any) -> list[str]:
    from peft.tuners.tuners_utils import _find_minimal_target_modules

    names = list(mix.module_names.values())
    others = [n for n, _ in mix.model.named_modules() if n and n not in set(names)]
    return sorted(_find_minimal_target_modules(names, others))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMSettings:
    """How the vLLM server is started or reached."""

    python: Optional[str] = None          # the vLLM virtualenv's python (default: find_vllm_python)
    url: Optional[str] = None             # an existing vLLM server (nothing is started)
    api_key: Optional[str] = None         # its key (a started one gets a random key)
    dtype: Optional[str] = None          # vLLM's --dtype; None: the dtype mixroute loaded the base in
    max_lora_rank: Optional[int] = None   # default: enough for a mixture of every expert
    max_loras: int = 8                    # adapters in one vLLM batch
    mixture_cache: int = 8                # mixture adapters kept loaded (LRU)
    kv_cache_gib: float = 2.0             # VLLM_CPU_KVCACHE_SPACE of a started server
    max_model_len: Optional[int] = None
    startup_timeout: float = 900.0
    prepass_threads: int = 1              # torch threads of the routing pre-pass beside a started vLLM (0: keep)
    adapter_dir: Optional[str] = None     # where adapters are written (a remote vLLM must read this path)
    extra_args: list[str] = field(default_factory=list)


class VLLMProcess:
    """A vLLM OpenAI server as a child process on 127.0.0.1."""

    def __init__(self, python: Path, model_path: str, adapters: Callable[[], dict[str, str]], max_lora_rank: int,
                 max_loras: int, max_cpu_loras: int, settings: VLLMSettings, log_path: Path) -> None:
        self.python, self.model_path, self.adapters = python, model_path, adapters
        self.max_lora_rank, self.max_loras, self.max_cpu_loras = max_lora_rank, max_loras, max_cpu_loras
        self.settings, self.log_path = settings, log_path
        self.api_key = secrets.token_urlsafe(24)
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path,
               "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(self.port),
               "--api-key", self.api_key, "--dtype", self.settings.dtype or "auto", "--enable-lora",
               "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
               "--max-cpu-loras", str(self.max_cpu_loras), "--disable-log-stats"]
        if self.settings.max_model_len:
            cmd += ["--max-model-len", str(self.settings.max_model_len)]
        adapters = self.adapters()
        if adapters:
            cmd += ["--lora-modules", *(f"{n}={d}" for n, d in adapters.items())]
        return cmd + list(self.settings.extra_args)

    def start(self) -> None:
        self.stop(timeout=10)   # a restart: what is left of the last one (vLLM's engine core is its own process)
        self.port = _free_port()
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", f"{self.settings.kv_cache_gib:g}"),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        env.pop("PYTHONPATH", None)   # mixroute's packages must not shadow the vLLM virtualenv's
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        logf.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float, stopping: Callable[[], bool] = lambda: False) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stopping():
            if not self.alive():
                raise RuntimeError(f"vLLM exited with code {self.proc.returncode if self.proc else '?'} while "
                                   f"starting; its log ({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        if not stopping():
            raise TimeoutError(f"vLLM did not answer /health within {timeout:.0f} s; its log ({self.log_path}) "
                               f"ends with:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """End the server and every process of its group (vLLM's engine core is a child process of its own,
        which outlives a killed API server)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                os.killpg(self.proc.pid, 0)   # ProcessLookupError once the whole group is gone
                time.sleep(0.2)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        except ProcessLookupError:
            pass


class VLLMEngine:
    """The engine interface of ``serve.engine.Engine`` over a vLLM server: routes locally, generates there."""

    def __init__(self, served: Any, settings: Optional[VLLMSettings] = None, max_batch: int = 16,
                 max_wait_ms: float = 10.0, on_batch: Optional[Callable[[list[Request]], None]] = None,
                 precision: str = "no", max_queue: int = 256) -> None:
        # a library is served with global routing (``load_library(scope='global')``): its per-layer routers
        # decide inside the forward and arrow per token, which check_servable refuses with the reason
        check_servable(served.mix)
        self.served, self.settings = served, settings or VLLMSettings()
        self.model, self.mix, self.tok = served.model, served.mix, served.tok
        self.expert_names = list(served.expert_names)
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait_ms) / 1000
        self.on_batch, self.precision = on_batch, check_precision(precision)
        self._admission = Admission(max_queue)
        self.device = next(self.model.parameters()).device
        self.workdir = Path(self.settings.adapter_dir or tempfile.mkdtemp(prefix="mixroute-vllm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._own_workdir = self.settings.adapter_dir is None
        self._experts: dict[str, str] = {}            # expert name -> adapter dir loaded in vLLM
        self._mixtures: collections.OrderedDict[str, str] = collections.OrderedDict()   # key -> adapter name
        self._users: collections.Counter = collections.Counter()   # adapter name -> requests using it
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._inflight: dict[int, tuple[Request, Any]] = {}
        self._lock = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self.restarts = 0
        self.process: Optional[VLLMProcess] = None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="mixroute-vllm-io", daemon=True)
        self._router_thread = threading.Thread(target=self._route_loop, name="mixroute-vllm-router", daemon=True)
        self._monitor = threading.Thread(target=self._watch, name="mixroute-vllm-monitor", daemon=True)
        self._client: Any = None

    # ------------------------------------------------------------------ life cycle
    @property
    def url(self) -> str:
        return self.settings.url.rstrip("/") if self.settings.url else self.process.url  # type: ignore[union-attr]

    @property
    def api_key(self) -> Optional[str]:
        return self.settings.api_key if self.settings.url else self.process.api_key  # type: ignore[union-attr]

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def needed_rank(self) -> int:
        """The rank of the largest mixture the router itself decides: its top-k experts' ranks added up (a soft
        router: every expert). A larger rank costs vLLM on every LoRA request (about 15% fewer requests/s at 32
        than at 8 on this project's CPU); a client's ``mixroute.weights`` over more experts than that is
        refused with the option that allows it."""
        if self.mix is None:
            return 1
        k = max(min(getattr(getattr(r, "inner", r), "top_k", len(self.expert_names)), len(self.expert_names))
                for r in self.mix.routers.values())
        return k * next(iter(self.mix.experts.values())).rank

    def start(self) -> "VLLMEngine":
        import httpx

        self._export_experts()
        if self.settings.dtype is None:
            # the local engine's weights: the same answers, and on CPUs without fast bf16 (this project's 2-core
            # machines: 4x fewer requests/s in bfloat16) the faster choice; pass bfloat16 on GPUs
            self.settings.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        if self.settings.url is None:
            from mixroute.models import resolve_model_path

            python = find_vllm_python(self.settings.python)
            path, _ = resolve_model_path(self.served.model_path)
            rank = self.settings.max_lora_rank or lora_rank_for(self.needed_rank())
            slots = len(self.expert_names) + self.settings.mixture_cache
            self.process = VLLMProcess(python, path, lambda: dict(self._experts), rank,
                                       max(1, min(self.settings.max_loras, slots)), slots + 16, self.settings,
                                       self.workdir / "vllm.log")
            log.info("mixroute: starting vLLM (%s), log at %s", python, self.process.log_path)
            t0 = time.monotonic()
            self.process.start()
            self.process.wait_ready(self.settings.startup_timeout)
            log.info("mixroute: vLLM ready at %s in %.0f s", self.process.url, time.monotonic() - t0)
            if self.device.type == "cpu" and self.settings.prepass_threads:
                # vLLM pins its worker to a core of this machine: the pre-pass (the only torch work left in
                # this process) must not spin on every core against it
                torch.set_num_threads(self.settings.prepass_threads)
        else:
            self._load_experts(self._experts)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))
        self._ready.set()
        self._loop_thread.start()
        self._router_thread.start()
        self._monitor.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._queue.put(None)
        self._router_thread.join(timeout)
        with self._lock:
            pending = list(self._inflight.values())
        for _, fut in pending:
            fut.cancel()
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self.process is not None:
            self.process.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _watch(self) -> None:
        """Restart a started vLLM that died; requests in flight fail with 503 meanwhile."""
        while not self._stopping:
            time.sleep(0.5)
            if self.process is None or self.process.alive() or self._stopping:
                continue
            self._ready.clear()
            log.error("mixroute: vLLM exited (code %s); restarting. Log tail:\n%s", self.process.proc.returncode,
                      self.process.log_tail(10))
            with self._lock:
                pending = list(self._inflight.values())
            for req, fut in pending:
                req.error = Unavailable("the vLLM engine died while this request ran; it is restarting")
                fut.cancel()
            self._mixtures.clear()
            self._users.clear()
            try:
                self.process.start()
                self.process.wait_ready(self.settings.startup_timeout, lambda: self._stopping)
                self.restarts += 1
                self._ready.set()
                log.info("mixroute: vLLM restarted at %s", self.process.url)
            except Exception:
                log.exception("mixroute: vLLM did not restart; retrying")

    # ------------------------------------------------------------------ requests
    def submit(self, req: Request) -> Request:
        if self._stopping:
            raise Unavailable("the server is shutting down")
        if not self._ready.is_set():
            raise Unavailable("the vLLM engine is restarting; retry shortly")
        self._admission.enter()
        self._queue.put(req)
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self._lock:
            item = self._inflight.get(id(req))
        if item is not None:
            self._loop.call_soon_threadsafe(item[1].cancel)

    def queued(self) -> int:
        return self._admission.waiting

    def between_batches(self, change: Callable[[], Any], timeout: Optional[float] = None) -> Any:
        """Run ``change()`` once every request sent to vLLM has finished; later requests wait for it."""
        if self._stopping:
            raise Unavailable("the server is shutting down")
        return Control.run_on(self._queue, change, timeout)

    def check_mixture(self, mix: Any) -> None:
        """Raise ValueError when vLLM cannot serve ``mix`` (a library after an add): not one LoRA per sequence,
        or an adapter of rank above the running server's --max-lora-rank."""
        check_servable(mix)
        limit = self.process.max_lora_rank if self.process is not None else self.settings.max_lora_rank
        rank = next(iter(mix.experts.values())).rank
        if limit is not None and rank > limit:
            raise ValueError(f"the experts now have rank up to {rank}, above the vLLM server's --max-lora-rank "
                             f"{limit}; restart mixroute serve with --vllm-max-lora-rank {lora_rank_for(rank)}")

    def swap(self, mix: Any, expert_names: list[str]) -> None:
        """Serve a library's new mixture (call from ``between_batches``: nothing is in flight on vLLM then):
        removed experts are unloaded from vLLM, added ones exported and loaded, and every mixture adapter is
        dropped (it was built from the old experts)."""
        names = list(expert_names)
        for name in [n for n in self._experts if n not in names]:
            self._post("/v1/unload_lora_adapter", {"lora_name": name})
            shutil.rmtree(self._experts.pop(name), ignore_errors=True)
        for key, name in list(self._mixtures.items()):
            self._post("/v1/unload_lora_adapter", {"lora_name": name})
            shutil.rmtree(self.workdir / "mixtures" / name, ignore_errors=True)
            del self._mixtures[key]
        self.mix, self.expert_names = mix, names
        self._load_experts(self._export_experts())

    def describe(self) -> dict[str, Any]:
        """What ``/health`` says about the engine."""
        proc = self.process
        return {"kind": "vllm", "url": self.url, "ready": self._ready.is_set(), "restarts": self.restarts,
                "pid": proc.proc.pid if proc is not None and proc.proc is not None else None,
                "max_lora_rank": proc.max_lora_rank if proc is not None else self.settings.max_lora_rank,
                "experts_loaded": sorted(self._experts), "mixtures_loaded": len(self._mixtures)}

    def generate(self, req: Request, timeout: Optional[float] = None) -> Request:
        self.submit(req).done.wait(timeout)
        if req.error is not None:
            raise req.error
        return req

    # ------------------------------------------------------------------ adapters
    def _export_experts(self) -> dict[str, str]:
        """Write every expert not yet exported as a PEFT adapter; returns the new ones."""
        added = {}
        lib = self.served.library
        for i, name in enumerate(self.expert_names):
            if name in self._experts or self.mix is None:
                continue
            out = self.workdir / "experts" / _safe(name)
            shutil.rmtree(out, ignore_errors=True)
            if lib is not None:
                lib.export(name, out)   # the adapter as added: its own rank, not the bank's
            else:
                self.mix.export_peft(i, str(out))
            self._experts[name] = added[name] = str(out)
        return added

    def _load_experts(self, adapters: dict[str, str]) -> None:
        for name, path in adapters.items():
            try:
                self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
            except RuntimeError as e:   # a server reached by URL may hold an older adapter of that name
                if "already" not in str(e):
                    raise
                self._post("/v1/unload_lora_adapter", {"lora_name": name})
                self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def _post(self, path: str, body: dict) -> None:
        import httpx

        r = httpx.post(self.url + path, json=body, headers=self._headers(), timeout=120.0)
        if r.status_code >= 400 and not (path.endswith("unload_lora_adapter") and r.status_code == 404):
            raise RuntimeError(f"vLLM {path} {body.get('lora_name')}: HTTP {r.status_code}: {r.text[:300]}")

    def _adapter_for(self, weights: list[float]) -> str:
        """vLLM's model name for a request the mixture routes with ``weights`` over the experts."""
        nonzero = [e for e, w in enumerate(weights) if w > 0]
        if len(nonzero) == 1:
            return self.expert_names[nonzero[0]]
        rank = len(nonzero) * next(iter(self.mix.experts.values())).rank
        limit = self.process.max_lora_rank if self.process is not None else (self.settings.max_lora_rank or 512)
        if rank > limit:
            raise VLLMError(400, f"this request mixes {len(nonzero)} experts (an adapter of rank {rank}), more than "
                            f"the vLLM server's --max-lora-rank {limit}; start mixroute serve with "
                            f"--vllm-max-lora-rank {lora_rank_for(rank)} or use --engine local")
        w = torch.tensor(weights, dtype=torch.float32)
        key = hashlib.sha1(w.numpy().tobytes() + ",".join(self.expert_names).encode()).hexdigest()[:16]
        if key in self._mixtures:
            self._mixtures.move_to_end(key)
            return self._mixtures[key]
        name = f"mix-{key}"
        out = self.workdir / "mixtures" / name
        write_mixture_adapter(self.mix, [float(x) for x in w], out)
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(out)})
        self._mixtures[key] = name
        # evict the least recently used mixtures that no request in flight is using
        for old in list(self._mixtures):
            if len(self._mixtures) <= self.settings.mixture_cache:
                break
            old_name = self._mixtures[old]
            if self._users[old_name] == 0 and old != key:
                self._post("/v1/unload_lora_adapter", {"lora_name": old_name})
                del self._mixtures[old]
                shutil.rmtree(self.workdir / "mixtures" / old_name, ignore_errors=True)
        return name

    # ------------------------------------------------------------------ routing thread
    def _collect(self) -> tuple[list[Request], Any]:
        """Requests that arrived together (up to max_batch within max_wait) and the control item or stop
        marker (None) that ended the batch, if one did (``_NOTHING`` otherwise)."""
        first = self._queue.get()
        if first is None or isinstance(first, Control):
            return [], first
        batch, deadline, end = [first], time.perf_counter() + self.max_wait, _NOTHING
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if nxt is None or isinstance(nxt, Control):
                end = nxt
                break
            batch.append(nxt)
        self._admission.leave(len(batch))
        return batch, end

    def _route_loop(self) -> None:
        while True:
            batch, end = self._collect()
            if batch:
                try:
                    self._route_and_send(batch)
                except Exception as e:  # a failing batch fails alone; the router goes on
                    for r in batch:
                        finish(r, e)
            if end is None:
                return   # stop()
            if isinstance(end, Control):   # a library change: once every request sent to vLLM has finished
                with self._lock:
                    self._lock.wait_for(lambda: not self._inflight)
                end.run()

    def _route_and_send(self, batch: list[Request]) -> None:
        now = time.perf_counter()
        live = []
        for r in batch:
            if r.cancelled or r.expired(now):
                finish(r, ended_error(r))
            else:
                live.append(r)
        if not live:
            return
        if self.on_batch is not None:
            self.on_batch(live)
        names = self._route(live)
        for r, name in zip(live, names):
            r.batch_size = len(live)
            if isinstance(name, BaseException):
                finish(r, name)
                continue
            with self._lock:
                self._users[name] += 1
                fut = asyncio.run_coroutine_threadsafe(self._generate(r, name), self._loop)
                self._inflight[id(r)] = (r, fut)
            fut.add_done_callback(lambda f, r=r, name=name: self._finished(r, name, f))

    def _route(self, reqs: list[Request]) -> list[Any]:
        """vLLM's model name for each request (or the error it fails with), from one batched pre-pass."""
        if self.mix is None:
            for r in reqs:
                r.routing = {"mode": "none", "experts": [], "probabilities": {}, "router_latency_ms": 0.0}
            return [BASE_NAME] * len(reqs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids, attn = left_padded(reqs, pad, self.device)   # as the local engine's prefill
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(self.device, self.precision), \
                routing_inputs(self.mix, self.expert_names, reqs, self.device):
            decided = self.mix.route_prompts(ids, attn, (attn.cumsum(-1) - 1).clamp_min(0))
            record_routing(self.mix, self.expert_names, reqs, time.perf_counter() - t0, attn)
        weights = next(iter(decided.values())).weights.float().cpu()
        out: list[Any] = []
        for i in range(len(reqs)):
            try:
                out.append(self._adapter_for(weights[i].tolist()))
            except Exception as e:
                out.append(e)
        return out

    def _finished(self, r: Request, name: str, fut: Any) -> None:
        with self._lock:
            self._inflight.pop(id(r), None)
            self._users[name] -= 1
            self._lock.notify_all()
        if fut.cancelled():
            err = r.error or (Unavailable("the request was cancelled: its client disconnected") if r.cancelled
                              else Unavailable("the vLLM engine stopped"))
            finish(r, err)
        elif fut.exception() is not None:
            finish(r, fut.exception())
        else:
            finish(r, None)

    # ------------------------------------------------------------------ vLLM I/O
    async def _generate(self, r: Request, model: str) -> None:
        import httpx

        body: dict[str, Any] = {"model": model, "prompt": r.prompt_ids, "max_tokens": r.max_tokens,
                                "temperature": r.temperature, "top_p": r.top_p, "stream": True,
                                "stream_options": {"include_usage": True}}
        if r.stop:
            body["stop"] = r.stop
        if r.seed is not None:
            body["seed"] = r.seed
        if r.ignore_eos:
            body["ignore_eos"] = True
        if r.min_tokens:
            body["min_tokens"] = r.min_tokens
        left = None if r.timeout is None else max(0.001, r.timeout - (time.perf_counter() - r.t_submit))
        try:
            async with asyncio.timeout(left):
                async with self._client.stream("POST", self.url + "/v1/completions", json=body,
                                               headers=self._headers()) as resp:
                    if resp.status_code >= 400:
                        raw = (await resp.aread()).decode(errors="replace")
                        try:
                            msg = json.loads(raw)["error"]["message"]
                        except (ValueError, KeyError, TypeError):
                            msg = raw[:500]
                        if resp.status_code >= 500:
                            raise Unavailable(f"vLLM answered {resp.status_code}: {msg}")
                        raise VLLMError(resp.status_code, f"vLLM: {msg}")
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data.strip() == "[DONE]":
                            break
                        self._chunk(r, json.loads(data))
        except TimeoutError as e:
            raise RequestTimeout(f"the request ran past its timeout of {r.timeout:g} s") from e
        except httpx.HTTPError as e:
            raise Unavailable(f"the vLLM engine is not reachable ({type(e).__name__}); it may be restarting") from e

    @staticmethod
    def _chunk(r: Request, obj: dict) -> None:
        usage = obj.get("usage")
        if usage:
            r.completion_tokens = int(usage.get("completion_tokens", 0))
        for ch in obj.get("choices") or []:
            text, finish = ch.get("text") or "", ch.get("finish_reason")
            if r.t_first is None:
                r.t_first = time.perf_counter()
            r.text += text
            if finish:
                r.finish_reason = "length" if finish == "length" else "stop"
            if r.on_text is not None and (text or finish):
                r.on_text(r, text, r.finish_reason if finish else None)


_NOTHING = object()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "expert"


if sys.version_info < (3, 11):   # asyncio.timeout
    raise ImportError("mixroute.serve.vllm needs Python 3.11 or newer")
