"""`mixroute federate` from a fresh clone: a Dolly preset without the file says what Dolly-15k is and how to
point at it, and the failed start leaves nothing that would block its own retry."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mixroute.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_a_missing_dolly_file_is_explained_and_the_retry_is_not_blocked(tmp_path):
    out = tmp_path / "fed"
    args = ["federate", str(ROOT / "configs" / "fed_mop_skew.yaml"),
            f"data.path={tmp_path / 'databricks-dolly-15k.jsonl'}", f"output_dir={out}"]
    for attempt in range(2):   # the second attempt fails on the data again, not on "already holds a run"
        res = CliRunner().invoke(app, args)
        text = " ".join(res.output.split())
        assert res.exit_code == 2, res.output
        assert "file not found" in text and "databricks/databricks-dolly-15k" in text, text
        assert "data.path=null" in text and "already holds a run" not in text, text
        assert not out.exists() or not any(out.iterdir()), f"attempt {attempt} left {list(out.iterdir())}"


def test_a_gpu_this_machine_lacks_is_refused_before_a_run_directory_exists(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same answer on a GPU machine
    out = tmp_path / "fed"
    res = CliRunner().invoke(app, ["federate", str(ROOT / "configs" / "fed_lora_skew.yaml"), "model.name=tiny",
                                   "data.path=null", f"output_dir={out}", "--device", "cuda"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "federated.device" in text and "no CUDA GPU" in text and "--device cpu" in text, text
    assert not out.exists()


def test_each_simulated_client_gets_a_gpu_share_only_on_cuda(monkeypatch):
    """Ray hides GPUs from a task given num_gpus=0: on cuda every client needs a share. (No GPU here: torch's
    view of the machine is what is replaced, the arithmetic and the checks are the real ones.)"""
    import torch

    from mixroute.config import FederatedConfig
    from mixroute.federated.runner import client_resources

    assert client_resources(FederatedConfig(clients=8)) == {"num_cpus": 1.0, "num_gpus": 0.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert client_resources(FederatedConfig(clients=8, device="cuda"))["num_gpus"] == 0.25
    assert client_resources(FederatedConfig(clients=1, device="cuda"))["num_gpus"] == 1.0
    assert client_resources(FederatedConfig(clients=8, device="cuda", gpus_per_client=0.5))["num_gpus"] == 0.5
    assert client_resources(FederatedConfig(clients=8, device="cpu", gpus_per_client=0.5))["num_gpus"] == 0.0


def test_flower_and_ray_notices_are_kept_out_and_other_warnings_are_not(monkeypatch):
    import importlib
    import logging
    import warnings

    from flwr.supercore.logger import log

    from mixroute.federated.runner import without_runtime_notices

    flwr_sim = importlib.import_module("flwr.simulation.run_simulation")   # the package re-exports the function
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logging.getLogger("flwr").addHandler(handler)
    monkeypatch.setattr(flwr_sim, "_run_simulation", lambda **kw: None)   # the notice, not the Ray runtime
    monkeypatch.setattr(flwr_sim, "event", lambda *a, **kw: None)
    try:
        flwr_sim.run_simulation(server_app=None, client_app=None, num_supernodes=1)
        assert any("run_simulation" in m and "DEPRECATED" in m for m in seen), seen   # Flower still says it
        seen.clear()
        with without_runtime_notices():
            flwr_sim.run_simulation(server_app=None, client_app=None, num_supernodes=1)
            log(logging.WARNING, "DEPRECATED FEATURE: %s", "something else")
            log(logging.WARNING, "a client timed out")
        assert seen == ["DEPRECATED FEATURE: something else", "a client timed out"], seen
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with without_runtime_notices():
                warnings.warn("Tip: In future versions of Ray, Ray will no longer override accelerator visible "
                              "devices "
                              "env var if num_gpus=0", FutureWarning)
                warnings.warn("something else", FutureWarning)
        assert [str(w.message) for w in caught] == ["something else"]
    finally:
        logging.getLogger("flwr").removeHandler(handler)
