"""Evaluation: the held-out pass, perplexity, BLEU / ROUGE-L, router accuracy, classifier baseline, gates.

``held_out_pass`` runs the frozen model (or a mixture) over held-out batches without gradients and returns
per-example sums; ``perplexity`` (the one perplexity of mixroute: training's validation, ``mixroute eval`` and
``mixroute prune`` all use it) and the other metric functions are pure (tensors / strings in, dicts out) so they
can be checked against hand-computed values; ``evaluate_run`` loads a run directory, computes them all on the
held-out split and writes ``eval.json`` (schema in docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixroute import rundir
from mixroute.data import to_device
from mixroute.devices import autocast, resolve_device


# ------------------------------------------------------------------ the held-out pass
@dataclass
class HeldOut:
    """Per-example results of ``held_out_pass`` (N examples, concatenated over batches)."""

    nll: Tensor                                   # (N,) summed NLL of the response tokens
    tokens: Tensor                                # (N,) response tokens
    task_ids: Tensor                              # (N,)
    routing: dict[str, Tensor] = field(default_factory=dict)       # key -> (N, E) weights per example
    router_probs: dict[str, Tensor] = field(default_factory=dict)  # key -> (N, E) softmax of router logits
    pooled: Optional[Tensor] = None               # (N, H) pooled hidden states read at ``capture_layer``


def _per_example(weights: Tensor, token_level: bool, token_mask: Optional[Tensor]) -> Tensor:
    """Reduce observable routing weights to one vector per example: (B, E) as is; (B, T, E) / (B, T, R) mean
    over attended tokens; Poly (B, S, E) mean over splits."""
    w = weights.detach().float()
    if w.dim() == 2:
        return w
    if token_level and token_mask is not None and token_mask.shape[1] == w.shape[1]:
        m = token_mask.to(w.dtype).unsqueeze(-1)
        return (w * m).sum(1) / m.sum(1).clamp_min(1.0)
    return w.mean(1)


@torch.no_grad()
def held_out_pass(model: nn.Module, mix: Optional[nn.Module], batches: Iterable[dict[str, Tensor]],
                  device: torch.device | str = "cpu", capture_layer: Optional[int] = None) -> HeldOut:
    """Teacher-forced pass over held-out batches: response-token NLL per example, routing per example and,
    with ``capture_layer``, the hidden states entering that decoder layer mean-pooled over the prompt tokens
    (what a sequence-level router reads)."""
    from mixroute.arch import decoder_layers, lm_head_logits
    from mixroute.routers.base import masked_mean

    decoder = model.get_decoder()
    runner = mix if mix is not None else model
    modes = {m: m.training for m in runner.modules()}  # restored after: a recipe calls this mid-training
    runner.eval()
    nll, toks, tasks, pooled = [], [], [], []
    routing: dict[str, list[Tensor]] = {}
    probs: dict[str, list[Tensor]] = {}
    captured: list[Tensor] = []
    handle = None
    if capture_layer is not None:
        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
        handle = decoder_layers(model)[capture_layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for raw in batches:
            b = to_device(raw, device)
            captured.clear()
            ctx = (mix.context.inputs(b.get("task_ids"), b.get("prompt_mask")) if mix is not None
                   else contextlib.nullcontext())
            with ctx:
                hidden = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 use_cache=False).last_hidden_state
            target = b["labels"][:, 1:]
            keep = target != -100
            logits = lm_head_logits(model, hidden[:, :-1][keep]).float()
            tok_nll = F.cross_entropy(logits, target[keep], reduction="none")
            row = keep.nonzero()[:, 0]
            nll.append(torch.zeros(len(target), device=tok_nll.device).index_add_(0, row, tok_nll).cpu())
            toks.append(keep.sum(1).cpu())
            tasks.append(b["task_ids"].cpu())
            if captured:
                mask = b["attention_mask"].bool()
                if "prompt_mask" in b:
                    mask = mask & b["prompt_mask"].bool()
                pooled.append(masked_mean(captured[0].float(), mask).cpu())
            if mix is not None:
                for key, w in mix.context.routing.items():
                    per_token = mix.routers[key].level in ("token", "rank")
                    vec = _per_example(w, per_token, b["attention_mask"].bool())
                    routing.setdefault(key, []).append(vec.cpu())
                for key, lg in mix.context.router_logits.items():
                    probs.setdefault(key, []).append(lg.detach().float().softmax(-1).cpu())
    finally:
        if handle is not None:
            handle.remove()
        for m, training in modes.items():
            m.train(training)
    return HeldOut(
        nll=torch.cat(nll) if nll else torch.zeros(0), tokens=torch.cat(toks) if toks else torch.zeros(0),
        task_ids=torch.cat(tasks) if tasks else torch.zeros(0, dtype=torch.long),
        routing={k: torch.cat(v) for k, v in routing.items()}, router_probs={k: torch.cat(v) for k, v in probs.items()},
        pooled=torch.cat(pooled) if pooled else None,
    )


# ------------------------------------------------------------------ perplexity
def perplexity(nll: Tensor, tokens: Tensor, task_ids: Tensor, categories: Sequence[str]) -> dict[str, Any]:
    """Token-weighted perplexity overall and per category (exp of summed NLL / response tokens); ``average``
    is the unweighted mean of the per-category perplexities (the papers' table average)."""
    def ppl(sel: Tensor) -> Optional[float]:
        n = float(tokens[sel].sum())
        return math.exp(float(nll[sel].sum()) / n) if n > 0 else None

    per = {c: ppl(task_ids == i) for i, c in enumerate(categories)}
    per = {c: v for c, v in per.items() if v is not None}
    overall = ppl(torch.ones_like(task_ids, dtype=torch.bool)) if len(task_ids) else None
    return {"overall": overall, "per_category": per, "average": _mean(per.values())}


def _mean(values: Any) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------ generation metrics
def bleu_rouge(hypotheses: Sequence[str], references: Sequence[str], task_ids: Sequence[int],
               categories: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Corpus BLEU (sacrebleu) and mean ROUGE-L F-measure (rouge-score, stemmed) per category, 0-100 scale;
    ``average`` is the mean over categories."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    bleu, rouge = {}, {}
    for i, c in enumerate(categories):
        idx = [k for k, t in enumerate(task_ids) if int(t) == i]
        if not idx:
            continue
        hyps, refs = [hypotheses[k] for k in idx], [references[k] for k in idx]
        bleu[c] = sacrebleu.corpus_bleu(hyps, [refs]).score
        rouge[c] = 100.0 * sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(idx)
    return ({"average": _mean(bleu.values()), "per_category": bleu},
            {"average": _mean(rouge.values()), "per_category": rouge})


# ------------------------------------------------------------------ routing
def router_accuracy(predicted: Sequence[int], labels: Sequence[int], categories: Sequence[str],
                    num_experts: int) -> dict[str, Any]:
    """Top-1 routing accuracy overall and per category, and the confusion matrix ``confusion[label][expert]``."""
    confusion = [[0] * num_experts for _ in categories]
    for p, y in zip(predicted, labels):
        confusion[int(y)][int(p)] += 1
    per = {}
    for i, c in enumerate(categories):
        n = sum(confusion[i])
        if n:
            per[c] = confusion[i][i] / n if i < num_experts else 0.0
    total = len(labels)
    correct = sum(int(p) == int(y) for p, y in zip(predicted, labels))
    return {"overall": correct / total if total else None, "per_category": per, "labels": list(categories),
            "confusion": confusion}


def classifier_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                        categories: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """The standalone baseline of MoA's table 3: logistic regression on the pooled hidden states the router
    reads, fit on the train split, scored on the held-out split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(train_y.tolist())) < 2:
        pred = [int(train_y[0])] * len(test_y)
    else:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
        clf.fit(train_x.numpy(), train_y.numpy())
        pred = clf.predict(test_x.numpy()).tolist()
    acc = router_accuracy(pred, test_y.tolist(), categories, len(categories))
    return {"overall": acc["overall"], "per_category": acc["per_category"]}


def routed_expert(held: HeldOut, level_aligned_keys: Optional[Sequence[str]] = None) -> Optional[Tensor]:
    """Top-1 expert per example: argmax of the router probabilities averaged over the label-aligned routers
    (every layer's router votes with its softmax); routers without logits (oracle) by their weights."""
    source = held.router_probs or held.routing
    keys = list(level_aligned_keys or source.keys())
    if not keys:
        return None
    return torch.stack([source[k] for k in keys]).mean(0).argmax(-1)


def gate_matrix(held: HeldOut, num_categories: int) -> tuple[list[list[float]], dict[str, list[list[float]]]]:
    """Average routing weight per (category, expert): averaged over routers, and per layer (``layer_<i>``)."""
    def per_category(w: Tensor) -> list[list[float]]:
        rows = []
        for c in range(num_categories):
            sel = held.task_ids == c
            rows.append(w[sel].mean(0).tolist() if bool(sel.any()) else [0.0] * w.shape[1])
        return rows

    if not held.routing:
        return [], {}
    keys = list(held.routing)
    mean = torch.stack([held.routing[k] for k in keys]).mean(0)
    layers = {k.split("_", 1)[1]: per_category(held.routing[k]) for k in keys
              if k.startswith("layer_") and len(keys) > 1}
    return per_category(mean), layers


def gate_level(mix: Optional[nn.Module]) -> str:
    """``sequence``, ``token`` or ``rank`` (SMoRA's gates are over single ranks): what gates.json's weights
    are averaged over. Task-level (Poly) allocations are per sequence."""
    levels = {r.level for r in mix.routers.values()} if mix is not None else set()
    return next((lv for lv in ("rank", "token") if lv in levels), "sequence")


def router_read_layer(mix: nn.Module) -> int:
    """The decoder layer whose input the label-aligned router reads (for the classifier baseline): its own
    when there is one router (MoP's gate, a global task router), the middle layer when every layer has one."""
    aligned = [r for r in mix.routers.values() if r.label_aligned]
    if len(aligned) == 1:
        return aligned[0].read_layer
    return mix.model.config.num_hidden_layers // 2


def validation_snapshot(model: nn.Module, mix: Optional[nn.Module], data: Any, batch_size: int, step: int,
                        stage: str, device: torch.device | str = "cpu",
                        category: Optional[int] = None) -> tuple[dict, dict, Optional[dict]]:
    """Validation perplexity of ``mix`` (or the base model) at ``step``: the perplexity dict, its metrics.jsonl
    eval row, and a gates.json snapshot (None when nothing routes). Central and federated training both log
    these. With ``category`` only that category's validation examples are read (a stage-1 LoRA)."""
    cats = data.categories
    held = held_out_pass(model, mix, data.batches("validation", batch_size, category=category), device=device)
    ppl = perplexity(held.nll, held.tokens, held.task_ids, cats)
    row = {"step": step, "split": "validation", "ppl": ppl["overall"], "ppl_average": ppl["average"],
           "ppl_per_category": ppl["per_category"]}
    weights, layers = gate_matrix(held, len(cats))
    snap: Optional[dict] = None
    if weights:
        snap = {"stage": stage, "step": step, "weights": weights, "level": gate_level(mix)}
        if layers:
            snap["layers"] = layers
    return ppl, row, snap


# ------------------------------------------------------------------ generation
@torch.no_grad()
def generate_texts(model: nn.Module, mix: Optional[nn.Module], tok: Any, prompts: Sequence[list[int]],
                   task_ids: Optional[Sequence[int]], max_new_tokens: int, batch_size: int,
                   device: torch.device | str = "cpu") -> tuple[list[str], list[int]]:
    """Greedy, batched, left-padded generation with the KV cache. ``task_ids`` (None: no labels, for routers
    that do not need them) are visible to the routers. Returns the decoded continuations and, for
    sequence-level routers, the expert chosen at the prefill (-1 otherwise)."""
    from mixroute.data import generation_batch

    texts, chosen = [], []
    runner = mix if mix is not None else model
    runner.eval()
    for start in range(0, len(prompts), batch_size):
        ids = list(prompts[start:start + batch_size])
        b = generation_batch(ids, tok)
        input_ids, attn = b["input_ids"].to(device), b["attention_mask"].to(device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                      use_cache=True)
        if mix is not None:
            t = None if task_ids is None else torch.tensor(task_ids[start:start + batch_size], device=device)
            out = mix.generate(input_ids=input_ids, attention_mask=attn, task_ids=t, **kwargs)
            chosen += mix.chosen_experts() or [-1] * len(ids)
        else:
            out = model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
            chosen += [-1] * len(ids)
        texts += [t.strip() for t in tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]
    return texts, chosen


# ------------------------------------------------------------------ a run directory
class _Phases:
    """``evaluate_run``'s progress: one rich bar per phase (held-out batches, generated prompts, train-split
    batches for the classifier) with elapsed time and ETA; silent when disabled. The metric functions stay
    free of it: the bar wraps what they iterate over."""

    def __init__(self, run: str, enabled: bool) -> None:
        self.run, self.progress = run, None
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), transient=False)
        self.progress.start()

    def track(self, items: Sequence[Any], what: str, unit: str, sizes: Optional[Sequence[int]] = None) -> Iterable:
        """Yield ``items``, advancing the phase's bar after each by its size (1, or ``sizes[i]``)."""
        if self.progress is None or not items:
            yield from items
            return
        sizes = list(sizes) if sizes is not None else [1] * len(items)
        task = self.progress.add_task(f"eval {self.run}: {what}", total=sum(sizes), unit=unit)
        for item, n in zip(items, sizes):
            yield item
            self.progress.advance(task, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def evaluate_run(run_dir: str | Path, max_new_tokens: Optional[int] = None, max_generate: Optional[int] = None,
                 split: Optional[str] = None, write: bool = True, progress: bool = False,
                 classifier: bool = True, device: str | torch.device = "auto",
                 precision: str = "no") -> dict[str, Any]:
    """Evaluate ``run_dir`` (its config.yaml and final/ mixture) and write ``eval.json``.

    ``max_generate=0`` skips generation (BLEU / ROUGE-L come out empty); ``classifier=False`` skips the
    logistic-regression baseline, which runs the whole train split through the model once more. ``device``
    (auto: CUDA when available) and ``precision`` (autocast: no, bf16, fp16) say where and how it runs.
    ``progress`` shows a bar per phase: the held-out pass, generation, the classifier's train-split pass.
    """
    dev = resolve_device(device)
    phases = _Phases(Path(run_dir).name, progress)
    try:
        with autocast(dev, precision):
            return _evaluate_run(run_dir, max_new_tokens, max_generate, split, write, phases, classifier, dev)
    finally:
        phases.close()


def _evaluate_run(run_dir: str | Path, max_new_tokens: Optional[int], max_generate: Optional[int],
                  split: Optional[str], write: bool, phases: _Phases, classifier: bool,
                  device: torch.device) -> dict[str, Any]:
    from mixroute.methods import is_label_aligned

    t0 = time.time()
    run = rundir.load_run(run_dir, device)
    cfg, model, tok, mix, data = run.cfg, run.model, run.tok, run.mix, run.data
    split = split or cfg.eval.split
    max_new_tokens = max_new_tokens or cfg.eval.max_new_tokens
    max_generate = max_generate if max_generate is not None else cfg.eval.max_generate
    cats = data.categories
    aligned = is_label_aligned(mix.cfg if mix is not None else None)
    layer = router_read_layer(mix) if aligned else None

    batches = data.batches(split, cfg.eval.batch_size)
    held = held_out_pass(model, mix, phases.track(batches, f"perplexity ({split})", "batches"), device=device,
                         capture_layer=layer)
    result: dict[str, Any] = {"run": Path(run_dir).name, "method": cfg.train.method, "split": split,
                              "categories": list(cats),
                              "perplexity": perplexity(held.nll, held.tokens, held.task_ids, cats),
                              # what a paired comparison of two runs on the same split needs (bootstrap intervals)
                              "per_example": {"nll": [round(float(x), 5) for x in held.nll],
                                              "tokens": held.tokens.tolist(), "task_ids": held.task_ids.tolist()}}

    examples = data.generation_examples(split, max_generate) if max_generate > 0 else []
    hyps, chosen = [], []
    bs = cfg.eval.batch_size
    chunks = [examples[i:i + bs] for i in range(0, len(examples), bs)]  # generate_texts' own batches
    for chunk in phases.track(chunks, "generation", "prompts", [len(c) for c in chunks]):
        h, c = generate_texts(model, mix, tok, [e["prompt_ids"] for e in chunk], [e["task_id"] for e in chunk],
                              max_new_tokens, bs, device)
        hyps += h
        chosen += c
    labels = [e["task_id"] for e in examples]
    result["bleu"], result["rougeL"] = bleu_rouge(hyps, [e["reference"] for e in examples], labels, cats)

    result["router_accuracy"] = result["classifier_accuracy"] = None
    if aligned:
        pred = routed_expert(held)
        num_experts = mix.cfg.num_experts
        result["router_accuracy"] = router_accuracy(pred.tolist(), held.task_ids.tolist(), cats, num_experts)
        if any(c >= 0 for c in chosen):
            result["router_accuracy"]["generation"] = router_accuracy(chosen, labels, cats, num_experts)["overall"]
    if aligned and classifier:
        train_batches = data.batches("train", cfg.eval.batch_size)
        train_held = held_out_pass(model, mix, phases.track(train_batches, "classifier (train split)", "batches"),
                                   device=device, capture_layer=layer)
        result["classifier_accuracy"] = classifier_accuracy(train_held.pooled, train_held.task_ids, held.pooled,
                                                            held.task_ids, cats, seed=cfg.train.seed)
        result["classifier_accuracy"]["layer"] = layer
    result["trainable_parameters"] = mix.trainable_parameters() if mix is not None else 0
    if mix is not None:
        result["parameters"] = mix.num_parameters_by_part()
    result["generation"] = {"max_new_tokens": max_new_tokens, "examples": len(examples),
                            "samples": [{"category": cats[e["task_id"]], "prompt": e.get("prompt", ""),
                                         "reference": e["reference"], "output": h}
                                        for e, h in list(zip(examples, hyps))[:8]]}
    result["seconds"] = round(time.time() - t0, 1)
    if write:
        rundir.write_eval(run_dir, result)
    return result


# ------------------------------------------------------------------ one prompt
def routed_generate(run_dir: str | Path, prompt: str, max_new_tokens: int = 64, category: Optional[str] = None,
                    context: str = "", device: str | torch.device = "auto",
                    precision: str = "no") -> dict[str, Any]:
    """Answer one prompt with a run's mixture; the router picks the expert (``mixroute generate``).

    Returns ``{"expert": description, "text": continuation}``. Routers that need labels at inference
    (oracle, poly) need ``category``; learned routers decide from the prompt alone.
    """
    from mixroute.routers import router_class
    from mixroute.rundir import load_run

    dev = resolve_device(device)
    run = load_run(run_dir, dev)
    cats = run.data.categories
    routers = list(run.mix.routers.values()) if run.mix is not None else []
    needs_label = any(r.needs_task_ids for r in routers)
    if category is not None and category not in cats:
        raise ValueError(f"--category {category!r} is not one of this run's categories: {', '.join(cats)}")
    if needs_label and category is None:
        raise ValueError(f"router {run.mix.cfg.router!r} routes by label: pass --category (one of "
                         f"{', '.join(cats)})")
    task_ids = [cats.index(category)] if category is not None else None
    ids = run.data.prompt_ids({"instruction": prompt, "context": context, "response": "",
                               "category": category or cats[0]})
    with autocast(dev, precision):
        texts, chosen = generate_texts(run.model, run.mix, run.tok, [ids], task_ids, max_new_tokens, 1, dev)
    if run.mix is None:
        expert = "none (base model)"
    elif gate_level(run.mix) != "sequence":
        expert = f"{gate_level(run.mix)}-level routing ({run.mix.cfg.router}): experts are chosen per token"
    elif any(r.level == "task" for r in routers):
        expert = f"task-level mixing ({run.mix.cfg.router}): the skills allocated to {category or 'the task'}"
    elif router_class(run.mix.cfg.router).experts_for(run.mix.cfg) == 1:
        expert = "0 (single expert)"
    else:
        e = chosen[0]
        name = f" ({cats[e]})" if e < len(cats) and any(r.label_aligned for r in routers) else ""
        expert = f"{e}{name}"
    return {"expert": expert, "text": texts[0]}
