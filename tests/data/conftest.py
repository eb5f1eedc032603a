"""The embedded SmolLM2 tokenizer, with a pad token, for the data tests."""

import pytest


@pytest.fixture(scope="session")
def tok():
    from mixroute.models import embedded_tokenizer

    t = embedded_tokenizer()
    if t.pad_token is None:
        t.pad_token = t.eos_token
    return t
