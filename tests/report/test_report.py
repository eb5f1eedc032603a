"""`mixroute report` from fixture run directories (tiny real trainings, see tests/fixtures/runs/make_fixtures.py):
every figure present and decodable, tables equal to eval.json, partial runs, --layer, federated rounds, CLI
exit codes, --watch with a real writer thread, TensorBoard event files, a light package import."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixroute.cli import app
from mixroute.report import ReportError, write_report

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "runs"
RUNS = ["moa", "lora_mixed", "mop", "partial"]
runner = CliRunner()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The full report of every fixture (3 evaluated runs, a partial one, a folder of 4 pruned models)."""
    out = tmp_path_factory.mktemp("report")
    warnings: list[str] = []
    html_path = write_report([FIX / r for r in RUNS] + [FIX / "pruned"], out, warn=warnings.append)
    return out, html_path.read_text(), (out / "report.md").read_text(), warnings


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes the whole image: a truncated PNG fails here
        return im.size


def _md_table(md: str, first_header: str, after: str = "") -> dict[str, dict[str, str]]:
    """Markdown table whose header row starts with ``first_header`` (after the heading ``after``) as
    {row label: {column: cell}} with bold markers removed."""
    lines = md[md.index(after):].splitlines() if after else md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    table = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip().strip("*") for c in ln.strip("|").split("|")]
        table[cells[0]] = dict(zip(header[1:], cells[1:]))
    return table


@pytest.mark.slow
def test_every_figure_present_and_decodes(report):
    out, html, md, _ = report
    expected = {"confusion_0_moa", "confusion_2_mop", "gates_0_moa", "gates_1_lora_mixed", "gates_2_mop", "curves",
                "ppl_per_category_0_moa", "ppl_per_category_1_lora_mixed", "ppl_per_category_2_mop",
                "ppl_per_category_3_partial", "prune_sparsity"}
    assert {p.stem for p in out.glob("*.png")} == expected
    embedded = re.findall(r'<figure id="fig-([^"]+)"><img src="data:image/png;base64,([^"]+)"', html)
    assert {name for name, _ in embedded} == expected
    for name, b64 in embedded:
        data = base64.b64decode(b64)
        assert data == (out / f"{name}.png").read_bytes()
        assert len(data) > 10_000, name
        w, h = _png_size(data)
        assert w > 300 and h > 200, (name, w, h)
        assert "![" in md and f"({name}.png)" in md
    assert html.count("<img ") == len(expected)
    # self-contained: no external resource of any kind
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<link" not in html


def test_comparison_table_matches_eval_json(report):
    _, _, md, _ = report
    table = _md_table(md, "category", after="## Comparison")
    evals = {r: json.loads((FIX / r / "eval.json").read_text()) for r in ("moa", "lora_mixed", "mop")}
    for run, e in evals.items():
        for cat in e["categories"]:
            assert table[cat][f"{run} PPL"] == f"{e['perplexity']['per_category'][cat]:.3f}"
            assert table[cat][f"{run} BLEU"] == f"{e['bleu']['per_category'][cat]:.2f}"
            assert table[cat][f"{run} ROUGE-L"] == f"{e['rougeL']['per_category'][cat]:.2f}"
        assert table["average"][f"{run} PPL"] == f"{e['perplexity']['average']:.3f}"
    # best per row: the lowest perplexity is bold (markdown) and highlighted (HTML)
    for cat in evals["moa"]["categories"]:
        best = min(evals, key=lambda r: evals[r]["perplexity"]["per_category"][cat])
        assert f"**{evals[best]['perplexity']['per_category'][cat]:.3f}**" in md


def test_best_cells_highlighted_in_html(report):
    _, html, _, _ = report
    e = json.loads((FIX / "moa" / "eval.json").read_text())
    others = [json.loads((FIX / r / "eval.json").read_text()) for r in ("lora_mixed", "mop")]
    best_avg = min([e] + others, key=lambda x: x["perplexity"]["average"])["perplexity"]["average"]
    assert f'<td class="num best">{best_avg:.3f}</td>' in html


def test_accuracy_and_parameter_tables_match_eval_json(report):
    _, _, md, _ = report
    acc = _md_table(md, "category", after="## Router accuracy")
    params = _md_table(md, "run", after="## Trainable parameters")
    for run in ("moa", "mop"):
        e = json.loads((FIX / run / "eval.json").read_text())
        assert acc["overall"][f"{run} router"] == f"{e['router_accuracy']['overall']:.1%}"
        assert acc["overall"][f"{run} classifier"] == f"{e['classifier_accuracy']['overall']:.1%}"
        for cat, v in e["router_accuracy"]["per_category"].items():
            assert acc[cat][f"{run} router"] == f"{v:.1%}"
    assert "lora_mixed router" not in acc["overall"]  # no label-aligned router
    for run in ("moa", "lora_mixed", "mop"):
        e = json.loads((FIX / run / "eval.json").read_text())
        assert params[run]["trainable"] == f"{e['trainable_parameters']:,}"
        assert params[run]["base (frozen)"] == f"{e['parameters']['base']:,}"


def test_config_data_and_pruning_tables(report):
    _, _, md, _ = report
    cfg = _md_table(md, "run", after="## Configuration")
    # the mixture each method applied, not the section config.yaml records (all four say "lora / task", 8)
    assert (cfg["moa"]["method"], cfg["moa"]["expert / router"], cfg["moa"]["experts"]) == ("moa", "lora / task", "8")
    assert (cfg["lora_mixed"]["expert / router"], cfg["lora_mixed"]["experts"]) == ("lora / single", "1")
    assert cfg["lora_mixed"]["expert size"] == "rank 8"
    assert (cfg["mop"]["expert / router"], cfg["mop"]["experts"]) == ("prompt / gate", "8")
    assert cfg["mop"]["expert size"].endswith(" tokens")
    assert cfg["mop"]["steps"] == "4" and cfg["mop"]["data"].startswith("built-in synthetic suite")
    data = _md_table(md, "run", after="| run | source |")
    split = json.loads((FIX / "moa" / "data_report.json").read_text())["splits"]
    assert [data["moa"][s] for s in ("train", "validation", "test")] == [str(split[s]) for s in split]
    pruned = _md_table(md, "model", after="## Pruning")
    assert set(pruned) == {"magnitude-50", "magnitude-75", "wanda-50", "wanda-75"}
    w = json.loads((FIX / "pruned" / "wanda-75" / "prune_report.json").read_text())
    assert pruned["wanda-75"]["PPL after"] == f"{w['ppl_after']:.3f}"
    assert pruned["wanda-75"]["achieved sparsity"] == f"{w['overall_sparsity']:.1%}"


def test_partial_run_lists_what_is_missing_and_renders_the_rest(report):
    _, html, md, warnings = report
    partial = [w for w in warnings if "partial" in w]
    for name in ("data_report.json", "gates.json", "eval.json"):
        assert any(f"{name} missing" in w for w in partial), partial
    assert any("mixroute eval" in w for w in partial)
    assert not [w for w in warnings if "partial" not in w]  # the complete runs are complete
    assert 'class="note warning"' in html and "partial: " in html and "eval.json missing" in html
    assert "ppl_per_category_3_partial.png" in md  # its curves are still drawn


def test_missing_and_broken_inputs_do_not_stop_the_report(tmp_path):
    run = tmp_path / "broken"
    shutil.copytree(FIX / "partial", run)
    (run / "gates.json").write_text("{not json")
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 9, "loss": 1.0')  # a line being written: ignored silently
    warnings: list[str] = []
    html = write_report([run], tmp_path / "out", warn=warnings.append).read_text()
    assert any("gates.json is not valid JSON" in w for w in warnings)
    assert not any("metrics.jsonl" in w for w in warnings)
    assert "No run has gates.json snapshots yet" in html and "No run has an eval.json yet" in html
    with pytest.raises(ReportError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "out")


def test_layer_selection(tmp_path, monkeypatch):
    """--layer N picks that layer's matrix, --layer all adds a selector, an absent layer warns and falls back
    (the renderer is stubbed: the real one is exercised by the full report)."""
    from mixroute.report import plots

    calls = []
    monkeypatch.setattr(plots, "gate_heatmap", lambda name, gates, layer=None: calls.append(layer) or b"\x89PNG")
    run = tmp_path / "moa"
    run.mkdir()
    shutil.copy(FIX / "moa" / "gates.json", run)
    html = write_report([run], tmp_path / "one", layer=1, warn=lambda m: None).read_text()
    assert calls == ["1"] and "gates_0_moa_layer1" in html
    calls.clear()
    html = write_report([run], tmp_path / "all", layer="all", warn=lambda m: None).read_text()
    assert calls == [None, "0", "1"]
    assert '<select data-group="gates_0_moa"' in html and html.count('data-fig-group="gates_0_moa"') == 3
    calls.clear()
    warnings: list[str] = []
    html = write_report([run], tmp_path / "bad", layer=7, warn=warnings.append).read_text()
    assert calls == [None] and any("no per-layer gates for layer 7 (available: 0, 1)" in w for w in warnings)


def test_federated_rounds_are_plotted(tmp_path):
    run = tmp_path / "fed"
    run.mkdir()
    rows = [{"round": r, "ppl": 30.0 / r, "ppl_per_category": {"a": 40.0 / r, "b": 20.0 / r},
             "bytes_up": 2_000_000 * r, "bytes_down": 1_000_000} for r in (1, 2, 3)]
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    html = write_report([run], out, warn=lambda m: None).read_text()
    assert "Federated rounds" in html and _png_size((out / "rounds_0_fed.png").read_bytes())[0] > 300


def test_cli_exit_codes(tmp_path):
    missing = runner.invoke(app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert runner.invoke(app, ["report", str(f)]).exit_code == 2
    bad_layer = runner.invoke(app, ["report", str(FIX / "moa"), "--layer", "first"])
    assert bad_layer.exit_code == 2 and "--layer" in bad_layer.output
    help_text = runner.invoke(app, ["report", "--help"], terminal_width=200).output
    assert "--watch" in help_text and "Examples" in help_text


def test_cli_report_of_a_partial_run(tmp_path):
    run = tmp_path / "partial"
    shutil.copytree(FIX / "partial", run)
    res = runner.invoke(app, ["report", str(run)], terminal_width=300)
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "eval.json missing" in res.output
    assert (run / "report" / "report.html").is_file() and (run / "report" / "report.md").is_file()


def test_watch_regenerates_when_metrics_grow(tmp_path):
    """A real writer thread appends a validation line while `mixroute report --watch` polls."""
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(FIX / "partial", run)
    (run / "metrics.jsonl").write_text("\n".join((FIX / "partial" / "metrics.jsonl").read_text()
                                                 .splitlines()[:3]) + "\n")  # validation at 0, steps 1-2
    first: dict[str, str] = {}

    def writer() -> None:
        deadline = time.time() + 60
        while not (out / "report.html").exists() and time.time() < deadline:
            time.sleep(0.05)
        first["html"] = (out / "report.html").read_text()
        with (run / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps({"step": 3, "loss": 10.5, "lm_loss": 10.5, "aux_loss": 0.0, "lr": 0.02,
                                 "tokens_per_s": 300.0, "time": time.time()}) + "\n")

    t = threading.Thread(target=writer)
    t.start()
    res = runner.invoke(app, ["report", str(run), "--out", str(out), "--watch", "--interval", "0.2",
                              "--max-updates", "1"], terminal_width=300)
    t.join(timeout=60)
    assert res.exit_code == 0, res.output
    assert "update 1: rewrote" in res.output
    assert res.output.count("eval.json missing") == 1  # warned once, not at every rewrite
    assert "<td>step 2, validation at step 0</td>" in first["html"]
    html = (out / "report.html").read_text()
    assert "<td>step 3, validation at step 0</td>" in html and 'http-equiv="refresh"' in html


def test_tensorboard_logger_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="optional extra: pip install 'mixroute[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mixroute.train.tb import TensorBoardLogger

    tb = TensorBoardLogger(tmp_path)
    assert not (tmp_path / "tb").exists()  # nothing written before the first scalar
    tb.log(1, {"train/loss": 2.5, "train/lr": 0.01, "note": "text", "missing": None, "bad": float("nan")})
    tb.log(2, {"train/loss": 2.0})
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "train/lr"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]


def test_tensorboard_logger_without_tensorboard_raises_import_error(tmp_path, monkeypatch):
    from mixroute.train.tb import TensorBoardLogger

    monkeypatch.setitem(sys.modules, "tensorboard.compat.proto.event_pb2", None)
    with pytest.raises(ImportError, match=r"pip install 'mixroute\[tensorboard\]'"):
        TensorBoardLogger(tmp_path)


def test_package_import_is_light():
    code = ("import sys, mixroute.report, mixroute.cli.report; "
            "heavy = [m for m in ('matplotlib', 'torch', 'tensorboard') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_configuration_table_shows_a_config_it_cannot_read_as_written():
    """A config.yaml this version rejects (an unknown key) still gets a row: its mixture section as written."""
    import yaml

    from mixroute.report.runs import RunInfo
    from mixroute.report.tables import applied_mixture

    config = yaml.safe_load((FIX / "lora_mixed" / "config.yaml").read_text())
    assert applied_mixture(RunInfo("r", FIX, config=config))["router"] == "single"   # readable: as applied
    config["train"]["no_such_key"] = 1
    assert applied_mixture(RunInfo("r", FIX, config=config)) == {
        "expert": "lora", "router": "task", "num_experts": 8, "size": "rank 8"}


def test_the_configuration_table_names_the_base_model():
    """model.name null is the embedded SmolLM2, not "-" (nor "None")."""
    from mixroute.report.tables import base_model_label

    assert base_model_label({"model": {"name": None}}).startswith("SmolLM2-135M-Instruct (embedded")
    assert base_model_label({"model": {}}).startswith("SmolLM2-135M-Instruct")
    assert base_model_label({"model": {"name": "models/smol-w75"}}) == "models/smol-w75"
    assert base_model_label({"model": {"name": "tiny"}}) == "tiny random Llama (tests)"
    assert base_model_label(None) == "-"
