"""Metrics against hand-computed values, the compare table, and eval.json of a tiny trained run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mixroute.evaluate import (HeldOut, bleu_rouge, classifier_accuracy, evaluate_run, gate_matrix, held_out_pass,
                               perplexity, router_accuracy, applied_router_accuracy)
from mixroute.report.compare import comparison_table, format_metric, to_csv, to_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_perplexity_is_token_weighted():
    nll = torch.tensor([2.0, 4.0, 3.0])
    tokens = torch.tensor([1, 3, 2])
    tasks = torch.tensor([0, 1, 1])
    p = perplexity(nll, tokens, tasks, ["a", "b"])
    assert p["overall"] == pytest.approx(math.exp(9 / 6))
    assert p["per_category"]["a"] == pytest.approx(math.exp(2.0))
    assert p["per_category"]["b"] == pytest.approx(math.exp(7 / 5))
    assert p["average"] == pytest.approx((math.exp(2.0) + math.exp(7 / 5)) / 2)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(fresh_tiny):
    """A model whose logits are all equal has perplexity = vocabulary size, whatever the text."""
    model, _ = fresh_tiny
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    ids = torch.randint(0, 500, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "prompt_mask": labels == -100, "task_ids": torch.tensor([0, 1])}
    held = held_out_pass(model, None, [batch])
    assert held.tokens.tolist() == [6, 6]
    p = perplexity(held.nll, held.tokens, held.task_ids, ["x", "y"])
    assert p["overall"] == pytest.approx(model.config.vocab_size, rel=1e-4)


def test_held_out_pass_restores_training_modes(fresh_tiny):
    """The recipe validates mid-training: experts and routers stay in training mode, the base in eval mode."""
    from mixroute.config import MixtureConfig
    from mixroute.mixture import Mixture
    from mixroute.train.loop import train_mode

    model, _ = fresh_tiny
    mix = Mixture.attach(model, MixtureConfig(router="task", num_experts=2, num_tasks=2))
    train_mode(mix)
    before = [m.training for m in mix.modules()]
    ids = torch.randint(0, 500, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "prompt_mask": labels == -100, "task_ids": torch.tensor([0, 1])}
    held = held_out_pass(model, mix, [batch])
    assert held.tokens.tolist() == [5, 5] and held.routing
    assert [m.training for m in mix.modules()] == before and mix.training and not model.training


def test_bleu_and_rouge_on_fixed_strings():
    hyps = ["the cat sat on the mat", "the cat sat", "completely different words here"]
    refs = ["the cat sat on the mat", "the cat sat on the mat", "nothing in common at all"]
    bleu, rouge = bleu_rouge(hyps, refs, [0, 1, 2], ["same", "prefix", "other"])
    assert bleu["per_category"]["same"] == pytest.approx(100.0)
    assert rouge["per_category"]["same"] == pytest.approx(100.0)
    # LCS 3 of 3 hypothesis / 6 reference words: P=1, R=0.5, F=2/3
    assert rouge["per_category"]["prefix"] == pytest.approx(200 / 3)
    assert bleu["per_category"]["other"] == pytest.approx(0.0) and rouge["per_category"]["other"] == 0.0
    import sacrebleu

    assert bleu["per_category"]["prefix"] == pytest.approx(sacrebleu.corpus_bleu([hyps[1]], [[refs[1]]]).score)
    assert rouge["average"] == pytest.approx((100 + 200 / 3 + 0) / 3)


def test_router_accuracy_and_confusion():
    acc = router_accuracy([0, 0, 1, 1, 2, 0], [0, 0, 1, 2, 2, 2], ["a", "b", "c"], 3)
    assert acc["overall"] == pytest.approx(4 / 6)
    assert acc["per_category"] == {"a": 1.0, "b": 1.0, "c": pytest.approx(1 / 3)}
    assert acc["confusion"] == [[2, 0, 0], [0, 1, 0], [1, 1, 1]]
    assert acc["labels"] == ["a", "b", "c"]


def test_router_accuracy_counts_every_applied_layer_decision():
    """A vote over layers would call both examples right; what ran was 3 right decisions out of 4."""
    routing = {"layer_0": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "layer_1": torch.tensor([[0.0, 1.0], [0.0, 1.0]])}
    probs = {"layer_0": torch.tensor([[0.6, 0.4], [0.1, 0.9]]), "layer_1": torch.tensor([[0.45, 0.55], [0.2, 0.8]])}
    held = HeldOut(nll=torch.zeros(2), tokens=torch.ones(2), task_ids=torch.tensor([0, 1]), routing=routing,
                   router_probs=probs)
    acc = applied_router_accuracy(held, ["a", "b"], 2)
    assert acc["overall"] == pytest.approx(3 / 4)
    assert acc["per_router"] == {"layer_0": 1.0, "layer_1": 0.5}
    assert acc["agreement"] == 0.5 and acc["routers"] == 2 and acc["n"] == 2
    assert acc["confusion"] == [[1, 1], [0, 2]]
    one = applied_router_accuracy(HeldOut(nll=torch.zeros(2), tokens=torch.ones(2), task_ids=torch.tensor([0, 1]),
                                          routing={"global": routing["layer_1"]}), ["a", "b"], 2)
    assert one["overall"] == 0.5 and "per_router" not in one
    assert one["interval"][0] < 0.5 < one["interval"][1]


def test_classifier_baseline_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    y_train, y_test = torch.arange(3).repeat(10), torch.arange(3).repeat(4)
    x_train = centers[y_train] + torch.randn(30, 2, generator=g) * 0.1
    x_test = centers[y_test] + torch.randn(12, 2, generator=g) * 0.1
    acc = classifier_accuracy(x_train, y_train, x_test, y_test, ["a", "b", "c"])
    assert acc["overall"] == 1.0 and acc["per_category"] == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_gate_matrix_averages_per_category_and_layer():
    routing = {"layer_0": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]),
               "layer_1": torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.5, 0.5]])}
    held = HeldOut(nll=torch.zeros(3), tokens=torch.ones(3), task_ids=torch.tensor([0, 1, 1]), routing=routing)
    weights, layers = gate_matrix(held, 2)
    assert weights == [[0.5, 0.5], [0.25, 0.75]]
    assert layers["0"] == [[1.0, 0.0], [0.25, 0.75]] and layers["1"] == [[0.0, 1.0], [0.25, 0.75]]


def _fake_eval(run: str, cats: list[str], base: float) -> dict:
    per = {c: base + i for i, c in enumerate(cats)}
    return {"run": run, "method": run, "categories": cats,
            "perplexity": {"overall": base, "per_category": per, "average": base + 0.5},
            "bleu": {"average": 10.0, "per_category": per}, "rougeL": {"average": 20.0, "per_category": per}}


def test_compare_table_shape():
    evals = [_fake_eval("moa", ["a", "b"], 3.0), _fake_eval("lora_mixed", ["a", "b"], 4.0)]
    table = comparison_table(evals)
    assert table.groups == ["moa", "lora_mixed"] and table.metrics == ["PPL", "BLEU", "ROUGE-L"]
    assert [r[0] for r in table.rows] == ["a", "b", "average"]
    assert all(len(v) == 6 for _, v in table.rows)
    assert table.rows[-1][1][:3] == [3.5, 10.0, 20.0]
    md = to_markdown(table).splitlines()
    assert len(md) == 2 + 3 and md[0].count("|") == 8
    csv = to_csv(table).splitlines()
    assert csv[0].split(",")[1] == "moa PPL" and len(csv) == 4
    assert (format_metric(None, "PPL"), format_metric(3.14159, "PPL"), format_metric(30.1, "BLEU")) == \
        ("-", "3.142", "30.10")


def test_evaluate_run_writes_the_eval_json_schema(tmp_path):
    from mixroute.config import load_config
    from mixroute.train import train

    cfg = load_config(ROOT / "configs" / "moa.yaml", [
        "model.name=tiny", "data.synthetic_per_task=6", "data.max_length=48", "train.max_steps=2",
        "train.stage1_steps=1", "train.eval_every=0", "train.save_every=0", "eval.max_eval=3",
        f"output_dir={tmp_path / 'moa'}"])
    run = train(cfg, progress=False)
    result = evaluate_run(run, max_new_tokens=3, max_generate=2)
    saved = json.loads((run / "eval.json").read_text())
    assert saved["method"] == "moa" and saved["split"] == "test"
    for key in ("perplexity", "bleu", "rougeL", "router_accuracy", "classifier_accuracy", "trainable_parameters",
                "generation", "categories"):
        assert key in saved, key
    cats = saved["categories"]
    assert set(saved["perplexity"]["per_category"]) == set(cats) and saved["perplexity"]["overall"] > 1
    acc = saved["router_accuracy"]
    assert len(acc["confusion"]) == len(cats) and sum(map(sum, acc["confusion"])) > 0
    assert 0 <= saved["classifier_accuracy"]["overall"] <= 1
    lo, hi = saved["classifier_accuracy"]["interval"]
    assert lo <= saved["classifier_accuracy"]["overall"] <= hi
    assert saved["generation"] ["max_new_tokens"] == 3
    assert result["trainable_parameters"] > 0

    # perplexity-only: no generation, no classifier; the same perplexity and router accuracy
    lean = evaluate_run(run, max_generate=0, classifier=False, write=False)
    routed = {k: v for k, v in result["router_accuracy"].items() if k != "generation"}  # routing while generating
    assert lean["perplexity"] == result["perplexity"] and lean["router_accuracy"] == routed
    assert lean["classifier_accuracy"] is None and lean["bleu"]["average"] is None
    assert lean["generation"]["examples"] == 0
    assert json.loads((run / "eval.json").read_text()) == saved  # write=False left it alone
