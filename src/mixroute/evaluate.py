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
from mixroute.routers.base import per_example


# ------------------------------------------------------------------ the held-out pass
@dataclass
class HeldOut:
    """Per-example results of ``held_out_pass`` (N examples, concatenated over batches)."""

    nll: Tensor                                   # (N,) summed NLL of the response tokens
    tokens: Tensor                                # (N,) response tokens
    task_ids: Tensor                              # (N,)
    routing: dict[str, Tensor] = field(default_factory=dict)       # key -> (N, E) weights applied per example
    router_probs: dict[str, Tensor] = field(default_factory=dict)  # key -> (N, E) softmax of router logits


@torch.no_grad()
def held_out_pass(model: nn.Module, mix: Optional[nn.Module], batches: Iterable[dict[str, Tensor]],
                  device: torch.device | str = "cpu") -> HeldOut:
    """Teacher-forced pass over held-out batches: response-token NLL per example and the routing weights each
    router applied to each example."""
    from mixroute.arch import lm_head_logits

    decoder = model.get_decoder()
    runner = mix if mix is not None else model
    modes = {m: m.training for m in runner.modules()}  # restored after: a recipe calls this mid-training
    runner.eval()
    nll, toks, tasks = [], [], []
    routing: dict[str, list[Tensor]] = {}
    probs: dict[str, list[Tensor]] = {}
    try:
        for raw in batches:
            b = to_device(raw, device)
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
            if mix is not None:
                for key, w in mix.context.routing.items():
                    per_token = mix.routers[key].level in ("token", "rank")
                    vec = per_example(w, b["attention_mask"].bool() if per_token else None)
                    routing.setdefault(key, []).append(vec.cpu())
                for key, lg in mix.context.router_logits.items():
                    probs.setdefault(key, []).append(lg.detach().float().softmax(-1).cpu())
    finally:
        for m, training in modes.items():
            m.train(training)
    return HeldOut(
        nll=torch.cat(nll) if nll else torch.zeros(0), tokens=torch.cat(toks) if toks else torch.zeros(0),
        task_ids=torch.cat(tasks) if tasks else torch.zeros(0, dtype=torch.long),
        routing={k: torch.cat(v) for k, v in routing.items()}, router_probs={k: torch.cat(v) for k, v in probs.items()},
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
def proportion_interval(correct: int, total: int) -> Optional[list[float]]:
    """95% Wilson score interval of a proportion (scipy)."""
    from scipy.stats import binomtest

    if total <= 0:
        return None
    ci = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def router_accuracy(predicted: Sequence[int], labels: Sequence[int], categories: Sequence[str],
                    num_experts: int) -> dict[str, Any]:
    """Top-1 routing accuracy overall (with its 95% Wilson interval) and per category, and the confusion matrix
    ``confusion[label][expert]``."""
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
    return {"overall": correct / total if total else None, "interval": proportion_interval(correct, total),
            "n": total, "per_category": per, "labels": list(categories), "confusion": confusion}


def applied_experts(held: HeldOut, keys: Optional[Sequence[str]] = None) -> dict[str, Tensor]:
    """Router key -> (N,) the top-1 expert each example was given by that router, as the forward pass applied
    it (its weights, not its logits: a top-1 router applies exactly its argmax, a forced route its override)."""
    keys = list(keys) if keys is not None else list(held.routing)
    return {k: held.routing[k].argmax(-1) for k in keys}


def applied_router_accuracy(held: HeldOut, categories: Sequence[str], num_experts: int,
                            keys: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Router accuracy of the decisions the forward pass applied. One router (a global one, MoP's gate): its
    decision per example. One router per layer: every (example, layer) decision counts, ``per_router`` gives
    each layer's accuracy and ``agreement`` the share of examples whose layers all chose the same expert; the
    overall interval is over examples (a bootstrap of the per-example share of correct layers), since one
    example's layers are not independent."""
    applied = applied_experts(held, keys)
    if not applied:
        return {}
    labels = held.task_ids.long()
    stacked = torch.stack(list(applied.values()), dim=1)               # (N, K)
    result = router_accuracy(stacked.flatten().tolist(), labels.repeat_interleave(stacked.shape[1]).tolist(),
                             categories, num_experts)
    result["routers"] = len(applied)
    if len(applied) > 1:
        per = {k: float((v == labels).float().mean()) for k, v in applied.items()}
        result["per_router"] = per
        result["agreement"] = float((stacked == stacked[:, :1]).all(1).float().mean())
        result["interval"] = _bootstrap_mean((stacked == labels[:, None]).float().mean(1))
        result["n"] = len(labels)
    return result


def _bootstrap_mean(values: Tensor) -> Optional[list[float]]:
    """95% percentile bootstrap interval of a mean (scipy, seeded)."""
    from scipy.stats import bootstrap

    if len(values) < 2 or bool((values == values[0]).all()):
        return None if len(values) < 1 else [float(values[0]), float(values[0])]
    res = bootstrap((values.numpy(),), lambda x, axis: x.mean(axis=axis), confidence_level=0.95,
                    n_resamples=2000, method="percentile", random_state=0)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def classifier_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                        categories: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """The standalone baseline of MoA's table 3: logistic regression on the features a router reads, fit to
    convergence on the train split, scored on the held-out split (with a 95% Wilson interval)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(train_y.tolist())) < 2:
        pred = [int(train_y[0])] * len(test_y)
    else:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
        clf.fit(train_x.numpy(), train_y.numpy())
        pred = clf.predict(test_x.numpy()).tolist()
    acc = router_accuracy(pred, test_y.tolist(), categories, len(categories))
    return {"overall": acc["overall"], "interval": acc["interval"], "n": acc["n"],
            "per_category": acc["per_category"]}


@torch.no_grad()
def frozen_features(mix: nn.Module, batches: Iterable[dict[str, Tensor]], layer: int,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """((N, H) features, (N,) labels): what a sequence router at ``layer`` reads from the frozen base (no
    expert applied): the hidden states entering that layer, pooled over the prompt without attention sinks.
    The classifier baseline reads exactly these; a global router reads them too."""
    from mixroute.routers.base import pool_prompt

    feats, labels = [], []
    for raw in batches:
        b = to_device(raw, device)
        mask = b["attention_mask"].bool()
        if b.get("prompt_mask") is not None:
            mask = mask & b["prompt_mask"].bool()
        hidden = mix.frozen_layer_input(layer, kwargs={"input_ids": b["input_ids"],
                                                       "attention_mask": b["attention_mask"]})
        feats.append(pool_prompt(hidden.float(), mask).cpu())
        labels.append(b["task_ids"].cpu())
    return torch.cat(feats), torch.cat(labels)


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
    """The decoder layer whose frozen-base input the classifier baseline reads: the router's own when there
    is one router (MoP's gate, a global task router), the middle layer when every layer has one."""
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
    from mixroute.methods import is_label_aligned

    cats = data.categories
    held = held_out_pass(model, mix, data.batches("validation", batch_size, category=category), device=device)
    ppl = perplexity(held.nll, held.tokens, held.task_ids, cats)
    row = {"step": step, "split": "validation", "ppl": ppl["overall"], "ppl_average": ppl["average"],
           "ppl_per_category": ppl["per_category"]}
    if category is None and mix is not None and is_label_aligned(mix.cfg):
        # the decisions this pass applied, logged at every validation: a stage 2 that moves its routers away
        # from the labels shows here, not only in the final evaluation
        acc = applied_router_accuracy(held, cats, mix.cfg.num_experts)
        row["router_accuracy"] = acc["overall"]
        if "per_router" in acc:
            row["router_accuracy_per_router"] = acc["per_router"]
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
                   device: torch.device | str = "cpu", applied: bool = False) -> tuple[list[str], list]:
    """Greedy, batched, left-padded generation with the KV cache. ``task_ids`` (None: no labels, for routers
    that do not need them) are visible to the routers. Returns the decoded continuations and, for
    sequence-level routers, the expert chosen at the prefill (``Mixture.chosen_experts``; -1 otherwise) or,
    with ``applied``, every router's applied expert per prompt (a list per prompt, empty otherwise)."""
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
            if applied:
                per_router = mix.applied_experts() or {}
                chosen += [[v[i] for v in per_router.values()] for i in range(len(ids))]
            else:
                chosen += mix.chosen_experts() or [-1] * len(ids)
        else:
            out = model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
            chosen += [[] if applied else -1 for _ in ids]
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
        from rich.progress import TextColumn

        from mixroute.progress import bar

        self.progress = bar(TextColumn("{task.fields[unit]}"))
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
    held = held_out_pass(model, mix, phases.track(batches, f"perplexity ({split})", "batches"), device=device)
    result: dict[str, Any] = {"run": Path(run_dir).name, "method": cfg.train.method, "split": split,
                              "categories": list(cats),
                              "perplexity": perplexity(held.nll, held.tokens, held.task_ids, cats),
                              # what a paired comparison of two runs on the same split needs (bootstrap intervals)
                              "per_example": {"nll": [round(float(x), 5) for x in held.nll],
                                              "tokens": held.tokens.tolist(), "task_ids": held.task_ids.tolist()}}

    examples = data.generation_examples(split, max_generate) if max_generate > 0 else []
    hyps, applied = [], []
    bs = cfg.eval.batch_size
    chunks = [examples[i:i + bs] for i in range(0, len(examples), bs)]  # generate_texts' own batches
    for chunk in phases.track(chunks, "generation", "prompts", [len(c) for c in chunks]):
        h, c = generate_texts(model, mix, tok, [e["prompt_ids"] for e in chunk], [e["task_id"] for e in chunk],
                              max_new_tokens, bs, device, applied=True)
        hyps += h
        applied += c
    labels = [e["task_id"] for e in examples]
    result["bleu"], result["rougeL"] = bleu_rouge(hyps, [e["reference"] for e in examples], labels, cats)

    result["router_accuracy"] = result["classifier_accuracy"] = None
    if aligned:
        num_experts = mix.cfg.num_experts
        result["router_accuracy"] = applied_router_accuracy(held, cats, num_experts)
        decisions = [(e, y) for row, y in zip(applied, labels) for e in row]
        if decisions:
            result["router_accuracy"]["generation"] = router_accuracy(
                [e for e, _ in decisions], [y for _, y in decisions], cats, num_experts)["overall"]
    if aligned and classifier:
        every = len(data.examples["train"])   # the whole train split, as the router was fit on
        train_batches = data.batches("train", cfg.eval.batch_size, max_per_category=every)
        train_x, train_y = frozen_features(mix, phases.track(train_batches, "classifier (train split)", "batches"),
                                           layer, device)
        test_x, test_y = frozen_features(mix, batches, layer, device)
        result["classifier_accuracy"] = classifier_accuracy(train_x, train_y, test_x, test_y, cats,
                                                            seed=cfg.train.seed)
        result["classifier_accuracy"]["layer"] = layer
    result["training"] = training_outcome(rundir.read_metrics(run_dir))
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


def training_outcome(metrics: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Whether the (last stage of) training moved away from its start, from the run's early-stopping line:
    ``trained`` is False when the kept weights are those validated before the first step (the run is then
    not a result of the method, and reports flag it); ``routers_pretrained`` says whether that start already
    held routers fitted by router pre-training (an epoch of it beat their initialisation). None when the run
    did not early-stop (it ends on its last step) or logged no such line."""
    rows = [m for m in metrics if m.get("stage") == "early_stopping" and "category" not in m]
    if not rows:
        return None
    r = rows[-1]
    start = r.get("start_step")
    trained = r.get("trained")
    if trained is None and start is not None and r.get("best_step") is not None:
        trained = r["best_step"] > start
    return {"start_step": start, "best_step": r.get("best_step"), "stopped_step": r.get("stopped_step"),
            "trained": trained, "routers_pretrained": routers_pretrained(metrics)}


def routers_pretrained(metrics: Sequence[dict[str, Any]]) -> bool:
    """Whether a run's router pre-training moved its routers (an epoch beat their initialisation), from its
    metrics.jsonl rows."""
    return any(m.get("stage") == "router_pretrain" and (m.get("best_epoch") or 0) > 0 for m in metrics)


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
        texts, applied = generate_texts(run.model, run.mix, run.tok, [ids], task_ids, max_new_tokens, 1, dev,
                                        applied=True)
    if run.mix is None:
        expert = "none (base model)"
    elif gate_level(run.mix) != "sequence":
        expert = f"{gate_level(run.mix)}-level routing ({run.mix.cfg.router}): experts are chosen per token"
    elif any(r.level == "task" for r in routers):
        expert = f"task-level mixing ({run.mix.cfg.router}): the skills allocated to {category or 'the task'}"
    elif router_class(run.mix.cfg.router).experts_for(run.mix.cfg) == 1:
        expert = "0 (single expert)"
    else:
        # what the forward applied: one expert, or (per-layer routers that disagree) each one with its layers
        aligned = any(r.label_aligned for r in routers)
        counts = torch.bincount(torch.tensor(applied[0])).tolist()
        parts = [(n, e) for e, n in enumerate(counts) if n]
        parts.sort(key=lambda p: (-p[0], p[1]))
        named = [f"{e}" + (f" ({cats[e]})" if aligned and e < len(cats) else "") for _, e in parts]
        expert = named[0] if len(parts) == 1 else "; ".join(
            f"{name} at {n} of {len(applied[0])} layers" for (n, _), name in zip(parts, named))
    return {"expert": expert, "text": texts[0]}
