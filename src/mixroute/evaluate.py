"""Evaluation of a run directory: perplexity, BLEU / ROUGE-L, router accuracy, classifier baseline, gates.

Metric functions are pure (tensors / strings in, dicts out) so they can be checked against hand-computed
values; ``evaluate_run`` loads a run directory, computes them all on the held-out split and writes
``eval.json`` (schema in docs/architecture.md).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from mixroute.train.loop import HeldOut, held_out_pass


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
    """``sequence``, ``token`` or ``rank`` (SMoRA's gates are over single ranks)."""
    if mix is None:
        return "sequence"
    if mix.cfg.router == "rank":
        return "rank"
    levels = {getattr(r, "level", "sequence") for r in mix.routers.values()}
    return "token" if "token" in levels else "sequence"


def router_read_layer(mix: nn.Module) -> int:
    """The decoder layer whose input the label-aligned router reads (for the classifier baseline): the MoP
    gate's layer, layer 0 for a global task router, the middle layer for per-layer task routers."""
    for r in mix.routers.values():
        if hasattr(r, "layer") and isinstance(r.layer, int):
            return r.layer
    if "global" in mix.routers:
        return 0
    return mix.model.config.num_hidden_layers // 2


# ------------------------------------------------------------------ generation
@torch.no_grad()
def generate_texts(model: nn.Module, mix: Optional[nn.Module], tok: Any, prompts: Sequence[list[int]],
                   task_ids: Sequence[int], max_new_tokens: int, batch_size: int,
                   device: torch.device | str = "cpu") -> tuple[list[str], list[int]]:
    """Greedy, batched, left-padded generation with the KV cache. Returns the decoded continuations and, for
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
            t = torch.tensor(task_ids[start:start + batch_size], device=device)
            out = mix.generate(input_ids=input_ids, attention_mask=attn, task_ids=t, **kwargs)
            chosen += _prefill_choice(mix, len(ids))
        else:
            out = model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
            chosen += [-1] * len(ids)
        texts += [t.strip() for t in tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]
    return texts, chosen


def _prefill_choice(mix: nn.Module, n: int) -> list[int]:
    kept = getattr(mix.context, "kept", {})
    ws = [r.weights for r in kept.values() if getattr(r, "weights", None) is not None and r.weights.dim() == 2]
    if not ws:
        return [-1] * n
    return torch.stack([w.float() for w in ws]).mean(0).argmax(-1)[:n].tolist()


# ------------------------------------------------------------------ a run directory
def evaluate_run(run_dir: str | Path, max_new_tokens: Optional[int] = None, max_generate: Optional[int] = None,
                 split: Optional[str] = None, write: bool = True, progress: bool = False,
                 classifier: bool = True) -> dict[str, Any]:
    """Evaluate ``run_dir`` (its config.yaml and final/ mixture) and write ``eval.json``.

    ``max_generate=0`` skips generation (BLEU / ROUGE-L come out empty); ``classifier=False`` skips the
    logistic-regression baseline, which runs the whole train split through the model once more.
    """
    from mixroute.config import atomic_write_text
    from mixroute.train.centralized import load_run
    from mixroute.methods import is_label_aligned

    t0 = time.time()
    run = load_run(run_dir)
    cfg, model, tok, mix, data = run.cfg, run.model, run.tok, run.mix, run.data
    split = split or cfg.eval.split
    max_new_tokens = max_new_tokens or cfg.eval.max_new_tokens
    max_generate = max_generate if max_generate is not None else cfg.eval.max_generate
    cats = data.categories
    aligned = is_label_aligned(mix.cfg if mix is not None else None)
    layer = router_read_layer(mix) if aligned else None

    held = held_out_pass(model, mix, data.batches(split, cfg.eval.batch_size), capture_layer=layer)
    result: dict[str, Any] = {"run": Path(run_dir).name, "method": cfg.train.method, "split": split,
                              "categories": list(cats),
                              "perplexity": perplexity(held.nll, held.tokens, held.task_ids, cats)}

    examples = data.generation_examples(split, max_generate) if max_generate > 0 else []
    hyps, chosen = generate_texts(model, mix, tok, [e["prompt_ids"] for e in examples],
                                  [e["task_id"] for e in examples], max_new_tokens,
                                  cfg.eval.batch_size) if examples else ([], [])
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
        train_held = held_out_pass(model, mix, data.batches("train", cfg.eval.batch_size), capture_layer=layer)
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
        atomic_write_text(Path(run_dir) / "eval.json", json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------ one prompt
def routed_generate(run_dir: str | Path, prompt: str, max_new_tokens: int = 64, category: Optional[str] = None,
                    context: str = "") -> dict[str, Any]:
    """Answer one prompt with a run's mixture; the router picks the expert (``mixroute generate``).

    Returns ``{"expert": description, "text": continuation}``. Methods that route by label (oracle, poly)
    need ``category``; for learned routers it is ignored by routing.
    """
    from mixroute.train.centralized import load_run

    run = load_run(run_dir)
    cats = run.data.categories
    needs_label = run.mix is not None and run.mix.cfg.router in ("oracle", "poly") and run.mix.cfg.poly_mode != "mu"
    if category is not None and category not in cats:
        raise ValueError(f"--category {category!r} is not one of this run's categories: {', '.join(cats)}")
    if needs_label and category is None:
        raise ValueError(f"router {run.mix.cfg.router!r} routes by label: pass --category (one of "
                         f"{', '.join(cats)})")
    task = cats.index(category) if category is not None else 0
    ids = run.data.prompt_ids({"instruction": prompt, "context": context, "response": "",
                               "category": category or cats[0]})
    texts, chosen = generate_texts(run.model, run.mix, run.tok, [ids], [task], max_new_tokens, 1)
    if run.mix is None:
        expert = "none (base model)"
    elif gate_level(run.mix) != "sequence":
        expert = f"token-level routing ({run.mix.cfg.router}): experts are chosen per token"
    elif run.mix.cfg.num_experts == 1:
        expert = "0 (single expert)"
    else:
        e = chosen[0]
        name = f" ({cats[e]})" if e < len(cats) and run.mix.cfg.router in ("task", "gate", "oracle") else ""
        expert = f"{e}{name}"
    return {"expert": expert, "text": texts[0]}
