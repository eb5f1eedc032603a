"""``mixroute library ...``: build and use an expert library (docs/library.md)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from mixroute.cli.common import console, fail, user_errors

HELP = ("An expert library: a directory of PEFT LoRA experts on one base model, routed by centroid, arrow or a "
        "refittable task router; add or remove experts without retraining the others.\n\n"
        "Example:\n\n"
        "  mixroute library create lib --from runs/demo/moa\n\n"
        "  mixroute library add lib legal adapters/legal --examples legal_prompts.txt --cost 8\n\n"
        "  mixroute library route lib \"Summarise this contract.\" --router arrow\n\n"
        "  mixroute serve lib --allow-library-updates   (docs/library.md, docs/serving.md)")

CREATE_EXAMPLES = """Examples:

mixroute library create lib --from runs/demo/moa   (every expert of a trained LoRA mixture; MoA's router too)

mixroute library create lib --model tiny   (an empty library on a base model; then mixroute library add)"""

ADD_EXAMPLES = """Examples:

mixroute library add lib summarization runs/lora_single/stage1/summarization --examples summ.jsonl

mixroute library add lib legal ~/peft/legal-lora --examples prompts.txt --cost 2.5 --description "contracts"

--examples: a .txt file (one prompt per line) or a records file in the Dolly schema (JSONL/JSON/CSV/Parquet)."""

ROUTE_EXAMPLES = """Examples:

mixroute library route lib "Convert 5 km to metres."

mixroute library route lib "Write a poem" --router centroid --cost-weight 0.05 --json

mixroute library route lib "Convert 5 km to metres." --scope global   (as --engine vllm routes it)"""

FIT_EXAMPLES = """Examples:

mixroute library fit-router lib --data train.jsonl   (records whose category names an expert; experts stay frozen)

mixroute library fit-router lib --data train.jsonl --scope global   (the router --engine vllm serves)

mixroute library calibrate lib --data val.jsonl   (per-expert loss estimates for cost-aware routing)

mixroute library curve lib --data test.jsonl --lambdas 0,0.01,0.05,0.1 --out curve.png"""

_ROUTER = "Router: centroid (prototypes from example prompts), arrow (zero-shot, from the LoRA weights), task " \
          "(fitted with fit-router). Default: the library's own (set at create)."
_COST = "lambda of cost-aware routing: pick argmax(quality - lambda * cost) (centroid, task)."
_SCOPE = ("layer: a decision in every layer, with the experts applied below (the default); global: one decision "
          "per prompt from the frozen base at the library's router layer, applied at every layer (what "
          "`mixroute serve LIB --engine vllm` uses; centroid and task).")


def _scope_option(what: str = "Routing"):
    return typer.Option("layer", "--scope", help=f"{what}: {_SCOPE}")


def _open(lib: str, progress: bool = True):
    from mixroute.library import Library

    return Library(lib, progress=progress)


def _errors():
    from mixroute.library import LibraryError

    return user_errors(LibraryError)


def create_cmd(
    lib: str = typer.Argument(..., help="New library directory."),
    from_run: Optional[str] = typer.Option(None, "--from", help="Run directory of a trained LoRA mixture."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model of an empty library (without --from): "
                                                              "a local directory, a cached HF id, 'tiny'; omit for "
                                                              "the embedded SmolLM2-135M-Instruct."),
    router: str = typer.Option("centroid", "--router", help="Default router: centroid, arrow or task."),
    max_rank: int = typer.Option(64, "--max-rank", help="Adapters above this LoRA rank are refused."),
    examples: int = typer.Option(32, "--examples-per-expert", help="With --from: training prompts per category "
                                                                   "for the centroid prototypes."),
    router_layer: Optional[int] = typer.Option(None, "--router-layer", help="The decoder layer whose frozen-base "
                                                                            "input global routing reads (default: "
                                                                            "the middle layer; with --from a "
                                                                            "global MoA run: the run's)."),
) -> None:
    """Create a library from a trained run's LoRA experts, or an empty one on a base model."""
    if from_run and model:
        fail("--from RUN_DIR uses the run's own base model; do not pass --model with it")
    with user_errors():
        from mixroute.library import Library

        with _errors():
            if from_run:
                if router_layer is not None:
                    fail("--router-layer applies to an empty library; --from takes the run's router layer when it "
                         "routed globally, else the middle layer")
                lib_ = Library.from_run(lib, from_run, max_rank=max_rank, router=router,
                                        examples_per_expert=examples, progress=True)
            else:
                lib_ = Library.create(lib, model, max_rank=max_rank, router=router, progress=True,
                                      router_layer=router_layer)
    console.print(f"wrote library {lib}: {len(lib_.man.experts)} experts"
                  + (f" ({', '.join(lib_.man.names())})" if lib_.man.experts else ""))


def add_cmd(
    lib: str = typer.Argument(..., help="Library directory."),
    name: str = typer.Argument(..., help="Name of the new expert (letters, digits, _ - .)."),
    adapter_dir: str = typer.Argument(..., help="PEFT LoRA adapter directory (adapter_config.json + "
                                                "adapter_model.safetensors)."),
    examples: Optional[str] = typer.Option(None, "--examples", help="Prompts of the expert's domain (.txt one per "
                                                                   "line, or records): its centroid prototype."),
    cost: Optional[float] = typer.Option(None, "--cost", help="Cost for cost-aware routing (default: its rank)."),
    description: str = typer.Option("", "--description", help="Free text shown by `list`."),
) -> None:
    """Add a PEFT LoRA adapter as an expert; the other experts are untouched."""
    with user_errors(), _errors():
        e = _open(lib).add(name, adapter_dir, examples, cost, description)
    console.print(f"added {e.name} (rank {e.rank}, cost {e.cost:g}, {e.examples} example prompts)")


def remove_cmd(lib: str = typer.Argument(..., help="Library directory."),
               name: str = typer.Argument(..., help="Expert to remove.")) -> None:
    """Remove an expert; fitted router state keeps working for the others."""
    with user_errors(), _errors():
        _open(lib).remove(name)
    console.print(f"removed {name}")


def list_cmd(lib: str = typer.Argument(..., help="Library directory."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the experts, their costs and the state of each router."""
    from rich.table import Table

    with user_errors(), _errors():
        lb = _open(lib)
        rows, notes = lb.rows(), lb.notes()
        state = {k: lb.stale(k) or "fitted" for k in ("task", "calibration", "task-global", "calibration-global")}
    if as_json:
        print(json.dumps({"base": lb.man.base.get("model"), "router": lb.man.router, "experts": rows,
                          "state": state, "notes": notes}, indent=2))
        return
    table = Table(title=f"{lib}: default router {lb.man.router}")
    for col in ("name", "rank", "cost", "examples", "checksum", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["rank"]), f"{r['cost']:g}", str(r["examples"]), r["checksum"][7:19],
                      r["description"])
    console.print(table)
    console.print(f"arrow: ready (from weights); centroid: "
                  f"{'ready' if all(r['examples'] for r in rows) else 'needs examples for some experts'}; "
                  f"task router: {state['task']} (global: {state['task-global']}); calibration: "
                  f"{state['calibration']} (global: {state['calibration-global']}); global routing reads layer "
                  f"{lb.global_layer()}")
    for n in notes:
        console.print(f"note: {n}")


def route_cmd(
    lib: str = typer.Argument(..., help="Library directory."),
    prompt: str = typer.Argument(..., help="The prompt to route."),
    router: Optional[str] = typer.Option(None, "--router", help=_ROUTER),
    cost_weight: float = typer.Option(0.0, "--cost-weight", help=_COST),
    scope: str = _scope_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show which expert the router picks for a prompt and why (probabilities, costs, scores)."""
    with user_errors(), _errors():
        r = _open(lib, progress=False).route(prompt, router, cost_weight, scope)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    console.print(f"router {r['router']} ({r['scope']} routing, cost weight {r['cost_weight']:g}"
                  f"{', calibrated' if r['calibrated'] else ''}): [bold]{r['chosen']}[/bold]"
                  + (f" ({r['layers_agreeing']:.0%} of layers)" if r["layers_agreeing"] is not None else ""))
    for e in sorted(r["experts"], key=lambda x: -x.get("score", x["probability"])):
        extra = f"  quality {e['quality']:.4f}  score {e['score']:.4f}" if "score" in e else ""
        console.print(f"  {e['name']:<24} p={e['probability']:.4f}  cost {e['cost']:g}{extra}")
    for n in r["notes"]:
        console.print(f"note: {n}")


def export_cmd(lib: str = typer.Argument(..., help="Library directory."),
               name: str = typer.Argument(..., help="Expert to export."),
               out: str = typer.Option(..., "--out", help="Directory for the PEFT adapter.")) -> None:
    """Write one expert as a PEFT adapter directory (`PeftModel.from_pretrained(base, OUT)`)."""
    with user_errors(), _errors():
        _open(lib).export(name, out)
    console.print(f"wrote PEFT adapter {out} (expert {name})")


def fit_router_cmd(
    lib: str = typer.Argument(..., help="Library directory."),
    data: str = typer.Option(..., "--data", help="Records (Dolly schema) whose category names an expert."),
    steps: int = typer.Option(300, "--steps", help="Optimizer steps of each layer's linear router."),
    lr: float = typer.Option(1e-2, "--lr", help="Learning rate."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Use at most this many records."),
    scope: str = _scope_option("Which router to fit"),
) -> None:
    """Train only the task router on the frozen experts (one pass over the data, then small linear fits)."""
    if steps < 1 or lr <= 0:
        fail("--steps must be >= 1 and --lr > 0")
    with user_errors(), _errors():
        res = _open(lib).fit_router(data, steps=steps, lr=lr, max_examples=max_examples, scope=scope)
    console.print(f"task router ({scope} routing) fitted on {res['examples']} records: train accuracy "
                  f"{res['train_accuracy']:.3f}")


def calibrate_cmd(
    lib: str = typer.Argument(..., help="Library directory."),
    data: str = typer.Option(..., "--data", help="Records (Dolly schema): prompts and responses."),
    ridge: float = typer.Option(1.0, "--ridge", help="L2 penalty of the per-layer linear loss estimates."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Use at most this many records."),
    scope: str = _scope_option("Which routing to calibrate"),
) -> None:
    """Learn each expert's loss on a prompt (from the prompt's features) for cost-aware routing."""
    with user_errors(), _errors():
        res = _open(lib).calibrate(data, ridge=ridge, max_examples=max_examples, scope=scope)
    console.print(f"calibrated on {res['examples']} records: picks the lowest-loss expert "
                  f"{res['best_expert_accuracy']:.1%} of the time (in sample); oracle loss {res['oracle_loss']:.4f}")


def curve_cmd(
    lib: str = typer.Argument(..., help="Library directory."),
    data: str = typer.Option(..., "--data", help="Held-out records (Dolly schema)."),
    lambdas: str = typer.Option("0,0.01,0.03,0.1,0.3,1", "--lambdas", help="Comma-separated cost weights."),
    router: Optional[str] = typer.Option(None, "--router", help=_ROUTER),
    out: Optional[str] = typer.Option(None, "--out", help="PNG of the curve, JSON rows beside it (default: "
                                                          "LIB/cost_curve.png)."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Use at most this many records."),
    scope: str = _scope_option(),
) -> None:
    """Routed perplexity vs mean cost as lambda varies (the quality-vs-cost curve)."""
    try:
        lams = [float(x) for x in lambdas.split(",") if x.strip()]
    except ValueError:
        fail(f"--lambdas: {lambdas!r} is not a comma-separated list of numbers")
    if not lams or any(x < 0 for x in lams):
        fail("--lambdas: give at least one value, all >= 0")
    with user_errors(), _errors():
        from mixroute.library.curve import cost_curve

        rows = cost_curve(_open(lib), data, lams, router, max_examples=max_examples, scope=scope)
    console.print("| lambda | perplexity | mean cost |\n|---|---|---|")
    for r in rows:
        console.print(f"| {r['lambda']:g} | {r['ppl']:.3f} | {r['mean_cost']:.3f} |")
    from pathlib import Path

    from mixroute.fileio import atomic_write_text
    from mixroute.report.plots import cost_curve_plot

    png = Path(out) if out else Path(lib) / "cost_curve.png"
    cost_curve_plot(rows, png, Path(lib).resolve().name)
    atomic_write_text(png.with_suffix(".json"), json.dumps(rows, indent=2))
    console.print(f"wrote {png} and {png.with_suffix('.json')}")
