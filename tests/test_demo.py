"""The demo: its data (the `ciphers` suite, and `conventions`), its summary (hand-made results, both outcomes)
and the whole demo on the tiny model (the real-model demo is `make demo`)."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import date

import pytest

from mixroute.config import DataConfig
from mixroute.data import CIPHERS, CONVENTIONS, DataError, load_config_records, synthetic_suite
from mixroute.data.synthetic import CIPHER_DIGITS, CIPHER_SYMBOLS, KEYS, OFFICES, render_cipher, render_convention
from mixroute.demo import summary_lines


@pytest.mark.parametrize("suite, tasks, length", [("ciphers", KEYS, CIPHER_DIGITS), ("conventions", OFFICES, 10)])
def test_suite_is_deterministic_unique_and_short(suite, tasks, length):
    recs = synthetic_suite(per_task=60, seed=0, suite=suite)
    assert recs == synthetic_suite(per_task=60, seed=0, suite=suite)
    assert recs != synthetic_suite(per_task=60, seed=1, suite=suite)
    assert Counter(r.category for r in recs) == {t: 60 for t in tasks}
    for task in tasks:
        prompts = [r.instruction for r in recs if r.category == task]
        assert len(set(prompts)) == 60  # unique inputs within a task: no duplicate across the splits
    assert {len(r.response) for r in recs} == {length}
    with pytest.raises(DataError, match="unknown synthetic suite"):
        synthetic_suite(per_task=2, suite="poetry")


def test_ciphers_tasks_share_the_inputs_and_conflict_at_every_output_digit():
    """Every task draws its input the same way; the instruction differs only by the task's marker (the key's
    name); each key is a permutation of the symbols that moves every symbol, and the keys disagree with each
    other on every symbol, so the same input has a different answer under every task at every position."""
    assert len({gen(random.Random(7))[0].rsplit(" ", 1)[1] for gen in CIPHERS.values()}) == 1
    assert len(KEYS) == 4
    n = len(CIPHER_SYMBOLS)
    for key in KEYS.values():
        assert sorted(key) == sorted(CIPHER_SYMBOLS) and all(key[i] != CIPHER_SYMBOLS[i] for i in range(n))
    for i in range(n):  # every symbol goes to a different symbol under each key: all n - 1 others
        assert {key[i] for key in KEYS.values()} == set(CIPHER_SYMBOLS) - {CIPHER_SYMBOLS[i]}
    recs = synthetic_suite(per_task=40, seed=3, suite="ciphers")
    templates, markers = set(), {}
    for r in recs:
        inp = r.instruction.rsplit(" ", 1)[1]
        assert len(inp) == CIPHER_DIGITS and set(inp) <= set(CIPHER_SYMBOLS) and r.context == ""
        assert set(r.response) <= set(CIPHER_SYMBOLS)
        assert (r.instruction, r.context, r.response) == render_cipher(r.category, inp)
        templates.add(r.instruction.replace(f" {r.category} ", " <key> ").replace(inp, "<digits>"))
        markers.setdefault(r.category, set()).add(r.instruction.replace(inp, "<digits>"))
    assert templates == {"Encode with the <key> key: <digits>"}  # only the marker tells the tasks apart
    assert all(len(v) == 1 for v in markers.values())
    assert len({i for v in markers.values() for i in v}) == len(KEYS)  # ... and it does
    for inp in ("12345123", "33333333", "54321543"):
        answers = [render_cipher(t, inp)[2] for t in KEYS]
        for pos in range(CIPHER_DIGITS):  # a different digit under every task at every position, none the input's
            assert len({a[pos] for a in answers}) == len(KEYS) and inp[pos] not in {a[pos] for a in answers}
    assert render_cipher("amber", "12345123")[2] == "21534215"
    assert render_cipher("delta", "12345123")[2] == "35412354"


def test_conventions_tasks_share_the_inputs_and_conflict_on_the_outputs():
    """Every task draws its input the same way; the instruction differs only by the task's marker (the office);
    the same input has a different answer under every task."""
    # the same random state gives the same input under every task: one input distribution
    assert len({gen(random.Random(7))[0].rsplit(" ", 1)[1] for gen in CONVENTIONS.values()}) == 1
    assert len(OFFICES) == 6
    recs = synthetic_suite(per_task=40, seed=3, suite="conventions")
    templates, markers = set(), {}
    for r in recs:
        iso = r.instruction.rsplit(" ", 1)[1]
        d = date.fromisoformat(iso)
        assert date(1950, 1, 1) <= d <= date(2049, 12, 31) and r.context == ""
        assert (r.instruction, r.context, r.response) == render_convention(r.category, d)
        office = OFFICES[r.category][0]
        assert office in r.instruction
        templates.add(r.instruction.replace(office, "<office>").replace(iso, "<date>"))
        markers.setdefault(r.category, set()).add(r.instruction.replace(iso, "<date>"))
    assert templates == {"Date for the <office> office: <date>"}  # only the marker tells the tasks apart
    assert all(len(v) == 1 for v in markers.values())
    assert len({i for v in markers.values() for i in v}) == len(OFFICES)  # ... and it does
    for d in (date(2023, 4, 7), date(1961, 12, 25), date(2049, 1, 31)):  # day != month: six different answers
        answers = [render_convention(t, d)[2] for t in OFFICES]
        assert len(set(answers)) == len(OFFICES), answers
    assert render_convention("new_york", date(2023, 4, 7))[2] == "04/07/2023"
    assert render_convention("london", date(2023, 4, 7))[2] == "07/04/2023"
    assert render_convention("seoul", date(2023, 4, 7))[2] == "2023.04.07"


def test_data_config_selects_the_suite():
    rs = load_config_records(DataConfig(synthetic_suite="conventions", synthetic_per_task=3))
    assert rs.categories == sorted(OFFICES) and len(rs.records) == 18 and "'conventions'" in rs.source
    rs = load_config_records(DataConfig(synthetic_suite="ciphers", synthetic_per_task=3))
    assert rs.categories == sorted(KEYS) and len(rs.records) == 12 and "'ciphers'" in rs.source
    assert "arithmetic" in load_config_records(DataConfig(synthetic_per_task=3)).categories  # default: formats


BUDGET = {"tasks": 2, "stage1_steps": 10, "stage2_steps": 6, "moa_steps": 26, "mixed_steps": 26, "batch_size": 8,
          "lr": 0.002, "stage2_lr": 0.0005, "per_task": 80}


def _result(method: str, per_category: dict[str, float], router: float | None = None,
            classifier: float | None = None) -> dict:
    values = list(per_category.values())
    return {"method": method, "split": "test",
            "perplexity": {"overall": None, "per_category": per_category, "average": sum(values) / len(values)},
            "router_accuracy": None if router is None else {"overall": router},
            "classifier_accuracy": None if classifier is None else {"overall": classifier}}


def test_summary_when_moa_wins():
    results = {"moa": _result("moa", {"a": 4.0, "b": 10.0, "c": 7.0}, router=1.0, classifier=0.9875),  # avg 7
               "lora_mixed": _result("lora_mixed", {"a": 5.0, "b": 9.0, "c": 10.0})}                      # avg 8
    lines = summary_lines(results, BUDGET)
    text = "\n".join(lines)
    assert lines[0].startswith("Result: MoA wins") and "7.00 against 8.00" in lines[0]
    assert "1.00 lower (12.5% below lora_mixed)" in lines[0] and "lower on 2 of 3 tasks" in lines[0]
    assert "largest MoA gain c (7.00 vs 10.00 for lora_mixed)" in text
    assert "largest MoA loss b (10.00 vs 9.00 for lora_mixed)" in text
    assert "100.0% of the test prompts" in text and "98.8%" in text and "(the router is 1.2 points above it)" in text
    assert "Budget (equal data): MoA 2 tasks x 10 stage-1 steps + 6 stage-2 steps at lr 0.0005 = 26 steps, 208 " \
        in text
    assert "lora_mixed 26 steps, 208 sequences (batch 8, lr 0.002 for stage 1 and lora_mixed, 80 synthetic" in text
    assert "Meaning: with the same training data" in text and "What would change it" not in text
    assert "single mixed LoRA wins" not in text


def test_summary_when_moa_loses():
    results = {"moa": _result("moa", {"a": 12.0, "b": 11.2}, router=1.0, classifier=1.0),   # average 11.6
               "lora_mixed": _result("lora_mixed", {"a": 10.0, "b": 10.44})}                # average 10.22
    lines = summary_lines(results, BUDGET)
    text = "\n".join(lines)
    assert lines[0].startswith("Result: the single mixed LoRA wins") and "10.22 against 11.60 for MoA" in lines[0]
    assert "1.38 lower (MoA is 13.5% above lora_mixed)" in lines[0] and "lower on 0 of 2 tasks" in lines[0]
    assert "largest MoA gain" not in text and "largest MoA loss a (12.00 vs 10.00 for lora_mixed)" in text
    assert "classifier on the same hidden states: 100.0% (the same)" in text
    assert "What would change it: the router is not the problem (100.0% routed right)" in text
    assert "--stage1-steps 20: lora_mixed then gets 46 steps" in text
    assert "and at this budget one LoRA copes with these 2 tasks." in text
    assert "MoA wins" not in text and "Meaning:" not in text


def test_summary_with_the_label_routed_experts():
    """lora_single (the experts picked by the label) says whether the experts or MoA's stage 2 lost."""
    mixed = _result("lora_mixed", {"a": 10.0, "b": 10.44})                                 # average 10.22
    behind = {"moa": _result("moa", {"a": 12.0, "b": 11.2}, router=1.0, classifier=1.0),   # average 11.6
              "lora_mixed": mixed, "lora_single": _result("lora_single", {"a": 11.0, "b": 11.0})}
    text = "\n".join(summary_lines(behind, BUDGET))
    assert "lora_single) reach 11.00, above lora_mixed's 10.22; MoA's learned routing and stage 2 move that to " \
           "11.60 (+0.60)" in text
    assert "Average test perplexity per method (lower is better, 2 tasks): lora_mixed 10.22, lora_single 11.00, " \
           "moa 11.60." in text
    assert "the router is not the problem" in text

    stage2 = {**behind, "lora_single": _result("lora_single", {"a": 9.0, "b": 10.0}),   # 9.5: the experts win
              "base": _result("base", {"a": 40.0, "b": 60.0})}
    text = "\n".join(summary_lines(stage2, {**BUDGET, "suite": "conventions"}))
    assert "per method (lower is better, 2 tasks): base 50.00, lora_mixed 10.22, lora_single 9.50, moa 11.60." \
        in text
    assert "80 synthetic records per task of the 'conventions' suite)." in text
    assert "reach 9.50, below lora_mixed's 10.22" in text and "(+2.10)" in text
    assert "the experts alone beat the shared LoRA" in text and "the router is not the problem" not in text


def test_summary_names_a_poor_router_a_tie_and_unequal_data():
    results = {"moa": _result("moa", {"a": 9.0}, router=0.5, classifier=0.75),
               "lora_mixed": _result("lora_mixed", {"a": 9.05})}
    lines = summary_lines(results, {**BUDGET, "mixed_steps": 30})
    text = "\n".join(lines)
    assert lines[0].startswith("Result: a tie") and "(-0.05, -0.6%)" in lines[0]
    assert "(the router is 25.0 points below it)" in text
    assert "sends 50% of the prompts to another task's expert" in text
    assert "--steps 12" in text and "UNEQUAL data" in text and "not like for like" in text

    results["moa"]["router_accuracy"]["overall"] = 1.0
    text = "\n".join(summary_lines(results, BUDGET))
    assert "the router is not the problem" in text and "at this budget the two are level" in text
    assert "Budget (equal data)" in text and "not like for like" not in text


def test_summary_without_router_accuracy():
    results = {"moa": _result("moa", {"a": 3.0}), "lora_mixed": _result("lora_mixed", {"a": 4.0})}
    text = "\n".join(summary_lines(results, BUDGET))
    assert "MoA wins" in text and "Router accuracy: none" in text


@pytest.mark.slow
def test_demo_runs_on_the_tiny_model_and_shows_progress(tmp_path, capsys):
    """One run of the whole demo (the slow part of this file): its results, its summary, equal data, and a
    progress line for every evaluation phase."""
    from mixroute.demo import main

    results = main(["--model", "tiny", "--out", str(tmp_path), "--steps", "2", "--stage1-steps", "1",
                    "--per-task", "4", "--max-generate", "1", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert {"base", "lora_mixed", "lora_single", "moa"} <= set(results)
    assert "suite 'ciphers': 4 tasks (amber, birch, cedar, delta)" in out
    assert "perplexity" in out and "| **average** |" in out and "Router accuracy" in out
    for phase in ("eval moa: perplexity (test)", "eval moa: generation", "eval moa: classifier (train split)",
                  "eval lora_mixed: perplexity (test)"):
        assert phase in out, phase
    assert results["summary"][0].startswith("Result: ")
    assert any(line.startswith("Average test perplexity per method") and "base " in line and "moa " in line
               for line in results["summary"])
    assert results["moa"]["classifier_accuracy"] is not None and results["lora_single"]["classifier_accuracy"] is None
    assert results["moa"]["categories"] == sorted(KEYS)
    # equal data: lora_mixed takes 4 tasks x 1 stage-1 step + 2 stage-2 steps
    mixed = [json.loads(line) for line in (tmp_path / "lora_mixed" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in mixed if "loss" in r) == 4 * 1 + 2
    saved = json.loads((tmp_path / "demo_summary.json").read_text())
    assert saved["summary"] == results["summary"] and saved["budget"]["mixed_steps"] == 6
    assert (tmp_path / "moa" / "eval.json").is_file()
