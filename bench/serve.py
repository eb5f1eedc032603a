"""Routed serving under load: `mixroute serve` on a MoA run, on its own engine and on vLLM, against vLLM with
the client naming the expert, one plain LoRA and a hand-written PEFT server that switches `set_adapter` per
request.

Each server is a real uvicorn process on 127.0.0.1. A load generator (asyncio + httpx) keeps C clients busy
(C in --clients) with prompts from the run's held-out split whose categories are mixed uniformly or skewed
(--skew of the requests from one category), and measures output tokens/s, requests/s, p50/p95 latency and time
to first token (streamed; the PEFT baseline does not stream, so its TTFT is its latency). Servers:

* mixroute MoA: ``model`` = the run's name, the router picks the expert per request, mixed-expert batches;
* mixroute MoA on vLLM (--engines vllm): the same, generation on a vLLM child process (``--engine vllm``);
* vLLM, client names the expert (--engines vllm): vLLM alone with the run's experts as LoRA adapters, each
  request naming its category's expert: the anchor, what routing must cost little on top of;
* mixroute single LoRA (--lora-run): the same server on a one-expert run (the cost floor of routing);
* PEFT: the run's experts exported as PEFT adapters, one request at a time, ``set_adapter`` to the expert of
  the request's category (the client names the adapter: what users write by hand today).

--lengths natural,32 measures answers as the model ends them and answers forced to exactly --max-tokens
tokens (``ignore_eos``), which compares decode speed at equal length.

Prints a markdown table and, unless --no-write, rewrites the "## Serving" section of docs/benchmarks.md.

    python bench/serve.py                                  # runs/demo/moa vs runs/demo/lora_mixed vs PEFT
    python bench/serve.py --run /tmp/tiny_moa --lora-run "" --clients 1,4 --requests 8 --max-tokens 8 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


# ------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, timeout_s: float = 600) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited:\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout_s} s: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mixroute_server(run: str, port: int, args: argparse.Namespace, max_batch: int,
                    engine: str = "local") -> subprocess.Popen:
    extra = ["--engine", "vllm", "--vllm-dtype", args.vllm_dtype] if engine == "vllm" else []
    return start([sys.executable, "-m", "mixroute.cli", "serve", run, "--port", str(port), "--max-batch",
                  str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--device", args.device,
                  "--max-tokens-limit", str(max(args.max_tokens, 1)), *extra], port, timeout_s=1200)


class VLLMAnchor:
    """vLLM alone, started by mixroute's own launcher with the run's experts as LoRA adapters (rank as trained):
    the client names the adapter."""

    def __init__(self, run: str, args: argparse.Namespace) -> None:
        from mixroute.serve import load_served
        from mixroute.serve.vllm import VLLMProcess, VLLMSettings, find_vllm_python, lora_rank_for
        from mixroute.models import resolve_model_path

        served = load_served(run, device="cpu")
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
        adapters = {}
        for i, name in enumerate(served.expert_names):
            served.mix.export_peft(i, str(self.tmp / name))
            adapters[name] = str(self.tmp / name)
        rank = next(iter(served.mix.experts.values())).rank
        self.proc = VLLMProcess(find_vllm_python(), resolve_model_path(served.model_path)[0], lambda: adapters,
                                lora_rank_for(rank), len(adapters), len(adapters),
                                VLLMSettings(dtype=args.vllm_dtype), self.tmp / "vllm.log")
        self.proc.start()
        self.proc.wait_ready(1200)
        self.port, self.headers = self.proc.port, {"Authorization": f"Bearer {self.proc.api_key}"}

    def stop(self) -> None:
        import shutil

        self.proc.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def peft_server_main(run: str, port: int, device: str) -> None:
    """The baseline: base model + N PEFT adapters, one request at a time, set_adapter per request."""
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel

    from mixroute.rundir import load_model, read_config
    from mixroute.serve import load_served

    served = load_served(run)
    tmp = Path(tempfile.mkdtemp(prefix="mixroute-peft-"))
    names = list(served.expert_names)
    for i, name in enumerate(names):
        served.mix.export_peft(i, str(tmp / name))
    del served
    base, tok = load_model(read_config(run).model)
    model = PeftModel.from_pretrained(base, str(tmp / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(tmp / name), adapter_name=name)
    model.to(device).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def complete(body: dict) -> dict:
        ids = tok(body["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with lock, torch.no_grad():
            model.set_adapter(body["model"])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=int(body["max_tokens"]), pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:]
        return {"choices": [{"text": tok.decode(new, skip_special_tokens=True), "index": 0,
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": int(new.numel()),
                          "total_tokens": ids.shape[1] + int(new.numel())}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ------------------------------------------------------------------ load
def prompts_for(run: str, n: int, skew: Optional[float], seed: int = 0) -> list[tuple[str, str]]:
    """n (prompt text, expert name of its category): uniform over categories, or ``skew`` of them from one."""
    from mixroute.data import RunData
    from mixroute.rundir import load_model, read_config

    cfg = read_config(run)
    _, tok = load_model(cfg.model)
    data = RunData.build(cfg, tok)
    by_cat: dict[int, list[str]] = {}
    for ex in data.generation_examples("test", None):
        by_cat.setdefault(ex["task_id"], []).append(tok.decode(ex["prompt_ids"]))
    cats = sorted(by_cat)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = cats[0] if skew is not None and rng.random() < skew else cats[i % len(cats)]
        out.append((rng.choice(by_cat[c]), data.categories[c]))
    return out


async def one(client: Any, url: str, model: str, prompt: str, max_tokens: int, stream: bool,
              forced: bool = False) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if forced:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    if not stream:
        r = await client.post(url, json=body)
        r.raise_for_status()
        t = time.perf_counter() - t0
        return {"latency": t, "ttft": t, "tokens": r.json()["usage"]["completion_tokens"], "router_ms": None}
    body.update(stream=True, stream_options={"include_usage": True})
    ttft, tokens, router_ms = None, 0, None
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("routing") and router_ms is None:
                router_ms = chunk["routing"].get("router_latency_ms")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    t = time.perf_counter() - t0
    return {"latency": t, "ttft": ttft if ttft is not None else t, "tokens": tokens, "router_ms": router_ms}


async def load(port: int, work: list[tuple[str, str]], clients: int, max_tokens: int, stream: bool,
               model_for: Any, forced: bool = False, headers: Optional[dict] = None) -> dict:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    queue = list(work)
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4),
                                 headers=headers or {}) as client:
        async def worker() -> None:
            while queue:
                prompt, cat = queue.pop()
                results.append(await one(client, url, model_for(cat), prompt, max_tokens, stream, forced))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    routed = [r for r in results if r["router_ms"] is not None]
    share = (sum(r["router_ms"] / 1000 for r in routed) / sum(r["latency"] for r in routed)) if routed else None
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "req_s": len(results) / wall,
            "p50": q(lat, 0.5), "p95": q(lat, 0.95), "ttft50": q(ttft, 0.5),
            "tokens": sum(r["tokens"] for r in results) / len(results), "router_share": share}


# ------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo/moa", help="MoA run directory (8 experts)")
    p.add_argument("--lora-run", default="runs/demo/lora_mixed", help="single-LoRA run ('' = skip)")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT set_adapter baseline")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels")
    p.add_argument("--requests", type=int, default=64, help="requests per (server, mix, concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--skew", type=float, default=0.7, help="share of the skewed mix sent to one category")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engines", default="local", help="comma list: local (mixroute's engine), vllm (mixroute on "
                                                         "vLLM + vLLM alone with the client naming the expert)")
    p.add_argument("--lengths", default="natural", help="comma list: natural (answers end at EOS) and/or forced "
                                                         "(every answer exactly --max-tokens tokens: ignore_eos)")
    p.add_argument("--vllm-dtype", default="float32", help="vLLM's --dtype for both vLLM servers (float32: "
                                                               "bfloat16 served 4x fewer requests/s on this "
                                                               "project's 2-core CPU)")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    p.add_argument("--section", default="## Serving", help="the docs/benchmarks.md section the table replaces")
    p.add_argument("--_peft-server", nargs=2, metavar=("RUN", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._peft_server:
        return peft_server_main(args._peft_server[0], int(args._peft_server[1]), args.device)

    args.load_at_start = os.getloadavg()[0]   # reported: a busy machine makes every number here meaningless
    levels = [int(c) for c in args.clients.split(",")]
    mixes = {"uniform": prompts_for(args.run, args.requests, None),
             "skewed": prompts_for(args.run, args.requests, args.skew)}
    run_name = Path(args.run).resolve().name
    engines = args.engines.split(",")
    lengths = args.lengths.split(",")
    servers: list[tuple[str, Any, bool, Any]] = []
    if "local" in engines:
        servers.append(("mixroute MoA (router decides)", lambda port: mixroute_server(args.run, port, args,
                                                                                      args.max_batch), True,
                        lambda cat: run_name))
    if "vllm" in engines:
        servers.append(("mixroute MoA on vLLM (router decides)", lambda port: mixroute_server(
            args.run, port, args, args.max_batch, engine="vllm"), True, lambda cat: run_name))
        servers.append(("vLLM, client names the expert", lambda port: VLLMAnchor(args.run, args), True,
                        lambda cat: cat))
    if args.lora_run:
        lora_name = Path(args.lora_run).resolve().name
        servers.append(("mixroute single LoRA", lambda port: mixroute_server(args.lora_run, port, args,
                                                                             args.max_batch), True,
                        lambda cat: lora_name))
    if not args.no_peft:
        servers.append(("PEFT set_adapter per request", lambda port: start(
            [sys.executable, __file__, "--_peft-server", args.run, str(port), "--device", args.device], port),
            False, lambda cat: cat))
    rows = []
    for label, launch, stream, model_for in servers:
        port = free_port()
        proc = launch(port)
        headers = getattr(proc, "headers", None)
        port = getattr(proc, "port", port)
        try:
            asyncio.run(load(port, mixes["uniform"][:max(levels)], max(levels), args.max_tokens, stream,
                             model_for, headers=headers))  # warm-up
            for length in lengths:
                if length == "forced" and label.startswith("PEFT"):
                    continue   # the hand-written PEFT server has no ignore_eos
                for mix_name, work in mixes.items():
                    for c in levels:
                        r = asyncio.run(load(port, work, c, args.max_tokens, stream, model_for,
                                             forced=length == "forced", headers=headers))
                        rows.append({"server": label, "mix": mix_name, "clients": c, "length": length, **r})
                        print(f"{label:40s} {length:7s} {mix_name:8s} c={c:<3d} {r['tok_s']:8.1f} tok/s "
                              f"{r['req_s']:6.2f} req/s p50 {r['p50']:.3f}s p95 {r['p95']:.3f}s "
                              f"ttft {r['ttft50']:.3f}s {r['tokens']:.1f} tok/answer", flush=True)
        finally:
            proc.stop() if isinstance(proc, VLLMAnchor) else stop(proc)
    text = table(rows, args, levels)
    print(text)
    if not args.no_write:
        from protocol import write_section

        write_section(ROOT / "docs" / "benchmarks.md", args.section, text)


def table(rows: list[dict], args: argparse.Namespace, levels: list[int]) -> str:
    def find(server: str, mix: str, c: int, length: str = "natural") -> Optional[dict]:
        return next((r for r in rows if r["server"].startswith(server) and r["mix"] == mix and r["clients"] == c
                     and r["length"] == length), None)

    cmd = "python bench/serve.py " + shlex.join(sys.argv[1:])
    out = [args.section, "", f"`{cmd.strip()}` on {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs (1-minute load {args.load_at_start:.2f} when the run started), device {args.device}; "
           f"{args.requests} requests per cell, max_tokens "
           f"{args.max_tokens}, greedy, --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms}; "
           f"skewed = {args.skew:.0%} of requests from one category; vLLM dtype {args.vllm_dtype}; forced = "
           f"every answer {args.max_tokens} tokens (ignore_eos). Ratios: output tok/s against vLLM with the client "
           "naming the expert (same mix, clients and length), and against the hand-written PEFT server.", "",
           "| server | length | mix | clients | output tok/s | req/s | tokens/answer | p50 s | p95 s | TTFT p50 s | "
           "routing share of latency | vs vLLM client-named | vs PEFT |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peft = find("PEFT", r["mix"], r["clients"], r["length"])
        anchor = find("vLLM, client", r["mix"], r["clients"], r["length"])
        ratio = f"{r['tok_s'] / peft['tok_s']:.2f}x" if peft and peft["tok_s"] > 0 else "-"
        vs = f"{r['tok_s'] / anchor['tok_s']:.2f}x" if anchor and anchor["tok_s"] > 0 else "-"
        share = "-" if r.get("router_share") is None else f"{100 * r['router_share']:.1f}%"
        out.append(f"| {r['server']} | {r['length']} | {r['mix']} | {r['clients']} | {r['tok_s']:.1f} | "
                   f"{r['req_s']:.2f} | {r['tokens']:.1f} | {r['p50']:.3f} | {r['p95']:.3f} | {r['ttft50']:.3f} | "
                   f"{share} | {vs} | {ratio} |")
    notes = []
    hi = max(levels)
    for length in ("natural", "forced"):
        for mix in ("uniform", "skewed"):
            routed, anchor = find("mixroute MoA on vLLM", mix, hi, length), find("vLLM, client", mix, hi, length)
            local = find("mixroute MoA (router", mix, hi, length)
            if routed and anchor:
                notes.append(f"{length}, {mix}, {hi} clients: routed through vLLM "
                             f"{routed['req_s'] / anchor['req_s']:.2f}x the requests/s and "
                             f"{routed['tok_s'] / anchor['tok_s']:.2f}x the output tokens/s of vLLM with the client "
                             f"naming the expert (target >= 0.9x)" + (
                                 f"; {routed['tok_s'] / local['tok_s']:.2f}x mixroute's own engine" if local else "")
                             + ".")
    hi, lo = max(levels), min(levels)
    for mix in ("uniform", "skewed"):
        moa, lora = find("mixroute MoA (router", mix, hi), find("mixroute single", mix, hi)
        one = find("mixroute MoA (router", mix, lo)
        if moa and lora:
            notes.append(f"{mix}: routing costs {100 * (1 - moa['tok_s'] / lora['tok_s']):.1f}% throughput against "
                         f"one plain LoRA at {hi} clients (target <= 10%).")
        if moa and one and hi != lo:
            notes.append(f"{mix}: {hi} clients give {moa['tok_s'] / one['tok_s']:.2f}x the throughput of {lo} "
                         f"(one request at a time; target >= 3x).")
    return "\n".join(out + [""] + [f"- {n}" for n in notes]) + "\n"


if __name__ == "__main__":
    main()
