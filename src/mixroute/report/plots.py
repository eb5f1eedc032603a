"""The report's figures (matplotlib, Agg backend) as PNG bytes: gate heatmaps, router confusion matrix,
training curves, validation perplexity per category, federated rounds, perplexity against sparsity.

Colour-blind-safe throughout: viridis / cividis for heatmaps, the Okabe-Ito palette (with distinct line styles
and markers) for lines.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mixroute.report.runs import RunInfo  # noqa: E402

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
STAGES = ("before", "during", "after")
DPI = 100


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _line_style(i: int) -> dict[str, Any]:
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "linestyle": STYLES[(i // len(OKABE_ITO)) % len(STYLES)],
            "marker": MARKERS[i % len(MARKERS)], "markersize": 4}


# ------------------------------------------------------------------ gates
def gate_layers(gates: dict[str, Any]) -> list[str]:
    """Layer keys present in every snapshot that has any (per-layer routers), in numeric order."""
    keys = [set(s.get("layers") or {}) for s in gates.get("snapshots", []) if s.get("layers")]
    common = set.intersection(*keys) if keys else set()
    return sorted(common, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def pick_snapshots(gates: dict[str, Any]) -> list[dict[str, Any]]:
    """One snapshot per stage: before, the middle "during" one, after (those that exist)."""
    snaps = gates.get("snapshots") or []
    out = []
    for stage in STAGES:
        these = [s for s in snaps if s.get("stage") == stage]
        if these:
            out.append(these[len(these) // 2] if stage == "during" else these[-1 if stage == "after" else 0])
    return out


def gate_heatmap(run_name: str, gates: dict[str, Any], layer: Optional[str] = None) -> bytes:
    """Categories x experts, average routing weight, one panel per stage, one colour scale for all panels.
    ``layer``: a key of ``snapshot["layers"]``; None = ``weights`` (the average over layers)."""
    snaps = pick_snapshots(gates)
    mats = [(s, s["layers"][layer] if layer is not None else s["weights"]) for s in snaps]
    cats = gates.get("categories") or [str(i) for i in range(len(mats[0][1]))]
    n_exp = len(mats[0][1][0]) if mats and mats[0][1] else 0
    vmax = max((max(max(row) for row in m) for _, m in mats if m), default=1.0) or 1.0
    w = max(3.0, 0.45 * n_exp + 1.6)
    fig, axes = plt.subplots(1, len(mats), figsize=(w * len(mats) + 1.2, 0.38 * len(cats) + 1.8), squeeze=False)
    im = None
    for ax, (snap, m) in zip(axes[0], mats):
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_title(f"{snap.get('stage')} (step {snap.get('step')})", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_xticks(range(n_exp))
        ax.set_yticks(range(len(cats)))
        ax.set_yticklabels(cats if ax is axes[0][0] else [], fontsize=8)
        if len(cats) * n_exp <= 144:  # values readable in the cells; near-zero cells left blank
            for i, row in enumerate(m):
                for j, v in enumerate(row):
                    if v >= 0.005:
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if v > 0.6 * vmax else "white")
    axes[0][0].set_ylabel("category")
    where = f"layer {layer}" if layer is not None else "average over layers"
    fig.suptitle(f"{run_name}: average gate weight per category and expert ({where}, "
                 f"{gates.get('level', 'sequence')}-level routing)", fontsize=11)
    fig.colorbar(im, ax=axes[0].tolist(), label="average routing weight (0-1)", shrink=0.9)
    return _png(fig)


# ------------------------------------------------------------------ router confusion
def confusion_matrix(run_name: str, acc: dict[str, Any]) -> bytes:
    conf = acc["confusion"]
    labels = acc.get("labels") or [str(i) for i in range(len(conf))]
    n_exp = len(conf[0]) if conf else 0
    vmax = max((max(row) for row in conf if row), default=1) or 1
    fig, ax = plt.subplots(figsize=(0.45 * n_exp + 3.2, 0.38 * len(labels) + 1.8))
    im = ax.imshow(conf, cmap="cividis", vmin=0, vmax=vmax, aspect="auto")
    for i, row in enumerate(conf):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * vmax else "white")
    ax.set_xticks(range(n_exp))
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("expert chosen by the router")
    ax.set_ylabel("true category")
    ax.set_title(f"{run_name}: router confusion (accuracy {acc.get('overall', 0):.1%})", fontsize=11)
    fig.colorbar(im, ax=ax, label="held-out examples (count)")
    return _png(fig)


# ------------------------------------------------------------------ training curves
def training_curves(runs: list[RunInfo]) -> bytes:
    """Train loss, validation perplexity and throughput against step, one colour per run; stage 1 (one LoRA per
    category, MoA) dotted."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, r in enumerate(runs):
        style = _line_style(i)
        for stage, ls in ((True, ":"), (False, style["linestyle"])):
            rows = [x for x in r.train_rows if (x.get("stage") == "stage1") == stage and "step" in x]
            if not rows:
                continue
            label = f"{r.name} (stage 1)" if stage else r.name
            kw = dict(style, linestyle=ls, label=label, alpha=0.6 if stage else 1.0)
            steps = [x["step"] for x in rows]
            axes[0].plot(steps, [x.get("loss") for x in rows], **kw)
            axes[2].plot(steps, [x.get("tokens_per_s") for x in rows], **kw)
        ev = [x for x in r.eval_rows if x.get("ppl") is not None and "step" in x and x.get("stage") != "stage1"]
        if ev:
            axes[1].plot([x["step"] for x in ev], [x["ppl"] for x in ev], **style, label=r.name)
        for j, cat in enumerate(dict.fromkeys(x.get("category") for x in r.eval_rows if x.get("stage") == "stage1")):
            ev = [x for x in r.eval_rows if x.get("stage") == "stage1" and x.get("category") == cat
                  and x.get("ppl") is not None]
            axes[1].plot([x["step"] for x in ev], [x["ppl"] for x in ev], **dict(style, linestyle=":"), alpha=0.6,
                         label=f"{r.name} (stage 1, own category)" if j == 0 else None)
    for ax, title, ylabel in zip(axes, ("training loss", "validation perplexity", "throughput"),
                                 ("loss (nats / token)", "perplexity", "tokens / s")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#777")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _log_if_wide(axes[1])
    return _png(fig)


def _log_if_wide(ax: Any) -> None:
    """Log scale for a y range over 20x (perplexity from a random init), linear otherwise."""
    ys = [y for line in ax.lines for y in line.get_ydata() if y is not None and y > 0]
    if ys and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
        ax.set_ylabel(ax.get_ylabel() + " (log scale)")


def _per_category_axes(ax: Any, xs_rows: list[tuple[Any, dict[str, float]]], title: str, xlabel: str,
                       overall: Optional[list[tuple[Any, float]]] = None) -> None:
    """Validation perplexity per category against ``x`` (step or round); ``overall`` as a thick black line."""
    cats = list(dict.fromkeys(c for _, per in xs_rows for c in per))
    for i, cat in enumerate(cats):
        pts = [(x, per[cat]) for x, per in xs_rows if per.get(cat) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **_line_style(i), label=cat)
    if overall:
        ax.plot([p[0] for p in overall], [p[1] for p in overall], color="black", linewidth=2.5, label="overall")
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="category")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _log_if_wide(ax)
    ax.grid(alpha=0.3)


def category_curves(run: RunInfo) -> bytes:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    _per_category_axes(ax, [(x["step"], x.get("ppl_per_category") or {}) for x in run.eval_rows
                            if "step" in x and x.get("stage") != "stage1"],
                       f"{run.name}: validation perplexity per category", "optimizer step")
    return _png(fig)


# ------------------------------------------------------------------ federated rounds
def round_curves(run: RunInfo) -> bytes:
    """Per-round validation perplexity per category and communication per round (bytes up / down)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.2), gridspec_kw={"wspace": 0.45})  # room for the legend
    rounds = run.rounds
    _per_category_axes(a, [(x["round"], x.get("ppl_per_category") or {}) for x in rounds],
                       f"{run.name}: validation perplexity per round", "federated round",
                       overall=[(x["round"], x["ppl"]) for x in rounds if x.get("ppl") is not None])
    xs = [x["round"] for x in rounds]
    for off, (key, label, color) in zip((-0.2, 0.2), (("bytes_up", "client -> server", OKABE_ITO[0]),
                                                      ("bytes_down", "server -> client", OKABE_ITO[1]))):
        ys = [(x.get(key) or 0) / 1e6 for x in rounds]
        if any(ys):
            b.bar([x + off for x in xs], ys, width=0.4, color=color, label=label)
    b.set_title(f"{run.name}: communication per round")
    b.set_xlabel("federated round")
    b.set_ylabel("MB per round (all clients)")
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.grid(alpha=0.3, axis="y")
    if b.patches:
        b.legend(fontsize=8)
    return _png(fig)


def partition_heatmap(run: RunInfo) -> bytes:
    """Clients x categories example counts of a federated run's partition (partition.json)."""
    part = run.partition or {}
    counts, cats, clients = part.get("counts") or [[0]], part.get("categories") or [], part.get("clients") or []
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * max(len(cats), 2), 1.2 + 0.45 * max(len(clients), 2)))
    im = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cats)), cats, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(clients)), clients, fontsize=8)
    top = max((max(r) for r in counts if r), default=0)
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n < top / 2 else "black")
    ax.set_title(f"{run.name}: {part.get('scheme', '?')} partition (train examples)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


def client_gate_heatmaps(run: RunInfo) -> bytes:
    """Per client: categories x experts average routing weight of its training sequences in its first and last
    round (gates_clients.json), one colour scale for all panels."""
    doc = run.client_gates or {}
    clients = doc.get("clients") or {}
    cats = doc.get("categories") or []
    panels = []
    for name in sorted(clients, key=lambda c: int(c.split()[-1]) if c.split()[-1].isdigit() else 0):
        rounds = sorted(clients[name], key=int)
        for r in ([rounds[0], rounds[-1]] if len(rounds) > 1 else rounds):
            panels.append((f"{name}, round {r}", clients[name][r]))
    n = max(len(panels), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 0.6 + 0.32 * max(len(cats), 2) * rows),
                             squeeze=False)
    vmax = max((max(max(row) for row in w if row) for _, w in panels if w), default=1.0) or 1.0
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, w) in zip(axes.flat, panels):
        ax.axis("on")
        im = ax.imshow(w, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(cats)), cats if ax in axes[:, 0] else [""] * len(cats), fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
    if panels:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03)
    fig.suptitle(f"{run.name}: gate by category per client (its training data; 0 = category not held)",
                 fontsize=10)
    return _png(fig)


# ------------------------------------------------------------------ pruning
def sparsity_curves(runs: list[RunInfo]) -> bytes:
    """Perplexity after pruning against achieved sparsity, one line per method, from the dense model (0%)."""
    by_method: dict[str, list[tuple[float, float]]] = {}
    dense: list[float] = []
    for r in runs:
        p = r.prune or {}
        if p.get("ppl_after") is None:
            continue
        label = f"{p.get('method')} {p['pattern']}" if p.get("pattern") else str(p.get("method"))
        by_method.setdefault(label, []).append((100 * p.get("overall_sparsity", p.get("target_sparsity", 0)),
                                                p["ppl_after"]))
        if p.get("ppl_before") is not None:
            dense.append(p["ppl_before"])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, pts) in enumerate(sorted(by_method.items())):
        pts = sorted(pts)
        if dense:
            pts = [(0.0, dense[0])] + pts
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **_line_style(i), label=label)
    ax.set_title("perplexity against sparsity (pruned base models)")
    ax.set_xlabel("sparsity of the pruned layers (%)")
    ax.set_ylabel("validation perplexity")
    _log_if_wide(ax)
    ax.grid(alpha=0.3)
    if by_method:
        ax.legend(fontsize=8)
    return _png(fig)


# ------------------------------------------------------------------ expert library
def cost_curve(rows: list[dict[str, Any]], title: str = "cost-aware routing") -> bytes:
    """Routed perplexity against mean expert cost, one point per lambda (``mixroute library curve``)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pts = sorted(rows, key=lambda r: r["lambda"])
    ax.plot([r["mean_cost"] for r in pts], [r["ppl"] for r in pts], **_line_style(0))
    for r in pts:
        ax.annotate(f"λ={r['lambda']:g}", (r["mean_cost"], r["ppl"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_title(f"{title}: quality against cost as lambda varies")
    ax.set_xlabel("mean cost of the chosen experts")
    ax.set_ylabel("routed perplexity (lower is better)")
    ax.grid(alpha=0.3)
    return _png(fig)


def cost_curve_plot(rows: list[dict[str, Any]], path: Any, title: str = "cost-aware routing") -> None:
    """Write ``cost_curve`` as a PNG file (atomically)."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(cost_curve(rows, title))
    os.replace(tmp, path)
