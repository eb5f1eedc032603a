"""Shared fixtures. Tests use the tiny random Llama; tests marked `integration` use the real embedded model."""

import os

import pytest
import torch

# make test-fast runs one worker per core (pytest-xdist): each worker then takes one thread, as two threads per
# worker would oversubscribe the cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models of many families: one thread is faster than two threads synchronising, many times so on
    shared cores (for the rest of the module that uses it)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the tiny random Llama with the real SmolLM2 tokenizer. Do not mutate the model in
    place; use `fresh_tiny` for tests that attach adapters."""
    from mixroute.models import tiny_model

    return tiny_model(seed=0)


@pytest.fixture
def fresh_tiny():
    from mixroute.models import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def smollm():
    """The real embedded SmolLM2-135M-Instruct (converted once into the mixroute cache)."""
    from mixroute.models import load_base_model

    return load_base_model()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A trained tiny MoA run directory (2 steps, 8 label-aligned experts): what the serving tests serve."""
    from pathlib import Path

    from mixroute.config import load_config
    from mixroute.train import train

    out = tmp_path_factory.mktemp("serve") / "tiny_moa"
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "moa.yaml"),
                      ["model.name=tiny", "data.synthetic_per_task=6", "data.max_length=48", "train.max_steps=2",
                       "train.stage1_steps=1", "train.eval_every=0", "train.save_every=0", f"output_dir={out}"])
    return str(train(cfg, progress=False))
