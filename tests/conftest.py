"""Shared fixtures. Tests use the tiny random Llama; tests marked `integration` use the real embedded model."""

import pytest
import torch

torch.set_num_threads(2)


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
